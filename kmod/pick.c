// SPDX-License-Identifier: GPL-2.0
/* Choosing which seccomp filter of a container's init process to register. */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/printk.h>
#include <linux/rcupdate.h>
#include <linux/sched/signal.h>
#include <linux/sched/task.h>
#include <linux/seccomp.h>

#include "speaker.h"

/* Return the newest filter of task's parent with a reference held, or NULL. */
static struct seccomp_filter *speaker_parent_filter(struct task_struct *task)
{
	struct seccomp_filter *top = NULL;
	struct sighand_struct *sighand;
	struct task_struct *parent;
	unsigned long flags;

	rcu_read_lock();
	parent = rcu_dereference(task->real_parent);
	get_task_struct(parent);
	rcu_read_unlock();

	sighand = speaker_lock_sighand(parent, &flags);
	if (sighand) {
		top = parent->seccomp.filter;
		if (top)
			refcount_inc(sf_refs(top));
		speaker_unlock_sighand(sighand, flags);
	}
	put_task_struct(parent);
	return top;
}

static bool speaker_in_chain(struct seccomp_filter *needle, struct seccomp_filter *chain)
{
	for (; chain; chain = *sf_prev(chain))
		if (chain == needle)
			return true;
	return false;
}

/*
 * Pick the filter to register and take a reference on it. By default this is
 * the oldest filter of task that its parent does not also have: the filter
 * the container runtime installed, below anything the application stacked
 * later and above anything inherited from the host. With newest, it is the
 * filter the task uses now. Returns NULL with *err set on failure.
 */
struct seccomp_filter *speaker_pick_filter(struct task_struct *task, bool newest, int *err)
{
	struct seccomp_filter *inherited = newest ? NULL : speaker_parent_filter(task);
	struct seccomp_filter *chosen = NULL, *walk;
	struct sighand_struct *sighand;
	unsigned long flags;

	sighand = speaker_lock_sighand(task, &flags);
	if (!sighand) {
		*err = -ESRCH;
		goto out;
	}
	if (task->seccomp.mode != SECCOMP_MODE_FILTER || !task->seccomp.filter) {
		*err = -ENODATA;
		goto unlock;
	}
	if (newest) {
		chosen = task->seccomp.filter;
	} else {
		for (walk = task->seccomp.filter; walk && !speaker_in_chain(walk, inherited); walk = *sf_prev(walk))
			chosen = walk;
	}
	if (!chosen) {
		/* Every filter of the task came from its parent. */
		*err = -ENODATA;
		goto unlock;
	}
	if (!speaker_filter_plausible(chosen)) {
		pr_err("the seccomp filter of pid %d does not match the layout table entry for %s; not registering it\n",
		       task_pid_nr(task), speaker_layout->release);
		chosen = NULL;
		*err = -ENOEXEC;
		goto unlock;
	}
	refcount_inc(sf_refs(chosen));
unlock:
	speaker_unlock_sighand(sighand, flags);
out:
	if (inherited)
		speaker_put_filter(inherited);
	return chosen;
}
