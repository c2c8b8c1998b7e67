"""How many CPU threads torch computes with: the physical cores this process may use that other
work is not already using, shared among the processes of a `torchrun` on this machine.

Intra-op threads beyond the free cores do not add speed, they take it away: on a 2-core machine
already running other jobs, a 3-epoch VAE fit took 38 s with torch's default of 2 threads and 4 s
with 1, because OpenMP's workers wait for each other at every small op while the other jobs hold
the cores (README, "Threads").
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["physical_cores", "free_cores", "default_threads", "set_threads"]


def _allowed_cpus():
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return list(range(os.cpu_count() or 1))


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyperthread siblings count once),
    capped by a cgroup CPU quota (containers, CI runners)."""
    cpus = _allowed_cpus()
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:  # no sysfs: count logical CPUs
            cores.add(("", str(cpu)))
    count = len(cores) or 1
    try:  # cgroup v2: "max 100000" or "QUOTA PERIOD"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return count


def free_cores() -> int:
    """Physical cores not already busy with other work (the 1-minute load average, rounded)."""
    cores = physical_cores()
    try:
        busy = int(round(os.getloadavg()[0]))
    except (AttributeError, OSError):  # Windows
        busy = 0
    return max(1, cores - busy)


def default_threads() -> int:
    """The thread count used when none is given: ``OMP_NUM_THREADS`` if set (the user chose), else
    the free physical cores divided among this machine's ``torchrun`` processes."""
    chosen = os.environ.get("OMP_NUM_THREADS", "").strip()
    if chosen.isdigit() and int(chosen) > 0:
        return int(chosen)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, free_cores() // max(1, local_processes))


def set_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op thread count (``None``: ``default_threads()``); returns it."""
    import torch

    num_threads = default_threads() if num_threads is None else int(num_threads)
    if num_threads < 1:
        raise ValueError(f"threads must be >= 1, got {num_threads}")
    torch.set_num_threads(num_threads)
    return num_threads
