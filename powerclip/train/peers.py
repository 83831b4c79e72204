"""Which rank is gone: a heartbeat per rank in the rendezvous store, read when a collective fails.

Why: when a rank dies without a launcher to report it (``srun`` starts every rank on its own; a
node is lost; the OOM killer takes one process), the survivors only see their backend's error, e.g.
gloo's "Connection reset by peer", which names no rank and no host. Every rank therefore writes its
identity (host, pid) once and a beat counter every ``BEAT_S`` seconds, from a daemon thread, into
the TCP store that every launcher already runs at ``MASTER_ADDR:MASTER_PORT`` (keys under
``powerclip/peers/``). When training fails with a runtime error, ``explain`` reads the beats twice,
``STALE_S`` apart: the ranks whose counter stood still are named, with their host and pid, in one
``PeerLostError`` line. If the store itself cannot be reached, its host (rank 0 under ``srun`` and
plain ``RANK``/``WORLD_SIZE`` launches) is the one that is gone. A rank that stops because of a lost
peer says so in the store (``left/RANK``) before it exits, so the ranks that learn of the failure
later (from it) name the rank that died, not each other. Rank 0, which hosts the store under those
launches, keeps it up after its own verdict until every other survivor has written its ``left/RANK``
(at most ``LINGER_S``): a survivor whose read window ends a moment after rank 0's would otherwise
find the store gone with rank 0 and name rank 0 instead of the rank that died. A survivor can still
learn of the failure only after that: one blocked in a collective with rank 0 fails when rank 0
exits. So every other rank's heartbeat thread also watches for rank 0's verdict (``left/0``) and keeps
it: a survivor that then finds the store gone names the ranks rank 0 named, not rank 0.

Cost: nothing per training step. The beat is one small store write and one key check per rank
every ``BEAT_S`` (the check stops once rank 0's verdict is seen) from a thread that holds no device
and takes no lock of the training thread, so GPU steps gain no host synchronisation. A rank that is merely slow keeps beating (the thread runs while the main thread
waits in a collective or a kernel), so slowness is not reported as death.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time

from powerclip.errors import UserError

log = logging.getLogger(__name__)

PREFIX = "powerclip/peers/"
BEAT_S = 1.0  # one store write per rank per second: ~1000 writes/s for 1000 ranks, trivial for TCPStore
STALE_S = 4.0  # a rank whose beat did not move for this long is gone (4 missed beats: room for load)
CONNECT_S = 10.0  # store connection and request timeout of the watch (never the training's)
LINGER_S = STALE_S + 2 * CONNECT_S  # rank 0 keeps the store up this long at most for the others' verdicts


class PeerLostError(UserError, RuntimeError):
    """A peer rank stopped (its message names the rank, host and pid, and what failed here)."""


class PeerWatch:
    """This rank's heartbeat thread and the read-back of every rank's beats (see the module doc)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int) -> None:
        self.host, self.port, self.rank, self.world_size = host, port, rank, world_size
        self.identity = f"{socket.gethostname()} pid {os.getpid()}"
        self.store_owner: str | None = None  # rank 0's identity, read once: it is lost with the store
        self.store_owner_verdict: list[tuple[int, str]] | None = None  # the ranks rank 0 named, if it did
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _client(self):
        import torch.distributed as dist

        store = dist.TCPStore(self.host, self.port, is_master=False, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=CONNECT_S))
        return dist.PrefixStore(PREFIX, store)

    def start(self) -> PeerWatch:
        """Register this rank and start beating; reads rank 0's identity (needed if the store dies)."""
        store = self._client()
        store.set(f"id/{self.rank}", self.identity)
        store.set(f"beat/{self.rank}", "0")
        store.wait(["id/0"], datetime.timedelta(seconds=CONNECT_S))
        self.store_owner = store.get("id/0").decode()
        self._thread = threading.Thread(target=self._beat, args=(store,), name="powerclip-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self, store) -> None:
        n = 0
        while not self._stop.wait(BEAT_S):
            n += 1
            try:
                store.set(f"beat/{self.rank}", str(n))
                if self.rank != 0 and self.store_owner_verdict is None and store.check(["left/0"]):
                    verdict = store.get("left/0").decode()
                    self.store_owner_verdict = self._named(store, [int(r) for r in verdict.split(",") if r.strip()])
            except Exception:  # noqa: BLE001 - the store's host finished or died: the watch ends quietly
                return

    @staticmethod
    def _named(store, ranks: list[int]) -> list[tuple[int, str]]:
        """[(rank, "host pid N"), ...] of ``ranks``, from the identities they registered."""
        return [(r, store.get(f"id/{r}").decode() if store.check([f"id/{r}"]) else "unknown host") for r in ranks]

    def stop(self) -> None:
        self._stop.set()

    def _beats(self, store) -> list[str | None]:
        """Every rank's beat (None: never registered); one round trip when all registered, which
        matters when a thousand survivors ask the store at once."""
        keys = [f"beat/{r}" for r in range(self.world_size)]
        if store.check(keys):
            return [v.decode() for v in store.multi_get(keys)]
        return [store.get(k).decode() if store.check([k]) else None for k in keys]

    def lost_ranks(self, wait_s: float = STALE_S) -> tuple[list[tuple[int, str]], bool]:
        """([(rank, "host pid N"), ...] of the ranks that stopped beating, store lost?).

        Two reads ``wait_s`` apart (monotonic wait); ranks that left because of a lost peer of their
        own are not counted. Nothing stale and the store answering: ([], False). The store gone after
        rank 0 gave its verdict: the ranks rank 0 named, and False.
        """
        try:
            store = self._client()
            first = self._beats(store)
            deadline = time.monotonic() + wait_s
            while (left := deadline - time.monotonic()) > 0:
                time.sleep(min(left, 0.5))
            second = self._beats(store)
            lost = [r for r in range(self.world_size) if r != self.rank and (second[r] is None or first[r] == second[r])
                    and not store.check([f"left/{r}"])]
            found = self._named(store, lost)
            if found:
                store.set(f"left/{self.rank}", ",".join(str(r) for r, _ in found))
                if self.rank == 0:
                    self._linger(store, {r for r, _ in found})
            return found, False
        except Exception:  # noqa: BLE001 - connection refused / reset / timed out: the store's host is gone
            if self.store_owner_verdict:  # rank 0 named the dead before it closed its store
                return self.store_owner_verdict, False
            return [(0, self.store_owner or "unknown host")], True

    def _linger(self, store, lost: set[int]) -> None:
        """Keep this process (and the store it hosts) up until every other survivor has written its
        verdict, or LINGER_S: they read the beats through this store."""
        waiting = [f"left/{r}" for r in range(self.world_size) if r != self.rank and r not in lost]
        deadline = time.monotonic() + LINGER_S
        while waiting and time.monotonic() < deadline:
            waiting = [k for k in waiting if not store.check([k])]
            if waiting:
                time.sleep(0.2)

    def explain(self, error: BaseException, wait_s: float = STALE_S) -> PeerLostError | None:
        """A one-line ``PeerLostError`` naming the ranks that stopped, or None when every rank beats."""
        lost, store_lost = self.lost_ranks(wait_s)
        if not lost:
            return None
        who = ", ".join(f"rank {r} ({ident.replace(' pid ', ', pid ')})" for r, ident in lost)
        how = (f"the rendezvous store at {self.host}:{self.port} that it hosts is unreachable" if store_lost
               else f"no heartbeat for {wait_s:.0f} s")
        first = " ".join(str(error).split())[:200]
        return PeerLostError(f"peer {who} is gone ({how}); rank {self.rank} stopped when a collective failed "
                             f"({type(error).__name__}: {first}). That rank's own log says why it ended "
                             "(killed, out of memory, node lost); restart the job from the last checkpoint")


_WATCH: PeerWatch | None = None


def start_watch(rank: int, world_size: int) -> PeerWatch | None:
    """Start this process's watch when it is one of several ranks that met at MASTER_ADDR:MASTER_PORT."""
    global _WATCH
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if world_size < 2 or not addr or not port:
        return None
    if _WATCH is not None and (_WATCH.rank, _WATCH.world_size) == (rank, world_size):
        return _WATCH
    try:
        _WATCH = PeerWatch(addr, int(port), rank, world_size).start()
    except Exception as e:  # noqa: BLE001 - diagnostics only: training does not depend on it
        log.warning("rank %d: no peer heartbeat (store at %s:%s: %s); a lost rank will not be named",
                    rank, addr, port, e)
        _WATCH = None
    return _WATCH


def stop_watch() -> None:
    """Stop this process's heartbeat (training ended; a later ``start_watch`` starts a new one)."""
    global _WATCH
    if _WATCH is not None:
        _WATCH.stop()
    _WATCH = None


def explain_failure(error: BaseException) -> PeerLostError | None:
    """``PeerLostError`` naming the lost ranks when ``error`` came with a peer's death; else None."""
    if _WATCH is None or isinstance(error, PeerLostError):
        return None
    return _WATCH.explain(error)
