"""The `cascada` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cascada", description="An actor runtime for ML cascades.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the built-in demo cascade in several processes")
    demo.add_argument("--requests", type=int, default=2000, help="documents to push through (default 2000)")
    demo.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    sub.add_parser("version", help="print the version")
    args = parser.parse_args(argv)
    if args.command == "version":
        from . import __version__

        print(__version__)
        return 0
    if args.command == "demo":
        from ._demo import main as demo_main

        return demo_main(requests=args.requests, json_path=args.json)
    return 2


if __name__ == "__main__":
    sys.exit(main())
