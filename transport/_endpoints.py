"""Where processes listen: private ipc directories and endpoint strings."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import tempfile

from ._errors import ConfigurationError

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
IPC_PATH_MAX = 107


class IpcDirectory:
    """A per-system directory, mode 0700, that holds every ipc socket file of one run.

    Owner-only permissions keep other users from connecting; the directory is removed with
    everything in it when the system closes, which also cleans files left by a SIGKILLed
    process (libzmq cannot unlink those)."""

    # "/cascada-<pid>-XXXXXXXX/" (a pid has at most 7 digits) + an 8-hex-digit stem + ".ipc"
    _OVERHEAD = 26 + 8 + 4

    def __init__(self, base: str | None = None) -> None:
        if base is None:
            base = default_ipc_base()
        check_ipc_base(base)
        sweep_dead_ipc_dirs(base)
        try:
            # The owner's pid is in the name, so a later system can tell the directory of a
            # system that was SIGKILLed (and could not clean up) from one still running.
            self.path = tempfile.mkdtemp(prefix=f"cascada-{os.getpid()}-", dir=base)
        except OSError as exc:
            raise ConfigurationError(f"cannot create the ipc directory in {base!r}: {exc}") from exc
        os.chmod(self.path, 0o700)

    def endpoint(self, stem: str | None = None) -> str:
        name = stem or secrets.token_hex(4)
        path = os.path.join(self.path, f"{name}.ipc")
        if len(path) > IPC_PATH_MAX:
            raise ConfigurationError(
                f"ipc path {path!r} is {len(path)} characters, over the {IPC_PATH_MAX} that "
                "unix sockets allow: pass a shorter ipc_dir (for example /tmp) to ActorSystem"
            )
        return f"ipc://{path}"

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


_OWNED = re.compile(r"^cascada-(\d+)-[A-Za-z0-9_]+$")


def sweep_dead_ipc_dirs(base: str) -> list[str]:
    """Remove ipc directories in base left by systems that died without cleaning up (their
    owner pid is gone). Only our own user's directories are touched; returns what was removed."""
    removed: list[str] = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    uid = os.getuid()
    for name in names:
        m = _OWNED.match(name)
        if m is None:
            continue
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid != uid or not stat.S_ISDIR(st.st_mode) or _pid_alive(int(m.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_gone(pid: int) -> bool:
    """True when pid is not a live process here (gone, or a zombie awaiting its reaper)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    state = raw[raw.rfind(b")") + 2 : raw.rfind(b")") + 3]
    return state in (b"Z", b"X")


def default_ipc_base() -> str:
    """The system temp dir, or /tmp when that is too long for socket paths (a long TMPDIR is
    common on macOS and in CI sandboxes)."""
    base = tempfile.gettempdir()
    if len(os.path.abspath(base)) + IpcDirectory._OVERHEAD > IPC_PATH_MAX and os.path.isdir("/tmp"):
        return "/tmp"
    return base


def check_ipc_base(base: str | None) -> None:
    """Refuse, before anything is created, a base directory whose socket paths would be too long."""
    resolved = os.path.abspath(base if base is not None else default_ipc_base())
    longest = len(resolved) + IpcDirectory._OVERHEAD
    if longest > IPC_PATH_MAX:
        raise ConfigurationError(
            f"ipc_dir {resolved!r} is too long: socket paths under it would reach {longest} characters, "
            f"over the {IPC_PATH_MAX} that unix sockets allow; choose a shorter directory such as /tmp"
        )


def ipc_path(endpoint: str) -> str | None:
    """The socket file of an ``ipc://`` endpoint, or None for other transports."""
    if endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):
        return endpoint[len("ipc://") :]
    return None


def check_endpoint(endpoint: str) -> str:
    """Validate a user-given endpoint before any socket sees it."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in ("ipc", "tcp", "inproc"):
        raise ConfigurationError(
            f"endpoint {endpoint!r} is not ipc://PATH, tcp://HOST:PORT or inproc://NAME"
        )
    if scheme == "tcp" and rest.startswith("*"):
        raise ConfigurationError(
            f"endpoint {endpoint!r} listens on every interface; bind an explicit address such "
            "as tcp://127.0.0.1:PORT"
        )
    path = ipc_path(endpoint)
    if path is not None and len(path) > IPC_PATH_MAX:
        raise ConfigurationError(
            f"ipc path {path!r} is {len(path)} characters, over the {IPC_PATH_MAX} that unix "
            "sockets allow: choose a shorter path"
        )
    return endpoint


_BOOT_ID: str | None = None


def host_id() -> str:
    """Identifies this machine (boot), so a ref can tell whether a pid is checkable here."""
    global _BOOT_ID
    if _BOOT_ID is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _BOOT_ID = f.read().strip()
        except OSError:
            import socket

            _BOOT_ID = socket.gethostname()
    return _BOOT_ID
