// SPDX-License-Identifier: GPL-2.0
/*
 * One registered container: its seccomp filter, one program per phase, and
 * the program swap.
 *
 * Seccomp reads a filter without locks: seccomp_run_filters() tests the
 * action cache of the task's newest filter and, on a miss, runs f->prog of
 * every filter in the chain. A swap therefore has three steps, each visible
 * to other CPUs in order:
 *
 * 1. clear the cache bits of syscalls that the new program does not always
 *    allow, so no task skips the new program for them;
 * 2. publish the new program pointer;
 * 3. set the cache bits of syscalls that the new program always allows.
 *
 * Filters that a task stacked on top of the registered one have caches of
 * their own, copied from the registered filter's cache when they were
 * attached. Those caches only ever lose bits here (speaker_narrow_stacked),
 * which can cost speed but never lets a syscall skip a program. A switch
 * from an ioctl narrows them between steps 1 and 2.
 *
 * Nothing here frees a program that tasks may have run. Such programs stay
 * with the group until the container has exited (see main.c).
 */
#include <linux/bitmap.h>
#include <linux/filter.h>
#include <linux/rcupdate.h>
#include <linux/sched/signal.h>
#include <linux/sched/task.h>
#include <linux/seccomp.h>
#include <linux/slab.h>
#include <linux/timekeeping.h>

#include "speaker.h"

/* Clear the bits of filter's cache that are not set in allow. */
static void speaker_cache_narrow(struct seccomp_filter *filter, const unsigned long *allow)
{
	unsigned long *cache = sf_cache(filter);
	unsigned int word;

	for (word = 0; word < SPEAKER_CACHE_WORDS; word++) {
		unsigned long extra = READ_ONCE(cache[word]) & ~allow[word];
		unsigned int bit;

		for_each_set_bit(bit, &extra, BITS_PER_LONG)
			clear_bit(word * BITS_PER_LONG + bit, cache);
	}
}

/* Set the bits of filter's cache that are set in allow. */
static void speaker_cache_widen(struct seccomp_filter *filter, const unsigned long *allow)
{
	unsigned long *cache = sf_cache(filter);
	unsigned int word;

	for (word = 0; word < SPEAKER_CACHE_WORDS; word++) {
		unsigned long missing = allow[word] & ~READ_ONCE(cache[word]);
		unsigned int bit;

		for_each_set_bit(bit, &missing, BITS_PER_LONG)
			set_bit(word * BITS_PER_LONG + bit, cache);
	}
}

/*
 * Compute the action cache that the registered filter must have with the
 * program of phase: what the older filters' cache allows and the program
 * always allows. Bits past the syscall tables stay clear.
 */
static void speaker_target_cache(struct speaker_group *g, enum speaker_phase phase, unsigned long *cache)
{
	struct seccomp_filter *prev = *sf_prev(g->filter);
	const unsigned long *allow = g->programs[phase].allow;
	unsigned int word;

	/*
	 * For SPEAKER_PHASE_ORIGINAL, allow is the kernel's own cache saved at
	 * registration. Older filters can have lost bits since, when they are
	 * registered as well, so that cache is narrowed by theirs like the others.
	 */
	for (word = 0; word < SPEAKER_CACHE_WORDS; word++)
		cache[word] = allow[word] & (prev ? READ_ONCE(sf_cache(prev)[word]) : ~0UL);
}

/*
 * Swap the program of phase into the registered filter. The caller holds
 * g->lock with interrupts off, and the phase has a program. Safe in atomic
 * context: the signal probe calls it under the target's siglock.
 */
void speaker_group_install(struct speaker_group *g, enum speaker_phase phase)
{
	struct speaker_program *program = &g->programs[phase];
	unsigned long cache[SPEAKER_CACHE_WORDS];

	lockdep_assert_held(&g->lock);

	speaker_target_cache(g, phase, cache);
	speaker_cache_narrow(g->filter, cache);
	/* Orders the cleared bits before the new program for every reader. */
	smp_store_release(sf_prog(g->filter), program->prog);
	/* Orders the new program before the bits that let readers skip it. */
	smp_mb__before_atomic();
	speaker_cache_widen(g->filter, cache);

	program->ever_installed = true;
	g->phase = phase;
	g->switches++;
	g->switch_ns = ktime_get_ns();
}

