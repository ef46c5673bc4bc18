"""Build a whole flow graph from a description: a dict, or a TOML file.

::

    topology = cascada.load_topology("cascade.toml")          # read and check; spawns nothing
    async with cascada.ActorSystem() as system:
        built = await cascada.build_topology(system, "cascade.toml")   # or a dict
        answer = await built.top.ask("run", x)
        await built.refs["cheap"].ask("stats")

The format (TOML shown; a dict has the same shape)::

    top = "answer"                       # what build_topology returns as .top (optional: default
                                         # the one flow that nothing else uses)

    [actors.cheap]                       # an actor: its name is the key
    class = "mypkg.models:Cheap"         # "package.module:Class", a subclass of cascada.Actor
    args = [0.5]                         # optional: constructor arguments
    kwargs = { size = 64 }               # optional: keyword arguments
    placement = "process"                # optional: "process" (default) or "local"
    cpus = [0]                           # optional, process only: the CPUs its process runs on

    [actors.check]
    class = "cascada.stages:Verifier"
    kwargs = { check = { new = "cascada.stages:ConfidenceCheck", args = [0.8] } }

    [flows.answer]                       # a flow: its name is the key
    kind = "cascade"                     # sequence | route | fanout | loop | cascade
    tiers = ["cheap.infer", "big.infer"]
    verifier = "check.check"
    max_escalations = 1

**Steps** (wherever a flow names what it calls):

- ``"name"``: an actor or flow of this topology, method ``run`` (a flow's entry);
  ``"name.method"``: that handler. ``"self"`` (or the flow's own name) is the flow itself:
  self-recursion, bounded by the flow's ``max_depth``.
- a table ``{ step = "name.method", timeout = 2.0, take = "out", stream = true, name = "label",
  args = [...], kwargs = {...} }`` for the options of ``cascada.Step``.
- a table ``{ call = "package.module:function" }`` (same options but ``stream``): a local
  function run inside the flow's process.
- a list of steps (inside a step position, e.g. a route edge): those steps one after the other.

**Flow keys**, by kind (besides ``kind``, ``placement``, ``cpus``, ``max_depth``, ``max_in_flight``):

- ``sequence``: ``steps = [step, ...]``.
- ``route``: ``router = step``, ``edges = { edge = step, ... }``, ``combine`` (``"weighted_sum"``,
  ``"list"``, ``"dict"``, ``"first"`` or a step), ``on_empty`` (``"none"``, ``"item"``, ``"error"``),
  ``normalize``.
- ``fanout``: ``worker = step`` or ``workers = { name = step, ... }``, ``split = step``,
  ``gather_timeout``, ``on_error`` (``"raise"``, ``"missing"``), ``capacity``, ``max_parallel``,
  ``combine`` (``"gather"``, ``"results"`` or a step).
- ``loop``: ``body = step``, ``until = step``, ``max_rounds``, ``on_limit`` (``"result"``, ``"error"``).
- ``cascade``: ``tiers = [step, ...]``, ``verifier = step`` or a list (one per tier; ``false``
  for none), ``max_escalations``, ``tier_costs``, ``on_exhausted`` (``"answer"``, ``"error"``),
  ``verify_last``.

**Values** in ``args`` and ``kwargs`` are plain TOML values, except three kinds of table:
``{ ref = "name" }`` (the ref of another actor or flow of this topology), ``{ import =
"package.module:name" }`` (that object: a function, a class) and ``{ new =
"package.module:Class", args = [...], kwargs = {...} }`` (an instance made here and sent to the
actor through the trusted spawn channel).

**Order and checks.** Everything is spawned in dependency order (what a flow or actor refers
to first; independent ones at once). Every problem is a ConfigurationError naming the key,
raised before anything is spawned: unknown keys, names that are not there, a class that does
not import or is not an Actor, a method the class does not have (or a stream called as a plain
method), a bad kind, and cycles (a flow may refer to itself; two flows may not refer to each
other: use ``SELF`` recursion with a depth guard instead). If spawning fails part way, what was
spawned is stopped again. Reading TOML needs Python 3.11+ (``tomllib``); on 3.10 pass a dict.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .actors import Actor, ActorRef, ActorSystem, ConfigurationError
from .actors._actor import handlers_of
from .actors._flow import SELF, Cascade, FanOut, Flow, LoopUntil, Route, Sequential, Step

__all__ = ["Topology", "TopologyPlan", "build_topology", "load_topology"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")
_IMPORT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_TOP_KEYS = frozenset(("top", "actors", "flows"))
_ACTOR_KEYS = frozenset(("class", "args", "kwargs", "placement", "cpus"))
_COMMON_FLOW_KEYS = frozenset(("kind", "placement", "cpus", "max_depth", "max_in_flight"))
_STEP_OPTS = frozenset(("timeout", "take", "stream", "name", "args", "kwargs"))
_KINDS: dict[str, type[Flow]] = {"sequence": Sequential, "route": Route, "fanout": FanOut, "loop": LoopUntil,
                                 "cascade": Cascade}
_KIND_KEYS: dict[str, frozenset[str]] = {
    "sequence": frozenset(("steps",)),
    "route": frozenset(("router", "edges", "combine", "on_empty", "normalize")),
    "fanout": frozenset(("worker", "workers", "split", "gather_timeout", "on_error", "capacity", "max_parallel",
                         "combine")),
    "loop": frozenset(("body", "until", "max_rounds", "on_limit")),
    "cascade": frozenset(("tiers", "verifier", "max_escalations", "tier_costs", "on_exhausted", "verify_last")),
}
_MODES = {"route": ("weighted_sum", "list", "dict", "first"), "fanout": ("gather", "results")}


def _err(key: str, why: str) -> ConfigurationError:
    return ConfigurationError(f"topology: {key}: {why}")


# --------------------------------------------------------------------------- the plan

# A value whose refs are filled in at spawn time: resolve(refs) -> the value.
Resolver = Callable[[Mapping[str, ActorRef]], Any]


@dataclass
class _Node:
    name: str
    key: str  # "actors.x" or "flows.x"
    cls: type[Actor]
    placement: str
    cpus: list[int] | None = None
    deps: set[str] = field(default_factory=set)
    args: list[Resolver] = field(default_factory=list)
    kwargs: dict[str, Resolver] = field(default_factory=dict)


@dataclass
class TopologyPlan:
    """A checked topology: what to spawn, in which order, and which name is the top."""

    nodes: dict[str, _Node]
    order: list[list[str]]  # levels: each level depends only on the levels before it
    top: str

    @property
    def names(self) -> list[str]:
        return [n for level in self.order for n in level]


@dataclass
class Topology:
    """What build_topology spawned: ``top`` (the top flow's ref), ``refs`` (every actor and
    flow by its topology name) and ``order`` (the order they were spawned in)."""

    top: ActorRef
    refs: dict[str, ActorRef]
    order: list[str]

    def __getitem__(self, name: str) -> ActorRef:
        return self.refs[name]


def _const(x: Any) -> Resolver:
    def resolve(refs: Mapping[str, ActorRef]) -> Any:
        return x
    return resolve


def _ref_to(name: str) -> Resolver:
    def resolve(refs: Mapping[str, ActorRef]) -> Any:
        return refs[name]
    return resolve


def _import(path: Any, key: str) -> Any:
    if not (isinstance(path, str) and _IMPORT.match(path)):
        raise _err(key, f"{path!r} is not an import path 'package.module:name'")
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # ImportError, AttributeError, or whatever the module raised
        raise _err(key, f"cannot import {path!r}: {type(exc).__name__}: {exc}") from exc
    return obj


class _Reader:
    """Turns the description into nodes, checking as it goes."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        if not isinstance(spec, Mapping):
            raise ConfigurationError(f"topology: expected a dict (or a TOML file), got {type(spec).__name__}")
        unknown = sorted(set(spec) - _TOP_KEYS)
        if unknown:
            raise _err(unknown[0], f"unknown key (a topology has {', '.join(sorted(_TOP_KEYS))})")
        self.spec = spec
        actors = spec.get("actors", {})
        flows = spec.get("flows", {})
        for key, table in (("actors", actors), ("flows", flows)):
            if not isinstance(table, Mapping):
                raise _err(key, f"must be a table of named entries, got {type(table).__name__}")
        if not flows and not actors:
            raise ConfigurationError("topology: nothing to build: give [actors.NAME] and [flows.NAME] tables")
        self.kinds: dict[str, str] = {}  # name -> "actor" | "flow"
        self.classes: dict[str, type[Actor]] = {}
        for name in actors:
            self._name(name, f"actors.{name}")
            self.kinds[name] = "actor"
        for name in flows:
            self._name(name, f"flows.{name}")
            if name in self.kinds:
                raise _err(f"flows.{name}", f"the name {name!r} is already an actor; names are shared by actors "
                                            "and flows")
            self.kinds[name] = "flow"
        self.nodes: dict[str, _Node] = {}
        for name, table in actors.items():
            self.nodes[name] = self._actor(name, table)
        for name, table in flows.items():
            self.nodes[name] = self._flow(name, table)

    @staticmethod
    def _name(name: Any, key: str) -> None:
        if not (isinstance(name, str) and _NAME.match(name)) or name == "self":
            raise _err(key, f"name {name!r} must start with a letter or _ and hold only letters, digits, _ and - "
                            "(at most 64; 'self' is reserved)")

    def _known(self) -> str:
        return ", ".join(sorted(self.kinds)) or "none"

    # -- actors -----------------------------------------------------------------------

    def _placement(self, table: Mapping[str, Any], key: str) -> str:
        placement = table.get("placement", "process")
        if placement not in ("process", "local"):
            raise _err(f"{key}.placement", f"must be 'process' or 'local', got {placement!r}")
        return str(placement)

    def _cpus(self, table: Mapping[str, Any], key: str, placement: str) -> list[int] | None:
        cpus = table.get("cpus")
        if cpus is None:
            return None
        if not (isinstance(cpus, list) and cpus and all(type(c) is int and c >= 0 for c in cpus)):
            raise _err(f"{key}.cpus", f"must be a non-empty list of CPU numbers such as [0], got {cpus!r}")
        if placement != "process":
            raise _err(f"{key}.cpus", "pins the actor's own process: it needs placement = 'process'")
        return list(cpus)

    def _actor(self, name: str, table: Any) -> _Node:
        key = f"actors.{name}"
        if not isinstance(table, Mapping):
            raise _err(key, f"must be a table with class = 'package.module:Class', got {type(table).__name__}")
        unknown = sorted(set(table) - _ACTOR_KEYS)
        if unknown:
            raise _err(f"{key}.{unknown[0]}", f"unknown key (an actor has {', '.join(sorted(_ACTOR_KEYS))})")
        if "class" not in table:
            raise _err(f"{key}.class", "missing: name the actor's class as 'package.module:Class'")
        cls = _import(table["class"], f"{key}.class")
        if not (isinstance(cls, type) and issubclass(cls, Actor)):
            raise _err(f"{key}.class", f"{table['class']!r} is not a subclass of cascada.Actor")
        self.classes[name] = cls
        placement = self._placement(table, key)
        node = _Node(name, key, cls, placement, self._cpus(table, key, placement))
        args = table.get("args", [])
        kwargs = table.get("kwargs", {})
        if not isinstance(args, list):
            raise _err(f"{key}.args", f"must be a list, got {type(args).__name__}")
        if not (isinstance(kwargs, Mapping) and all(isinstance(k, str) for k in kwargs)):
            raise _err(f"{key}.kwargs", "must be a table of keyword arguments")
        node.args = [self._value(v, f"{key}.args[{i}]", node) for i, v in enumerate(args)]
        node.kwargs = {k: self._value(v, f"{key}.kwargs.{k}", node) for k, v in kwargs.items()}
        return node

    def _value(self, v: Any, key: str, node: _Node) -> Resolver:
        """An argument value; {ref}, {import} and {new} tables are resolved."""
        if isinstance(v, Mapping):
            if "ref" in v:
                if set(v) != {"ref"}:
                    raise _err(key, "a {ref = NAME} table holds only ref")
                target = v["ref"]
                if target == node.name:
                    raise _err(key, f"{node.name!r} cannot get its own ref as an argument (an actor has self.ref; "
                                    "a flow refers to itself with the step 'self')")
                if target not in self.kinds:
                    raise _err(key, f"unknown name {target!r} (known: {self._known()})")
                node.deps.add(target)
                return _ref_to(target)
            if "import" in v:
                if set(v) != {"import"}:
                    raise _err(key, "an {import = 'pkg.mod:name'} table holds only import")
                obj = _import(v["import"], f"{key}.import")
                return _const(obj)
            if "new" in v:
                extra = set(v) - {"new", "args", "kwargs"}
                if extra:
                    raise _err(f"{key}.{sorted(extra)[0]}", "unknown key (a {new} table has new, args, kwargs)")
                cls = _import(v["new"], f"{key}.new")
                if not callable(cls):
                    raise _err(f"{key}.new", f"{v['new']!r} is not a class or callable")
                nargs = v.get("args", [])
                nkwargs = v.get("kwargs", {})
                if not isinstance(nargs, list) or not isinstance(nkwargs, Mapping):
                    raise _err(key, "a {new} table's args is a list and kwargs a table")
                rargs = [self._value(a, f"{key}.args[{i}]", node) for i, a in enumerate(nargs)]
                rkwargs = {k: self._value(a, f"{key}.kwargs.{k}", node) for k, a in nkwargs.items()}

                def make(refs: Mapping[str, ActorRef], c: Any = cls, where: str = key) -> Any:
                    try:
                        return c(*[r(refs) for r in rargs], **{k: r(refs) for k, r in rkwargs.items()})
                    except Exception as exc:
                        raise _err(where, f"{v['new']}(...) raised {type(exc).__name__}: {exc}") from exc

                return make
            parts = {k: self._value(x, f"{key}.{k}", node) for k, x in v.items()}
            return lambda refs: {k: r(refs) for k, r in parts.items()}
        if isinstance(v, list):
            items = [self._value(x, f"{key}[{i}]", node) for i, x in enumerate(v)]
            return lambda refs: [r(refs) for r in items]
        return _const(v)

    # -- flows ------------------------------------------------------------------------

    def _flow(self, name: str, table: Any) -> _Node:
        key = f"flows.{name}"
        if not isinstance(table, Mapping):
            raise _err(key, f"must be a table with kind = one of {', '.join(_KINDS)}")
        kind = table.get("kind")
        if kind not in _KINDS:
            raise _err(f"{key}.kind", f"{kind!r} is not a flow kind; use one of {', '.join(_KINDS)}")
        allowed = _COMMON_FLOW_KEYS | _KIND_KEYS[kind]
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise _err(f"{key}.{unknown[0]}", f"unknown key for a {kind} flow (it takes {', '.join(sorted(allowed))})")
        placement = self._placement(table, key)
        node = _Node(name, key, _KINDS[kind], placement, self._cpus(table, key, placement))
        for opt in ("max_depth", "max_in_flight"):
            if opt in table:
                node.kwargs[opt] = self._value(table[opt], f"{key}.{opt}", node)

        def need(k: str) -> Any:
            if k not in table:
                raise _err(f"{key}.{k}", f"missing: a {kind} flow needs {k}")
            return table[k]

        def step(k: str) -> Resolver:
            return self._step(need(k), f"{key}.{k}", node)

        def steps(k: str) -> list[Resolver]:
            v = need(k)
            if not isinstance(v, list) or not v:
                raise _err(f"{key}.{k}", "must be a non-empty list of steps")
            return [self._step(s, f"{key}.{k}[{i}]", node) for i, s in enumerate(v)]

        def named(k: str) -> dict[str, Resolver]:
            v = need(k)
            if not isinstance(v, Mapping) or not v:
                raise _err(f"{key}.{k}", "must be a non-empty table of name = step")
            return {e: self._step(s, f"{key}.{k}.{e}", node) for e, s in v.items()}

        def plain(*ks: str) -> None:
            for k in ks:
                if k in table:
                    node.kwargs[k] = self._value(table[k], f"{key}.{k}", node)

        def combine() -> None:
            if "combine" not in table:
                return
            v = table["combine"]
            if isinstance(v, str) and v in _MODES[kind]:
                node.kwargs["combine"] = _const(v)
            else:
                node.kwargs["combine"] = self._step(v, f"{key}.combine", node)

        if kind == "sequence":
            node.args = steps("steps")
        elif kind == "route":
            node.args = [step("router")]
            edges = named("edges")
            node.args.append(lambda refs: {e: r(refs) for e, r in edges.items()})
            combine()
            plain("on_empty", "normalize")
        elif kind == "fanout":
            if ("worker" in table) == ("workers" in table):
                raise _err(f"{key}.worker", "give a fanout flow either worker = step or workers = { name = step }")
            if "worker" in table:
                node.args = [step("worker")]
            else:
                workers = named("workers")
                node.args = [lambda refs: {w: r(refs) for w, r in workers.items()}]
            if "split" in table:
                node.kwargs["split"] = step("split")
            combine()
            plain("gather_timeout", "on_error", "capacity", "max_parallel")
        elif kind == "loop":
            node.args = [step("body"), step("until")]
            plain("max_rounds", "on_limit")
        else:
            tiers = steps("tiers")
            node.args = [lambda refs: [r(refs) for r in tiers]]
            v = need("verifier")
            if isinstance(v, list):
                checks = [None if s is False else self._step(s, f"{key}.verifier[{i}]", node)
                          for i, s in enumerate(v)]
                node.args.append(lambda refs: [None if r is None else r(refs) for r in checks])
            else:
                node.args.append(step("verifier"))
            plain("max_escalations", "tier_costs", "on_exhausted", "verify_last")
        return node

    def _step(self, v: Any, key: str, node: _Node) -> Resolver:
        """A step reference: 'name', 'name.method', 'self', a table with options, a list."""
        if isinstance(v, list):
            if not v:
                raise _err(key, "a list of steps must not be empty")
            parts = [self._step(s, f"{key}[{i}]", node) for i, s in enumerate(v)]
            return lambda refs: Step([r(refs) for r in parts])
        opts: dict[str, Any] = {}
        if isinstance(v, Mapping):
            if ("step" in v) == ("call" in v):
                raise _err(key, "a step table has step = 'name.method' or call = 'package.module:function'")
            extra = set(v) - _STEP_OPTS - {"step", "call"}
            if extra:
                raise _err(f"{key}.{sorted(extra)[0]}", f"unknown step option (options: {', '.join(sorted(_STEP_OPTS))})")
            for k in _STEP_OPTS & set(v):
                opts[k] = v[k]
            if "args" in opts and not isinstance(opts["args"], list):
                raise _err(f"{key}.args", "must be a list")
            rargs = [self._value(a, f"{key}.args[{i}]", node) for i, a in enumerate(opts.pop("args", []))]
            kw = opts.pop("kwargs", {})
            if not isinstance(kw, Mapping):
                raise _err(f"{key}.kwargs", "must be a table")
            rkwargs = {k: self._value(a, f"{key}.kwargs.{k}", node) for k, a in kw.items()}
            if "call" in v:
                if opts.get("stream"):
                    raise _err(f"{key}.stream", "a local function step cannot stream")
                fn = _import(v["call"], f"{key}.call")
                if not callable(fn):
                    raise _err(f"{key}.call", f"{v['call']!r} is not callable")
                self._check_opts(opts, key, fn)
                return lambda refs: Step(fn, args=[r(refs) for r in rargs],
                                         kwargs={k: r(refs) for k, r in rkwargs.items()} or None, **opts)
            v = v["step"]
        else:
            rargs, rkwargs = [], {}
        if not isinstance(v, str):
            raise _err(key, f"a step is 'name', 'name.method', 'self', a table or a list, got {type(v).__name__}")
        target, _, method = v.partition(".")
        if not method:
            method = "run"
        if target == "self" or target == node.name:
            if node.cls not in _KINDS.values():
                raise _err(key, "only a flow can refer to itself")
            target_cls: type[Actor] = node.cls
        elif target not in self.kinds:
            raise _err(key, f"unknown name {target!r} (known: {self._known()})")
        else:
            target_cls = self.classes[target] if self.kinds[target] == "actor" else self._flow_class(target)
        handler = handlers_of(target_cls).get(method)
        if handler is None:
            raise _err(key, f"{target!r} ({target_cls.__qualname__}) has no handler {method!r}; its handlers: "
                            f"{', '.join(sorted(handlers_of(target_cls)))}")
        if opts.get("stream") and handler.kind != "stream":
            raise _err(key, f"{target}.{method} is not a stream handler, but the step says stream = true")
        if not opts.get("stream") and handler.kind == "stream":
            raise _err(key, f"{target}.{method} is a stream handler: add stream = true to the step "
                            f"({{ step = '{v}', stream = true }})")
        self._check_opts(opts, key, None)
        if target == "self" or target == node.name:
            return lambda refs: Step(SELF, method, args=[r(refs) for r in rargs],
                                     kwargs={k: r(refs) for k, r in rkwargs.items()} or None, **opts)
        node.deps.add(target)
        return lambda refs: Step(refs[target], method, args=[r(refs) for r in rargs],
                                 kwargs={k: r(refs) for k, r in rkwargs.items()} or None, **opts)

    def _flow_class(self, name: str) -> type[Actor]:
        kind = self.spec["flows"][name].get("kind") if isinstance(self.spec["flows"][name], Mapping) else None
        return _KINDS.get(kind, Flow) if isinstance(kind, str) else Flow

    @staticmethod
    def _check_opts(opts: dict[str, Any], key: str, fn: Any) -> None:
        try:
            Step(fn if fn is not None else SELF, **opts)  # checks timeout, take, name the same way Step does
        except ConfigurationError as exc:
            raise _err(key, str(exc)) from exc


