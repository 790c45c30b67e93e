"""Turn a FilterPlan into a seccomp BPF program with libseccomp (through pyseccomp).

libseccomp adds rules for every architecture in a filter at once, so the
program is built as one single-arch filter per architecture, each with that
arch's own rules, merged into one before export. Syscalls that libseccomp
multiplexes on x86 (socket calls through socketcall, IPC through ipc) get
both the direct and the multiplexed rule, as libseccomp always does.
"""

from __future__ import annotations

import dataclasses
import os

import pyseccomp

from speaker.compile.arches import ARCH_TOKENS
from speaker.compile.bpf import MAX_INSTRUCTIONS
from speaker.compile.plan import FilterPlan

# libseccomp's SCMP_FLTATR_CTL_OPTIMIZE level 2 sorts each arch's rules into
# a binary tree, so a lookup costs O(log n) jumps instead of O(n).
_OPTIMIZE_BINARY_TREE = 2


class CompileError(RuntimeError):
    """libseccomp rejected a rule or could not export the program."""


@dataclasses.dataclass(frozen=True)
class CompiledProgram:
    """A plan and its BPF program (``struct sock_filter`` array, 8 bytes per instruction)."""

    plan: FilterPlan
    bpf: bytes

    @property
    def instructions(self) -> int:
        return len(self.bpf) // 8


def build_filter(plan: FilterPlan, *, binary_tree: bool = True) -> pyseccomp.SyscallFilter:
    """Return a libseccomp filter holding ``plan`` for all of its architectures."""
    merged: pyseccomp.SyscallFilter | None = None
    native = pyseccomp.system_arch()
    for arch in plan.arches:
        single = _new_filter(plan, binary_tree)
        token = ARCH_TOKENS[arch]
        if token != native:
            single.add_arch(token)
            single.remove_arch(native)
        for name, action in sorted(plan.rules.get(arch, {}).items()):
            try:
                single.add_rule(action.libseccomp, name)
            except OSError as exc:
                raise CompileError(f"libseccomp rejected the rule {action} for {name} on {arch}: {exc.strerror}") from exc
        if merged is None:
            merged = single
        else:
            merged.merge(single)
    assert merged is not None, "CompileSettings guarantees at least one arch"
    return merged


def compile_plan(plan: FilterPlan, *, binary_tree: bool = True) -> CompiledProgram:
    """Compile ``plan`` into a BPF program. Raises CompileError when libseccomp fails or the program is too long."""
    bpf = export_bpf(build_filter(plan, binary_tree=binary_tree))
    if len(bpf) // 8 > MAX_INSTRUCTIONS:
        raise CompileError(
            f"the {plan.layout} filter has {len(bpf) // 8} instructions, above the kernel's limit of {MAX_INSTRUCTIONS}"
        )
    return CompiledProgram(plan=plan, bpf=bpf)


def export_bpf(syscall_filter: pyseccomp.SyscallFilter) -> bytes:
    """Return the raw BPF of a libseccomp filter."""
    fd = os.memfd_create("speaker-bpf", os.MFD_CLOEXEC)
    try:
        with os.fdopen(fd, "wb", closefd=False) as stream:
            try:
                syscall_filter.export_bpf(stream)
            except OSError as exc:
                raise CompileError(f"libseccomp could not export the filter: {exc.strerror}") from exc
        size = os.lseek(fd, 0, os.SEEK_END)
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def export_pfc(plan: FilterPlan, *, binary_tree: bool = True) -> str:
    """Return libseccomp's pseudo-filter-code listing of ``plan``, for people to read."""
    syscall_filter = build_filter(plan, binary_tree=binary_tree)
    fd = os.memfd_create("speaker-pfc", os.MFD_CLOEXEC)
    try:
        with os.fdopen(fd, "w", closefd=False) as stream:
            syscall_filter.export_pfc(stream)
        size = os.lseek(fd, 0, os.SEEK_END)
        return os.pread(fd, size, 0).decode()
    finally:
        os.close(fd)


def _new_filter(plan: FilterPlan, binary_tree: bool) -> pyseccomp.SyscallFilter:
    default = plan.default_action.libseccomp
    single = pyseccomp.SyscallFilter(default)
    # A syscall of an arch the filter does not cover gets the default action
    # too, instead of libseccomp's KILL_THREAD.
    single.set_attr(pyseccomp.Attr.ACT_BADARCH, default)
    # The exported program does not carry no_new_privs. The loader sets it.
    single.set_attr(pyseccomp.Attr.CTL_NNP, 0)
    if binary_tree:
        single.set_attr(pyseccomp.Attr.CTL_OPTIMIZE, _OPTIMIZE_BINARY_TREE)
    return single
