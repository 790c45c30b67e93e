"""Build the guest's initramfs: busybox, a Python interpreter with the modules the guest scripts import, and test files.

Everything the guest runs comes from RAM. Sharing the host's files over 9p
instead took about 11 s for one ``python -c pass`` under TCG on a 2-core
machine (0.6 s from the initramfs), because every path lookup crosses to qemu.

Host files keep their paths in the guest, including the symlinks on the way
to them (such as /lib -> usr/lib), so the interpreter finds its standard
library and the dynamic loader finds its libraries as on the host.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

_NEWC_MAGIC = "070701"

# Standard library modules that other modules import inside functions (argparse
# imports shutil to format help, tracebacks need linecache and tokenize, and
# codecs finds an encoding's module only when a decode names it).
LAZY_STDLIB = (
    "shutil", "traceback", "linecache", "tokenize", "textwrap", "gettext", "locale", "queue", "warnings",
    "encodings.utf_8_sig",
)  # fmt: skip

# Run by the interpreter that the guest uses, with the guest's search path:
# imports LAZY_STDLIB and each script's top-level imports, runs anyio's event
# loop and worker thread once (anyio imports its backend only then), and
# prints every module file.
_COLLECTOR = r"""
import importlib, importlib.util, json, sys
for name in sys.argv[1].split(","):
    importlib.import_module(name)
for index, path in enumerate(sys.argv[2:]):
    spec = importlib.util.spec_from_file_location(f"_guest_script_{index}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
if "anyio" in sys.modules:
    import anyio, anyio.to_thread
    async def warm_up():
        await anyio.sleep(0)
        await anyio.to_thread.run_sync(lambda: None)
    anyio.run(warm_up)
files = set()
for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None)
    if path:
        files.add(path)
        cached = getattr(module, "__cached__", None)
        if cached:
            files.add(cached)
print(json.dumps(sorted(files)))
"""


class ImageError(RuntimeError):
    """A file the guest needs could not be found or read."""


class Initramfs:
    """An in-memory newc cpio archive, written out by ``write``."""

    def __init__(self) -> None:
        # guest path -> (mode, data or link target, rdev, mtime)
        self._entries: dict[str, tuple[int, bytes, tuple[int, int], int]] = {}

    def _parents(self, path: str) -> None:
        parent = PurePosixPath(path).parent
        for ancestor in reversed([parent, *parent.parents]):
            name = str(ancestor).lstrip("/")
            if name and name not in self._entries:
                self._entries[name] = (stat.S_IFDIR | 0o755, b"", (0, 0), 0)

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        self._parents(path)
        self._entries[path.lstrip("/")] = (stat.S_IFDIR | mode, b"", (0, 0), 0)

    def add_data(self, path: str, data: bytes, mode: int = 0o644, mtime: int = 0) -> None:
        """Add a regular file. Python checks a cached .pyc against its source's mtime, so copies keep theirs."""
        self._parents(path)
        self._entries[path.lstrip("/")] = (stat.S_IFREG | mode, data, (0, 0), mtime)

    def add_symlink(self, path: str, target: str) -> None:
        self._parents(path)
        self._entries[path.lstrip("/")] = (stat.S_IFLNK | 0o777, target.encode(), (0, 0), 0)

    def add_char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parents(path)
        self._entries[path.lstrip("/")] = (stat.S_IFCHR | mode, b"", (major, minor), 0)

    def has(self, path: str) -> bool:
        return path.lstrip("/") in self._entries

    def add_host_file(
        self, host_path: str | os.PathLike[str], guest_path: str | None = None, *, strip: bool = False, depth: int = 0
    ) -> None:
        """Copy a host file, reproducing every symlink on its path when it keeps its host path."""
        path = Path(host_path)
        if guest_path is not None:
            info = path.stat()
            self.add_data(guest_path, _read(path, strip), stat.S_IMODE(info.st_mode), int(info.st_mtime))
            return
        if not path.is_absolute():
            raise ImageError(f"{path} must be an absolute path")
        if depth > 40:
            raise ImageError(f"too many symlinks on the way to {host_path}")
        current = Path("/")
        for index, part in enumerate(path.parts[1:], start=1):
            current = current / part
            if current.is_symlink():
                target = os.readlink(current)
                self.add_symlink(str(current), target)
                followed = Path(os.path.normpath(current.parent / target))
                rest = path.parts[index + 1 :]
                self.add_host_file(followed.joinpath(*rest), strip=strip, depth=depth + 1)
                return
        if not self.has(str(path)):
            info = path.stat()
            self.add_data(str(path), _read(path, strip), stat.S_IMODE(info.st_mode), int(info.st_mtime))

    def write(self, output: Path) -> int:
        """Write the archive (directories first) and return its size in bytes."""
        ordered = sorted(self._entries.items(), key=lambda item: (not stat.S_ISDIR(item[1][0]), item[0]))
        chunks = []
        for inode, (name, (mode, data, rdev, mtime)) in enumerate(ordered, start=1):
            chunks.append(_newc_entry(name, mode, data, rdev, mtime, inode))
        chunks.append(_newc_entry("TRAILER!!!", 0, b"", (0, 0), 0, 0))
        blob = b"".join(chunks)
        output.write_bytes(blob)
        return len(blob)


