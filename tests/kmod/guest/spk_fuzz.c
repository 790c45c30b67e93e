// SPDX-License-Identifier: GPL-2.0
/*
 * Random ioctls on /dev/speaker: random commands, sizes and pointers, and
 * well-formed requests with random fields, including random classic BPF
 * programs for a live registered group.
 *
 * Usage: spk_fuzz DEVICE CALLS SEED GROUP_PID GROUP_ID
 *
 * GROUP_ID is a group registered for GROUP_PID. The fuzzer may unregister
 * it and register GROUP_PID again. Generated programs only return ALLOW,
 * ERRNO, LOG, TRACE or USER_NOTIF, and never divide by a register, so the
 * group's tasks survive them. Prints one summary line:
 *   fuzz calls=N ok=N errno=E:COUNT,... groups=LAST_ID
 * and exits 0 unless the device cannot be opened.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../../../kmod/speaker_ioctl.h"

#define PAGE 4096
#define MAX_ERRNO_SEEN 200

static uint64_t rng_state;

static uint64_t next_random(void)
{
	/* xorshift64* */
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545F4914F6CDD1DULL;
}

static uint32_t below(uint32_t bound)
{
	return bound ? (uint32_t)(next_random() % bound) : 0;
}

static void fill_random(void *buffer, size_t size)
{
	unsigned char *bytes = buffer;
	size_t i;

	for (i = 0; i < size; i++)
		bytes[i] = (unsigned char)next_random();
}

static const uint32_t returns[] = {
	SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | 1, SECCOMP_RET_ERRNO | 4000,
	SECCOMP_RET_LOG, SECCOMP_RET_TRACE, SECCOMP_RET_USER_NOTIF,
};

/* A program that passes seccomp's checks most of the time, of 1 to 48 instructions. */
static uint32_t generate_program(struct sock_filter *insns)
{
	static const uint16_t alu_ops[] = { BPF_ADD, BPF_SUB, BPF_MUL, BPF_AND, BPF_OR, BPF_XOR, BPF_LSH, BPF_RSH };
	static const uint16_t jump_ops[] = { BPF_JEQ, BPF_JGE, BPF_JGT, BPF_JSET };
	uint32_t len = 1 + below(48);
	uint32_t pc;

	for (pc = 0; pc + 1 < len; pc++) {
		struct sock_filter *insn = &insns[pc];
		uint32_t room = len - pc - 2;

		memset(insn, 0, sizeof(*insn));
		switch (below(9)) {
		case 0:
			insn->code = BPF_LD | BPF_W | BPF_ABS;
			insn->k = 4 * below(16);
			break;
		case 1:
			insn->code = below(2) ? (BPF_LD | BPF_IMM) : (BPF_LDX | BPF_IMM);
			insn->k = (uint32_t)next_random();
			break;
		case 2:
			insn->code = BPF_ALU | alu_ops[below(8)] | (below(2) ? BPF_X : BPF_K);
			insn->k = below(32);
			break;
		case 3:
			insn->code = BPF_MISC | (below(2) ? BPF_TAX : BPF_TXA);
			break;
		case 4:
			insn->code = below(2) ? BPF_ST : BPF_STX;
			insn->k = below(16);
			break;
		case 5:
			insn->code = below(2) ? (BPF_LD | BPF_MEM) : (BPF_LDX | BPF_MEM);
			insn->k = below(16);
			break;
		case 6:
			insn->code = BPF_JMP | BPF_JA;
			insn->k = below(room + 1);
			break;
		case 7:
			insn->code = BPF_RET | BPF_K;
			insn->k = returns[below(6)];
			break;
		default:
			insn->code = BPF_JMP | jump_ops[below(4)] | (below(2) ? BPF_X : BPF_K);
			insn->jt = (uint8_t)below(room + 1 < 256 ? room + 1 : 256);
			insn->jf = (uint8_t)below(room + 1 < 256 ? room + 1 : 256);
			insn->k = below(4) ? below(500) : (uint32_t)next_random();
			break;
		}
	}
	memset(&insns[len - 1], 0, sizeof(insns[0]));
	insns[len - 1].code = BPF_RET | BPF_K;
	insns[len - 1].k = returns[below(6)];
	return len;
}

struct scratch {
	unsigned char *base;	/* two writable pages followed by one PROT_NONE page */
	struct sock_filter *program;
};

/* Pick an argument pointer for a request of size bytes, copying request there when the pointer is usable. */
static void *pick_pointer(struct scratch *scratch, const void *request, size_t size)
{
	unsigned char *slot = scratch->base;
	unsigned char *guard = scratch->base + 2 * PAGE;

	switch (below(20)) {
	case 0:
		return NULL;
	case 1:
		return (void *)(uintptr_t)next_random();
	case 2:
		return (void *)(uintptr_t)0xffffffff81000000ULL;
	case 3:
		/* The request ends inside the PROT_NONE page. */
		slot = guard - (size > 1 ? size / 2 : 1);
		memcpy(slot, request, guard - slot);
		return slot;
	case 4:
		return guard;
	default:
		memcpy(slot, request, size);
		return slot;
	}
}

