"""speaker.kmod_io against kmod/speaker_ioctl.h: the C compiler's numbers are the reference.

A generated C program prints every structure size, field offset, ioctl
number and constant that kmod_io defines, and the test compares them. The
same values are then checked for 32-bit user space with static assertions
under ``gcc -m32``, because the header promises one layout for both.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from speaker import kmod_io
from tests.conftest import ROOT, require_system

HEADER = ROOT / "kmod" / "speaker_ioctl.h"

STRUCTURES = {
    "speaker_version": kmod_io.VersionStruct,
    "speaker_register": kmod_io.RegisterStruct,
    "speaker_load": kmod_io.LoadStruct,
    "speaker_switch": kmod_io.SwitchStruct,
    "speaker_state": kmod_io.StateStruct,
    "speaker_unregister": kmod_io.UnregisterStruct,
    "speaker_cache": kmod_io.CacheStruct,
}

CONSTANTS = {
    "SPEAKER_ABI_VERSION": kmod_io.ABI_VERSION,
    "SPEAKER_IOC_MAGIC": kmod_io.IOC_MAGIC,
    "SPEAKER_IOC_VERSION": kmod_io.IOC_VERSION,
    "SPEAKER_IOC_REGISTER": kmod_io.IOC_REGISTER,
    "SPEAKER_IOC_LOAD": kmod_io.IOC_LOAD,
    "SPEAKER_IOC_SWITCH": kmod_io.IOC_SWITCH,
    "SPEAKER_IOC_QUERY": kmod_io.IOC_QUERY,
    "SPEAKER_IOC_UNREGISTER": kmod_io.IOC_UNREGISTER,
    "SPEAKER_IOC_CACHE": kmod_io.IOC_CACHE,
    "SPEAKER_REGISTER_NEWEST": kmod_io.REGISTER_NEWEST,
    "SPEAKER_REGISTER_ADOPT": kmod_io.REGISTER_ADOPT,
    "SPEAKER_SWITCH_FORCE": kmod_io.SWITCH_FORCE,
    "SPEAKER_STATE_ALIVE": kmod_io.STATE_ALIVE,
    "SPEAKER_STATE_STOP_SEEN": kmod_io.STATE_STOP_SEEN,
    "SPEAKER_UNREGISTER_RESTORE": kmod_io.UNREGISTER_RESTORE,
    "SPEAKER_NO_INSN": kmod_io.NO_INSN,
    "SPEAKER_CACHE_BITMAP_WORDS": kmod_io.CACHE_BITMAP_WORDS,
    "SPEAKER_PHASE_COUNT": len(kmod_io.KmodPhase),
    **{f"SPEAKER_PHASE_{phase.name}": int(phase) for phase in kmod_io.KmodPhase},
    **{f"SPEAKER_LOAD_{reason.name}": int(reason) for reason in kmod_io.LoadError},
}


def python_layout() -> dict[str, int]:
    """Return every value kmod_io defines, keyed as the C program prints it."""
    values = dict(CONSTANTS)
    for name, structure in STRUCTURES.items():
        values[f"sizeof {name}"] = ctypes.sizeof(structure)
        for field, *_ in structure._fields_:
            values[f"offsetof {name}.{field}"] = getattr(structure, field).offset
    return values


def c_expressions() -> dict[str, str]:
    expressions = {name: f"(unsigned long long)({name})" for name in CONSTANTS}
    for name, structure in STRUCTURES.items():
        expressions[f"sizeof {name}"] = f"sizeof(struct {name})"
        for field, *_ in structure._fields_:
            expressions[f"offsetof {name}.{field}"] = f"offsetof(struct {name}, {field})"
    return expressions


def compile_and_run(directory: Path) -> dict[str, int]:
    lines = [f'#include "{HEADER}"', "#include <stddef.h>", "#include <stdio.h>", "int main(void)", "{", '\tputs("{");']
    items = list(c_expressions().items())
    for index, (key, expression) in enumerate(items):
        comma = "," if index + 1 < len(items) else ""
        lines.append(f'\tprintf("\\"{key}\\": %llu{comma}\\n", (unsigned long long)({expression}));')
    lines += ['\tputs("}");', "\treturn 0;", "}"]
    source = directory / "abi.c"
    source.write_text("\n".join(lines) + "\n")
    binary = directory / "abi"
    subprocess.run(["gcc", "-Wall", "-Werror", "-o", str(binary), str(source)], check=True, capture_output=True, text=True)
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    return json.loads(output)


@pytest.fixture(scope="module")
def compiler() -> None:
    require_system("a C compiler", shutil.which("gcc") is not None, "install build-essential")


def test_abi_matches_header(compiler: None, tmp_path: Path) -> None:
    from_c = compile_and_run(tmp_path)
    from_python = python_layout()
    assert set(from_c) == set(from_python)
    mismatched = {key: (from_python[key], from_c[key]) for key in from_c if from_c[key] != from_python[key]}
    assert mismatched == {}, "kmod_io value, header value"


def test_abi_same_for_32_bit(compiler: None, tmp_path: Path) -> None:
    """A 32-bit caller goes through compat_ptr_ioctl, which passes the structure unchanged."""
    asserts = [f'#include "{HEADER}"', "#include <stddef.h>"]
    for key, expression in c_expressions().items():
        if key.startswith(("sizeof", "offsetof")):
            asserts.append(f'_Static_assert({expression} == {python_layout()[key]}, "{key}");')
    source = tmp_path / "abi32.c"
    source.write_text("\n".join(asserts) + "\n")
    # linux-libc-dev keeps the uapi asm headers, which do not differ for i386 here, under the multiarch path.
    result = subprocess.run(
        ["gcc", "-m32", "-fsyntax-only", "-I/usr/include/x86_64-linux-gnu", str(source)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