def _read(path: Path, strip: bool) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read {path} for the guest image: {exc}") from exc
    if strip and data.startswith(b"\x7fELF") and shutil.which("strip"):
        # Debug sections are most of an unstripped libpython, and the guest never reads them.
        with tempfile.TemporaryDirectory(prefix="speaker-strip-") as directory:
            stripped = Path(directory) / path.name
            result = subprocess.run(["strip", "--strip-debug", "-o", str(stripped), str(path)], capture_output=True, check=False)
            if result.returncode == 0:
                return stripped.read_bytes()
    return data


def _newc_entry(name: str, mode: int, data: bytes, rdev: tuple[int, int], mtime: int, inode: int) -> bytes:
    encoded = name.encode() + b"\0"
    fields = [inode, mode, 0, 0, 1, mtime, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0]
    header = (_NEWC_MAGIC + "".join(f"{value:08x}" for value in fields)).encode()
    head = header + encoded
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def guest_python() -> Path:
    """Return the interpreter the guest runs: the base interpreter behind this (possibly virtual) environment."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return Path(os.path.realpath(base))


def guest_python_path(repo: Path) -> list[str]:
    """Return the guest's PYTHONPATH: the repository and this environment's site-packages."""
    paths = [str(repo)]
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths()[key]
        if path not in paths:
            paths.append(path)
    return paths


def python_files(scripts: Iterable[Path], python_path: list[str]) -> list[str]:
    """Return the module files (sources and their cached bytecode) that the scripts' top-level imports load."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": os.pathsep.join(python_path)}
    result = subprocess.run(
        [str(guest_python()), "-S", "-c", _COLLECTOR, ",".join(LAZY_STDLIB), *map(str, scripts)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        raise ImageError(f"collecting the guest's Python modules failed:\n{result.stderr}")
    return json.loads(result.stdout)


def shared_libraries(binaries: Iterable[str]) -> set[str]:
    """Return every library that ldd lists for the binaries, by the path ldd prints."""
    libraries: set[str] = set()
    for binary in binaries:
        result = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False)
        for line in result.stdout.splitlines():
            for word in line.split():
                if word.startswith("/"):
                    libraries.add(word)
    return libraries


def package_files(names: Iterable[str]) -> list[str]:
    """Return every module file of whole packages, for packages that import submodules only when used."""
    files = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ImageError(f"package {name} not found for the guest image")
        for location in spec.submodule_search_locations:
            for path in sorted(Path(location).rglob("*")):
                if path.suffix in (".py", ".pyc", ".so") and "tests" not in path.parts:
                    files.append(str(path))
    return files


def add_python(image: Initramfs, scripts: Iterable[Path], repo: Path, whole_packages: Iterable[str] = ()) -> None:
    """Add the guest interpreter, its libraries, the modules the scripts import and ``whole_packages``."""
    scripts = [Path(script) for script in scripts]
    python = guest_python()
    python_path = guest_python_path(repo)
    files = python_files(scripts, python_path) + [str(script) for script in scripts] + package_files(whole_packages)
    extensions = [path for path in files if path.endswith(".so")]
    image.add_host_file(python, strip=True)
    for library in sorted(shared_libraries([str(python), *extensions])):
        image.add_host_file(library, strip=True)
    for path in files:
        image.add_host_file(path, strip=path.endswith(".so"))
    if Path("/etc/ld.so.cache").exists():
        image.add_host_file("/etc/ld.so.cache", "/etc/ld.so.cache")


def add_ctypes_libraries(image: Initramfs, names: Iterable[str]) -> None:
    """Add the host's libraries that Python code loads with ``ctypes.util.find_library``, such as ``seccomp``.

    On Linux, find_library runs ``/sbin/ldconfig -p``, which reads
    /etc/ld.so.cache (``add_python`` copies it), so the static ldconfig comes
    along with each library at the path that the cache names.
    """
    ldconfig = Path("/sbin/ldconfig")
    if not ldconfig.exists():
        raise ImageError("/sbin/ldconfig not found; ctypes.util.find_library needs it in the guest")
    image.add_host_file(ldconfig)
    result = subprocess.run([str(ldconfig), "-p"], capture_output=True, text=True, env={"LC_ALL": "C"}, check=False)
    for name in names:
        prefix = f"lib{name}.so"
        paths = [
            line.split(" => ", 1)[1].strip()
            for line in result.stdout.splitlines()
            if line.strip().startswith(prefix) and "x86-64" in line and " => " in line
        ]
        if not paths:
            raise ImageError(f"library {name} is not in the host's ld.so.cache; install it (libseccomp2 for seccomp)")
        for path in paths:
            image.add_host_file(path, strip=True)


def add_busybox(image: Initramfs, busybox: Path) -> None:
    """Add a static busybox as /bin/busybox and the device nodes the kernel needs before devtmpfs."""
    image.add_host_file(busybox, "/bin/busybox")
    image.add_symlink("/bin/sh", "busybox")
    image.add_char_device("/dev/console", 5, 1)
    image.add_char_device("/dev/null", 1, 3, 0o666)
    for directory in ("/proc", "/sys", "/tmp", "/run", "/root"):
        image.add_dir(directory)
    image.add_data("/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    image.add_data("/etc/group", b"root:x:0:\nnogroup:x:65534:\n")
