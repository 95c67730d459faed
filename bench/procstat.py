"""What a process costs, read from /proc (Linux): CPU seconds (user + system) and peak RSS."""

from __future__ import annotations

import os
from collections.abc import Iterable

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU time of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name (field 2) may hold spaces: split after its closing parenthesis.
    fields = raw[raw.rindex(b")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / _TICKS


def total_cpu_seconds(pids: Iterable[int]) -> float:
    """CPU seconds of several processes together; a process that is gone counts 0."""
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def status_kb(pid: int | str, key: str) -> int:
    """A `kB` line of /proc/<pid>/status (VmHWM: peak RSS, VmRSS: current), 0 when absent."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident set size (VmHWM) in MiB."""
    return status_kb(pid, "VmHWM") / 1024


def machine_cpu() -> tuple[float, float]:
    """Busy and total CPU seconds of the whole machine so far (all CPUs, from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice (guest time is inside user)
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return (total - idle) / _TICKS, total / _TICKS


def busy_fraction(before: tuple[float, float], after: tuple[float, float]) -> float:
    """Share of the machine's CPU time that was busy between two `machine_cpu()` readings (0..1)."""
    busy = after[0] - before[0]
    total = after[1] - before[1]
    return busy / total if total > 0 else 0.0
