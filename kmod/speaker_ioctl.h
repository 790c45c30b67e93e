/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * Ioctl ABI of /dev/speaker, the SPEAKER kernel module.
 *
 * A container is registered by the pid of its init process. The module then
 * keeps a reference to the seccomp filter that the container runtime
 * installed, and swaps the BPF program inside that filter when user space
 * (or the stop signal) switches the container to another phase. Every task
 * that shares the filter runs the new program from then on.
 *
 * All structures have the same layout on 32-bit and 64-bit user space: user
 * pointers travel as __u64, and every __u64 sits at an 8-byte offset.
 * Fields named "reserved" and unknown flag bits must be zero.
 */
#ifndef SPEAKER_IOCTL_H
#define SPEAKER_IOCTL_H

#include <linux/ioctl.h>
#include <linux/types.h>

/* Incremented on every incompatible change of the structures below. */
#define SPEAKER_ABI_VERSION 1

#define SPEAKER_DEVICE_NAME "speaker"
/* Unassigned in Documentation/userspace-api/ioctl/ioctl-number.rst of Linux 6.1. */
#define SPEAKER_IOC_MAGIC 0xB9

enum speaker_phase {
	/* The program the container runtime installed, kept for restoring. */
	SPEAKER_PHASE_ORIGINAL = 0,
	SPEAKER_PHASE_BOOTING = 1,
	SPEAKER_PHASE_RUNNING = 2,
	SPEAKER_PHASE_SHUTDOWN = 3,
};
#define SPEAKER_PHASE_COUNT 4

/* SPEAKER_IOC_VERSION output. */
struct speaker_version {
	__u32 abi_version;
	/* Value of the max_groups module parameter. */
	__u32 max_groups;
	/* Containers registered now. */
	__u32 groups;
	/* Unregistered containers whose programs wait for the container to exit. */
	__u32 retired;
};

/* Register the newest filter of the init task instead of the lowest one it did not inherit. */
#define SPEAKER_REGISTER_NEWEST (1U << 0)
/*
 * When the filter is registered already, return that registration's id
 * instead of failing with EBUSY. The existing registration keeps its stop
 * signal and programs.
 */
#define SPEAKER_REGISTER_ADOPT (1U << 1)

struct speaker_register {
	/* In: SPEAKER_ABI_VERSION. A mismatch fails with EPROTO. */
	__u32 abi_version;
	/* In: pid of the container's init process, in the caller's pid namespace. */
	__s32 pid;
	/* In: signal that switches the container to SPEAKER_PHASE_SHUTDOWN, 0 for none. */
	__u32 stop_signal;
	/* In: SPEAKER_REGISTER_* flags. */
	__u32 flags;
	/* Out: handle for the other ioctls. Never 0. */
	__u64 id;
};

/* SPEAKER_IOC_LOAD error_reason values. */
enum speaker_load_error {
	SPEAKER_LOAD_OK = 0,
	/* len is 0 or larger than BPF_MAXINSNS (4096). */
	SPEAKER_LOAD_LENGTH = 1,
	/* An opcode that seccomp does not accept. */
	SPEAKER_LOAD_OPCODE = 2,
	/* A jump target outside the program. */
	SPEAKER_LOAD_JUMP = 3,
	/* The last instruction is not a return. */
	SPEAKER_LOAD_NO_RET = 4,
	/* A load from struct seccomp_data that is unaligned or out of bounds. */
	SPEAKER_LOAD_OFFSET = 5,
	/* A scratch memory index of 16 or more. */
	SPEAKER_LOAD_MEM_INDEX = 6,
	/* A scratch memory load that some path reaches before any store. */
	SPEAKER_LOAD_MEM_UNINIT = 7,
	/* Division by the constant 0. */
	SPEAKER_LOAD_DIV_ZERO = 8,
	/* A constant shift of 32 or more. */
	SPEAKER_LOAD_SHIFT = 9,
	/* The filter chain would exceed seccomp's limit of 32768 instructions per path. */
	SPEAKER_LOAD_PATH_LENGTH = 10,
	/* The instructions changed in user memory while the module copied them. */
	SPEAKER_LOAD_CHANGED = 11,
	/* The kernel's own classic BPF check rejected the program. */
	SPEAKER_LOAD_KERNEL = 12,
};

