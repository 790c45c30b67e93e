// SPDX-License-Identifier: GPL-2.0
/*
 * Checks a classic BPF program the way seccomp does before it installs one,
 * translates its loads for seccomp, and computes which syscalls it allows
 * whatever their arguments (the input of seccomp's action cache).
 */
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/sched.h>
#include <linux/seccomp.h>
#include <linux/slab.h>
#include <linux/stddef.h>
#include <asm/unistd.h>

#include "speaker.h"

/* Opcodes that seccomp accepts, before its load translation. */
static bool speaker_opcode_allowed(u16 code)
{
	switch (code) {
	case BPF_LD | BPF_W | BPF_ABS:
	case BPF_LD | BPF_W | BPF_LEN:
	case BPF_LDX | BPF_W | BPF_LEN:
	case BPF_RET | BPF_K:
	case BPF_RET | BPF_A:
	case BPF_ALU | BPF_ADD | BPF_K:
	case BPF_ALU | BPF_ADD | BPF_X:
	case BPF_ALU | BPF_SUB | BPF_K:
	case BPF_ALU | BPF_SUB | BPF_X:
	case BPF_ALU | BPF_MUL | BPF_K:
	case BPF_ALU | BPF_MUL | BPF_X:
	case BPF_ALU | BPF_DIV | BPF_K:
	case BPF_ALU | BPF_DIV | BPF_X:
	case BPF_ALU | BPF_AND | BPF_K:
	case BPF_ALU | BPF_AND | BPF_X:
	case BPF_ALU | BPF_OR | BPF_K:
	case BPF_ALU | BPF_OR | BPF_X:
	case BPF_ALU | BPF_XOR | BPF_K:
	case BPF_ALU | BPF_XOR | BPF_X:
	case BPF_ALU | BPF_LSH | BPF_K:
	case BPF_ALU | BPF_LSH | BPF_X:
	case BPF_ALU | BPF_RSH | BPF_K:
	case BPF_ALU | BPF_RSH | BPF_X:
	case BPF_ALU | BPF_NEG:
	case BPF_LD | BPF_IMM:
	case BPF_LDX | BPF_IMM:
	case BPF_MISC | BPF_TAX:
	case BPF_MISC | BPF_TXA:
	case BPF_LD | BPF_MEM:
	case BPF_LDX | BPF_MEM:
	case BPF_ST:
	case BPF_STX:
	case BPF_JMP | BPF_JA:
	case BPF_JMP | BPF_JEQ | BPF_K:
	case BPF_JMP | BPF_JEQ | BPF_X:
	case BPF_JMP | BPF_JGE | BPF_K:
	case BPF_JMP | BPF_JGE | BPF_X:
	case BPF_JMP | BPF_JGT | BPF_K:
	case BPF_JMP | BPF_JGT | BPF_X:
	case BPF_JMP | BPF_JSET | BPF_K:
	case BPF_JMP | BPF_JSET | BPF_X:
		return true;
	default:
		return false;
	}
}

static bool speaker_is_cond_jump(u16 code)
{
	return BPF_CLASS(code) == BPF_JMP && BPF_OP(code) != BPF_JA;
}

/*
 * Record that instruction pc, whose paths have stored the slots in valid,
 * leads to instruction target. Unreachable instructions do not count, because
 * no path through them runs.
 */
static void speaker_flow(u16 *stored, bool *reached, u32 pc, u64 target, u16 valid)
{
	if (!reached[pc])
		return;
	stored[target] = reached[target] ? (stored[target] & valid) : valid;
	reached[target] = true;
}

/*
 * Check a program that user space asked to load. Returns 0 or a
 * SPEAKER_LOAD_* reason, and sets *bad_insn to the index of the first
 * rejected instruction (SPEAKER_NO_INSN when none is at fault).
 *
 * Classic BPF only jumps forward, so one pass in program order visits every
 * predecessor of an instruction before the instruction itself. That pass
 * tracks, per instruction, which scratch memory slots every path to it has
 * stored.
 */
