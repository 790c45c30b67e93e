"""Cgroup hierarchies, and the container ids that cgroup paths contain.

The ebpf source keys its kernel counts by the id of each task's cgroup in one
hierarchy. On cgroup v2 that is the unified hierarchy. On a cgroup v1 host it
is one controller's hierarchy, because Docker's cgroupfs driver puts each
container in ``/docker/<id>`` of every v1 controller. A cgroup id is the inode
number of the cgroup's directory, so a scan of the hierarchy's mount maps ids
to paths, and the path names the container:

* cgroupfs driver: ``/docker/<id>``;
* systemd driver: ``/system.slice/docker-<id>.scope``;
* other runtimes use a prefix such as ``cri-containerd-`` or ``libpod-``
  (see ``speaker.container_cgroups``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from pathlib import Path

from speaker.container_cgroups import CgroupResolver

_RESOLVER = CgroupResolver()

#: v1 controllers to key by, in order of preference. Docker creates the
#: container's cgroup in each of them.
V1_CONTROLLERS = ("memory", "pids", "cpu", "devices")


class CgroupError(RuntimeError):
    """No usable cgroup hierarchy, or an invalid choice of hierarchy."""


@dataclasses.dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy that the kernel program can key counts by."""

    version: int
    mount: Path
    #: ``root`` of the cgroup tracepoints: 0 for v2, the hierarchy number in
    #: /proc/cgroups for v1.
    hierarchy_id: int
    #: v1 only: the controller, and its index in the kernel's ``css_set.subsys``.
    controller: str = ""
    subsys_index: int = -1

    @property
    def cgroup_id_expression(self) -> str:
        """Return the bpftrace expression for the current task's cgroup id in this hierarchy."""
        if self.version == 2:
            return "cgroup"
        return f"curtask->cgroups->subsys[{self.subsys_index}]->cgroup->kn->id"

    def describe(self) -> str:
        if self.version == 2:
            return f"cgroup v2 at {self.mount}"
        return f"cgroup v1 {self.controller} controller at {self.mount}"


def container_id_from_path(path: str) -> str:
    """Return the container id in a cgroup path, or "" when the path is not a container's.

    Uses the same rule as ``classify`` for /proc/PID/cgroup lines, so both
    attribute a process alike. The id may be in a parent directory, for a
    container that made cgroups of its own.
    """
    return _RESOLVER.container_of_text(path)


