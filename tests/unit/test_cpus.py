"""``server.workers = "auto"``: one worker per CPU the process may use.

The cgroup parsing runs on written-out /proc and /sys trees (the formats of
proc(5) and the kernel's cgroup v1/v2 files); the affinity mask and a real
cgroup quota are applied to a child process, which then counts its CPUs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.cpus import cgroup_cpu_quota, usable_cpus

COUNT = [sys.executable, "-c", "from gateway.cpus import usable_cpus; print(usable_cpus())"]


def _count_in_child(prepare: Callable[[], object]) -> str:
    """usable_cpus() as a child process counts it after ``prepare()`` ran in it."""
    out = subprocess.run(
        COUNT, capture_output=True, text=True, timeout=30, check=True, preexec_fn=prepare
    )
    return out.stdout.strip()


def _proc(tmp: Path, cgroup: str, mountinfo: str) -> Path:
    proc = tmp / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "self" / "mountinfo").write_text(mountinfo)
    return proc


def _write(directory: Path, **files: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("__", ".")).write_text(text + "\n")


def test_cgroup_v2_quota_is_the_smallest_along_the_path(tmp_path: Path) -> None:
    root = tmp_path / "cg2"
    _write(root, cpu__max="max 100000")
    _write(root / "system.slice", cpu__max="300000 100000")
    _write(root / "system.slice" / "gateway.service", cpu__max="150000 100000")
    proc = _proc(
        tmp_path,
        "0::/system.slice/gateway.service\n",
        f"30 23 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
    )
    assert cgroup_cpu_quota(proc) == 1.5
    (root / "system.slice" / "gateway.service" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(proc) == 3.0


def test_cgroup_v1_quota_in_a_container_whose_mount_root_is_its_own_cgroup(
    tmp_path: Path,
) -> None:
    """Docker without a cgroup namespace: /proc/self/cgroup names the host path, the
    mount's root is that same path, so the quota is at the mount point itself."""
    point = tmp_path / "cpu"
    _write(point, cpu__cfs_quota_us="250000", cpu__cfs_period_us="100000")
    proc = _proc(
        tmp_path,
        "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n",
        f"40 31 0:35 /docker/abc {point} ro,nosuid - cgroup cgroup rw,cpu,cpuacct\n"
        f"41 31 0:36 /docker/abc {tmp_path / 'memory'} ro - cgroup cgroup rw,memory\n",
    )
    assert cgroup_cpu_quota(proc) == 2.5


def test_no_quota_and_unreadable_files_mean_no_limit(tmp_path: Path) -> None:
    point = tmp_path / "cpu"
    _write(point, cpu__cfs_quota_us="-1", cpu__cfs_period_us="100000")
    proc = _proc(tmp_path, "1:cpu:/\n", f"32 31 0:29 / {point} rw - cgroup cgroup rw,cpu\n")
    assert cgroup_cpu_quota(proc) is None
    assert cgroup_cpu_quota(tmp_path / "missing") is None
    assert usable_cpus(tmp_path / "missing") == len(os.sched_getaffinity(0))


def test_a_quota_below_one_cpu_still_runs_one_worker(tmp_path: Path) -> None:
    root = tmp_path / "cg2"
    _write(root, cpu__max="20000 100000")
    proc = _proc(tmp_path, "0::/\n", f"30 23 0:26 / {root} rw - cgroup2 cgroup2 rw\n")
    assert cgroup_cpu_quota(proc) == pytest.approx(0.2)
    assert usable_cpus(proc) == 1


def test_the_affinity_mask_limits_the_count() -> None:
    """A process pinned to one CPU (taskset -c 0) runs one worker on any machine."""
    assert _count_in_child(lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})) == "1"


def _v1_cpu_mount() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if tail[:1] == ["cgroup"] and "cpu" in tail[2].split(","):
            return Path(fields[4])
    return None


def test_a_real_cgroup_cpu_quota_limits_the_count() -> None:
    """A child moved into a cgroup with 1.5 CPUs of quota counts min(affinity, 1)."""
    mount = _v1_cpu_mount()
    if mount is None or not os.access(mount, os.W_OK):
        pytest.skip("needs a writable cgroup v1 cpu hierarchy (as root); parsing is tested above")
    group = mount / f"gateway-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("150000")
        procs = group / "cgroup.procs"
        assert _count_in_child(lambda: procs.write_text(str(os.getpid()))) == "1"
    finally:
        if group.exists():
            group.rmdir()
