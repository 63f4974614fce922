"""What this process may use of the machine it runs on: the one answer backends (a replica's
default ``n_threads``) and ``llm-pool tune`` (the cores it cuts into layouts) share.

``os.cpu_count()`` counts the host's cores, but a process under ``taskset``, in a container with
a cpuset, or under a CPU quota (``docker run --cpus``, a Kubernetes CPU limit) gets fewer, and
more llama.cpp threads than cores make its spinning workers crawl.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

#: Where the cgroup hierarchies are mounted, and this process's cgroups (tests point both at
#: files of their own).
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def machine_cores() -> int:
    """The cores this process may run on: its CPU affinity (``taskset``, a container's cpuset),
    at most its cgroup CPU quota rounded down, and at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cores, math.floor(quota))) if quota is not None else cores


def cgroup_cpu_quota() -> float | None:
    """The smallest CPU quota, in cores, set on this process's cgroup or any cgroup above it
    (cgroup v2's ``cpu.max``, v1's ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); None when
    none is set or none can be read.  A container often sees its own cgroup at the mount's root
    while ``/proc`` names the host's path: walking up to the root reads it either way."""
    try:
        lines = PROC_CGROUP.read_text(errors="replace").splitlines()  # a cgroup name may hold any byte
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:  # not "id:controllers:path"
            continue
        _, controllers, path = fields
        if controllers == "":
            base, version = CGROUP_ROOT, 2
        elif "cpu" in controllers.split(","):
            base, version = CGROUP_ROOT / controllers, 1
        else:
            continue
        parts = [p for p in path.split("/") if p and p != ".."]
        for depth in range(len(parts), -1, -1):
            quota = _read_quota(base.joinpath(*parts[:depth]), version)
            if quota is not None:
                quotas.append(quota)
    return min(quotas, default=None)


def _read_quota(folder: Path, version: int) -> float | None:
    try:
        if version == 2:
            limit, period = (folder / "cpu.max").read_text().split()[:2]
        else:
            limit, period = ((folder / f"cpu.cfs_{n}_us").read_text().strip() for n in ("quota", "period"))
        if limit in ("max", "-1"):
            return None
        quota, length = int(limit), int(period)
        return quota / length if quota > 0 and length > 0 else None
    except (OSError, ValueError, ArithmeticError):  # unreadable, not numbers, too large to divide
        return None
