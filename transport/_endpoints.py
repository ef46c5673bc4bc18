"""Where processes listen: private ipc directories and endpoint strings."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import stat
import struct
import tempfile

from ._errors import ConfigurationError, EndpointConflict

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


class ProcessWatch:
    """``gone(pid)`` answers what process_gone does, for pids asked about again and again
    (the owners of the leased tensors in each message): the /proc stat file of each pid is
    opened once and re-read in place (one pread, ~2 us here, instead of open, read and close,
    ~8 us). The open file stays bound to the process it was opened for, so a reused pid
    cannot pass for it: once that process is reaped the read fails and it counts as gone.
    At most ``max_pids`` files are kept open; ``close()`` lets every one go."""

    def __init__(self, max_pids: int = 256) -> None:
        self.max_pids = max_pids
        self._fds: dict[int, int] = {}

    def gone(self, pid: int) -> bool:
        fd = self._fds.get(pid)
        if fd is None:
            if len(self._fds) >= self.max_pids:
                self.close()
            try:
                fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return True
            except OSError:
                return False  # as process_gone: unreadable is not gone
            self._fds[pid] = fd
        try:
            raw = os.pread(fd, 512, 0)
        except OSError:
            raw = b""
        end = raw.rfind(b")")
        if end < 0 or raw[end + 2 : end + 3] in (b"Z", b"X"):
            del self._fds[pid]
            os.close(fd)
            return True
        return False

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


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


_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def listener_pid(path: str, timeout: float = 1.0) -> int | None:
    """The pid of the process listening on the unix socket at ``path``, as the kernel tells it
    (SO_PEERCRED: the process that called listen, which it cannot forge), or None when
    nothing listens there: no file, not a socket, or a stale socket file left by a process
    that died (kill -9 leaves one; libzmq cannot unlink it then).

    Costs one connect and close (tens of microseconds); a libzmq listener drops the
    connection once it sees it close. Raises EndpointConflict when something listens but
    does not accept within ``timeout`` (its backlog is full), so its pid cannot be read."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return None
    except OSError:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except (TimeoutError, BlockingIOError) as exc:
            raise EndpointConflict(f"something listens on {path!r} but does not accept connections: {exc}") from exc
        except OSError:
            return None
        pid, _uid, _gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        return pid if pid > 0 else None
    finally:
        sock.close()


def claim_ipc_path(path: str) -> None:
    """Make ``path`` free to bind, or raise EndpointConflict.

    libzmq's ipc bind unlinks whatever is at the path and binds anew, so a second process
    binding a live endpoint silently takes it over: the first keeps the connections it has
    and never sees a new one. Call this right before binding: a live listener makes it
    raise; a stale socket file (its process died) is removed, so the bind is a clean one;
    anything that is not a socket (a file, a directory, a symlink) is left alone and
    refused. A process that binds between this check and the bind still wins the race;
    private 0700 directories (IpcDirectory) keep other users out of it altogether."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise EndpointConflict(f"{path!r} exists and is not a socket: refusing to bind over it")
    pid = listener_pid(path)
    if pid is not None:
        raise EndpointConflict(f"process {pid} already listens on {path!r}: binding would silently take it over")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def check_ipc_listener(endpoint: str, pid: int, timeout: float = 1.0) -> None:
    """Raise EndpointConflict unless the process listening on ``endpoint`` is ``pid``, for an
    ipc endpoint on this host (other transports pass unchecked).

    A client should call this before it connects to an actor's ipc endpoint, and again on
    every reconnect: if another process took the path over, what is meant for the actor
    must not reach it. When nothing listens (the actor died and its file is stale or gone)
    this passes; the connection then fails as it does for any dead peer."""
    path = ipc_path(endpoint)
    if path is None:
        return
    found = listener_pid(path, timeout)
    if found is not None and found != pid:
        raise EndpointConflict(
            f"{endpoint} is held by process {found}, not by process {pid} that the ref names: "
            "another process took the path over"
        )


def socket_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the socket file at ``path``, or None when there is none. Record it
    right after binding: a different value later means the path was taken over, or removed,
    behind the binder's back."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


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
