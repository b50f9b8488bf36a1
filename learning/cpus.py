"""How many CPUs this process may really use, and how many threads the model gets of them.

One rule for serving (learning/runtime.py), training (learning/train.py) and the benchmarks: the
cores in this process's affinity mask, capped by a cgroup CPU quota (a container limited to 2 CPUs
on a 64-core host sees 64 cores in `os.cpu_count()`; OpenMP sized to 64 threads then thrashes).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cpu_budget(cgroup_cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may really use (affinity and cgroup quota), so torch does not oversubscribe."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    return max(1, n)


def decode_threads() -> int:
    """Intra-op threads for decoding on a CPU: one core fewer than the process may use.

    Decoding is memory-bound (1 thread is within 5% of 2 on an idle 2-core box), but when the cores
    are oversubscribed (embeddings, Chroma, the event loop, other processes) OpenMP threads spin at
    every barrier: measured on 2 busy cores, 2 threads fell to 0.5-1.8 tok/s while 1 thread kept
    7.5-8.7 tok/s. OMP_NUM_THREADS, when set, wins (learning/runtime.py).
    """
    return max(1, cpu_budget() - 1)
