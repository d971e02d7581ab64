"""What a process costs, read from /proc: CPU seconds (utime+stime) and resident memory.

A gateway may be a wrapper around its real server (``npx`` → node, a supervisor → workers), so
every reading covers the process *and its descendants*. Linux only; elsewhere the readings are
``None`` and the report says so rather than inventing numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (via /proc/PID/task/TID/children)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = (task / "children").read_text().split()
                todo.extend(int(k) for k in kids)
        except OSError:
            continue
    return out


def _cpu_ticks(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of the man page)


def cpu_seconds(pid: int) -> float | None:
    """CPU time used so far by ``pid`` and its descendants, in seconds."""
    if not Path(f"/proc/{pid}/stat").exists():
        return None
    return sum(_cpu_ticks(p) for p in descendants(pid)) / _TICKS


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` and its descendants."""
    total = 0
    found = False
    for p in descendants(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    found = True
                    break
        except OSError:
            continue
    return total if found else None


def pin(pid: int, cores: set[int]) -> bool:
    """Pin ``pid`` and its descendants (all threads) to ``cores``; False if not possible."""
    if not cores or not hasattr(os, "sched_setaffinity"):
        return False
    ok = True
    for p in descendants(pid):
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                os.sched_setaffinity(int(task.name), cores)
        except OSError:
            ok = False
    return ok


def core_plan() -> tuple[set[int], set[int]]:
    """(gateway cores, load-generator + simulator cores). With two or more usable cores the
    gateway under test gets one to itself; with one core both share it."""
    try:
        usable = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return set(), set()
    if len(usable) < 2:
        return set(usable), set(usable)
    return {usable[0]}, set(usable[1:])


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (children inherit it).
    Returns the new soft limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return int(soft)
