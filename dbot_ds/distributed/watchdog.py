"""A rank that dies or hangs must not hang the others forever.

Every collective runs under the process group's timeout (`run.collective_timeout_s`, passed to
`deepspeed.init_distributed`): a peer that died closes its sockets and the survivors' collective fails at once;
a peer that hangs (stopped, stuck in I/O) makes it fail after the timeout. Either way the survivors get an
exception from inside torch.distributed, which says little about who is missing.

To name the lost rank, every rank runs a daemon thread that writes a heartbeat (time, step) into the rendezvous
store every few seconds, off the training thread and without touching the device. When a collective fails, the
ranks whose heartbeat stopped are the lost ones. If the store itself is gone, rank 0 (which hosts it) is.
"""
from __future__ import annotations

import threading
import time

import torch.distributed as dist

_KEY = "dbot/heartbeat/{}"


class LostRank(RuntimeError):
    """A collective failed because a rank died or hung; the message names it. Exit code 4."""


class Heartbeat:
    """Writes (time, step) for this rank into the default store every `interval_s` seconds."""

    current: Heartbeat | None = None             # this process's, for the entry point's error handler

    def __init__(self, rank: int, world: int, interval_s: float):
        self.rank, self.world, self.interval_s = rank, world, interval_s
        self.step = 0                              # set by the trainer; read by the thread (a plain int)
        self.store = dist.distributed_c10d._get_default_store() if world > 1 else None
        self._stop = threading.Event()
        Heartbeat.current = self
        if self.store is not None:
            self._beat()
            threading.Thread(target=self._run, name="dbot-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        self.store.set(_KEY.format(self.rank), f"{time.time():.3f} {self.step}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
            except Exception:          # noqa: BLE001 - the store is gone (rank 0 died): nothing left to report to
                return

    def stop(self) -> None:
        self._stop.set()

    def lost(self, error: BaseException) -> LostRank:
        """Name the ranks whose heartbeat stopped (call after a collective failed)."""
        self.stop()
        stale_s = 2.5 * self.interval_s
        deadline = time.time() + stale_s + self.interval_s   # a rank that just died still has a fresh heartbeat
        while True:
            try:
                beats = {r: self._read(r) for r in range(self.world)}
            except Exception:          # noqa: BLE001 - the store lives in rank 0's process
                return LostRank(f"lost rank 0: the rendezvous store it hosts no longer answers ({_short(error)})")
            now = time.time()
            stale = {r: b for r, b in beats.items() if r != self.rank and now - b[0] > stale_s}
            if stale or now > deadline:
                break
            time.sleep(self.interval_s / 2)
        if not stale:
            return LostRank(f"a collective failed but every rank's heartbeat is alive ({_short(error)})")
        names = ", ".join(f"rank {r} (last heartbeat {now - t:.0f} s ago, at step {s})" for r, (t, s) in stale.items())
        return LostRank(f"lost {names}: it died or hangs, and rank {self.rank} stopped waiting for it "
                        f"({_short(error)}). `--resume auto` continues from the last complete checkpoint")

    def _read(self, rank: int) -> tuple[float, int]:
        key = _KEY.format(rank)
        if not self.store.check([key]):
            return 0.0, -1
        t, step = self.store.get(key).decode().split()
        return float(t), int(step)


def is_comm_failure(e: BaseException) -> bool:
    """An exception that comes from a failed collective (timeout, peer gone), as opposed to a bug of ours."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "Timed out", "timed out", "Connection closed by peer", "Connection reset by peer", "Broken pipe",
        "NCCL communicator was aborted", "Watchdog caught collective operation timeout"))


def _short(e: BaseException) -> str:
    line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return line[:200]
