"""Find the Debian kernel that the qemu stage boots and the headers the module is built against.

.ci/setup.d/50-kmod.sh downloads ``linux-image-RELEASE`` for the release that
``linux-headers-amd64`` depends on and keeps its ``vmlinuz`` and ``config``
in ``$SPEAKER_KMOD_CACHE/RELEASE`` (default /var/cache/speaker/kmod). This
module unpacks the uncompressed ``vmlinux`` from ``vmlinuz`` next to it once:
qemu boots that ELF file directly through its PVH entry point, which skips
about 6 s of XZ decompression under TCG. Kernels compressed with zstd (Debian's
6.12 backports) are unpacked with the zstd command when it is installed, and
booted compressed otherwise.

SPEAKER_KMOD_HEADERS names a headers directory other than
/lib/modules/RELEASE/build, such as one unpacked from a .deb.
"""

from __future__ import annotations

import dataclasses
import lzma
import os
import re
import shutil
import subprocess
from pathlib import Path

CACHE_ENV = "SPEAKER_KMOD_CACHE"
RELEASE_ENV = "SPEAKER_KMOD_RELEASE"
HEADERS_ENV = "SPEAKER_KMOD_HEADERS"
DEFAULT_CACHE = Path("/var/cache/speaker/kmod")
SETUP_SCRIPT = ".ci/setup.d/50-kmod.sh"

_XZ_MAGIC = b"\xfd7zXZ\x00"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ELF_MAGIC = b"\x7fELF"


class KernelMissing(RuntimeError):
    """The guest kernel or its headers are not on this machine."""


@dataclasses.dataclass(frozen=True)
class GuestKernel:
    """A Debian kernel release with its headers and boot files."""

    release: str
    headers: Path
    vmlinuz: Path
    #: Image that qemu boots: the unpacked vmlinux when possible, else vmlinuz.
    boot_image: Path
    config: Path


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def headers_release() -> str:
    """Return the kernel release that the installed linux-headers-amd64 points to, such as ``6.1.0-57-amd64``.

    SPEAKER_KMOD_RELEASE overrides it.
    """
    if os.environ.get(RELEASE_ENV):
        return os.environ[RELEASE_ENV]
    try:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Depends}", "linux-headers-amd64"], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise KernelMissing("dpkg-query is missing: the qemu stage needs a Debian host") from None
    match = re.search(r"linux-headers-(\S+)", result.stdout)
    if result.returncode != 0 or match is None:
        raise KernelMissing(
            f"linux-headers-amd64 is not installed ({result.stderr.strip() or 'no dependency found'}); "
            f"run sh {SETUP_SCRIPT} as root"
        )
    return match.group(1)


def find_kernel(release: str | None = None) -> GuestKernel:
    """Return the cached guest kernel for ``release`` (default: the headers' release), unpacking vmlinux if needed."""
    release = release or headers_release()
    headers = Path(os.environ.get(HEADERS_ENV) or Path("/lib/modules") / release / "build")
    if not (headers / "Makefile").exists():
        raise KernelMissing(f"kernel headers for {release} not found at {headers}; install linux-headers-{release}")
    directory = cache_root() / release
    vmlinuz = directory / "vmlinuz"
    config = directory / "config"
    if not vmlinuz.exists() or not config.exists():
        raise KernelMissing(f"guest kernel {release} not found in {directory}; run sh {SETUP_SCRIPT} as root")
    vmlinux = directory / "vmlinux"
    if not vmlinux.exists():
        extract_vmlinux(vmlinuz, vmlinux)
    boot_image = vmlinux if vmlinux.exists() else vmlinuz
    return GuestKernel(release=release, headers=headers, vmlinuz=vmlinuz, boot_image=boot_image, config=config)


def extract_vmlinux(vmlinuz: Path, output: Path) -> None:
    """Unpack the ELF kernel inside a bzImage compressed with XZ, or with zstd if the zstd command exists.

    Leaves ``output`` absent when the compression is not supported here.
    """
    data = vmlinuz.read_bytes()
    elf = b""
    start = data.find(_XZ_MAGIC)
    if start >= 0:
        try:
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
        except lzma.LZMAError as exc:
            raise KernelMissing(f"cannot decompress the kernel in {vmlinuz}: {exc}") from exc
    elif data.find(_ZSTD_MAGIC) >= 0 and shutil.which("zstd"):
        start = data.find(_ZSTD_MAGIC)
        # The payload is followed by bzImage trailer bytes, which zstd reports as an error after decoding.
        result = subprocess.run(["zstd", "-dc"], input=data[start:], capture_output=True, check=False)
        elf = result.stdout
    if not elf.startswith(_ELF_MAGIC):
        return
    partial = output.with_name(output.name + ".partial")
    partial.write_bytes(elf)
    partial.replace(output)
