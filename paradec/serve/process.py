"""Process hygiene for the server's children: no engine or rank outlives the process that
started it, and one signal ends an engine with every rank it started.

``die_with_parent`` asks Linux to SIGKILL this process when its parent dies
(``PR_SET_PDEATHSIG``, through ctypes) and exits at once if the parent is already gone (the race
between fork and the ``prctl`` call). Elsewhere it does nothing; the engine also polls
``getppid`` (``Engine._alive``). The kernel sends the signal when the parent *thread* that
started the child ends, so the frontend starts engines from its event-loop thread only, the
thread that lives as long as it does.

``descendants`` lists a process's descendants from ``/proc`` (tests and benchmarks use it to
check that nothing survives a stop).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """This process gets ``sig`` when its parent dies (Linux); exits now if it already has."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl here: the getppid polling remains
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def kill_group(pgid: int) -> None:
    """SIGKILL to a process group (an engine that called ``os.setpgrp`` and its ranks); a group
    that is gone already is fine."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields from the state on (the state is [0], the parent [1], the start
    time [19]); None when the process is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone)."""
    return _stat(pid) is not None


def descendants(pid: int) -> dict[int, tuple[str, str]]:
    """{pid: (start time, command line)} of every live descendant of ``pid`` (from /proc; Linux).
    Take it before a stop: once the parent is gone, its orphans are init's children."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
            starts[int(entry)] = fields[19]
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = (starts[child], command_line(child))
                todo.append(child)
    return found


def survivors(snapshot: dict[int, tuple[str, str]]) -> dict[int, str]:
    """{pid: command line} of the processes of a ``descendants`` snapshot still alive (the same
    process: its start time is checked, so a reused pid does not count)."""
    left = {}
    for pid, (start, line) in snapshot.items():
        fields = _stat(pid)
        if fields is not None and fields[19] == start:
            left[pid] = line
    return left


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
