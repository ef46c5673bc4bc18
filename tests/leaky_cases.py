"""Deliberately leaky tests, run only by test_leak_check.py to prove the leak check works.
(Not collected in normal runs: the file name does not start with test_.)"""

from __future__ import annotations

import os
import subprocess
import tempfile

import zmq


def test_leaks_a_process() -> None:
    subprocess.Popen(["sleep", "30"])


def test_leaks_a_socket() -> None:
    ctx = zmq.Context()
    ctx.socket(zmq.DEALER)  # never closed, context never terminated
    test_leaks_a_socket.keep = ctx  # type: ignore[attr-defined]


def test_leaks_an_ipc_directory() -> None:
    os.mkdir(os.path.join(tempfile.gettempdir(), "cascada-leaked"))