/*
 * Take the siglock of a task, which keeps its seccomp filter chain in place.
 * Returns NULL when the task has already released its signal handlers while
 * exiting. The kernel's lock_task_sighand() does the same but is not exported
 * to modules. A sighand_struct is freed only after an RCU grace period
 * (SLAB_TYPESAFE_BY_RCU), so the pointer read under rcu_read_lock() stays a
 * lockable sighand_struct, and the loop retries if the task switched to
 * another one in the meantime.
 */
struct sighand_struct *speaker_lock_sighand(struct task_struct *task, unsigned long *flags)
{
	struct sighand_struct *sighand;

	rcu_read_lock();
	for (;;) {
		sighand = rcu_dereference(task->sighand);
		if (!sighand)
			break;
		spin_lock_irqsave(&sighand->siglock, *flags);
		if (sighand == rcu_access_pointer(task->sighand))
			break;
		spin_unlock_irqrestore(&sighand->siglock, *flags);
	}
	rcu_read_unlock();
	return sighand;
}

void speaker_unlock_sighand(struct sighand_struct *sighand, unsigned long flags)
{
	spin_unlock_irqrestore(&sighand->siglock, flags);
}

/*
 * Narrow, by allow, the caches of all filters stacked on top of filter by
 * any task. Runs under rcu_read_lock() without sleeping, and takes each
 * task's siglock, which keeps its filter chain alive and stops it from
 * attaching a new filter meanwhile. A filter attached after its task was
 * visited copies the already narrowed cache of the filter below it.
 */
void speaker_narrow_stacked(struct seccomp_filter *filter, const unsigned long *allow)
{
	struct task_struct *process, *thread;

	rcu_read_lock();
	for_each_process_thread(process, thread) {
		struct seccomp_filter *top, *walk;
		struct sighand_struct *sighand;
		unsigned long flags;

		if (READ_ONCE(thread->seccomp.mode) != SECCOMP_MODE_FILTER)
			continue;
		sighand = speaker_lock_sighand(thread, &flags);
		if (!sighand)
			continue;
		top = thread->seccomp.filter;
		for (walk = top; walk && walk != filter; walk = *sf_prev(walk))
			;
		if (walk == filter) {
			for (walk = top; walk != filter; walk = *sf_prev(walk))
				speaker_cache_narrow(walk, allow);
		}
		speaker_unlock_sighand(sighand, flags);
	}
	rcu_read_unlock();
}

static void speaker_narrow_work(struct work_struct *work)
{
	struct speaker_group *g = container_of(work, struct speaker_group, narrow_work);
	unsigned long allow[SPEAKER_CACHE_WORDS];
	unsigned long flags;

	spin_lock_irqsave(&g->lock, flags);
	bitmap_copy(allow, g->programs[g->phase].allow, SPEAKER_CACHE_WORDS * BITS_PER_LONG);
	spin_unlock_irqrestore(&g->lock, flags);
	speaker_narrow_stacked(g->filter, allow);
}

/*
 * Make a group for a filter. Takes over the caller's filter reference and
 * tgid reference. Returns NULL when out of memory.
 */
struct speaker_group *speaker_group_create(struct seccomp_filter *filter, struct pid *tgid, int stop_signal)
{
	struct speaker_group *g = kzalloc(sizeof(*g), GFP_KERNEL);
	struct speaker_program *original;
	unsigned int word;

	if (!g)
		return NULL;
	INIT_LIST_HEAD(&g->node);
	INIT_LIST_HEAD(&g->retired_node);
	INIT_LIST_HEAD(&g->batch_node);
	spin_lock_init(&g->lock);
	INIT_WORK(&g->narrow_work, speaker_narrow_work);
	g->filter = filter;
	g->tgid = tgid;
	g->stop_signal = stop_signal;
	g->phase = SPEAKER_PHASE_ORIGINAL;

	original = &g->programs[SPEAKER_PHASE_ORIGINAL];
	original->prog = READ_ONCE(*sf_prog(filter));
	original->ever_installed = true;
	for (word = 0; word < SPEAKER_CACHE_WORDS; word++)
		original->allow[word] = READ_ONCE(sf_cache(filter)[word]);
	return g;
}

/* Return 0 when g may switch to phase. The caller holds g->lock. */
static int speaker_switch_allowed(struct speaker_group *g, enum speaker_phase phase, bool force)
{
	if (!g->programs[phase].prog)
		return -ENODATA;
	if (g->stop_seen && phase != SPEAKER_PHASE_SHUTDOWN && !force)
		return -EALREADY;
	return 0;
}

