"""Sample the tasks and listening TCP ports of every Docker container, from the cgroup tree and /proc."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import anyio

from speaker.component import Output, Source
from speaker.errors import ComponentError
from speaker.events import ProcessSample, TaskSample
from speaker.options import Duration, option

#: Container directories in the cgroup tree: ``docker/ID`` (cgroupfs driver)
#: and ``docker-ID.scope`` (systemd driver), under any parent.
_CONTAINER_DIR = re.compile(r"^(?:docker-([0-9a-f]{64})\.scope|([0-9a-f]{64}))$")
#: Parent directories that hold container directories.
_PARENTS = ("docker", "system.slice")
#: TCP state LISTEN in /proc/net/tcp.
_TCP_LISTEN = "0A"


@dataclasses.dataclass(frozen=True)
class ProcSamplerOptions:
    interval: Duration = option(Duration.parse("500ms"), min=0.05, help="Time between two samples of each container.")
    cgroup_root: Path = option(
        Path("/sys/fs/cgroup"), help="Mount point of the cgroup file system (v1 hierarchies or the v2 tree)."
    )
    proc: Path = option(Path("/proc"), help="Mount point of the host's /proc.")


def container_cgroups(root: Path) -> dict[str, Path]:
    """Return the cgroup directory of each Docker container, by container id.

    cgroup v2 has one tree at ``root``. cgroup v1 has one tree per controller,
    and the ``pids`` tree (or ``memory``) contains every task of a container.
    Both Docker drivers are found: ``docker/ID`` (cgroupfs) and
    ``system.slice/docker-ID.scope`` (systemd).
    """
    if (root / "cgroup.controllers").exists():
        trees = [root]
    else:
        trees = [root / name for name in ("pids", "memory", "systemd") if (root / name).is_dir()][:1]
    found: dict[str, Path] = {}
    for tree in trees:
        for parent in _PARENTS:
            try:
                entries = os.scandir(tree / parent)
            except OSError:
                continue
            with entries:
                for entry in entries:
                    match = _CONTAINER_DIR.match(entry.name)
                    if match and entry.is_dir(follow_symlinks=False):
                        found[match.group(1) or match.group(2)] = Path(entry.path)
    return found


def cgroup_pids(directory: Path) -> list[int]:
    """Return the pids in a cgroup and its descendants (a container may make its own sub-cgroups)."""
    pids: list[int] = []
    for current, _dirs, files in os.walk(directory):
        if "cgroup.procs" not in files:
            continue
        try:
            with open(os.path.join(current, "cgroup.procs")) as handle:
                pids.extend(int(line) for line in handle if line.strip())
        except OSError:
            continue
    return pids


def read_task(proc: Path, pid: int, tid: int) -> TaskSample | None:
    """Read one task's state, CPU time and current syscall; None when it has exited."""
    base = f"{proc}/{pid}/task/{tid}"
    try:
        stat = _read_text(f"{base}/stat")
        syscall_text = _read_text(f"{base}/syscall")
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may itself contain spaces or ")".
    head, _, tail = stat.rpartition(")")
    fields = tail.split()
    if len(fields) < 13:
        return None
    comm = head.partition("(")[2]
    first = syscall_text.split(maxsplit=1)[0] if syscall_text.strip() else "running"
    # "running" while on a CPU, "-1" when blocked outside a syscall (a page fault, say).
    syscall = int(first) if first.isdigit() else None
    return TaskSample(
        pid=pid,
        tid=tid,
        comm=comm,
        state=fields[0],
        syscall=syscall,
        cpu_ticks=int(fields[11]) + int(fields[12]),
    )


def listening_ports(proc: Path, pid: int) -> set[int] | None:
    """Return the TCP ports in LISTEN in the network namespace of ``pid`` (IPv4 and IPv6).

    Returns None when neither table can be read, because the process exited.
    """
    ports: set[int] = set()
    read = False
    for name in ("tcp", "tcp6"):
        try:
            text = _read_text(f"{proc}/{pid}/net/{name}")
        except OSError:
            continue
        read = True
        for line in text.splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[3] == _TCP_LISTEN:
                ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports if read else None


def sample_container(proc: Path, container_id: str, directory: Path) -> ProcessSample | None:
    """Sample one container; None when it has no processes (created, or exiting)."""
    tasks: list[TaskSample] = []
    ports: set[int] = set()
    namespaces: set[int] = set()
    for pid in cgroup_pids(directory):
        try:
            tids = [int(name) for name in os.listdir(f"{proc}/{pid}/task")]
            namespace = os.stat(f"{proc}/{pid}/ns/net").st_ino
        except (FileNotFoundError, ProcessLookupError):
            continue
        for tid in tids:
            task = read_task(proc, pid, tid)
            if task is not None:
                tasks.append(task)
        if namespace not in namespaces:
            found = listening_ports(proc, pid)
            if found is not None:
                # A process that exited in between leaves the namespace to the next one.
                namespaces.add(namespace)
                ports |= found
    if not tasks:
        return None
    return ProcessSample(
        container_id=container_id,
        tasks=tuple(tasks),
        listening_ports=tuple(sorted(ports)),
        cpu_ticks=sum(task.cpu_ticks for task in tasks),
    )


def _read_text(path: str) -> str:
    with open(path, "rb", buffering=0) as handle:
        return handle.read(65536).decode("utf-8", "replace")


class ProcSampler(Source):
    """Emit a ProcessSample per Docker container every interval: tasks, states, current syscalls, LISTEN ports."""

    type_name = "proc_sampler"
    Options = ProcSamplerOptions
    emits = (ProcessSample,)

    async def setup(self) -> None:
        root = self.options.cgroup_root
        if not root.is_dir():
            raise ComponentError(f"{root} is not a directory: set cgroup_root to the cgroup mount point")
        self.known: set[str] = set()

    async def run(self, output: Output) -> None:
        interval = float(self.options.interval)
        while not self.stopping.is_set():
            started = anyio.current_time()
            samples = await anyio.to_thread.run_sync(self._sample_all)
            await output.send_many(samples)
            with anyio.move_on_after(max(0.0, started + interval - anyio.current_time())):
                await self.stopping.wait()

    def _sample_all(self) -> list[ProcessSample]:
        directories = container_cgroups(self.options.cgroup_root)
        for container_id in directories.keys() - self.known:
            self.log.info("container_found", container=container_id[:12], cgroup=str(directories[container_id]))
        for container_id in self.known - directories.keys():
            self.log.info("container_gone", container=container_id[:12])
        self.known = set(directories)
        samples = []
        for container_id, directory in directories.items():
            sample = sample_container(self.options.proc, container_id, directory)
            if sample is not None:
                samples.append(sample)
        return samples
