"""Classic BPF programs as seccomp runs them: parsing, checking and evaluation.

A seccomp filter is an array of ``struct sock_filter`` (8 bytes each: u16
code, u8 jt, u8 jf, u32 k, in host byte order) run over ``struct
seccomp_data`` (int nr, u32 arch, u64 instruction_pointer, u64 args[6]).
``evaluate`` interprets exactly the instructions that ``seccomp_check_filter``
in the kernel's kernel/seccomp.c accepts. It is how the tests check a
compiled program independently of libseccomp, and how SPEAKER reads the
filter a runtime actually loaded into a container.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable, Sequence

from speaker.compile.actions import Action
from speaker.compile.arches import ARCH_TOKENS, KERNEL_ARCH_TOKENS, X32_SYSCALL_BIT, syscall_table

INSTRUCTION = struct.Struct("<HBBI")
SECCOMP_DATA_SIZE = 64
#: BPF_MAXINSNS in include/uapi/linux/bpf_common.h.
MAX_INSTRUCTIONS = 4096
_MEMORY_WORDS = 16
_U32 = 0xFFFFFFFF

# Instruction classes, sizes, modes and operations from bpf_common.h.
_LD, _LDX, _ST, _STX, _ALU, _JMP, _RET, _MISC = range(8)
_W, _ABS, _IMM, _MEM, _LEN = 0x00, 0x20, 0x00, 0x60, 0x80
_K, _X = 0x00, 0x08
_RET_A = 0x10
_JA, _JEQ, _JGT, _JGE, _JSET = 0x00, 0x10, 0x20, 0x30, 0x40
_TAX, _TXA = 0x00, 0x80

#: Opcodes that ``seccomp_check_filter`` allows. BPF_MOD is missing on purpose:
#: the kernel rejects it in seccomp filters.
ALLOWED_CODES: frozenset[int] = frozenset(
    {
        _LD | _W | _ABS,
        _LD | _W | _LEN,
        _LDX | _W | _LEN,
        _RET | _K,
        _RET | _RET_A,
        *(_ALU | operation | source for operation in (0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0xA0) for source in (_K, _X)),
        _ALU | 0x80,
        _LD | _IMM,
        _LDX | _IMM,
        _MISC | _TAX,
        _MISC | _TXA,
        _LD | _MEM,
        _LDX | _MEM,
        _ST,
        _STX,
        _JMP | _JA,
        *(_JMP | operation | source for operation in (_JEQ, _JGT, _JGE, _JSET) for source in (_K, _X)),
    }
)


class BpfError(ValueError):
    """A program that the kernel would reject, or that failed while running."""


@dataclasses.dataclass(frozen=True, slots=True)
class Instruction:
    """One ``struct sock_filter``."""

    code: int
    jt: int
    jf: int
    k: int


def parse_program(data: bytes) -> tuple[Instruction, ...]:
    """Split raw ``sock_filter`` bytes into instructions. Raises BpfError for a bad length."""
    if not data or len(data) % INSTRUCTION.size:
        raise BpfError(f"a BPF program is a non-empty multiple of {INSTRUCTION.size} bytes, got {len(data)} bytes")
    if len(data) // INSTRUCTION.size > MAX_INSTRUCTIONS:
        raise BpfError(f"the program has {len(data) // INSTRUCTION.size} instructions, above BPF_MAXINSNS ({MAX_INSTRUCTIONS})")
    return tuple(Instruction(*fields) for fields in INSTRUCTION.iter_unpack(data))


def seccomp_data(nr: int, arch_token: int, args: Sequence[int] = (0,) * 6, instruction_pointer: int = 0) -> bytes:
    """Pack a ``struct seccomp_data`` as the kernel hands it to a filter."""
    padded = tuple(args) + (0,) * (6 - len(args))
    return struct.pack("<iIQ6Q", nr, arch_token, instruction_pointer, *padded)


def evaluate(program: Sequence[Instruction], data: bytes) -> int:
    """Run ``program`` over one packed ``seccomp_data`` and return its SECCOMP_RET_* value.

    Raises BpfError for an instruction seccomp does not allow, a jump out of
    the program, a load outside ``seccomp_data`` or a division by zero.
    """
    accumulator = index = 0
    memory = [0] * _MEMORY_WORDS
    pc = 0
    count = len(program)
    while True:
        if pc >= count:
            raise BpfError(f"execution ran past the last instruction ({count}) without a return")
        ins = program[pc]
        code = ins.code
        if code not in ALLOWED_CODES:
            raise BpfError(f"instruction {pc}: code {code:#06x} is not allowed in a seccomp filter")
        klass = code & 0x07
        pc += 1
        if klass == _RET:
            source = code & 0x18
            if source == _K:
                return ins.k
            if source == _RET_A:
                return accumulator
            raise BpfError(f"instruction {pc - 1}: invalid return source in code {code:#06x}")
        if klass == _JMP:
            operation = code & 0xF0
            if operation == _JA:
                pc += ins.k
                continue
            operand = index if code & _X else ins.k
            if operation == _JEQ:
                condition_met = accumulator == operand
            elif operation == _JGT:
                condition_met = accumulator > operand
            elif operation == _JGE:
                condition_met = accumulator >= operand
            elif operation == _JSET:
                condition_met = bool(accumulator & operand)
            else:
                raise BpfError(f"instruction {pc - 1}: unknown jump code {code:#06x}")
            pc += ins.jt if condition_met else ins.jf
            continue
        if klass in (_LD, _LDX):
            value = _load(ins, pc - 1, data, memory)
            if klass == _LD:
                accumulator = value
            else:
                index = value
            continue
        if klass == _ST:
            memory[_memory_slot(ins, pc - 1)] = accumulator
            continue
        if klass == _STX:
            memory[_memory_slot(ins, pc - 1)] = index
            continue
        if klass == _ALU:
            accumulator = _alu(ins, pc - 1, accumulator, index)
            continue
        # _MISC
        if code & 0xF8 == _TXA:
            accumulator = index
        elif code & 0xF8 == _TAX:
            index = accumulator
        else:
            raise BpfError(f"instruction {pc - 1}: unknown misc code {code:#06x}")


def _load(ins: Instruction, position: int, data: bytes, memory: list[int]) -> int:
    size, mode = ins.code & 0x18, ins.code & 0xE0
    if mode == _IMM:
        return ins.k
    if mode == _MEM:
        return memory[_memory_slot(ins, position)]
    if mode == _LEN:
        return SECCOMP_DATA_SIZE
    if mode == _ABS and (ins.code & 0x07) == _LD and size == _W:
        # The kernel only allows aligned 32-bit loads inside seccomp_data.
        if ins.k % 4 or ins.k + 4 > SECCOMP_DATA_SIZE:
            raise BpfError(f"instruction {position}: load at offset {ins.k} is outside seccomp_data or unaligned")
        return int.from_bytes(data[ins.k : ins.k + 4], "little")
    raise BpfError(f"instruction {position}: load code {ins.code:#06x} is not allowed in a seccomp filter")


def _memory_slot(ins: Instruction, position: int) -> int:
    if ins.k >= _MEMORY_WORDS:
        raise BpfError(f"instruction {position}: scratch memory slot {ins.k} is out of range")
    return ins.k


def _alu(ins: Instruction, position: int, accumulator: int, index: int) -> int:
    operation = ins.code & 0xF0
    operand = index if ins.code & _X else ins.k
    if operation == 0x00:
        return (accumulator + operand) & _U32
    if operation == 0x10:
        return (accumulator - operand) & _U32
    if operation == 0x20:
        return (accumulator * operand) & _U32
    if operation == 0x30:
        if operand == 0:
            raise BpfError(f"instruction {position}: division by zero")
        return accumulator // operand
    if operation == 0x40:
        return accumulator | operand
    if operation == 0x50:
        return accumulator & operand
    if operation == 0x60:
        return (accumulator << operand) & _U32 if operand < 32 else 0
    if operation == 0x70:
        return accumulator >> operand if operand < 32 else 0
    if operation == 0x80:
        return (-accumulator) & _U32
    if operation == 0xA0:
        return accumulator ^ operand
    raise BpfError(f"instruction {position}: unknown ALU code {ins.code:#06x}")


def check_program(program: Sequence[Instruction]) -> None:
    """Raise BpfError unless the kernel would accept ``program`` as a seccomp filter.

    Every opcode must be in ``ALLOWED_CODES``, every jump must land inside the
    program, and the last instruction must return.
    """
    count = len(program)
    for position, ins in enumerate(program):
        if ins.code not in ALLOWED_CODES:
            raise BpfError(f"instruction {position}: code {ins.code:#06x} is not allowed in a seccomp filter")
        if ins.code & 0x07 != _JMP:
            continue
        targets = (ins.k,) if ins.code & 0xF0 == _JA else (ins.jt, ins.jf)
        for offset in targets:
            if position + 1 + offset >= count:
                raise BpfError(f"instruction {position}: jump by {offset} leaves the program ({count} instructions)")
    if program[-1].code & 0x07 != _RET:
        raise BpfError("the last instruction is not a return")


def syscall_actions(
    program: Sequence[Instruction],
    arches: Iterable[str] = tuple(ARCH_TOKENS),
    args: Sequence[int] = (0,) * 6,
) -> dict[str, dict[str, Action]]:
    """Evaluate ``program`` for every syscall libseccomp names and return the action by arch and name.

    Arguments are ``args`` (all zero by default), so a rule that depends on
    argument values reports the action for those values only.
    """
    result: dict[str, dict[str, Action]] = {}
    for arch in arches:
        token = KERNEL_ARCH_TOKENS[arch]
        table = syscall_table(arch)
        result[arch] = {
            name: Action.from_ret(evaluate(program, seccomp_data(_as_int(nr), token, args)))
            for name, nr in table.numbers.items()
        }
    return result


def action_for(program: Sequence[Instruction], arch: str, nr: int, args: Sequence[int] = (0,) * 6) -> Action:
    """Return the action ``program`` takes for syscall number ``nr`` of ``arch``."""
    return Action.from_ret(evaluate(program, seccomp_data(_as_int(nr), KERNEL_ARCH_TOKENS[arch], args)))


def _as_int(nr: int) -> int:
    """Return ``nr`` as the signed int stored in seccomp_data.nr (x32 numbers stay positive)."""
    return nr - (1 << 32) if nr >= 1 << 31 else nr


__all__ = [
    "MAX_INSTRUCTIONS",
    "X32_SYSCALL_BIT",
    "BpfError",
    "Instruction",
    "ALLOWED_CODES",
    "action_for",
    "check_program",
    "evaluate",
    "parse_program",
    "seccomp_data",
    "syscall_actions",
]
