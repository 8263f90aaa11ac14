"""Failure detection across ranks: liveness means progress.

Every rank publishes two counters in the job's key-value store (torchrun's TCPStore at
MASTER_ADDR:MASTER_PORT) from a background thread, every ``heartbeat_s``: a heartbeat (the
process runs) and its **progress** (advanced by the decoding loop itself: every step, every
phase, every arrival at a meeting point; a cheap local increment that the thread publishes).

Before the ranks talk they meet at a named checkpoint. A rank that waits there watches the ranks
that have not arrived: one that reports an error is named at once; one whose progress has not
moved for ``timeout_s`` (``rank_timeout_s``) while others waited for it is named as stuck, and
so is one that is blocked in user code with a heartbeat still beating. Nothing is judged while
nobody waits: ranks idle between two ``generate()`` calls together are fine for as long as they
like.

The verdict is written once (the first wins) and the job then ends fast, the stuck rank first,
so that a launcher names it: the stuck rank's own heartbeat thread reads the verdict, records it
(in torchrun's error file, ``TORCHELASTIC_ERROR_FILE``, and on stderr) and ends its process;
a stuck rank that cannot (stopped, hung with the GIL held) is killed by the rank that judged
it when both run on the same machine, with the verdict written to its error file. Only then do
the waiting ranks raise ``RankFailure`` naming it.

Collectives follow a meeting (``meeting()``); while they run, gloo operations give up after
``timeout_s`` instead of the process group's own timeout, and a collective that breaks because
another rank died or froze inside it names that rank the same way.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from paradec.errors import ParadecError

_POLL_S = 0.02  # the longest wait between looks at the store; the first looks come sooner
_FIRST_POLL_S = 1e-4
_LOOK_S = 0.1  # how often a waiting rank reads the missing ranks' progress
_LAG_S = 0.5  # after the stuck rank has ended, the others wait this long before failing (a launcher sees it first)


class RankFailure(ParadecError, RuntimeError):
    """Another rank failed or stopped making progress."""


class Guard:
    """One rank's failure detection for the distributed decodes of one engine
    (``paradec.engine.Engine.guard``). name: the guard's own keys in the store; the ranks' guards
    of one engine share it."""

    def __init__(self, rank: int, world_size: int, timeout_s: float, name: str, heartbeat_s: float = 0.5):
        self.rank, self.world_size = rank, world_size
        self._heartbeat_max = heartbeat_s
        self.timeout_s = timeout_s
        self.run = 0
        self.progress = 0  # advanced by this rank's decoding; published by the heartbeat thread
        # keys of this guard in this incarnation of the job (torchrun keeps its store across restarts)
        self._ns = f"paradec/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{name}"
        self.store = _client(timeout_s)
        try:
            self.store.delete_key(f"{self._ns}/gone/{rank}")
        except Exception:  # noqa: BLE001 - a store without delete_key: nothing to undo
            pass
        self.store.set(f"{self._ns}/who/{rank}", json.dumps(_identity()))
        self._stop = threading.Event()
        self._beats = threading.Thread(target=self._beat, name="paradec-heartbeat", daemon=True)
        self._beats.start()

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    @timeout_s.setter
    def timeout_s(self, value: float) -> None:
        self._timeout_s = value
        self.heartbeat_s = min(self._heartbeat_max, value / 4)

    # --- this rank -----------------------------------------------------------------------

    def tick(self) -> None:
        """This rank made progress (a step, a phase, an arrival). Costs an integer increment."""
        self.progress += 1

    def check(self) -> None:
        """Between steps: counts as progress, and raises if any rank has reported a failure
        (one store look-up)."""
        self.progress += 1
        self._check_error()

    def new_run(self) -> None:
        """Every rank calls this once per generate call, so each call has its own keys."""
        self.run += 1

    def close(self) -> None:
        self._stop.set()
        self._beats.join(timeout=2 * self.heartbeat_s + 1)
        try:
            self.store.set(f"{self._ns}/gone/{self.rank}", "1")  # left on purpose: never killed for it
        except Exception:  # noqa: BLE001 - the store is gone: the job is ending
            pass

    def report(self, error: BaseException) -> None:
        """Tell the other ranks that this one failed (the first report wins). A rank that only
        noticed another's failure passes that one on, so everyone names the same culprit."""
        if isinstance(error, RankFailure):
            message = str(error)
        else:
            message = f"rank {self.rank} failed: {type(error).__name__}: {error}"
        try:
            self.store.compare_set(self._key("error"), "", _verdict(message, None, self.rank))
        except Exception:  # noqa: BLE001 - nothing more can be told
            pass

    # --- meeting the others ----------------------------------------------------------------

    def meet(self, checkpoint: str) -> None:
        """Wait until every rank reaches ``checkpoint``, or fail naming the rank that won't:
        one that reported an error, or one that made no progress for ``timeout_s`` while this
        rank waited for it."""
        self.tick()
        self.store.set(self._key(f"{checkpoint}/{self.rank}"), "1")
        watch: dict[int, list] = {}  # rank -> [progress, beats, progress seen moving, beats seen moving]
        pause, next_look, last_look = _FIRST_POLL_S, 0.0, None
        while True:
            self._check_error()
            missing = [r for r in range(self.world_size) if not self.store.check([self._key(f"{checkpoint}/{r}")])]
            if not missing:
                return
            now = time.monotonic()
            if now >= next_look:
                if last_look is not None and now - last_look > max(1.0, 10 * _LOOK_S):
                    for w in watch.values():  # this rank itself did not run (stopped, starved): start over
                        w[2] = w[3] = now
                last_look, next_look = now, now + _LOOK_S
                for r in missing:
                    progress = self.store.add(f"{self._ns}/progress/{r}", 0)
                    beats = self.store.add(f"{self._ns}/hb/{r}", 0)
                    w = watch.setdefault(r, [progress, beats, now, now])
                    if progress != w[0]:
                        w[0], w[2] = progress, now
                    if beats != w[1]:
                        w[1], w[3] = beats, now
                    if now - w[2] > self.timeout_s:
                        raise self._stuck(r, checkpoint, now - w[2], beats, now - w[3])
            time.sleep(pause)
            pause = min(2 * pause, _POLL_S)

    @contextmanager
    def meeting(self, checkpoint: str):
        """``meet(checkpoint)``, then the block's collectives: under gloo each operation gives up
        after ``timeout_s`` (the process group's own timeout is restored after), and one that
        breaks because another rank failed, died or froze raises ``RankFailure`` naming it."""
        self.meet(checkpoint)
        restore = _limit_collectives(self.timeout_s)
        try:
            yield
        except RuntimeError as error:
            if isinstance(error, ParadecError):
                raise
            failure = self._diagnose(checkpoint, error)
            if failure is None:
                raise
            raise failure from error
        finally:
            restore()
        self.tick()

    # --- judging -------------------------------------------------------------------------

    def _stuck(self, r: int, checkpoint: str, stalled: float, beats: int, silent: float) -> RankFailure:
        where = f"while the others waited for it at {checkpoint!r}"
        beating = beats > 0 and silent < self._lapse()
        if beats == 0:
            message = (f"rank {r} made no progress for {stalled:.1f} s {where}: it never started paradec's "
                       "failure detection (still starting up, or stuck before its first generate())")
        elif beating:
            message = (f"rank {r} made no progress for {stalled:.1f} s {where} (its process is alive but not "
                       "decoding: blocked in user code outside generate(), or hung)")
        else:
            message = (f"rank {r} stopped responding: it made no progress and sent no heartbeat for "
                       f"{stalled:.1f} s {where} (killed, stopped or disconnected)")
        return self._convict(r, message, beating)

    def _diagnose(self, checkpoint: str, error: BaseException) -> RankFailure | None:
        """A collective after ``checkpoint`` broke: name the rank behind it, if another one is.
        Watches the others' heartbeats for a few beats; None when every other rank is alive
        and none reported an error (then the error is this rank's own)."""
        others = [r for r in range(self.world_size) if r != self.rank]
        try:
            first = {r: self.store.add(f"{self._ns}/hb/{r}", 0) for r in others}
            deadline = time.monotonic() + self._lapse()
            while time.monotonic() < deadline:
                self._check_error()
                time.sleep(_POLL_S)
            silent = [r for r in others if self.store.add(f"{self._ns}/hb/{r}", 0) == first[r]]
        except RankFailure as failure:
            return failure
        except Exception:  # noqa: BLE001 - the store is gone too: nothing to tell
            return None
        if not silent:
            return None
        r = silent[0]
        cause = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        return self._convict(r, f"rank {r} stopped responding: no heartbeat for {self._lapse():.1f} s while the "
                                f"others talked with it after {checkpoint!r} (killed, stopped or disconnected; "
                                f"the collective failed with: {cause})", beating=False)

    def _convict(self, r: int, message: str, beating: bool) -> RankFailure:
        """Writes the verdict (unless another came first: then that one), ends rank ``r`` first
        and returns the failure to raise."""
        value = _verdict(message, r, self.rank)
        try:
            current = self.store.compare_set(self._key("error"), "", value)
        except Exception:  # noqa: BLE001 - the store is gone: say what this rank saw
            return RankFailure(message)
        if current != value.encode():
            return self._failure(current)
        # said now: a launcher may SIGTERM this rank as soon as the stuck one has ended
        print(f"[paradec rank {self.rank}] {message}; ending it", file=sys.stderr, flush=True)
        try:
            self.store.set(f"{self._ns}/stuck/{r}", message)  # its heartbeat thread ends it
            if not (beating and self._wait_for(f"{self._ns}/ended/{r}", 2 * self.heartbeat_s + 0.5)):
                self._kill(r, message)
        except Exception:  # noqa: BLE001 - the store went away with it
            pass
        finally:
            try:
                self.store.set(self._key("settled"), "1")
            except Exception:  # noqa: BLE001
                pass
        time.sleep(_LAG_S)
        return RankFailure(message)

    def _kill(self, r: int, message: str) -> None:
        """Ends stuck rank ``r`` that cannot end itself, when it runs on this machine: writes the
        verdict to its torchrun error file (unless it wrote one) and sends it SIGKILL."""
        if not self.store.check([f"{self._ns}/who/{r}"]) or self.store.check([f"{self._ns}/gone/{r}"]):
            return
        who = json.loads(self.store.get(f"{self._ns}/who/{r}"))
        start = who.get("start")
        if who.get("machine") != _machine() or start is None or _start_time(who["pid"]) != start:
            return  # elsewhere (its launcher ends it), or that process is gone
        path = who.get("error_file")
        if path and not os.path.exists(path):
            _record_for_torchrun(path, message)
        os.kill(who["pid"], signal.SIGKILL)
        self.store.set(f"{self._ns}/ended/{r}", "killed")
        print(f"[paradec rank {self.rank}] ended rank {r} (pid {who['pid']}, SIGKILL): {message}",
              file=sys.stderr, flush=True)

    def _check_error(self) -> None:
        if self.store.check([self._key("error")]):
            raise self._failure(self.store.get(self._key("error")))

    def _failure(self, raw: bytes) -> RankFailure:
        """The failure a rank reported; when the verdict names a stuck rank, waits (bounded)
        until that one has ended, so that it ends first."""
        try:
            data = json.loads(raw)
        except ValueError:
            return RankFailure(raw.decode(errors="replace"))
        stuck = data.get("stuck")
        if stuck is not None and stuck != self.rank:
            self._wait_for(self._key("settled"), 2 * self.heartbeat_s + 3.0)
            time.sleep(_LAG_S)
        return RankFailure(data["message"])

    def _wait_for(self, key: str, seconds: float) -> bool:
        """Polls (the store's own wait leaves its connection unusable when it times out)."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                if self.store.check([key]):
                    return True
            except Exception:  # noqa: BLE001 - the store is gone: nothing to wait for
                return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S)

    def _lapse(self) -> float:
        """A heartbeat not seen to move for this long has stopped."""
        return 3 * self.heartbeat_s + 0.25

    def _key(self, name: str) -> str:
        return f"{self._ns}/run{self.run}/{name}"

    # --- the heartbeat thread -------------------------------------------------------------

    def _beat(self) -> None:
        try:
            store = _client(self.timeout_s)  # the thread's own connection
        except Exception:  # noqa: BLE001
            return
        published = 0
        named = f"{self._ns}/stuck/{self.rank}"
        while not self._stop.is_set():
            try:
                store.add(f"{self._ns}/hb/{self.rank}", 1)
                progress = self.progress
                if progress != published:
                    store.add(f"{self._ns}/progress/{self.rank}", progress - published)
                    published = progress
                if store.check([named]):
                    self._end(store, store.get(named).decode())
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending
                return
            self._stop.wait(self.heartbeat_s)

    def _end(self, store, message: str) -> None:
        """The others waited for this rank and judged it stuck: end the process, the verdict
        recorded, so that the job ends and a launcher names this rank."""
        try:
            print(f"[paradec rank {self.rank}] {message}; the other ranks gave up on this one, which ends now",
                  file=sys.stderr, flush=True)
            _record_for_torchrun(os.environ.get("TORCHELASTIC_ERROR_FILE"), message)
            store.set(f"{self._ns}/ended/{self.rank}", "exited")
        finally:
            os._exit(1)


def _verdict(message: str, stuck: int | None, by: int) -> str:
    return json.dumps({"message": message, "stuck": stuck, "by": by})


def _record_for_torchrun(path: str | None, message: str) -> None:
    """Writes ``message`` where torchrun's agent reads a worker's error (the layout of
    ``torch.distributed.elastic``'s ErrorHandler), so its summary names that rank and says why."""
    if not path:
        return
    text = f"RankFailure: {message}"
    data = {"message": {"message": text, "extraInfo": {"py_callstack": text + "\n(recorded by paradec's rank guard)",
                                                       "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass


def _limit_collectives(seconds: float):
    """Makes the default process group's gloo operations give up after ``seconds``; returns
    what restores its own timeout. NCCL groups are left alone (their watchdog ends the process)."""
    try:
        backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
        if not isinstance(backend, dist.ProcessGroupGloo):
            return lambda: None
        before = backend.options._timeout
        limit = timedelta(seconds=seconds)
        if before <= limit:
            return lambda: None
        backend._set_default_timeout(limit)
        return lambda: backend._set_default_timeout(before)
    except Exception:  # noqa: BLE001 - no group, or an API that moved: the group's own timeout holds
        return lambda: None


def _identity() -> dict:
    """What another rank needs to end this process: where it runs, its pid and start time (so a
    reused pid is never hit), and torchrun's error file for it."""
    return {"machine": _machine(), "pid": os.getpid(), "start": _start_time(os.getpid()),
            "error_file": os.environ.get("TORCHELASTIC_ERROR_FILE", "")}


def _machine() -> str:
    """The host, its boot and the pid namespace: equal only where pids mean the same process."""
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        parts.append("no-proc")
    return "|".join(parts)


def _start_time(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (Linux), None if unknown or gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _client(timeout_s: float):
    """A client connection to the job's store."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        raise RankFailure("MASTER_ADDR and MASTER_PORT must be set (torchrun sets them) for failure detection")
    return dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s))
