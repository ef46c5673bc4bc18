"""Errors that cross processes as themselves.

A handler that raises a :class:`CascadaError` (cascada's own, a flow's, or a user's
subclass) sends, in the error body's ``details`` slot, the error's ``args``, its public
msgpack-native fields and its notes. The caller rebuilds the same type from the registry of
CascadaError subclasses its process has imported, and adds the remote traceback as a note.
A type the caller does not know, or details that do not check out, fall back to the
``RemoteError`` every other exception becomes; such a RemoteError keeps the details, so that
when it is raised on (a middle stage that never imported the class) a caller further up that
knows the type still gets it. Only registered CascadaError types are ever
built, and never through their ``__init__``: a hostile peer can choose fields, not code.
"""

from __future__ import annotations

from typing import Any

import msgpack

from traceback import format_exception

from ..transport._errors import ERROR_TYPES, CascadaError, wire_name
from ._errors import RemoteError

__all__ = ["describe_error", "error_details", "error_from_parts", "rebuild_error"]

MAX_DETAILS_BYTES = 256 * 1024  # larger details are dropped: the caller gets a RemoteError
MAX_NOTES = 8
MAX_NOTE_CHARS = 16 * 1024
_MAX_DEPTH = 8
_SCALARS = (type(None), bool, int, float, str, bytes)


def _native(value: Any, depth: int = 0) -> bool:
    """Whether value travels as itself (tuples come back as tuples: the codec keeps them)."""
    t = type(value)
    if t in _SCALARS:
        return t is not int or -(1 << 63) <= value < 1 << 64
    if depth >= _MAX_DEPTH:
        return False
    if t is list or t is tuple:
        return all(_native(v, depth + 1) for v in value)
    if t is dict:
        return all(type(k) is str and _native(v, depth + 1) for k, v in value.items())
    return False


def error_details(exc: BaseException) -> dict[str, Any] | None:
    """What the caller needs to rebuild exc as its own type, or None (it becomes a RemoteError)."""
    if not isinstance(exc, CascadaError) or ERROR_TYPES.get(wire_name(type(exc))) is not type(exc):
        return None
    try:
        fields = {k: v for k, v in exc.__cascada_fields__().items()
                  if type(k) is str and not k.startswith("_") and _native(v)}
    except Exception:  # a broken override: the error still travels, as a RemoteError
        return None
    args = list(exc.args) if _native(exc.args) else [str(exc)]
    notes = [n[:MAX_NOTE_CHARS] for n in getattr(exc, "__notes__", ()) if type(n) is str][-MAX_NOTES:]
    details = {"args": args, "fields": fields, "notes": notes}
    try:
        size = len(msgpack.packb(details, use_bin_type=True))
    except (TypeError, ValueError, OverflowError):
        return None
    return details if size <= MAX_DETAILS_BYTES else None


def describe_error(exc: BaseException) -> tuple[str, str, str, dict[str, Any] | None]:
    """How a handler's exception travels: type name, message, traceback and details."""
    tb = "".join(format_exception(exc))
    carried = getattr(exc, "_remote_details", None)
    if isinstance(exc, RemoteError) and type(carried) is dict:
        # A typed error this process could not rebuild: pass it on as it came, with the
        # traceback of where it was first raised as one more note.
        notes = [n for n in carried.get("notes", ()) if type(n) is str]
        if exc.remote_traceback:
            where = f"{exc.actor}.{exc.method}" if exc.actor else "remote handler"
            notes.append(_traceback_note(where, exc.remote_traceback))
        return exc.remote_type, exc.remote_message, tb, {**carried, "notes": notes[-MAX_NOTES:]}
    return wire_name(type(exc)), str(exc), tb, error_details(exc)


def _traceback_note(where: str, traceback: str) -> str:
    text = traceback.rstrip()
    if len(text) > MAX_NOTE_CHARS:  # the end says where it was raised: keep that
        text = "..." + text[-MAX_NOTE_CHARS:]
    return f"Remote traceback ({where}):\n{text}"


def rebuild_error(type_name: str | None, details: dict[str, Any] | None, where: str | None,
                  traceback: str | None) -> CascadaError | None:
    """The error a peer described, as its own type; None when it cannot be rebuilt here.
    ``where`` (``actor.method``) and ``traceback`` become a note on it."""
    if type_name is None or details is None:
        return None
    cls = ERROR_TYPES.get(type_name)
    args, fields, notes = details.get("args"), details.get("fields"), details.get("notes", [])
    if (cls is None or not isinstance(args, (list, tuple)) or type(fields) is not dict or type(notes) is not list
            or any(type(k) is not str or k.startswith("_") for k in fields)):
        return None
    try:
        exc = cls.__cascada_rebuild__(list(args), dict(fields))
    except Exception:
        return None
    if not isinstance(exc, cls):
        return None
    for note in notes[-MAX_NOTES:]:
        if type(note) is str:
            exc.add_note(note[:MAX_NOTE_CHARS])
    if traceback:
        exc.add_note(_traceback_note(where or "remote handler", traceback))
    return exc


def error_from_parts(type_name: str | None, message: str, traceback: str | None, details: dict[str, Any] | None, *,
                     actor: str | None, method: str | None, local: bool = False) -> CascadaError:
    """What the caller raises for a handler's exception: its own type when it can be rebuilt
    here, else a RemoteError that keeps the details to pass on. A local caller keeps the
    original as ``__cause__``, so it gets no traceback note."""
    typed = rebuild_error(type_name, details, f"{actor}.{method}" if actor else None, None if local else traceback)
    if typed is not None:
        return typed
    err = RemoteError(message, remote_type=type_name or "Exception", remote_traceback=traceback, actor=actor,
                      method=method)
    if type(details) is dict:
        err._remote_details = details
    return err