def _levels(nodes: Mapping[str, _Node]) -> list[list[str]]:
    """Dependency levels (Kahn's algorithm); ConfigurationError naming a cycle."""
    done: set[str] = set()
    levels: list[list[str]] = []
    left = dict(nodes)
    while left:
        level = sorted(n for n, node in left.items() if node.deps <= done)
        if not level:
            raise _err(_cycle(left), "a cycle: flows and actors may not refer to each other in a ring (a flow may "
                                     "refer to itself with 'self', under its max_depth)")
        levels.append(level)
        done.update(level)
        for n in level:
            del left[n]
    return levels


def _cycle(left: Mapping[str, _Node]) -> str:
    start = next(iter(sorted(left)))
    seen: list[str] = []
    at = start
    while at not in seen:
        seen.append(at)
        at = sorted(d for d in left[at].deps if d in left)[0]
    ring = seen[seen.index(at):] + [at]
    return f"{left[ring[0]].key} ({' -> '.join(ring)})"


def _try_flows(nodes: Mapping[str, _Node]) -> None:
    """Make each flow once here, with stand-in refs, so that its options are checked (with
    the key in the message) before anything is spawned. Flows do no I/O when made."""
    stand_in = {n: ActorRef(n, f"inproc://topology-check-{n}", 0, "") for n in nodes}
    for node in nodes.values():
        if node.cls not in _KINDS.values():
            continue
        try:
            node.cls(*[r(stand_in) for r in node.args], **{k: r(stand_in) for k, r in node.kwargs.items()})
        except (ConfigurationError, TypeError) as exc:
            raise _err(node.key, str(exc)) from exc


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    if sys.version_info < (3, 11):
        raise ConfigurationError(f"topology: reading {os.fspath(path)!r} needs Python 3.11+ (tomllib); on Python "
                                 "3.10 load the TOML yourself and pass the dict")
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigurationError(f"topology: cannot read {os.fspath(path)!r}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"topology: {os.fspath(path)!r} is not valid TOML: {exc}") from exc


def load_topology(spec: Mapping[str, Any] | str | os.PathLike[str], *, top: str | None = None) -> TopologyPlan:
    """Read (a TOML path) and check a topology; returns the plan, spawns nothing. Raises
    ConfigurationError naming the offending key. ``top`` overrides the description's."""
    if isinstance(spec, (str, os.PathLike)):
        spec = _read_toml(spec)
    reader = _Reader(spec)
    levels = _levels(reader.nodes)
    _try_flows(reader.nodes)
    chosen = top if top is not None else spec.get("top")
    if chosen is not None:
        if chosen not in reader.nodes:
            raise _err("top", f"unknown name {chosen!r} (known: {reader._known()})")
    else:
        used = {d for node in reader.nodes.values() for d in node.deps}
        roots = [n for n, kind in reader.kinds.items() if kind == "flow" and n not in used]
        if len(roots) != 1:
            roots = [n for n in reader.nodes if n not in used] if not roots else roots
        if len(roots) != 1:
            raise _err("top", f"cannot tell which is the top ({', '.join(sorted(roots)) or 'nothing is unused'}): "
                              "set top = 'NAME'")
        chosen = roots[0]
    return TopologyPlan(reader.nodes, levels, str(chosen))


async def build_topology(system: ActorSystem, spec: Mapping[str, Any] | str | os.PathLike[str] | TopologyPlan, *,
                         top: str | None = None, prefix: str = "") -> Topology:
    """Spawn every actor and flow of a topology in ``system``, dependencies first.

    ``spec`` is a dict, the path of a TOML file, or a plan from ``load_topology`` (``top``
    then comes from the plan).
    ``prefix`` is put before every actor name (to run two copies in one system). Returns a
    Topology (``.top``, ``.refs`` by topology name). When a spawn fails, the ones already
    spawned are stopped and the error (ActorInitFailed, ...) is raised."""
    if isinstance(spec, TopologyPlan):
        plan = spec
    else:
        # In a thread: reading the file and importing the classes it names (torch, say) block.
        plan = await asyncio.to_thread(load_topology, spec, top=top)
    if not isinstance(prefix, str):
        raise ConfigurationError(f"topology: prefix must be a string, got {prefix!r}")
    refs: dict[str, ActorRef] = {}
    spawned: list[ActorRef] = []
    try:
        for level in plan.order:
            results = await asyncio.gather(*(_spawn(system, plan.nodes[n], refs, prefix) for n in level),
                                           return_exceptions=True)
            failure: BaseException | None = None
            for n, r in zip(level, results):
                if isinstance(r, ActorRef):
                    refs[n] = r
                    spawned.append(r)
                elif failure is None:
                    failure = r
            if failure is not None:
                raise failure
    except BaseException:
        for ref in reversed(spawned):
            try:
                await system.stop(ref)
            except Exception:  # noqa: S110 - best effort: the system stops it at exit anyway
                system.node.log.warning("topology", "could not stop %s after a failed build", ref.name)
        raise
    return Topology(refs[plan.top], refs, [n for level in plan.order for n in level])


async def _spawn(system: ActorSystem, node: _Node, refs: Mapping[str, ActorRef], prefix: str) -> ActorRef:
    args = [r(refs) for r in node.args]
    kwargs = {k: r(refs) for k, r in node.kwargs.items()}
    if node.placement == "local":
        return await system.spawn(node.cls, *args, name=f"{prefix}{node.name}", placement="local", **kwargs)
    return await system.spawn(node.cls, *args, name=f"{prefix}{node.name}", placement="process", cpus=node.cpus,
                              **kwargs)