static uint64_t pick_id(uint64_t group_id)
{
	return below(2) ? group_id : below(4) ? below(8) : next_random();
}

int main(int argc, char **argv)
{
	long calls, call, ok = 0;
	long errors[MAX_ERRNO_SEEN + 1] = { 0 };
	struct scratch scratch;
	pid_t group_pid;
	uint64_t group_id;
	int fd, i;

	if (argc != 6) {
		fprintf(stderr, "usage: spk_fuzz DEVICE CALLS SEED GROUP_PID GROUP_ID\n");
		return 2;
	}
	calls = atol(argv[2]);
	rng_state = strtoull(argv[3], NULL, 0) | 1;
	group_pid = atoi(argv[4]);
	group_id = strtoull(argv[5], NULL, 0);
	fd = open(argv[1], O_RDWR);
	if (fd < 0) {
		perror(argv[1]);
		return 2;
	}
	scratch.base = mmap(NULL, 3 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	scratch.program = mmap(NULL, (BPF_MAXINSNS + 1) * sizeof(struct sock_filter), PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (scratch.base == MAP_FAILED || scratch.program == MAP_FAILED || mprotect(scratch.base + 2 * PAGE, PAGE, PROT_NONE))
		return 2;

	for (call = 0; call < calls; call++) {
		union {
			struct speaker_version version;
			struct speaker_register reg;
			struct speaker_load load;
			struct speaker_switch sw;
			struct speaker_state state;
			struct speaker_unregister unreg;
			struct speaker_cache cache;
			unsigned char bytes[512];
		} request;
		unsigned long command;
		size_t size = sizeof(request);
		uint32_t kind = below(100);
		void *pointer;
		long ret;

		fill_random(&request, sizeof(request));
		if (kind < 60) {
			switch (below(7)) {
			case 0:
				command = SPEAKER_IOC_VERSION;
				size = sizeof(request.version);
				break;
			case 1:
				command = SPEAKER_IOC_REGISTER;
				size = sizeof(request.reg);
				request.reg.abi_version = below(10) ? SPEAKER_ABI_VERSION : (uint32_t)next_random();
				request.reg.pid = below(3) ? group_pid : below(2) ? (int32_t)below(600) : (int32_t)next_random();
				request.reg.stop_signal = below(70);
				request.reg.flags = below(4);
				break;
			case 2:
				command = SPEAKER_IOC_LOAD;
				size = sizeof(request.load);
				request.load.id = pick_id(group_id);
				request.load.phase = below(6);
				if (below(5)) {
					request.load.len = generate_program(scratch.program);
				} else {
					request.load.len = below(3) ? below(BPF_MAXINSNS + 2) : (uint32_t)next_random();
					fill_random(scratch.program, (size_t)(request.load.len <= BPF_MAXINSNS + 1 ? request.load.len : 8) *
									    sizeof(struct sock_filter));
				}
				request.load.filter = below(10) ? (uint64_t)(uintptr_t)scratch.program : next_random();
				break;
			case 3:
				command = SPEAKER_IOC_SWITCH;
				size = sizeof(request.sw);
				request.sw.id = pick_id(group_id);
				request.sw.phase = below(6);
				request.sw.flags = below(3);
				break;
			case 4:
				command = SPEAKER_IOC_QUERY;
				size = sizeof(request.state);
				request.state.id = pick_id(group_id);
				break;
			case 5:
				command = SPEAKER_IOC_CACHE;
				size = sizeof(request.cache);
				request.cache.id = pick_id(group_id);
				break;
			default:
				command = SPEAKER_IOC_UNREGISTER;
				size = sizeof(request.unreg);
				/* Rarely the live group, which REGISTER above may bring back. */
				request.unreg.id = below(500) ? below(8) + group_id + 1 : group_id;
				request.unreg.flags = below(3);
				request.unreg.reserved = below(4) ? 0 : (uint32_t)next_random();
				break;
			}
		} else if (kind < 75) {
			command = _IOC(below(4), SPEAKER_IOC_MAGIC, below(7), below(1 << 14));
		} else if (kind < 90) {
			command = _IOC(below(4), SPEAKER_IOC_MAGIC, below(256), below(1 << 14));
		} else {
			command = (uint32_t)next_random();
		}

		if (_IOC_SIZE(command) > sizeof(request))
			size = sizeof(request);
		pointer = pick_pointer(&scratch, &request, size);
		ret = ioctl(fd, command, pointer);
		if (ret == 0) {
			ok++;
			if (command == SPEAKER_IOC_REGISTER && pointer == scratch.base)
				group_id = ((struct speaker_register *)pointer)->id;
		} else {
			errors[errno <= MAX_ERRNO_SEEN ? errno : MAX_ERRNO_SEEN]++;
		}
	}

	printf("fuzz calls=%ld ok=%ld errno=", calls, ok);
	for (i = 1; i <= MAX_ERRNO_SEEN; i++)
		if (errors[i])
			printf("%d:%ld,", i, errors[i]);
	printf(" groups=%llu\n", (unsigned long long)group_id);
	return 0;
}
