"""Failure detection across ranks, so that a failing rank never hangs the others.

Every rank beats a heartbeat counter in the job's key-value store (torchrun's TCPStore at
MASTER_ADDR:MASTER_PORT) from a background thread. A rank that raises writes its error there.
Before each collective the ranks meet at a named checkpoint: a rank waits until every rank has
arrived, and stops with ``RankFailure`` naming the culprit as soon as one reports an error, or
when one's heartbeat has not moved for ``timeout_s`` (killed, hung, or its machine lost). While
think blocks decode no collective runs; a rank only checks, between steps, whether another one
has reported a failure.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from paradec.errors import ParadecError

_POLL_S = 0.02  # the longest wait between looks at the store; the first looks come sooner
_FIRST_POLL_S = 1e-4


class RankFailure(ParadecError, RuntimeError):
    """Another rank failed or stopped responding."""


class Guard:
    def __init__(self, rank: int, world_size: int, timeout_s: float, heartbeat_s: float = 0.5):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.heartbeat_s = min(heartbeat_s, timeout_s / 4)
        self.run = 0
        self.store = _client(timeout_s)
        self._stop = threading.Event()
        self._beats = threading.Thread(target=self._beat, name="paradec-heartbeat", daemon=True)
        self._beats.start()

    def _beat(self) -> None:
        store = _client(self.timeout_s)  # the thread's own connection
        while not self._stop.is_set():
            try:
                store.add(f"paradec/hb/{self.rank}", 1)
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending
                return
            self._stop.wait(self.heartbeat_s)

    def close(self) -> None:
        self._stop.set()
        self._beats.join(timeout=2 * self.heartbeat_s + 1)

    def new_run(self) -> None:
        """Every rank calls this once per generate call, so each call has its own keys."""
        self.run += 1

    def _key(self, name: str) -> str:
        return f"paradec/run{self.run}/{name}"

    def report(self, error: BaseException) -> None:
        """Tell the other ranks that this one failed (the first report wins). A rank that only
        noticed another's failure passes that one on, so everyone names the same culprit."""
        if isinstance(error, RankFailure):
            message = str(error)
        else:
            message = f"rank {self.rank} failed: {type(error).__name__}: {error}"
        try:
            self.store.compare_set(self._key("error"), "", message)
        except Exception:  # noqa: BLE001 - nothing more can be told
            pass

    def check(self) -> None:
        """Raise if any rank has reported a failure (cheap: one store look-up)."""
        if self.store.check([self._key("error")]):
            raise RankFailure(self.store.get(self._key("error")).decode())

    def meet(self, checkpoint: str) -> None:
        """Wait until every rank reaches ``checkpoint``, or fail naming the rank that won't."""
        self.store.set(self._key(f"{checkpoint}/{self.rank}"), "1")
        seen: dict[int, tuple[int, float]] = {}
        pause = _FIRST_POLL_S  # ranks usually arrive within a millisecond of each other: look again soon
        while True:
            self.check()
            missing = [r for r in range(self.world_size) if not self.store.check([self._key(f"{checkpoint}/{r}")])]
            if not missing:
                return
            now = time.monotonic()
            for r in missing:
                beats = self.store.add(f"paradec/hb/{r}", 0)
                last = seen.get(r)
                if last is None or last[0] != beats:
                    seen[r] = (beats, now)
                elif now - last[1] > self.timeout_s:
                    raise RankFailure(
                        f"rank {r} stopped responding: no heartbeat for {self.timeout_s:.0f} s while the "
                        f"others waited at {checkpoint!r} (killed, hung or disconnected)"
                    )
            time.sleep(pause)
            pause = min(2 * pause, _POLL_S)


def _client(timeout_s: float):
    """A client connection to the job's store."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        raise RankFailure("MASTER_ADDR and MASTER_PORT must be set (torchrun sets them) for failure detection")
    return dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s))
