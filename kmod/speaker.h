/* SPDX-License-Identifier: GPL-2.0 */
/* Declarations shared by the files of the SPEAKER module. */
#ifndef SPEAKER_H
#define SPEAKER_H

#include <linux/bitops.h>
#include <linux/filter.h>
#include <linux/list.h>
#include <linux/mutex.h>
#include <linux/pid.h>
#include <linux/refcount.h>
#include <linux/spinlock.h>
#include <linux/workqueue.h>
#include <asm/seccomp.h>

#include "speaker_ioctl.h"

#if !defined(CONFIG_X86_64) || !defined(SECCOMP_ARCH_NATIVE) || !defined(SECCOMP_ARCH_COMPAT)
#error "the SPEAKER module supports x86_64 kernels with 32-bit compatibility only"
#endif

#define SPEAKER_NATIVE_WORDS BITS_TO_LONGS(SECCOMP_ARCH_NATIVE_NR)
#define SPEAKER_COMPAT_WORDS BITS_TO_LONGS(SECCOMP_ARCH_COMPAT_NR)
#define SPEAKER_CACHE_WORDS (SPEAKER_NATIVE_WORDS + SPEAKER_COMPAT_WORDS)

/* Seccomp's limit on the instructions of one filter chain (kernel/seccomp.c). */
#define SPEAKER_MAX_INSNS_PER_PATH ((1 << 18) / sizeof(struct sock_filter))

/*
 * Replaced programs that tasks may have run. They are freed only once the
 * container has exited, so each container may replace its active program
 * this many times.
 */
#define SPEAKER_MAX_RETIRED 32

/* --- layout.c: the kernel's private struct seccomp_filter ------------------ */

/* Byte offsets of the struct seccomp_filter members that the module uses. */
struct speaker_layout {
	const char *release;
	unsigned int refs;
	unsigned int users;
	/* struct action_cache: the native bitmap, then the compat bitmap. */
	unsigned int cache;
	unsigned int cache_size;
	unsigned int prev;
	unsigned int prog;
	unsigned int notif;
	unsigned int size;
};

extern const struct speaker_layout *speaker_layout;

int speaker_layout_init(void);

static inline refcount_t *sf_refs(struct seccomp_filter *f)
{
	return (refcount_t *)((char *)f + speaker_layout->refs);
}

static inline refcount_t *sf_users(struct seccomp_filter *f)
{
	return (refcount_t *)((char *)f + speaker_layout->users);
}

/* The native bitmap followed by the compat bitmap, SPEAKER_CACHE_WORDS words. */
static inline unsigned long *sf_cache(struct seccomp_filter *f)
{
	return (unsigned long *)((char *)f + speaker_layout->cache);
}

static inline struct seccomp_filter **sf_prev(struct seccomp_filter *f)
{
	return (struct seccomp_filter **)((char *)f + speaker_layout->prev);
}

static inline struct bpf_prog **sf_prog(struct seccomp_filter *f)
{
	return (struct bpf_prog **)((char *)f + speaker_layout->prog);
}

void speaker_put_filter(struct seccomp_filter *f);
bool speaker_filter_plausible(struct seccomp_filter *f);

/* --- bpf_check.c: validation and action-cache emulation -------------------- */

int speaker_check_program(const struct sock_filter *insns, u32 len, u32 *bad_insn);
int speaker_seccomp_translate(struct sock_filter *insns, unsigned int len);
void speaker_compute_allow(const struct sock_filter *insns, u32 len, unsigned long *allow);

/* --- pick.c: the filter a registration takes -------------------------------- */

struct seccomp_filter *speaker_pick_filter(struct task_struct *task, bool newest, int *err);

/* --- shutdown.c: the stop-signal probe --------------------------------------- */

int speaker_shutdown_init(void);
void speaker_shutdown_exit(void);

/* --- group.c: one registered container ------------------------------------- */

struct sighand_struct *speaker_lock_sighand(struct task_struct *task, unsigned long *flags);
void speaker_unlock_sighand(struct sighand_struct *sighand, unsigned long flags);


struct speaker_program {
	struct bpf_prog *prog;
	/*
	 * Syscalls that the program allows whatever their arguments: the native
	 * bitmap then the compat one, as in struct action_cache. For
	 * SPEAKER_PHASE_ORIGINAL this is the filter's cache at registration.
	 */
	unsigned long allow[SPEAKER_CACHE_WORDS];
	/* Installed in the filter at some time, so tasks may still run it. */
	bool ever_installed;
};

struct speaker_group {
	/* In the registry's group list, which the signal probe reads under RCU. */
	struct list_head node;
	/* In the registry's retired list. */
	struct list_head retired_node;
	/* In a caller's batch of groups being retired. */
	struct list_head batch_node;
	u64 id;
	/* Thread group of the container's init process. */
	struct pid *tgid;
	/* The registered filter. The group holds one reference (refs, not users). */
	struct seccomp_filter *filter;
	int stop_signal;
	/* Serializes program swaps from ioctls and from the signal probe. Taken with interrupts off. */
	spinlock_t lock;
	enum speaker_phase phase;
	struct speaker_program programs[SPEAKER_PHASE_COUNT];
	struct bpf_prog *retired[SPEAKER_MAX_RETIRED];
	unsigned int nr_retired;
	bool stop_seen;
	/* Unregistered, but speaker_finish_retire() has not finished with it. */
	bool retiring;
	u64 switches;
	u64 switch_ns;
	/* Narrows stacked filters after the signal probe switched phases. */
	struct work_struct narrow_work;
};

struct speaker_group *speaker_group_create(struct seccomp_filter *filter, struct pid *tgid, int stop_signal);
void speaker_group_install(struct speaker_group *g, enum speaker_phase phase);
int speaker_group_switch(struct speaker_group *g, enum speaker_phase phase, bool force);
void speaker_narrow_stacked(struct seccomp_filter *filter, const unsigned long *allow);
int speaker_group_set_program(struct speaker_group *g, enum speaker_phase phase, struct bpf_prog *prog,
			      const unsigned long *allow);
void speaker_group_discard(struct speaker_group *g);
void speaker_group_free(struct speaker_group *g);

/* --- registry.c: the registered containers ---------------------------------- */

/* Serializes the ioctls that change the registry or a group. */
extern struct mutex speaker_registry;
/* Registered groups: ioctls change the list under speaker_registry, the signal probe reads it under RCU. */
extern struct list_head speaker_groups;

struct speaker_group *speaker_find(u64 id);
int speaker_registry_add(struct speaker_group *g, struct speaker_register *req, void __user *arg);
int speaker_registry_remove(u64 id, bool restore);
unsigned int speaker_registry_clear(void);
void speaker_registry_counts(struct speaker_version *version);

#endif /* SPEAKER_H */