/*
 * Put phase's program in force from process context. No other call from
 * process context may switch g at the same time: ioctls hold the registry
 * mutex, and an unregistered group is no longer reachable by them. Before
 * the walk over stacked filters, the registered filter's cache already
 * lacks every bit that the new program does not allow, so a filter stacked
 * during the walk copies a cache that is narrow enough. Returns -ENODATA
 * without a program for phase, and -EALREADY when the stop signal has
 * switched g to shutdown and force is not set.
 */
int speaker_group_switch(struct speaker_group *g, enum speaker_phase phase, bool force)
{
	unsigned long cache[SPEAKER_CACHE_WORDS];
	unsigned long flags;
	bool needed;
	int err;

	spin_lock_irqsave(&g->lock, flags);
	err = speaker_switch_allowed(g, phase, force);
	needed = !err && g->phase != phase;
	if (needed) {
		speaker_target_cache(g, phase, cache);
		speaker_cache_narrow(g->filter, cache);
	}
	spin_unlock_irqrestore(&g->lock, flags);
	if (!needed)
		return err;

	speaker_narrow_stacked(g->filter, cache);

	spin_lock_irqsave(&g->lock, flags);
	/* The signal probe may have switched to shutdown meanwhile. */
	err = speaker_switch_allowed(g, phase, force);
	if (!err && g->phase != phase)
		speaker_group_install(g, phase);
	spin_unlock_irqrestore(&g->lock, flags);
	return err;
}

/*
 * Give a phase a new program, swapping it in at once when the phase is in
 * force (in the same order as speaker_group_switch). The group takes over
 * prog. Returns -ENOSPC, without taking prog, when the replaced program
 * would exceed SPEAKER_MAX_RETIRED.
 *
 * The caller holds the registry mutex, so only the signal probe can swap
 * programs concurrently.
 */
int speaker_group_set_program(struct speaker_group *g, enum speaker_phase phase, struct bpf_prog *prog,
			      const unsigned long *allow)
{
	struct speaker_program *program = &g->programs[phase];
	unsigned long cache[SPEAKER_CACHE_WORDS];
	struct bpf_prog *old;
	unsigned long flags;
	bool old_ran, active;

	spin_lock_irqsave(&g->lock, flags);
	old = program->prog;
	old_ran = program->ever_installed;
	if (old && old_ran && g->nr_retired == SPEAKER_MAX_RETIRED) {
		spin_unlock_irqrestore(&g->lock, flags);
		return -ENOSPC;
	}
	program->prog = prog;
	program->ever_installed = false;
	bitmap_copy(program->allow, allow, SPEAKER_CACHE_WORDS * BITS_PER_LONG);
	if (old && old_ran)
		g->retired[g->nr_retired++] = old;
	active = g->phase == phase;
	if (active) {
		speaker_target_cache(g, phase, cache);
		speaker_cache_narrow(g->filter, cache);
	}
	spin_unlock_irqrestore(&g->lock, flags);

	/* No task ever ran a program that was never installed. */
	if (old && !old_ran)
		bpf_prog_destroy(old);
	if (!active)
		return 0;

	speaker_narrow_stacked(g->filter, cache);
	spin_lock_irqsave(&g->lock, flags);
	if (g->phase == phase && program->prog == prog)
		speaker_group_install(g, phase);
	spin_unlock_irqrestore(&g->lock, flags);
	return 0;
}

/*
 * Free a group that was never published. Its only program is the one that
 * was installed when it was made, which it does not own: another group may
 * own it, or the filter does.
 */
void speaker_group_discard(struct speaker_group *g)
{
	speaker_put_filter(g->filter);
	put_pid(g->tgid);
	kfree(g);
}

/*
 * Free a group whose filter no task uses any more, or whose remaining tasks
 * keep the program that is installed now. The caller has waited for an
 * RCU-tasks grace period since the group's last swap and has cancelled
 * narrow_work. Programs other than the installed one are freed here; the
 * installed one belongs to the filter from now on.
 */
void speaker_group_free(struct speaker_group *g)
{
	struct bpf_prog *installed = READ_ONCE(*sf_prog(g->filter));
	unsigned int i;

	for (i = 0; i < SPEAKER_PHASE_COUNT; i++) {
		struct bpf_prog *prog = g->programs[i].prog;

		if (prog && prog != installed)
			bpf_prog_destroy(prog);
	}
	for (i = 0; i < g->nr_retired; i++)
		if (g->retired[i] != installed)
			bpf_prog_destroy(g->retired[i]);
	speaker_put_filter(g->filter);
	put_pid(g->tgid);
	kfree(g);
}
