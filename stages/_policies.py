"""Routing policies: small objects that turn scores or features into chosen edges.

Every policy has ``edges`` (the names it can choose) and ``decide(x) -> [(edge, weight)]``:
zero, one or several edges with a weight each. A single choice has weight 1.0; top-k gating
gives the renormalised gate probabilities. Policies are plain picklable objects, so they
travel to a ``Router`` actor's process as constructor arguments.

Scores may be lists of numbers, torch tensors or numpy arrays (anything with ``tolist()``);
a ``[1, V]`` row counts as one vector. Policies never import torch themselves.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..actors import ConfigurationError
from ._errors import RoutingError, StageInputError

Decision = list[tuple[str, float]]
"""What a policy decides: each chosen edge with its weight."""


@runtime_checkable
class Policy(Protocol):
    """What a Router needs from a policy."""

    @property
    def edges(self) -> tuple[str, ...]: ...

    def decide(self, x: Any) -> Decision: ...


# -- inputs ------------------------------------------------------------------------------


def as_scores(x: Any, where: str) -> list[float] | float:
    """A scalar or a flat vector of finite floats from a number, a sequence, a tensor or an
    array (a single ``[1, V]`` row is flattened). Raises StageInputError otherwise."""
    if hasattr(x, "tolist") and callable(x.tolist):
        x = x.tolist()
    if isinstance(x, (list, tuple)) and len(x) == 1 and isinstance(x[0], (list, tuple)):
        x = x[0]
    if isinstance(x, bool):
        raise StageInputError(f"{where}: expected a score or a vector of scores, got a bool")
    if isinstance(x, (int, float)):
        value = float(x)
        if not math.isfinite(value):
            raise StageInputError(f"{where}: the score is {value}; scores must be finite")
        return value
    if isinstance(x, (list, tuple)):
        if not x:
            raise StageInputError(f"{where}: the score vector is empty")
        out: list[float] = []
        for i, v in enumerate(x):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise StageInputError(f"{where}: element {i} of the score vector is {type(v).__name__}, "
                                      "not a number (pass a flat vector, or one [1, V] row)")
            f = float(v)
            if not math.isfinite(f):
                raise StageInputError(f"{where}: element {i} of the score vector is {f}; scores must be finite")
            out.append(f)
        return out
    raise StageInputError(f"{where}: expected a number, a sequence of numbers, a tensor or an array, "
                          f"got {type(x).__name__}")


def as_probs(x: Any, where: str) -> list[float]:
    """A probability vector (non-negative). A scalar p counts as the binary vector [1-p, p]."""
    s = as_scores(x, where)
    probs = [1.0 - s, s] if isinstance(s, float) else s
    for i, p in enumerate(probs):
        if p < 0.0 or p > 1.0 + 1e-9:
            raise StageInputError(f"{where}: probability {i} is {p}, outside [0, 1] (pass probabilities, "
                                  "not logits: apply a softmax first)")
    return probs


def _check_prob(name: str, value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ConfigurationError(f"{where}: {name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_edge_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"{where}: edge names must be non-empty strings, got {name!r}")
    return name


def _check_edges(edges: Sequence[str], where: str, *, allow_empty: bool = False) -> tuple[str, ...]:
    if isinstance(edges, str):
        raise ConfigurationError(f"{where}: edges must be a sequence of names, not one string {edges!r}")
    out = tuple(_check_edge_name(e, where) for e in edges)
    if not out and not allow_empty:
        raise ConfigurationError(f"{where}: at least one edge is needed")
    if len(set(out)) != len(out):
        dup = sorted({e for e in out if out.count(e) > 1})
        raise ConfigurationError(f"{where}: edge names must be unique; repeated: {dup}")
    return out


# -- confidence threshold ------------------------------------------------------------------


class ConfidenceThreshold:
    """Accept at this tier when the confidence reaches ``threshold``, else escalate.

    ``decide(probs)`` returns ``[(accept, 1.0)]`` when ``max(probs) >= threshold`` and
    ``[(escalate, 1.0)]`` otherwise. A scalar input is taken as the confidence itself (a
    calibrated score in [0, 1]); a vector as class probabilities."""

    def __init__(self, threshold: float, *, accept: str = "accept", escalate: str = "escalate") -> None:
        where = "ConfidenceThreshold"
        self.threshold = _check_prob("threshold", threshold, where)
        self.accept = _check_edge_name(accept, where)
        self.escalate = _check_edge_name(escalate, where)
        _check_edges((accept, escalate), where)

    @property
    def edges(self) -> tuple[str, ...]:
        return (self.accept, self.escalate)

    def confidence(self, x: Any) -> float:
        s = as_scores(x, "ConfidenceThreshold.decide")
        if isinstance(s, float):
            if not 0.0 <= s <= 1.0:
                raise StageInputError(f"ConfidenceThreshold.decide: a scalar confidence must be in [0, 1], got {s}")
            return s
        return max(as_probs(s, "ConfidenceThreshold.decide"))

    def decide(self, x: Any) -> Decision:
        return [(self.accept if self.confidence(x) >= self.threshold else self.escalate, 1.0)]

    def __repr__(self) -> str:
        return f"ConfidenceThreshold({self.threshold!r}, accept={self.accept!r}, escalate={self.escalate!r})"


# -- window around the decision boundary ----------------------------------------------------


class Window:
    """Escalate only inputs that fall inside a window around the decision boundary (the
    seed's window-based early-exit cascades): confident predictions on either side exit.

    - A scalar score s escalates when ``|s - boundary| < width`` (a binary classifier's
      probability of the positive class, boundary 0.5).
    - A probability vector escalates when half the margin between its two largest
      probabilities is below ``width``: ``(p1 - p2) / 2 < width``. For ``[1 - p, p]`` that is
      exactly ``|p - 0.5| < width``, so both forms agree on binary problems.

    ``Window.between(low, high)`` builds the window ``low < s < high`` for scalar scores."""

    def __init__(self, width: float, *, boundary: float = 0.5, accept: str = "accept",
                 escalate: str = "escalate") -> None:
        where = "Window"
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not (0.0 <= width < math.inf):
            raise ConfigurationError(f"{where}: width must be a finite number >= 0, got {width!r}")
        if isinstance(boundary, bool) or not isinstance(boundary, (int, float)) or not math.isfinite(boundary):
            raise ConfigurationError(f"{where}: boundary must be a finite number, got {boundary!r}")
        self.width = float(width)
        self.boundary = float(boundary)
        self.accept = _check_edge_name(accept, where)
        self.escalate = _check_edge_name(escalate, where)
        _check_edges((accept, escalate), where)

    @classmethod
    def between(cls, low: float, high: float, *, accept: str = "accept", escalate: str = "escalate") -> Window:
        """The window ``low < s < high`` on a scalar score."""
        if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and low <= high):
            raise ConfigurationError(f"Window.between: need numbers low <= high, got {low!r}, {high!r}")
        return cls((high - low) / 2.0, boundary=(high + low) / 2.0, accept=accept, escalate=escalate)

    @property
    def edges(self) -> tuple[str, ...]:
        return (self.accept, self.escalate)

    def distance(self, x: Any) -> float:
        """How far the input lies from the boundary (the quantity compared with ``width``)."""
        s = as_scores(x, "Window.decide")
        if isinstance(s, float):
            return abs(s - self.boundary)
        probs = as_probs(s, "Window.decide")
        if len(probs) < 2:
            raise StageInputError("Window.decide: a probability vector needs at least two classes")
        top = sorted(probs, reverse=True)
        return (top[0] - top[1]) / 2.0

    def decide(self, x: Any) -> Decision:
        return [(self.escalate if self.distance(x) < self.width else self.accept, 1.0)]

    def __repr__(self) -> str:
        return f"Window({self.width!r}, boundary={self.boundary!r})"


# -- top-k gating (MoE) ---------------------------------------------------------------------


@dataclass(frozen=True)
class Gate:
    """A top-k gating decision: the chosen experts with renormalised weights (largest
    first), and the softmax probabilities over every expert (for load statistics and
    auxiliary losses)."""

    choices: Decision
    probs: list[float]


def softmax(xs: Sequence[float], temperature: float = 1.0) -> list[float]:
    m = max(xs)
    exps = [math.exp((x - m) / temperature) for x in xs]
    total = math.fsum(exps)
    return [e / total for e in exps]


class TopK:
    """Mixture-of-experts gating: softmax over the gate logits, keep the k largest,
    renormalise their weights to sum to 1. Ties go to the lower expert index.

    ``experts`` is a list of edge names, or a count n for the names ``expert_0`` ...
    ``expert_{n-1}``."""

    def __init__(self, k: int, experts: int | Sequence[str], *, temperature: float = 1.0) -> None:
        where = "TopK"
        if isinstance(experts, bool):
            raise ConfigurationError(f"{where}: experts must be a count or a list of names, got {experts!r}")
        if isinstance(experts, int):
            if experts < 1:
                raise ConfigurationError(f"{where}: need at least one expert, got {experts}")
            names: tuple[str, ...] = tuple(f"expert_{i}" for i in range(experts))
        else:
            names = _check_edges(experts, where)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(names):
            raise ConfigurationError(f"{where}: k must be an integer in [1, {len(names)}] (the number of experts), "
                                     f"got {k!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                0.0 < temperature < math.inf):
            raise ConfigurationError(f"{where}: temperature must be a positive finite number, got {temperature!r}")
        self.k = k
        self.experts = names
        self.temperature = float(temperature)

    @property
    def edges(self) -> tuple[str, ...]:
        return self.experts

    def gate(self, logits: Any) -> Gate:
        s = as_scores(logits, "TopK.gate")
        if isinstance(s, float) or len(s) != len(self.experts):
            n = 1 if isinstance(s, float) else len(s)
            raise StageInputError(f"TopK.gate: got {n} gate logits for {len(self.experts)} experts")
        probs = softmax(s, self.temperature)
        order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))[: self.k]
        total = math.fsum(probs[i] for i in order)
        return Gate([(self.experts[i], probs[i] / total) for i in order], probs)

    def decide(self, x: Any) -> Decision:
        return self.gate(x).choices

    def gate_tensor(self, logits: Any) -> tuple[Any, Any, Any]:
        """Batched gating on a torch tensor of logits ``[N, E]``: returns ``(indices [N, k],
        weights [N, k], probs [N, E])``, weights renormalised over the k chosen experts."""
        import torch

        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] != len(self.experts):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise StageInputError(f"TopK.gate_tensor: expected a tensor [N, {len(self.experts)}], got {shape}")
        x = logits if logits.is_floating_point() else logits.float()
        probs = torch.softmax(x / self.temperature, dim=-1)
        weights, indices = torch.topk(probs, self.k, dim=-1)
        return indices, weights / weights.sum(dim=-1, keepdim=True), probs

    def __repr__(self) -> str:
        return f"TopK({self.k}, {list(self.experts)!r})"


# -- content key ------------------------------------------------------------------------------


def _key_bytes(key: Any) -> bytes:
    if isinstance(key, bool):
        return b"o" + (b"1" if key else b"0")
    if isinstance(key, str):
        return b"s" + key.encode("utf-8", "surrogatepass")
    if isinstance(key, (bytes, bytearray, memoryview)):
        return b"b" + bytes(key)
    if isinstance(key, int):
        return b"i" + str(key).encode()
    if isinstance(key, (list, tuple)):
        parts = [_key_bytes(k) for k in key]
        return b"l" + b"".join(len(p).to_bytes(4, "little") + p for p in parts)
    raise RoutingError(f"ContentKey: cannot hash a key of type {type(key).__name__}: use a str, bytes, int, "
                       "or a list of those (or pass key= to extract one)")


class ContentKey:
    """Route by a key: an explicit ``mapping`` first, else a stable hash onto ``edges``.

    The hash is rendezvous (highest random weight) hashing with BLAKE2b: the same key goes to
    the same edge in every process and run, and adding or removing one edge moves only the
    keys that edge gains or loses. Keys are str, bytes, int or lists of them (lists and tuples
    hash alike, as tuples arrive as lists on the wire). ``key`` extracts the key from an item
    (e.g. ``key=lambda item: item["user"]``)."""

    def __init__(self, edges: Sequence[str] = (), *, mapping: Mapping[Hashable, str] | None = None,
                 key: Callable[[Any], Any] | None = None) -> None:
        where = "ContentKey"
        self.hash_edges = _check_edges(edges, where, allow_empty=True)
        self.mapping: dict[Hashable, str] = {}
        for k, edge in (mapping or {}).items():
            self.mapping[k] = _check_edge_name(edge, f"{where} mapping[{k!r}]")
        if not self.hash_edges and not self.mapping:
            raise ConfigurationError(f"{where}: give edges to hash onto, a mapping, or both")
        if key is not None and not callable(key):
            raise ConfigurationError(f"{where}: key must be a callable that extracts the key, got {key!r}")
        self.key = key

    @property
    def edges(self) -> tuple[str, ...]:
        extra = [e for e in dict.fromkeys(self.mapping.values()) if e not in self.hash_edges]
        return self.hash_edges + tuple(extra)

    def edge_for(self, key: Any) -> str:
        lookup = tuple(key) if isinstance(key, list) else key
        if isinstance(lookup, Hashable):
            try:
                hit = self.mapping.get(lookup)
            except TypeError:  # a tuple holding something unhashable
                hit = None
            if hit is not None:
                return hit
        if not self.hash_edges:
            raise RoutingError(f"ContentKey: no mapping for key {key!r} and no edges to hash onto: add it to "
                               "mapping= or give edges=")
        kb = _key_bytes(key)
        best, best_score = self.hash_edges[0], b""
        for edge in self.hash_edges:
            score = hashlib.blake2b(kb + b"\x00" + edge.encode(), digest_size=8).digest()
            if score > best_score:
                best, best_score = edge, score
        return best

    def decide(self, x: Any) -> Decision:
        return [(self.edge_for(self.key(x) if self.key is not None else x), 1.0)]

    def __repr__(self) -> str:
        return f"ContentKey({list(self.hash_edges)!r}, mapping={len(self.mapping)} keys)"


# -- least loaded -------------------------------------------------------------------------------


class LeastLoaded:
    """Send each request to the replica with the fewest requests in flight.

    ``decide`` (and ``acquire``) picks a replica and counts one request in flight on it;
    ``release(replica)`` must be called when that request finishes. Ties rotate, so equal
    replicas share the load round-robin."""

    def __init__(self, replicas: Sequence[str]) -> None:
        self.replicas = _check_edges(replicas, "LeastLoaded")
        self.in_flight: dict[str, int] = dict.fromkeys(self.replicas, 0)
        self.served: dict[str, int] = dict.fromkeys(self.replicas, 0)
        self._next = 0

    @property
    def edges(self) -> tuple[str, ...]:
        return self.replicas

    def acquire(self) -> str:
        n = len(self.replicas)
        best = self.replicas[self._next % n]
        for i in range(n):
            cand = self.replicas[(self._next + i) % n]
            if self.in_flight[cand] < self.in_flight[best]:
                best = cand
        self._next = (self.replicas.index(best) + 1) % n
        self.in_flight[best] += 1
        self.served[best] += 1
        return best

    def release(self, replica: str) -> None:
        count = self.in_flight.get(replica)
        if count is None:
            raise RoutingError(f"LeastLoaded.release: no replica named {replica!r}; replicas are "
                               f"{list(self.replicas)}")
        if count == 0:
            raise RoutingError(f"LeastLoaded.release: replica {replica!r} has nothing in flight (released twice?)")
        self.in_flight[replica] = count - 1

    def decide(self, x: Any = None) -> Decision:
        return [(self.acquire(), 1.0)]

    def load(self) -> dict[str, int]:
        return dict(self.in_flight)

    def __repr__(self) -> str:
        return f"LeastLoaded({list(self.replicas)!r})"
