"""The cores this process may run on (``config.machine``): affinity, and the cgroup CPU quota a
container or a Kubernetes limit sets, read from a cgroup tree of the test's own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llm_pool.config import machine
from llm_pool.config.machine import cgroup_cpu_quota, machine_cores


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cgroup mount and /proc/self/cgroup under ``tmp_path``; affinity: 8 cores."""
    root = tmp_path / "cgroup"
    root.mkdir()
    monkeypatch.setattr(machine, "CGROUP_ROOT", root)
    monkeypatch.setattr(machine, "PROC_CGROUP", tmp_path / "proc-self-cgroup")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    return root


def write(path: Path, text: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for line in text.strip().splitlines():
        name, value = line.split("=", 1)
        (path / name).write_text(value + "\n")


def test_no_cgroup_file_leaves_the_affinity(tree: Path) -> None:
    assert (cgroup_cpu_quota(), machine_cores()) == (None, 8)


def test_a_v2_container_quota_at_the_mount_root_bounds_the_cores(tree: Path) -> None:
    """/proc names the host's path; the container sees its own cgroup at the mount's root."""
    (tree.parent / "proc-self-cgroup").write_text("0::/kubepods/burstable/pod1/c0ffee\n")
    write(tree, "cpu.max=150000 100000")
    assert (cgroup_cpu_quota(), machine_cores()) == (1.5, 1)  # rounded down: no thread beyond it


def test_the_smallest_quota_on_the_way_up_wins_and_max_is_none(tree: Path) -> None:
    (tree.parent / "proc-self-cgroup").write_text("0::/system.slice/llm-pool.service\n")
    write(tree / "system.slice" / "llm-pool.service", "cpu.max=max 100000")
    write(tree / "system.slice", "cpu.max=300000 100000")
    assert (cgroup_cpu_quota(), machine_cores()) == (3.0, 3)
    write(tree / "system.slice", "cpu.max=max 100000")
    assert (cgroup_cpu_quota(), machine_cores()) == (None, 8)


def test_v1_cfs_quota_and_its_unlimited_value(tree: Path) -> None:
    (tree.parent / "proc-self-cgroup").write_text("5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n2:cpuset:/\n")
    write(tree / "cpu,cpuacct" / "docker" / "abc", "cpu.cfs_quota_us=200000\ncpu.cfs_period_us=100000")
    assert (cgroup_cpu_quota(), machine_cores()) == (2.0, 2)
    write(tree / "cpu,cpuacct" / "docker" / "abc", "cpu.cfs_quota_us=-1")
    assert (cgroup_cpu_quota(), machine_cores()) == (None, 8)


def test_a_quota_below_one_core_still_gives_one_and_the_affinity_bounds_a_large_one(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tree.parent / "proc-self-cgroup").write_text("0::/\n")
    write(tree, "cpu.max=50000 100000")
    assert (cgroup_cpu_quota(), machine_cores()) == (0.5, 1)
    write(tree, "cpu.max=6400000 100000")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert machine_cores() == 2


def test_unreadable_or_garbled_files_are_no_quota(tree: Path) -> None:
    (tree.parent / "proc-self-cgroup").write_bytes(b"garbled\n1:name=\xff:/\n0::/a/b/c\n")
    write(tree / "a" / "b" / "c", "cpu.max=lots\n")
    write(tree / "a" / "b", "cpu.max=-5 100000")
    write(tree / "a", "cpu.max=" + "9" * 400 + " 1")
    write(tree, "cpu.max=100000 0")
    assert (cgroup_cpu_quota(), machine_cores()) == (None, 8)