int speaker_check_program(const struct sock_filter *insns, u32 len, u32 *bad_insn)
{
	u16 *stored;
	bool *reached;
	int reason = SPEAKER_LOAD_OK;
	u32 pc;

	*bad_insn = SPEAKER_NO_INSN;
	if (len == 0 || len > BPF_MAXINSNS)
		return SPEAKER_LOAD_LENGTH;

	stored = kcalloc(len, sizeof(*stored), GFP_KERNEL);
	reached = kcalloc(len, sizeof(*reached), GFP_KERNEL);
	if (!stored || !reached) {
		kfree(stored);
		kfree(reached);
		return -ENOMEM;
	}
	reached[0] = true;
	stored[0] = 0;

	for (pc = 0; pc < len && reason == SPEAKER_LOAD_OK; pc++) {
		const struct sock_filter *insn = &insns[pc];
		u16 code = insn->code;
		u16 valid = stored[pc];
		u64 next = (u64)pc + 1;

		if (!speaker_opcode_allowed(code)) {
			reason = SPEAKER_LOAD_OPCODE;
			break;
		}

		switch (code) {
		case BPF_LD | BPF_W | BPF_ABS:
			if (insn->k >= sizeof(struct seccomp_data) || insn->k % 4 != 0)
				reason = SPEAKER_LOAD_OFFSET;
			break;
		case BPF_LD | BPF_MEM:
		case BPF_LDX | BPF_MEM:
			if (insn->k >= BPF_MEMWORDS)
				reason = SPEAKER_LOAD_MEM_INDEX;
			else if (reached[pc] && !(valid & (1U << insn->k)))
				reason = SPEAKER_LOAD_MEM_UNINIT;
			break;
		case BPF_ST:
		case BPF_STX:
			if (insn->k >= BPF_MEMWORDS)
				reason = SPEAKER_LOAD_MEM_INDEX;
			else
				valid |= 1U << insn->k;
			break;
		case BPF_ALU | BPF_DIV | BPF_K:
			if (insn->k == 0)
				reason = SPEAKER_LOAD_DIV_ZERO;
			break;
		case BPF_ALU | BPF_LSH | BPF_K:
		case BPF_ALU | BPF_RSH | BPF_K:
			if (insn->k >= 32)
				reason = SPEAKER_LOAD_SHIFT;
			break;
		}
		if (reason != SPEAKER_LOAD_OK)
			break;

		/* Check jump targets, and hand the stored-slot set to every successor. */
		if (code == (BPF_JMP | BPF_JA)) {
			u64 target = next + insn->k;

			if (target >= len) {
				reason = SPEAKER_LOAD_JUMP;
				break;
			}
			speaker_flow(stored, reached, pc, target, valid);
		} else if (speaker_is_cond_jump(code)) {
			u64 taken = next + insn->jt;
			u64 not_taken = next + insn->jf;

			if (taken >= len || not_taken >= len) {
				reason = SPEAKER_LOAD_JUMP;
				break;
			}
			speaker_flow(stored, reached, pc, taken, valid);
			speaker_flow(stored, reached, pc, not_taken, valid);
		} else if (BPF_CLASS(code) != BPF_RET && next < len) {
			speaker_flow(stored, reached, pc, next, valid);
		}
	}

	if (reason == SPEAKER_LOAD_OK && BPF_CLASS(insns[len - 1].code) != BPF_RET) {
		reason = SPEAKER_LOAD_NO_RET;
		pc = len - 1;
	}
	if (reason != SPEAKER_LOAD_OK)
		*bad_insn = pc;
	kfree(stored);
	kfree(reached);
	return reason;
}

/*
 * Rewrite loads for seccomp, as the kernel does for its own filters: a word
 * load reads struct seccomp_data, and a length load yields its size. Used as
 * the check callback of bpf_prog_create_from_user(), which calls it on the
 * kernel's copy after its own classic BPF check. The opcode test repeats
 * speaker_check_program() so that this callback is safe on its own.
 */
