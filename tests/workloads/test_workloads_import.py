"""Importing the workloads package (and the F1 data module) stays light: no torch, no numpy."""

from __future__ import annotations

import subprocess
import sys


def test_workloads_import_is_light() -> None:
    code = ("import sys, cascada.workloads, cascada.workloads.f1_data as d; "
            "d.glyph_images(3); "
            "heavy = [m for m in ('torch', 'numpy', 'sklearn') if m in sys.modules]; print(heavy); "
            "sys.exit(bool(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
