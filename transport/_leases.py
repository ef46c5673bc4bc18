"""Leases: the owner side of every tensor handed over by reference (shm pool, CUDA IPC).

A producer that hands a buffer to another process by name or handle keeps that buffer
alive, and unmodified, until the consumer says it is done. Each hand-off is a *lease*:

- issued by the owner when it encodes the tensor, to one consumer process;
- released by the consumer when its last view of the tensor is freed (riding on its next
  reply to the owner, or in a control message of its own);
- expired by the owner when the consumer's process is gone, or after ``ttl`` seconds when
  the resource reports that no consumer holds it (a message that never got delivered).

A :class:`Resource` counts its holders (the owner's own reference, if any, plus one per
lease) and returns itself to its pool when the count drops to zero. The table knows nothing
of shared memory or CUDA: both backends go through this code, so the CPU test suite covers
the lease logic the GPU path relies on. See ``transport/TENSOR_LIFETIMES.md``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from typing import Protocol


class Resource(Protocol):
    """Something a lease keeps alive (a pool segment, an exported CUDA allocation)."""

    def acquire(self) -> None:
        """One more holder."""

    def release(self) -> None:
        """One holder fewer; at zero the resource goes back to its pool or is freed."""

    def held_elsewhere(self) -> bool:
        """True while some consumer process has the buffer mapped right now. Backends that
        cannot tell return True, so ttl expiry never frees memory under a reader."""


Consumer = tuple[str, int]
"""(host id, pid) of the process a lease was issued to; pid 0 when it is not known."""


class _Lease:
    __slots__ = ("resource", "consumer", "issued")

    def __init__(self, resource: Resource, consumer: Consumer, issued: float) -> None:
        self.resource = resource
        self.consumer = consumer
        self.issued = issued


class LeaseStats:
    __slots__ = ("issued", "released", "expired_dead", "expired_ttl", "unknown_releases", "release_messages",
                 "released_on_replies", "released_on_requests")

    def __init__(self) -> None:
        self.issued = 0
        self.released = 0
        self.expired_dead = 0  # the consumer's process was gone
        self.expired_ttl = 0  # never taken up within ttl (the message was lost on the way)
        self.unknown_releases = 0  # a release for a lease that is no longer outstanding
        # How releases came back (counted by the node that owns the table): in lease.release
        # messages of their own, or riding on the replies to our requests, or on the
        # requests of a process we answered with a leased tensor (ids).
        self.release_messages = 0
        self.released_on_replies = 0
        self.released_on_requests = 0

    def to_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


class LeaseTable:
    """Outstanding leases of one owner process. Not thread-safe: owned by the event loop."""

    def __init__(
        self,
        *,
        ttl: float | None = 60.0,
        host: str = "",
        process_gone: Callable[[int], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.host = host
        self._process_gone = process_gone
        self._clock = clock
        self._ids = itertools.count(1)
        self._leases: dict[int, _Lease] = {}
        self._by_consumer: dict[Consumer, set[int]] = {}
        self.stats = LeaseStats()
        self.on_change: Callable[[], None] | None = None  # e.g. wake senders waiting for a free segment

    def __len__(self) -> int:
        return len(self._leases)

    def issue(self, resource: Resource, consumer: Consumer) -> int:
        lease_id = next(self._ids)
        resource.acquire()
        self._leases[lease_id] = _Lease(resource, consumer, self._clock())
        ids = self._by_consumer.get(consumer)
        if ids is None:
            ids = self._by_consumer[consumer] = set()
        ids.add(lease_id)
        self.stats.issued += 1
        return lease_id

    def _drop(self, lease_id: int) -> bool:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        ids = self._by_consumer.get(lease.consumer)
        if ids is not None:
            ids.discard(lease_id)
            if not ids:
                del self._by_consumer[lease.consumer]
        lease.resource.release()
        return True

    def release(self, lease_ids: Iterable[int]) -> int:
        """The consumer is done with these leases. Unknown ids (already expired, or a
        duplicate release) are counted and ignored."""
        n = 0
        for lease_id in lease_ids:
            if self._drop(lease_id):
                n += 1
            else:
                self.stats.unknown_releases += 1
        self.stats.released += n
        if n:
            self._changed()
        return n

    def revoke(self, lease_id: int) -> None:
        """Take back a lease whose message was never sent (encoding failed part way)."""
        if self._drop(lease_id):
            self._changed()

    def expire_consumer(self, consumer: Consumer) -> int:
        """The consumer's process is gone: every lease it held is returned."""
        ids = list(self._by_consumer.get(consumer, ()))
        for lease_id in ids:
            self._drop(lease_id)
        self.stats.expired_dead += len(ids)
        if ids:
            self._changed()
        return len(ids)

    def consumers(self) -> list[Consumer]:
        return list(self._by_consumer)

    def sweep(self) -> int:
        """Expire the leases of consumers whose process is gone, then leases older than
        ttl that no consumer holds. Returns how many were expired."""
        n = 0
        gone = self._process_gone
        if gone is not None:
            for consumer in list(self._by_consumer):
                host, pid = consumer
                if pid and host == self.host and gone(pid):
                    n += self.expire_consumer(consumer)
        if self.ttl is not None and self._leases:
            cutoff = self._clock() - self.ttl
            stale = [i for i, lease in self._leases.items()
                     if lease.issued < cutoff and not lease.resource.held_elsewhere()]
            for lease_id in stale:
                self._drop(lease_id)
            self.stats.expired_ttl += len(stale)
            n += len(stale)
            if stale:
                self._changed()
        return n

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def snapshot(self) -> dict[str, int]:
        d = self.stats.to_dict()
        d["outstanding"] = len(self._leases)
        d["consumers"] = len(self._by_consumer)
        return d
