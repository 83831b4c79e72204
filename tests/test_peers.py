"""powerclip.train.peers in one process against a real TCPStore: rank 0, which hosts the store under
srun-style launches, keeps it up after its verdict until the other survivors have read the beats, so
a survivor whose read window ends later names the rank that died and not rank 0; and one that
finds the store gone after rank 0's verdict names whom rank 0 named.

(tests/test_dead_peer.py kills real training ranks; this test fixes the order of the two survivors'
read windows, which there depends on the machine's load.)"""

from __future__ import annotations

import datetime
import threading
import time

import pytest
import torch.distributed as dist

from powerclip.train import peers
from powerclip.train.dist_env import free_port

WINDOW_S = 1.0  # each survivor's read window (the beats read twice, this far apart)


@pytest.fixture(autouse=True)
def fast_beats(monkeypatch):
    """Ten beats a window: a live rank's counter moves between the two reads even when a busy machine
    delays its thread (at one beat a window, one late beat would count a live rank as gone)."""
    monkeypatch.setattr(peers, "BEAT_S", 0.1)


@pytest.fixture
def store_port():
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=30))
    yield port
    del server


def _watch(port: int, rank: int, world: int = 3) -> peers.PeerWatch:
    return peers.PeerWatch("127.0.0.1", port, rank, world).start()


def test_rank0_keeps_the_store_up_until_the_other_survivor_has_read_the_beats(store_port):
    watches = [_watch(store_port, r) for r in range(3)]
    watches[1].stop()  # rank 1 dies: its beat stands still
    time.sleep(peers.BEAT_S + 0.2)
    ended: dict[int, float] = {}
    verdicts: dict[int, list] = {}

    def survivor(rank: int) -> None:
        verdicts[rank] = watches[rank].lost_ranks(WINDOW_S)
        ended[rank] = time.monotonic()

    t0 = threading.Thread(target=survivor, args=(0,))
    t0.start()
    time.sleep(WINDOW_S + 0.5)  # rank 0's own window is over; rank 2 starts reading only now
    assert t0.is_alive(), "rank 0 returned (and under srun would exit, taking the store) before rank 2 read"
    survivor(2)
    t0.join(timeout=peers.LINGER_S + 10)
    assert not t0.is_alive()
    assert verdicts[0] == ([(1, watches[1].identity)], False)
    assert verdicts[2] == ([(1, watches[1].identity)], False)  # rank 1, through the store rank 0 kept up
    assert ended[0] >= ended[2] - 0.05  # rank 0 let go once rank 2's verdict was in the store
    for w in watches:
        w.stop()


def test_rank0_lingers_no_longer_than_its_bound(store_port, monkeypatch):
    """A survivor that never reads (stuck elsewhere) holds rank 0 for LINGER_S at most."""
    monkeypatch.setattr(peers, "LINGER_S", 1.5)
    watches = [_watch(store_port, r) for r in range(3)]
    watches[1].stop()
    time.sleep(peers.BEAT_S + 0.2)
    start = time.monotonic()
    assert watches[0].lost_ranks(WINDOW_S) == ([(1, watches[1].identity)], False)
    took = time.monotonic() - start
    assert WINDOW_S + 1.5 <= took < WINDOW_S + 1.5 + 20  # the window, the bound, and room for a busy machine
    for w in watches:
        w.stop()


def test_a_survivor_that_finds_the_store_gone_after_rank0s_verdict_names_whom_rank0_named(monkeypatch):
    """Rank 2 blocked in a collective with rank 0 learns of the failure only when rank 0 exits, after its
    linger, taking the store: rank 2's heartbeat thread kept rank 0's verdict, so it names rank 1."""
    monkeypatch.setattr(peers, "LINGER_S", 0.5)
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=30))
    watches = [_watch(port, r) for r in range(3)]
    watches[1].stop()  # rank 1 dies
    time.sleep(peers.BEAT_S + 0.2)
    assert watches[0].lost_ranks(WINDOW_S) == ([(1, watches[1].identity)], False)
    deadline = time.monotonic() + 30  # rank 2's beat thread sees the verdict within a beat or two
    while getattr(watches[2], "store_owner_verdict", None) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    watches[0].stop()
    del server  # rank 0 exits with its store
    monkeypatch.setattr(peers, "CONNECT_S", 1.0)  # the dead store's connection attempts give up sooner
    assert watches[2].lost_ranks(WINDOW_S) == ([(1, watches[1].identity)], False)
    # rank 0 itself killed (no verdict): the store's host is named
    lone = peers.PeerWatch("127.0.0.1", port, 1, 2)
    lone.store_owner = watches[0].identity
    assert lone.lost_ranks(WINDOW_S) == ([(0, watches[0].identity)], True)
    watches[2].stop()
