"""The forkserver: a small process that imports what actors need once, then forks them.

Starting a fresh interpreter that imports torch costs ~0.85 s per actor here; forking a
process that already imported it costs ~10 ms. The forkserver is started by an ActorSystem
before it has any actor of its own; it never creates an event loop or a zmq context, which
is what makes forking it safe (forking a process that has either is not).

It talks to its system over a private socketpair that nothing else can reach: that is the
trusted spawn channel. Spawn requests carry the actor class (pickled by value when it lives
in ``__main__``, a notebook or a test module), which only the forked child unpickles.

Fate sharing: the forkserver dies with its system (PR_SET_PDEATHSIG, and EOF on the
socketpair), and every actor process dies with the forkserver (PR_SET_PDEATHSIG again).
"""

from __future__ import annotations

import importlib
import os
import selectors
import signal
import socket
import sys
import traceback

from . import _frames
from ._pdeathsig import set_pdeathsig


def main(fd: int) -> None:
    set_pdeathsig(signal.SIGKILL)
    sock = socket.socket(fileno=fd)
    hello = _frames.read_blocking(sock)
    if hello is None:
        return
    sys.path[:] = hello["sys_path"]
    failures: dict[str, str] = {}
    for module in ["cascada.actors._child", *hello["preload"]]:
        try:
            importlib.import_module(module)
        except BaseException as exc:  # report every preload failure to the system
            failures[module] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    sock.sendall(_frames.pack(["hello", os.getpid(), failures]))

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    # The system decides when actors stop; Ctrl-C in a terminal must not kill us first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    children: set[int] = set()
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    try:
        while True:
            for key, _ in sel.select():
                if key.fileobj is sock:
                    req = _frames.read_blocking(sock)
                    if req is None:
                        return
                    _spawn(req, sock, children, (wake_r, wake_w))
                else:
                    try:
                        while os.read(wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                    _reap(sock, children)
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in list(children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _spawn(req: list[object], sock: socket.socket, children: set[int], wake: tuple[int, int]) -> None:
    op, token, header, blob = req
    assert op == "spawn"
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            sock.close()
            for fd in wake:
                os.close(fd)
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            set_pdeathsig(signal.SIGKILL)
            from ._child import run_child

            code = run_child(header, blob)  # type: ignore[arg-type]
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    children.add(pid)
    sock.sendall(_frames.pack(["spawned", token, pid]))


def _reap(sock: socket.socket, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        sock.sendall(_frames.pack(["exited", pid, code]))


if __name__ == "__main__":
    main(int(sys.argv[1]))
