"""The leak check that guards every test must itself catch leaks."""

from __future__ import annotations

import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def test_leak_check_catches_processes_sockets_and_ipc_dirs() -> None:
    pytest_bin = pathlib.Path(sys.executable).parent / "pytest"
    out = subprocess.run([str(pytest_bin), "-q", "-p", "no:randomly", str(HERE / "leaky_cases.py")],
                         capture_output=True, text=True, cwd=HERE.parent, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "child processes left running (now killed)" in text
    assert "file descriptors left open" in text
    assert "ipc directories left behind" in text
    assert "3 errors" in text
