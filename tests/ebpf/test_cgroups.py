"""Choice of the cgroup hierarchy, and container ids from cgroup paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from speaker.bpf.cgroups import (
    CgroupError,
    CgroupNames,
    Hierarchy,
    choose_hierarchy,
    container_id_from_path,
    find_hierarchies,
    runtime_uses_v2,
)
from tests.conftest import DATA

ID = "d954436a97ec8d11207a2890efbfe1e9f03fb496d53732b6afc2607a35e0e6c4"
OTHER_ID = "c5702dad090782d8f94996ac16fca056a09babb14276829553db492215f5de61"

# A cgroup v2 host with systemd: one cgroup2 mount at /sys/fs/cgroup and no
# v1 controllers. The line has the mountinfo layout of proc(5).
V2_MOUNTINFO = "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
V2_PROC_CGROUPS = "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpu\t0\t80\t1\nmemory\t0\t80\t1\npids\t0\t80\t1\n"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (f"/docker/{ID}", ID),
        (f"/system.slice/docker-{ID}.scope", ID),
        (f"/system.slice/docker-{ID}.scope/init.scope", ID),
        (f"/kubepods.slice/kubepods-pod1.slice/cri-containerd-{ID}.scope", ID),
        (f"/docker/{ID}/docker/{OTHER_ID}", OTHER_ID),
        ("/process_api/61737cf4982243e0824575800e3ed42e", ""),
        ("/system.slice/ssh.service", ""),
        ("/", ""),
    ],
)
def test_container_id_from_path(path: str, expected: str) -> None:
    assert container_id_from_path(path) == expected


def test_find_hierarchies_on_hybrid_host() -> None:
    unified, controllers = find_hierarchies(
        (DATA / "ebpf" / "mountinfo-hybrid.txt").read_text(), (DATA / "ebpf" / "proc-cgroups-hybrid.txt").read_text()
    )
    assert unified == Hierarchy(version=2, mount=Path("/sys/fs/cgroup/unified"), hierarchy_id=0)
    memory = controllers["memory"]
    # memory is the fifth line of /proc/cgroups and hierarchy 4 there.
    assert memory.subsys_index == 4
    assert memory.hierarchy_id == 4
    assert memory.mount == Path("/sys/fs/cgroup/memory")
    assert controllers["pids"].subsys_index == 11
    # net_cls is compiled in but not mounted.
    assert "net_cls" not in controllers


def test_choose_hierarchy_pure_v2(tmp_path: Path) -> None:
    (tmp_path / "mountinfo").write_text(V2_MOUNTINFO)
    (tmp_path / "cgroups").write_text(V2_PROC_CGROUPS)
    chosen = choose_hierarchy("auto", mountinfo=tmp_path / "mountinfo", proc_cgroups=tmp_path / "cgroups", proc=tmp_path)
    assert chosen.version == 2
    assert chosen.mount == Path("/sys/fs/cgroup")
    assert chosen.cgroup_id_expression == "cgroup"
    with pytest.raises(CgroupError, match='cgroup_hierarchy = "v2"'):
        choose_hierarchy("v1", mountinfo=tmp_path / "mountinfo", proc_cgroups=tmp_path / "cgroups", proc=tmp_path)


def write_process(proc: Path, pid: int, cgroup_text: str) -> None:
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "cgroup").write_text(cgroup_text)


@pytest.mark.parametrize(
    ("v2_line", "expected_version"),
    [(f"0::/docker/{ID}\n", 2), ("0::/\n", 1)],
)
def test_choose_hierarchy_hybrid_follows_running_container(tmp_path: Path, v2_line: str, expected_version: int) -> None:
    proc = tmp_path / "proc"
    write_process(proc, 1, "4:memory:/\n0::/\n")
    write_process(proc, 4242, f"4:memory:/docker/{ID}\n{v2_line}")
    chosen = choose_hierarchy(
        "auto",
        mountinfo=DATA / "ebpf" / "mountinfo-hybrid.txt",
        proc_cgroups=DATA / "ebpf" / "proc-cgroups-hybrid.txt",
        proc=proc,
    )
    assert chosen.version == expected_version


def test_runtime_uses_v2_unknown_without_containers(tmp_path: Path) -> None:
    write_process(tmp_path, 1, "4:memory:/\n0::/\n")
    assert runtime_uses_v2(tmp_path) is None


def test_cgroup_names_scan_and_add(tmp_path: Path) -> None:
    container = tmp_path / "docker" / ID
    service = tmp_path / "system.slice" / "ssh.service"
    container.mkdir(parents=True)
    service.mkdir(parents=True)
    names = CgroupNames(Hierarchy(version=2, mount=tmp_path, hierarchy_id=0))
    assert names.scan() == 5
    assert names.container_id(os.stat(container).st_ino) == ID
    assert names.container_id(os.stat(service).st_ino) == ""
    assert names.path(os.stat(tmp_path).st_ino) == "/"
    assert names.container_id(123456789) is None
    names.add(123456789, f"/system.slice/docker-{OTHER_ID}.scope")
    assert names.container_id(123456789) == OTHER_ID
