// SPDX-License-Identifier: GPL-2.0
/*
 * Shutdown detection: the container's stop signal switches it to its
 * shutdown program before the application's handler runs.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/printk.h>
#include <linux/rcupdate.h>
#include <linux/sched/signal.h>
#include <linux/string.h>
#include <linux/tracepoint.h>
#include <trace/events/signal.h>

#include "speaker.h"

static struct tracepoint *speaker_signal_tracepoint;

/*
 * Probe on the signal_generate tracepoint. The kernel calls it while it
 * holds the target's siglock, after queueing the signal. The target can
 * only dequeue the signal, and so run its handler, after taking that lock,
 * so the shutdown program is in force before the handler's first syscall.
 */
static void speaker_on_signal(void *data, int sig, struct kernel_siginfo *info, struct task_struct *task,
			      int group_signal, int result)
{
	struct speaker_group *g;

	if (result != TRACE_SIGNAL_DELIVERED && result != TRACE_SIGNAL_LOSE_INFO)
		return;

	rcu_read_lock();
	list_for_each_entry_rcu(g, &speaker_groups, node) {
		unsigned long flags;

		if (READ_ONCE(g->stop_signal) != sig || task_tgid(task) != g->tgid)
			continue;
		spin_lock_irqsave(&g->lock, flags);
		g->stop_seen = true;
		if (g->phase != SPEAKER_PHASE_SHUTDOWN && g->programs[SPEAKER_PHASE_SHUTDOWN].prog) {
			speaker_group_install(g, SPEAKER_PHASE_SHUTDOWN);
			/*
			 * TODO: stacked filters are narrowed only when this work
			 * runs, so until then a task whose newest filter is a
			 * stacked one can still skip the shutdown program for
			 * syscalls that running allowed.
			 */
			schedule_work(&g->narrow_work);
		}
		spin_unlock_irqrestore(&g->lock, flags);
	}
	rcu_read_unlock();
}

static void speaker_find_tracepoint(struct tracepoint *tp, void *priv)
{
	if (strcmp(tp->name, "signal_generate") == 0)
		*(struct tracepoint **)priv = tp;
}

/* Attach the probe. The tracepoint is not exported to modules, so it is looked up by name. */
int speaker_shutdown_init(void)
{
	int err;

	for_each_kernel_tracepoint(speaker_find_tracepoint, &speaker_signal_tracepoint);
	if (!speaker_signal_tracepoint) {
		pr_err("tracepoint signal_generate not found; shutdown detection needs CONFIG_TRACEPOINTS\n");
		return -ENOENT;
	}
	err = tracepoint_probe_register(speaker_signal_tracepoint, speaker_on_signal, NULL);
	if (err)
		pr_err("cannot attach to tracepoint signal_generate: error %d\n", err);
	return err;
}

/* Detach the probe and wait until no call of it runs any more. */
void speaker_shutdown_exit(void)
{
	tracepoint_probe_unregister(speaker_signal_tracepoint, speaker_on_signal, NULL);
	tracepoint_synchronize_unregister();
}
