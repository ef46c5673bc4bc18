#!/usr/bin/env python3
"""Run a script of scripts/ with cascada imported from this checkout, uninstalled.

    python3 scripts/from_source.py scripts/bench_flows.py --quick

For a bare machine (a lent GPU machine) that has the working tree and, on PYTHONPATH,
pyzmq, msgpack and uvloop, but no virtual environment: ``import cascada`` then finds this
checkout through a temporary folder whose ``cascada/`` links to ``cascada/*`` and to the
top-level actors/, transport/, stages/ and cudakernels/, laid out as the installed package
is. PYTHONPATH carries it to the forkserver and the actors; it is removed at exit. Where
cascada is installed, that one is used and nothing is made.
"""

from __future__ import annotations

import atexit
import os
import runpy
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def import_cascada_from_source() -> Any:
    """``import cascada``: the installed one, else this checkout's (see the module's text)."""
    try:
        import cascada

        return cascada
    except ImportError:
        pass
    shadow = tempfile.mkdtemp(prefix="cascada-source-")
    atexit.register(shutil.rmtree, shadow, True)  # links only: rmtree never follows them
    pkg = os.path.join(shadow, "cascada")
    os.mkdir(pkg)
    for entry in (REPO / "cascada").iterdir():
        os.symlink(entry, os.path.join(pkg, entry.name))
    for sub in ("actors", "transport", "stages", "cudakernels"):
        os.symlink(REPO / sub, os.path.join(pkg, sub))
    sys.path.insert(0, shadow)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (shadow, os.environ.get("PYTHONPATH")) if p)
    import cascada

    return cascada


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    import_cascada_from_source()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
