"""The table the benchmark scripts print: one row per figure, columns padded to fit."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def print_table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = "  ".join("-" * w for w in widths)
    print()
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    print(line)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print(line)


def add_common_args(parser: argparse.ArgumentParser, figures: Sequence[str]) -> None:
    """--json and --only, the same in every benchmark."""
    parser.add_argument("--json", metavar="PATH", help="also write every record as one JSON list")
    parser.add_argument("--only", metavar="LIST", default=",".join(figures),
                        help=f"comma-separated figures to measure, of {', '.join(figures)} (default: all)")


def selected(parser: argparse.ArgumentParser, only: str, figures: Sequence[str]) -> frozenset[str]:
    chosen = frozenset(x.strip() for x in only.split(",") if x.strip())
    if not chosen or not chosen <= set(figures):
        parser.error(f"--only takes figures from {', '.join(figures)}")
    return chosen
