"""How many CPUs this process may use: what ``server.workers = "auto"`` starts.

``os.cpu_count()`` counts the machine's CPUs, not ours. A process pinned with
``taskset``/``cpuset`` (its affinity mask) or given a CPU quota by its cgroup
(a container's ``--cpus``, Kubernetes ``resources.limits.cpu``, systemd's
``CPUQuota=``) may use fewer, and a worker per CPU it cannot use only adds
memory and contention. The quota is read for the process's cgroup and each
ancestor (the smallest wins), in cgroup v2 (``cpu.max``) and v1
(``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), and rounded down: a worker is
single-threaded, so 1.5 CPUs of quota run one worker at full speed, while two
would be throttled in turns (at least 1, always).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["cgroup_cpu_quota", "usable_cpus"]


def usable_cpus(proc: Path = Path("/proc")) -> int:
    """CPUs in this process's affinity mask, capped by its cgroup CPU quota; at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(proc)
    if quota is not None:
        cpus = min(cpus, math.floor(quota))
    return max(1, cpus)


def cgroup_cpu_quota(proc: Path = Path("/proc")) -> float | None:
    """The CPU quota (in CPUs) of this process's cgroups and their ancestors, or None."""
    try:
        memberships = (proc / "self" / "cgroup").read_text(encoding="utf-8").splitlines()
        mounts = _cgroup_mounts((proc / "self" / "mountinfo").read_text(encoding="utf-8"))
    except OSError:
        return None
    quotas: list[float] = []
    for line in memberships:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        for root, point, fstype, options in mounts:
            if hierarchy == "0" and not controllers and fstype == "cgroup2":
                quotas += _along(point, root, path, _v2_quota)
            elif fstype == "cgroup" and "cpu" in controllers.split(",") and "cpu" in options:
                quotas += _along(point, root, path, _v1_quota)
    return min(quotas) if quotas else None


def _cgroup_mounts(mountinfo: str) -> list[tuple[str, Path, str, set[str]]]:
    """(root, mount point, fs type, super options) of each cgroup mount (proc(5) mountinfo)."""
    out = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3 or not tail[0].startswith("cgroup"):
            continue
        root, point = (_unescape(f) for f in fields[3:5])
        out.append((root, Path(point), tail[0], set(tail[2].split(","))))
    return out


def _unescape(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        text = text.replace(code, char)
    return text


def _along(point: Path, root: str, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """Quotas from the process's cgroup directory up to the mount point."""
    relative = path[len(root) :] if path.startswith(root) else ""
    here = point / relative.strip("/")
    found = []
    while True:
        quota = read(here)
        if quota is not None:
            found.append(quota)
        if here == point or point not in here.parents:
            return found
        here = here.parent


def _v2_quota(directory: Path) -> float | None:
    """``cpu.max``: "max 100000" (no limit) or "150000 100000" (1.5 CPUs)."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = (directory / "cpu.max").read_text(encoding="ascii").split()
        if quota != "max" and int(period) > 0:
            return int(quota) / int(period)
    return None


def _v1_quota(directory: Path) -> float | None:
    """``cpu.cfs_quota_us`` (-1: no limit) over ``cpu.cfs_period_us``."""
    with contextlib.suppress(OSError, ValueError):
        quota = int((directory / "cpu.cfs_quota_us").read_text(encoding="ascii"))
        period = int((directory / "cpu.cfs_period_us").read_text(encoding="ascii"))
        if quota > 0 and period > 0:
            return quota / period
    return None