/* error_insn when no single instruction is at fault. */
#define SPEAKER_NO_INSN 0xffffffffU

struct speaker_load {
	/* In: handle from SPEAKER_IOC_REGISTER. */
	__u64 id;
	/* In: SPEAKER_PHASE_BOOTING, _RUNNING or _SHUTDOWN. */
	__u32 phase;
	/* In: number of struct sock_filter instructions. */
	__u32 len;
	/* In: user address of the instructions. */
	__u64 filter;
	/* Out, also on EINVAL: index of the rejected instruction, or SPEAKER_NO_INSN. */
	__u32 error_insn;
	/* Out, also on EINVAL: enum speaker_load_error. */
	__u32 error_reason;
};

/*
 * Switch even after the stop signal has moved the container to
 * SPEAKER_PHASE_SHUTDOWN. Without it such a switch fails with EALREADY, so
 * that a late request from user space cannot undo the shutdown switch.
 */
#define SPEAKER_SWITCH_FORCE (1U << 0)

struct speaker_switch {
	__u64 id;
	/* Any enum speaker_phase with a loaded program. */
	__u32 phase;
	/* SPEAKER_SWITCH_* flags. */
	__u32 flags;
};

/* speaker_state flags. */
/* The container's init process still exists. */
#define SPEAKER_STATE_ALIVE (1U << 0)
/* The stop signal was sent to the container's init. */
#define SPEAKER_STATE_STOP_SEEN (1U << 1)

struct speaker_state {
	/* In. */
	__u64 id;
	/* Out: init pid in the caller's pid namespace, 0 when not visible there. */
	__s32 pid;
	/* Out: enum speaker_phase in force. */
	__u32 phase;
	/* Out: bit (1 << phase) for each phase that has a program. */
	__u32 loaded;
	__u32 stop_signal;
	/* Out: SPEAKER_STATE_* flags. */
	__u32 flags;
	/* Out: the registered filter's reference and user counts, including the module's reference. */
	__u32 filter_refs;
	__u32 filter_users;
	/* Out: number of filters from the registered one down to the oldest. */
	__u32 filter_depth;
	/* Out: number of program swaps so far. */
	__u64 switches;
	/* Out: CLOCK_MONOTONIC time of the last swap, in nanoseconds. */
	__u64 switch_ns;
};

/* Words of each bitmap in struct speaker_cache, room for 1024 syscall numbers. */
#define SPEAKER_CACHE_BITMAP_WORDS 16

/*
 * SPEAKER_IOC_CACHE: the registered filter's seccomp action cache. Bit n of
 * native (x86_64) or compat (i386) is set when seccomp allows syscall n
 * without running any filter program.
 */
struct speaker_cache {
	/* In. */
	__u64 id;
	/* Out: number of valid bits in native and in compat. */
	__u32 native_bits;
	__u32 compat_bits;
	__u64 native[SPEAKER_CACHE_BITMAP_WORDS];
	__u64 compat[SPEAKER_CACHE_BITMAP_WORDS];
};

/* Put the runtime's original program back instead of keeping the current phase in force. */
#define SPEAKER_UNREGISTER_RESTORE (1U << 0)

struct speaker_unregister {
	__u64 id;
	/* SPEAKER_UNREGISTER_* flags. */
	__u32 flags;
	__u32 reserved;
};

#define SPEAKER_IOC_VERSION _IOR(SPEAKER_IOC_MAGIC, 0, struct speaker_version)
#define SPEAKER_IOC_REGISTER _IOWR(SPEAKER_IOC_MAGIC, 1, struct speaker_register)
#define SPEAKER_IOC_LOAD _IOWR(SPEAKER_IOC_MAGIC, 2, struct speaker_load)
#define SPEAKER_IOC_SWITCH _IOW(SPEAKER_IOC_MAGIC, 3, struct speaker_switch)
#define SPEAKER_IOC_QUERY _IOWR(SPEAKER_IOC_MAGIC, 4, struct speaker_state)
#define SPEAKER_IOC_UNREGISTER _IOW(SPEAKER_IOC_MAGIC, 5, struct speaker_unregister)
#define SPEAKER_IOC_CACHE _IOWR(SPEAKER_IOC_MAGIC, 6, struct speaker_cache)

#endif /* SPEAKER_IOCTL_H */
