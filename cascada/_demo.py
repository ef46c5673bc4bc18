"""``cascada run text``: a small two-tier text cascade in four processes, standard library only.

(This was the first ``cascada demo``; the demo is now F1, the digits cascade.)

    driver ──ask──▶ Router ──ask──▶ cheap Expert   (keyword heuristic)
       ▲              │   ──ask──▶ Verifier        (accept when confident)
       └───stream─────┘   ──ask──▶ big Expert      (bag-of-words nearest centroid)

Documents are paragraphs of Python's own reference topics (``pydoc_data.topics``) and the
label is the reference chapter they come from, so the answers can be checked. The Router
holds the refs of the other three, so a document travels process to process without the
driver in between; the driver only pushes documents and watches a progress stream.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .actors import Actor, ActorRef, ActorSystem, CascadaError, concurrent, run

IN_FLIGHT = 64  # documents the driver keeps in the cascade at once
THRESHOLD = 0.5  # the Verifier accepts a cheap answer at or above this confidence
MIN_WORDS = 12  # shorter paragraphs are headings or code fragments, not documents

# The reference chapter of every pydoc topic. Topics a Python version adds that are not listed
# here are left out, so the corpus is the same list of documents on every run.
CHAPTERS: dict[str, str] = {
    "statements": "assert assignment async augassign break class compound continue del else for function "
                  "global if import nonlocal pass raise return try while with",
    "expressions": "atom-identifiers atom-literals attribute-references await binary bitwise booleans calls "
                   "comparisons conversions exprlists in lambda operator-summary power shifting slicings "
                   "subscriptions unary yield",
    "lexical": "floating formatstrings id-classes identifiers imaginary integers numbers strings",
    "data model": "attribute-access callable-types context-managers customization numeric-types objects "
                  "sequence-types specialattrs specialnames types",
    "builtin types": "bltin-code-objects bltin-ellipsis-object bltin-null-object bltin-type-objects dict lists "
                     "string-methods truth typesfunctions typesmapping typesmethods typesmodules typesseq "
                     "typesseq-mutable",
    "execution": "debugger dynamic-features exceptions execmodel naming",
}
CHAPTER_OF: dict[str, str] = {topic: chapter for chapter, topics in CHAPTERS.items() for topic in topics.split()}

# What the cheap tier looks for: a few telling words per chapter.
KEYWORDS: dict[str, frozenset[str]] = {
    "statements": frozenset("statement statements clause suite executed loop target finally except".split()),
    "expressions": frozenset("expression expressions operator operators operand operands yields comparison "
                             "comparisons precedence primary equality".split()),
    "lexical": frozenset("literal literals digit digits character escape escapes backslash quote format "
                         "formatted field identifiers unicode prefix width alignment".split()),
    "data model": frozenset("method methods called instance instances attribute attributes special should "
                            "invoked".split()),
    "builtin types": frozenset("string strings sequence sequences dictionary dict key keys values items list "
                               "lists copy empty mapping".split()),
    "execution": frozenset("debugger pdb breakpoint command commands frame scope namespace local global "
                           "resolved binding module program".split()),
}

# The chapter each keyword points to (the keyword sets do not overlap).
CHAPTER_OF_KEYWORD: dict[str, str] = {word: chapter for chapter, keys in KEYWORDS.items() for word in keys}

_WORD = re.compile(r"[a-z_][a-z0-9_]*")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Document:
    id: int
    chapter: str  # the truth, known to the driver only
    text: str


def load_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return {name: text for name, text in sorted(topics.items()) if name in CHAPTER_OF}


def load_documents(n: int) -> list[Document]:
    """n documents, the same on every run: one paragraph of each topic in turn (so that even
    a short run sees every chapter), cycling once all paragraphs are used."""
    per_topic = [
        [(CHAPTER_OF[name], p.strip()) for p in re.split(r"\n\s*\n", text) if len(p.split()) >= MIN_WORDS]
        for name, text in load_topics().items()
    ]
    depth = max(map(len, per_topic))
    pool = [paragraphs[i] for i in range(depth) for paragraphs in per_topic if i < len(paragraphs)]
    return [Document(i, *pool[i % len(pool)]) for i in range(n)]


# -- the actors ------------------------------------------------------------------------------


class CheapExpert(Actor):
    """Counts chapter keywords: microseconds per document, right only when the words are
    unambiguous, so its confidence is the share of hits that agree, damped when hits are few."""

    async def classify(self, text: str) -> list[Any]:
        hits = Counter({chapter: 0 for chapter in KEYWORDS})
        hits.update(CHAPTER_OF_KEYWORD[w] for w in words(text) if w in CHAPTER_OF_KEYWORD)
        total = sum(hits.values())
        if total == 0:
            return ["statements", 0.0]
        chapter, top = hits.most_common(1)[0]  # ties go to the first chapter: deterministic
        return [chapter, round(top / total * min(1.0, total / 4), 4)]


class BigExpert(Actor):
    """TF-IDF nearest centroid over every topic: over ten times the work of the cheap tier
    per document. The centroids are built at start, in the actor's own process."""

    async def on_start(self) -> None:
        counts = {name: Counter(words(text)) for name, text in load_topics().items()}
        df = Counter(word for c in counts.values() for word in c)
        self._idf = {word: math.log(len(counts) / n) + 1.0 for word, n in df.items()}
        self._centroids = {name: _unit({w: tf * self._idf[w] for w, tf in c.items()}) for name, c in counts.items()}

    async def classify(self, text: str) -> list[Any]:
        doc = _unit({w: tf * self._idf.get(w, 0.0) for w, tf in Counter(words(text)).items()})
        best, score = "", -1.0
        for name, centroid in self._centroids.items():
            s = sum(weight * centroid.get(word, 0.0) for word, weight in doc.items())
            if s > score:
                best, score = name, s
        return [CHAPTER_OF[best], round(score, 4)]