def _unescape_mount_field(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def find_hierarchies(mountinfo: str, proc_cgroups: str) -> tuple[Hierarchy | None, dict[str, Hierarchy]]:
    """Return the cgroup v2 hierarchy (or None) and the mounted v1 controllers.

    ``mountinfo`` is the text of /proc/self/mountinfo and ``proc_cgroups`` that
    of /proc/cgroups, whose lines are in the kernel's subsystem order.
    """
    subsystems: dict[str, tuple[int, int]] = {}
    index = 0
    for line in proc_cgroups.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        fields = line.split()
        subsystems[fields[0]] = (index, int(fields[1]))
        index += 1

    unified: Hierarchy | None = None
    controllers: dict[str, Hierarchy] = {}
    for line in mountinfo.splitlines():
        before, separator, after = line.partition(" - ")
        if not separator:
            continue
        mount_point = Path(_unescape_mount_field(before.split()[4]))
        fs_fields = after.split()
        if len(fs_fields) < 3:
            continue
        fs_type, super_options = fs_fields[0], fs_fields[2].split(",")
        if fs_type == "cgroup2" and unified is None:
            unified = Hierarchy(version=2, mount=mount_point, hierarchy_id=0)
        elif fs_type == "cgroup":
            for option in super_options:
                if option in subsystems and option not in controllers:
                    subsys_index, hierarchy_id = subsystems[option]
                    controllers[option] = Hierarchy(
                        version=1,
                        mount=mount_point,
                        hierarchy_id=hierarchy_id,
                        controller=option,
                        subsys_index=subsys_index,
                    )
    return unified, controllers


def runtime_uses_v2(proc: Path = Path("/proc")) -> bool | None:
    """Return whether running containers are also in the v2 hierarchy of a hybrid host.

    Looks for a process whose v1 cgroup path names a container. Returns None
    when no such process runs, because then it cannot tell.
    """
    for cgroup_file in proc.glob("[0-9]*/cgroup"):
        try:
            lines = cgroup_file.read_text().splitlines()
        except OSError:
            continue
        v1_container = ""
        v2_path = ""
        # Each line is "hierarchy-id:controllers:path"; v2 is "0::path".
        for line in lines:
            hierarchy_id, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            if hierarchy_id == "0" and not controllers:
                v2_path = path
            elif not v1_container:
                v1_container = container_id_from_path(path)
        if v1_container:
            return container_id_from_path(v2_path) == v1_container
    return None


def choose_hierarchy(
    preference: str,
    *,
    mountinfo: Path = Path("/proc/self/mountinfo"),
    proc_cgroups: Path = Path("/proc/cgroups"),
    proc: Path = Path("/proc"),
) -> Hierarchy:
    """Return the hierarchy to key counts by: ``"v1"``, ``"v2"`` or ``"auto"``.

    ``auto`` takes v2 on a host without v1 controllers. On a hybrid host (v1
    controllers and a v2 mount) it takes v2 when a running container is in both,
    or when no container runs, because runc does add containers to the v2
    hierarchy (checked with runc 1.1.5). It takes v1 when a running container
    is missing from v2.
    Raises CgroupError.
    """
    try:
        unified, controllers = find_hierarchies(mountinfo.read_text(), proc_cgroups.read_text())
    except OSError as exc:
        raise CgroupError(f"cannot read the cgroup mounts: {exc}") from exc
    v1 = next((controllers[name] for name in V1_CONTROLLERS if name in controllers), None)

    if preference == "v2":
        if unified is None:
            raise CgroupError('no cgroup2 file system is mounted; set cgroup_hierarchy = "v1" or "auto"')
        return unified
    if preference == "v1":
        if v1 is None:
            raise CgroupError(
                f"none of the v1 controllers {', '.join(V1_CONTROLLERS)} is mounted; "
                'set cgroup_hierarchy = "v2" or "auto"'
            )
        return v1
    if unified is not None and (v1 is None or runtime_uses_v2(proc) is not False):
        return unified
    if v1 is not None:
        return v1
    raise CgroupError("no cgroup hierarchy is mounted under /sys/fs/cgroup; mount cgroup2 or the v1 controllers")


class CgroupNames:
    """Container ids of the cgroup ids of one hierarchy.

    Paths come from scans of the hierarchy's mount and from the kernel
    program's ``cgroup`` lines, which it prints for every cgroup made or
    removed.
    """

    def __init__(self, hierarchy: Hierarchy) -> None:
        self.hierarchy = hierarchy
        self._paths: dict[int, str] = {}

    def add(self, cgroup_id: int, path: str) -> None:
        self._paths[cgroup_id] = path

    def scan(self) -> int:
        """Record the path of every cgroup under the mount, and return how many there are."""
        found = 0
        for cgroup_id, path in self._walk():
            self._paths[cgroup_id] = path
            found += 1
        return found

    def _walk(self) -> Iterator[tuple[int, str]]:
        mount = str(self.hierarchy.mount)
        for directory, _, _ in os.walk(mount):
            try:
                inode = os.stat(directory).st_ino
            except OSError:
                continue
            relative = directory[len(mount) :] or "/"
            yield inode, relative

    def path(self, cgroup_id: int) -> str | None:
        return self._paths.get(cgroup_id)

    def container_id(self, cgroup_id: int) -> str | None:
        """Return the container id of ``cgroup_id``, "" for a cgroup of no container, None when unknown."""
        path = self._paths.get(cgroup_id)
        if path is None:
            return None
        return container_id_from_path(path)
