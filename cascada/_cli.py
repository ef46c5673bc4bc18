"""The `cascada` command.

- ``cascada demo``: the default demo (F1, the digits cascade).
- ``cascada run NAME|FILE``: a built-in workload (``f1`` digits-cascade, ``f2`` spec-decode,
  ``f3`` moe-dispatch, ``text`` the standard-library text cascade) or a topology TOML file
  with a ``[run]`` table (see :mod:`cascada.workloads.run_topology`).
- ``cascada version``.

Every run prints a summary table at the end; ``--json PATH`` also writes the figures. A
mistake in the command line or the file (unknown name, unreadable or invalid topology) is one
line on stderr and exit status 2; a failure while running is exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

BUILTINS = {
    "f1": "F1 digits-cascade: tiered classifiers in separate processes, accuracy vs MACs",
    "f2": "F2 spec-decode: draft decoder and target verifier in two processes, tokens/s vs target-only",
    "f3": "F3 moe-dispatch: top-k router, experts over worker processes, exactness and drops",
    "text": "the standard-library text cascade (keyword expert, verifier, TF-IDF expert)",
}
DEFAULT = "f1"


class _Usage(Exception):
    """A mistake in what was asked: one line, exit 2."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, metavar="N", help="items (F1, text, a topology file), prompts (F2) "
                                                              "or tokens (F3) to run")
    p.add_argument("--quick", action="store_true", help="a small, fast configuration")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascada", description="An actor runtime for ML cascades.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the default demo (F1: the digits cascade in several processes)")
    _common(demo)
    run = sub.add_parser("run", help="run a built-in workload or a topology TOML file",
                         description="TOPOLOGY is a built-in name (" + ", ".join(
                             f"{k}: {v}" for k, v in BUILTINS.items()) + ") or the path of a topology TOML file "
                         "with a [run] table.")
    run.add_argument("topology", metavar="TOPOLOGY", help="f1, f2, f3, text, or a .toml file")
    _common(run)
    run.add_argument("--source", default="auto", help="F1 data: auto (sklearn digits if installed, else glyphs), "
                                                       "sklearn, glyphs")
    sub.add_parser("version", help="print the version")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        from . import __version__

        print(__version__)
        return 0
    target = DEFAULT if args.command == "demo" else args.topology
    prog = f"cascada {args.command}"
    try:
        return _dispatch(target, args)
    except _Usage as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130


def _dispatch(target: str, args: Any) -> int:
    requests: int | None = args.requests
    if requests is not None and requests < 1:
        raise _Usage("--requests must be at least 1")
    progress = not args.no_progress
    if target in BUILTINS:
        if target == "text":
            from ._demo import main as text_main

            return text_main(requests=requests or (200 if args.quick else 2000), json_path=args.json)
        from . import CascadaError

        try:
            if target == "f1":
                from .workloads import f1_data, run_f1

                source = getattr(args, "source", "auto")
                try:
                    f1_data.resolve_source(source)
                except (ValueError, ImportError) as exc:
                    raise _Usage(str(exc)) from None
                return run_f1.main(requests, quick=args.quick, json_path=args.json, source=source, progress=progress)
            if target == "f2":
                from .workloads import run_f2

                return run_f2.main(requests, quick=args.quick, json_path=args.json, progress=progress)
            from .workloads import run_f3

            return run_f3.main(requests, quick=args.quick, json_path=args.json, progress=progress)
        except ImportError as exc:
            if exc.name == "torch":
                raise _Usage(f"{target} needs PyTorch: pip install 'cascada[torch]' (or run ./scripts/demo, "
                             "which installs it into .venv)") from None
            raise
        except CascadaError as exc:
            print(f"cascada run {target} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    if target.endswith(".toml") or os.path.sep in target or os.path.exists(target):
        from .workloads.run_topology import TopologyRunError, main as topo_main

        try:
            return topo_main(target, requests=requests, quick=args.quick, json_path=args.json, progress=progress)
        except TopologyRunError as exc:
            raise _Usage(str(exc)) from None
    raise _Usage(f"unknown topology {target!r}: not a built-in ({', '.join(BUILTINS)}) and not a file")


if __name__ == "__main__":
    sys.exit(main())