int speaker_seccomp_translate(struct sock_filter *insns, unsigned int len)
{
	unsigned int pc;

	for (pc = 0; pc < len; pc++) {
		struct sock_filter *insn = &insns[pc];

		if (!speaker_opcode_allowed(insn->code))
			return -EINVAL;
		switch (insn->code) {
		case BPF_LD | BPF_W | BPF_ABS:
			if (insn->k >= sizeof(struct seccomp_data) || insn->k % 4 != 0)
				return -EINVAL;
			insn->code = BPF_LDX | BPF_W | BPF_ABS;
			break;
		case BPF_LD | BPF_W | BPF_LEN:
			insn->code = BPF_LD | BPF_IMM;
			insn->k = sizeof(struct seccomp_data);
			break;
		case BPF_LDX | BPF_W | BPF_LEN:
			insn->code = BPF_LDX | BPF_IMM;
			insn->k = sizeof(struct seccomp_data);
			break;
		}
	}
	return 0;
}

/* A register or scratch slot value in the emulation below: a constant, or unknown. */
struct speaker_value {
	u32 value;
	bool known;
};

static struct speaker_value speaker_known(u32 value)
{
	return (struct speaker_value){ .value = value, .known = true };
}

static const struct speaker_value speaker_unknown = { .value = 0, .known = false };

/*
 * Apply an ALU operation to constant operands. Returns false when the result
 * is not a plain constant (division by zero makes the program return 0, and
 * shifts of 32 or more differ between interpreters).
 */
static bool speaker_alu(u16 op, u32 a, u32 operand, u32 *result)
{
	switch (op) {
	case BPF_ADD:
		*result = a + operand;
		return true;
	case BPF_SUB:
		*result = a - operand;
		return true;
	case BPF_MUL:
		*result = a * operand;
		return true;
	case BPF_DIV:
		if (operand == 0)
			return false;
		*result = a / operand;
		return true;
	case BPF_AND:
		*result = a & operand;
		return true;
	case BPF_OR:
		*result = a | operand;
		return true;
	case BPF_XOR:
		*result = a ^ operand;
		return true;
	case BPF_LSH:
		if (operand >= 32)
			return false;
		*result = a << operand;
		return true;
	case BPF_RSH:
		if (operand >= 32)
			return false;
		*result = a >> operand;
		return true;
	case BPF_NEG:
		*result = -a;
		return true;
	default:
		return false;
	}
}

/*
 * Return whether a checked program returns SECCOMP_RET_ALLOW for every
 * struct seccomp_data with this syscall number and architecture. The
 * emulation treats only nr and arch as known values. A branch on any other
 * field makes the result false, so a true result is valid for all arguments.
 */
