"""Machine-load helpers shared by the benchmark scripts in tools/."""

from __future__ import annotations

import os
from pathlib import Path


def busy_cpu_s() -> float:
    """CPU seconds spent by the whole machine (all processes) since boot, from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def loadavg() -> str:
    """1/5/15-minute load averages: other work on the machine skews timings."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"