def _unit(vector: dict[str, float]) -> dict[str, float]:
    norm = math.sqrt(sum(v * v for v in vector.values())) or 1.0
    return {k: v / norm for k, v in vector.items()}


class Verifier(Actor):
    """Decides whether a cheap answer stands. A separate actor so that the policy can change
    (or become a model of its own) without touching the Router or the experts."""

    def __init__(self, threshold: float) -> None:
        self._threshold = threshold

    async def accept(self, chapter: str, confidence: float) -> bool:
        return chapter in KEYWORDS and confidence >= self._threshold


class Router(Actor):
    """Runs the cascade for each document and publishes progress as a stream."""

    def __init__(self, cheap: ActorRef, big: ActorRef, verifier: ActorRef) -> None:
        self._cheap, self._big, self._verifier = cheap, big, verifier

    async def on_start(self) -> None:
        self._routed = 0
        self._changed = asyncio.Event()

    @concurrent  # many documents are in the cascade at once; each waits on other processes
    async def route(self, doc_id: int, text: str) -> list[Any]:
        chapter, confidence = await self._cheap.ask("classify", text)
        tier = "cheap"
        if not await self._verifier.ask("accept", chapter, confidence):
            chapter, confidence = await self._big.ask("classify", text)
            tier = "big"
        self._routed += 1
        self._changed.set()
        return [doc_id, chapter, tier]

    @concurrent  # it runs for the whole push, beside the route calls it reports on
    async def progress(self, total: int, steps: int = 100) -> AsyncIterator[int]:
        """Yield how many documents were routed since the call, every total/steps of them,
        and a last time at total."""
        start, step = self._routed, max(1, total // steps)
        mark = 0
        while True:
            done = self._routed - start
            if done >= mark or done >= total:
                yield min(done, total)
                if done >= total:
                    return
                mark = (done // step + 1) * step
            self._changed.clear()
            await self._changed.wait()


# -- the driver ------------------------------------------------------------------------------


@dataclass
class ActorFigures:
    name: str
    role: str
    pid: int
    handled: int


@dataclass
class Figures:
    requests: int
    driver_pid: int
    in_flight: int
    threshold: float
    actors: list[ActorFigures]
    distinct_processes: int
    cheap: int
    escalated: int
    cheap_fraction: float
    correct_cheap: int
    correct_big: int
    elapsed_s: float
    throughput_docs_per_s: float
    latency_ms: dict[str, float] = field(default_factory=dict)


ROLES = {
    "router": "routes documents, streams progress",
    "cheap": "keyword heuristic expert",
    "verifier": f"accepts confidence >= {THRESHOLD}",
    "big": "TF-IDF nearest-centroid expert",
}


class Progress:
    """One line rewritten in place on a terminal; a line per quarter in a log."""

    def __init__(self, total: int) -> None:
        self._total = max(1, total)
        self._tty = sys.stderr.isatty()
        self._shown = -1

    def update(self, done: int) -> None:
        pct = 100 * done // self._total
        if self._tty:
            sys.stderr.write(f"\r  routing  {pct:3d}%  ({done}/{self._total})")
            if done >= self._total:
                sys.stderr.write("\n")
        elif pct // 25 > self._shown:
            self._shown = pct // 25
            sys.stderr.write(f"  routing  {pct:3d}%  ({done}/{self._total})\n")
        sys.stderr.flush()


async def _watch(router: ActorRef, total: int) -> None:
    progress = Progress(total)
    async for done in router.stream("progress", total):
        progress.update(done)


async def _push(router: ActorRef, docs: Sequence[Document]) -> tuple[list[list[Any]], list[float]]:
    """Ask the Router for every document, IN_FLIGHT at a time; the answers and per-document
    latencies (seconds), both in document order."""
    answers: list[list[Any]] = [[] for _ in docs]
    latencies = [0.0] * len(docs)
    todo = iter(docs)

    # A fixed pool of senders rather than a task per document behind a semaphore: memory and
    # cancellation on Ctrl-C stay proportional to IN_FLIGHT, not to the number of documents.
    async def sender() -> None:
        for doc in todo:  # one shared iterator: each document goes to exactly one sender
            t = time.perf_counter()
            answers[doc.id] = await router.ask("route", doc.id, doc.text, timeout=60.0)
            latencies[doc.id] = time.perf_counter() - t

    await asyncio.gather(*(sender() for _ in range(min(IN_FLIGHT, len(docs)))))
    return answers, latencies


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def _run(requests: int) -> Figures:
    docs = load_documents(requests)
    # The forkserver imports this module once, so each actor process starts as a cheap fork.
    async with ActorSystem(preload=["cascada._demo", "pydoc_data.topics"]) as system:
        cheap = await system.spawn(CheapExpert, name="cheap", placement="process")
        big = await system.spawn(BigExpert, name="big", placement="process")
        verifier = await system.spawn(Verifier, THRESHOLD, name="verifier", placement="process")
        router = await system.spawn(Router, cheap, big, verifier, name="router", placement="process")
        refs = [router, cheap, verifier, big]

        watcher = asyncio.ensure_future(_watch(router, len(docs)))
        t0 = time.perf_counter()
        try:
            answers, latencies = await _push(router, docs)
            elapsed = time.perf_counter() - t0
            await asyncio.wait_for(watcher, 10.0)
        finally:
            watcher.cancel()

        actors = []
        for ref in refs:
            stats = await system.stats(ref)
            handled = sum(a["handled"] for a in stats["actors"] if a["name"] == ref.name)
            actors.append(ActorFigures(ref.name, ROLES[ref.name], stats["pid"], handled))

    by_tier = Counter(tier for _, _, tier in answers)
    correct = Counter(tier for (doc_id, chapter, tier) in answers if chapter == docs[doc_id].chapter)
    n = len(docs)
    return Figures(
        requests=n, driver_pid=os.getpid(), in_flight=IN_FLIGHT, threshold=THRESHOLD, actors=actors,
        distinct_processes=len({os.getpid(), *(a.pid for a in actors)}),  # the claim, checked
        cheap=by_tier["cheap"], escalated=by_tier["big"], cheap_fraction=round(by_tier["cheap"] / max(1, n), 4),
        correct_cheap=correct["cheap"], correct_big=correct["big"],
        elapsed_s=round(elapsed, 3), throughput_docs_per_s=round(n / elapsed, 1) if elapsed > 0 else 0.0,
        latency_ms={"p50": round(_percentile(latencies, 0.50) * 1e3, 2),
                    "p95": round(_percentile(latencies, 0.95) * 1e3, 2)},
    )


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:5.1f}%" if whole else "    -"


def render(f: Figures) -> str:
    n = f.requests
    lines = [
        "",
        f"cascada run text: {f.requests} documents through a {len(f.actors)}-actor cascade, {f.in_flight} in flight",
        "",
        f"  {'actor':<10} {'role':<34} {'pid':>8} {'handled':>8}",
        f"  {'driver':<10} {'pushes documents, reads progress':<34} {f.driver_pid:>8} {'-':>8}",
    ]
    lines += [f"  {a.name:<10} {a.role:<34} {a.pid:>8} {a.handled:>8}" for a in f.actors]
    lines += [
        f"  {f.distinct_processes} distinct processes (plus the forkserver that forked the actors)",
        "",
        f"  documents     {f.requests:>8}",
        f"  cheap tier    {f.cheap:>8}  {_share(f.cheap, n)}   correct {_share(f.correct_cheap, f.cheap)}",
        f"  escalated     {f.escalated:>8}  {_share(f.escalated, n)}   correct {_share(f.correct_big, f.escalated)}",
        "  (correct: the answer is the reference chapter the paragraph comes from)",
        f"  throughput    {f.throughput_docs_per_s:>8.0f}  docs/s   ({f.elapsed_s:.2f} s)",
        f"  latency p50   {f.latency_ms['p50']:>8.2f}  ms",
        f"  latency p95   {f.latency_ms['p95']:>8.2f}  ms",
        "",
    ]
    return "\n".join(lines)


def main(requests: int = 2000, json_path: str | None = None) -> int:
    if requests < 1:
        print("cascada run text: --requests must be at least 1", file=sys.stderr)
        return 2
    try:
        figures = run(_run(requests))
    except CascadaError as exc:
        print(f"cascada run text failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ncascada run text: interrupted", file=sys.stderr)
        return 130
    print(render(figures))
    if json_path:
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(asdict(figures), fh, indent=2)
            fh.write("\n")
    return 0