static bool speaker_always_allows(const struct sock_filter *insns, u32 len, u32 nr, u32 arch)
{
	struct speaker_value a = speaker_known(0), x = speaker_known(0);
	struct speaker_value mem[BPF_MEMWORDS];
	u32 pc, i;

	for (i = 0; i < BPF_MEMWORDS; i++)
		mem[i] = speaker_unknown;

	for (pc = 0; pc < len; pc++) {
		const struct sock_filter *insn = &insns[pc];
		u16 code = insn->code;
		struct speaker_value operand;
		bool branch_taken;
		u32 result;

		switch (BPF_CLASS(code)) {
		case BPF_LD:
			if (code == (BPF_LD | BPF_W | BPF_ABS)) {
				if (insn->k == offsetof(struct seccomp_data, nr))
					a = speaker_known(nr);
				else if (insn->k == offsetof(struct seccomp_data, arch))
					a = speaker_known(arch);
				else
					a = speaker_unknown;
			} else if (code == (BPF_LD | BPF_W | BPF_LEN)) {
				a = speaker_known(sizeof(struct seccomp_data));
			} else if (code == (BPF_LD | BPF_IMM)) {
				a = speaker_known(insn->k);
			} else if (code == (BPF_LD | BPF_MEM)) {
				a = mem[insn->k];
			} else {
				return false;
			}
			break;
		case BPF_LDX:
			if (code == (BPF_LDX | BPF_W | BPF_LEN))
				x = speaker_known(sizeof(struct seccomp_data));
			else if (code == (BPF_LDX | BPF_IMM))
				x = speaker_known(insn->k);
			else if (code == (BPF_LDX | BPF_MEM))
				x = mem[insn->k];
			else
				return false;
			break;
		case BPF_ST:
			mem[insn->k] = a;
			break;
		case BPF_STX:
			mem[insn->k] = x;
			break;
		case BPF_MISC:
			if (BPF_MISCOP(code) == BPF_TAX)
				x = a;
			else
				a = x;
			break;
		case BPF_ALU:
			operand = BPF_SRC(code) == BPF_X ? x : speaker_known(insn->k);
			if (BPF_OP(code) == BPF_NEG)
				operand = speaker_known(0);
			if (!a.known || !operand.known || !speaker_alu(BPF_OP(code), a.value, operand.value, &result))
				return false;
			a = speaker_known(result);
			break;
		case BPF_JMP:
			if (BPF_OP(code) == BPF_JA) {
				pc += insn->k;
				break;
			}
			operand = BPF_SRC(code) == BPF_X ? x : speaker_known(insn->k);
			if (!a.known || !operand.known)
				return false;
			switch (BPF_OP(code)) {
			case BPF_JEQ:
				branch_taken = a.value == operand.value;
				break;
			case BPF_JGE:
				branch_taken = a.value >= operand.value;
				break;
			case BPF_JGT:
				branch_taken = a.value > operand.value;
				break;
			case BPF_JSET:
				branch_taken = (a.value & operand.value) != 0;
				break;
			default:
				return false;
			}
			pc += branch_taken ? insn->jt : insn->jf;
			break;
		case BPF_RET:
			if (BPF_RVAL(code) == BPF_K)
				return (insn->k & SECCOMP_RET_ACTION_FULL) == SECCOMP_RET_ALLOW;
			return a.known && (a.value & SECCOMP_RET_ACTION_FULL) == SECCOMP_RET_ALLOW;
		default:
			return false;
		}
	}
	/* Unreachable for a checked program, which ends in a return. */
	return false;
}

/*
 * Fill allow (SPEAKER_CACHE_WORDS words: native bitmap, then compat bitmap)
 * with the syscalls that a checked program always allows. A program of
 * BPF_MAXINSNS instructions takes a few million emulation steps, so this
 * yields the CPU between syscall numbers. Sleeps.
 */
void speaker_compute_allow(const struct sock_filter *insns, u32 len, unsigned long *allow)
{
	unsigned long *native = allow;
	unsigned long *compat = allow + SPEAKER_NATIVE_WORDS;
	u32 nr;

	bitmap_zero(allow, SPEAKER_CACHE_WORDS * BITS_PER_LONG);
	for (nr = 0; nr < SECCOMP_ARCH_NATIVE_NR; nr++) {
		if (speaker_always_allows(insns, len, nr, SECCOMP_ARCH_NATIVE))
			__set_bit(nr, native);
		cond_resched();
	}
	/*
	 * Kernels with the uprobe syscalls (such as Debian's 6.12.95) let them
	 * through every filter by always setting their action-cache bits,
	 * whatever the program returns (seccomp_uprobe_exception() in
	 * kernel/seccomp.c).
	 */
#ifdef __NR_uretprobe
	__set_bit(__NR_uretprobe, native);
#endif
#ifdef __NR_uprobe
	__set_bit(__NR_uprobe, native);
#endif
	for (nr = 0; nr < SECCOMP_ARCH_COMPAT_NR; nr++) {
		if (speaker_always_allows(insns, len, nr, SECCOMP_ARCH_COMPAT))
			__set_bit(nr, compat);
		cond_resched();
	}
}
