// SPDX-License-Identifier: GPL-2.0
/*
 * The registry of containers: the module's only shared state.
 *
 * Ioctls change it under speaker_registry. The signal probe (shutdown.c)
 * reads speaker_groups under RCU. Unregistering a group keeps its current
 * program in force, or restores the runtime's original program on request,
 * and moves the group to the retired list. Programs that tasks may have run
 * are freed only when the filter's last other reference is gone, because
 * seccomp's PTRACE_SECCOMP_GET_FILTER copies a program to user space with
 * only a filter reference held.
 */
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/rcupdate.h>
#include <linux/rcupdate_wait.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#include "speaker.h"

static unsigned int max_groups = 1024;
module_param(max_groups, uint, 0644);
MODULE_PARM_DESC(max_groups, "Maximum number of registered containers (default 1024)");

DEFINE_MUTEX(speaker_registry);
LIST_HEAD(speaker_groups);
static LIST_HEAD(speaker_retired);
static unsigned int speaker_nr_groups;
static unsigned int speaker_nr_retired;
static u64 speaker_next_id;

struct speaker_group *speaker_find(u64 id)
{
	struct speaker_group *g;

	lockdep_assert_held(&speaker_registry);
	list_for_each_entry(g, &speaker_groups, node)
		if (g->id == id)
			return g;
	return NULL;
}

/*
 * Move g from the group list to the retired list. The caller holds the
 * registry mutex and puts g on its batch for speaker_finish_retire(), which
 * must run before g can be revived or freed.
 */
static void speaker_retire_locked(struct speaker_group *g, struct list_head *batch)
{
	lockdep_assert_held(&speaker_registry);
	list_del_rcu(&g->node);
	speaker_nr_groups--;
	g->retiring = true;
	list_add_tail(&g->retired_node, &speaker_retired);
	speaker_nr_retired++;
	list_add_tail(&g->batch_node, batch);
}

/*
 * Finish retiring a batch of groups: wait until the signal probe can no
 * longer see them or schedule their work, cancel that work, and put the
 * runtime's program back if restore is set. Sleeps.
 */
static void speaker_finish_retire(struct list_head *batch, bool restore)
{
	struct speaker_group *g, *next;

	if (list_empty(batch))
		return;
	synchronize_rcu();
	list_for_each_entry(g, batch, batch_node) {
		cancel_work_sync(&g->narrow_work);
		if (restore)
			speaker_group_switch(g, SPEAKER_PHASE_ORIGINAL, true);
	}
	mutex_lock(&speaker_registry);
	list_for_each_entry_safe(g, next, batch, batch_node) {
		g->retiring = false;
		list_del_init(&g->batch_node);
	}
	mutex_unlock(&speaker_registry);
}

/*
 * Free retired groups whose filter only the module still references, or all
 * of them when force is set (module unload). Sleeps for an RCU-tasks grace
 * period: seccomp runs f->prog without taking any lock, and a task that was
 * preempted inside a program holds that grace period until it leaves.
 */
static void speaker_reap(bool force)
{
	struct speaker_group *g, *next;
	LIST_HEAD(victims);

	mutex_lock(&speaker_registry);
	list_for_each_entry_safe(g, next, &speaker_retired, retired_node) {
		if (g->retiring)
			continue;
		if (force || refcount_read(sf_refs(g->filter)) == 1) {
			list_move_tail(&g->retired_node, &victims);
			speaker_nr_retired--;
		}
	}
	mutex_unlock(&speaker_registry);
	if (list_empty(&victims))
		return;

	synchronize_rcu_tasks();
	list_for_each_entry_safe(g, next, &victims, retired_node) {
		list_del(&g->retired_node);
		speaker_group_free(g);
	}
}

/* Unregister groups whose container init has exited, keeping their programs in force. */
static void speaker_sweep(void)
{
	struct speaker_group *g, *next;
	LIST_HEAD(batch);

	mutex_lock(&speaker_registry);
	list_for_each_entry_safe(g, next, &speaker_groups, node)
		if (!pid_has_task(g->tgid, PIDTYPE_TGID))
			speaker_retire_locked(g, &batch);
	mutex_unlock(&speaker_registry);
	speaker_finish_retire(&batch, false);
}

/*
 * Publish g, the group made for a REGISTER request, and write the id back.
 * Leaves g->id at 0 when it returns an existing group instead: an active one
 * with SPEAKER_REGISTER_ADOPT, or a retired one, which comes back with a new
 * id so that each filter always belongs to a single group.
 */
static int speaker_register_locked(struct speaker_group *g, struct speaker_register *req, void __user *arg)
{
	struct speaker_group *other;

	lockdep_assert_held(&speaker_registry);
	list_for_each_entry(other, &speaker_groups, node) {
		if (other->filter != g->filter)
			continue;
		if (!(req->flags & SPEAKER_REGISTER_ADOPT))
			return -EBUSY;
		req->id = other->id;
		return copy_to_user(arg, req, sizeof(*req)) ? -EFAULT : 0;
	}

	list_for_each_entry(other, &speaker_retired, retired_node) {
		if (other->filter != g->filter)
			continue;
		/* Still being unregistered: its node may still be on an RCU reader's path. */
		if (other->retiring)
			return -EAGAIN;
		req->id = speaker_next_id + 1;
		if (copy_to_user(arg, req, sizeof(*req)))
			return -EFAULT;
		list_del(&other->retired_node);
		speaker_nr_retired--;
		swap(other->tgid, g->tgid);
		other->id = ++speaker_next_id;
		other->stop_signal = req->stop_signal;
		other->stop_seen = false;
		list_add_tail_rcu(&other->node, &speaker_groups);
		speaker_nr_groups++;
		return 0;
	}

	if (speaker_nr_groups >= READ_ONCE(max_groups))
		return -ENOSPC;
	req->id = speaker_next_id + 1;
	if (copy_to_user(arg, req, sizeof(*req)))
		return -EFAULT;
	g->id = ++speaker_next_id;
	list_add_tail_rcu(&g->node, &speaker_groups);
	speaker_nr_groups++;
	return 0;
}

/*
 * Publish g for a REGISTER request, or drop it in favor of an existing
 * group, and write the id back to arg. Takes over g. Sleeps.
 */
int speaker_registry_add(struct speaker_group *g, struct speaker_register *req, void __user *arg)
{
	int err;

	speaker_sweep();
	mutex_lock(&speaker_registry);
	err = speaker_register_locked(g, req, arg);
	mutex_unlock(&speaker_registry);
	if (err || g->id == 0)
		speaker_group_discard(g);
	speaker_reap(false);
	return err;
}

/* Unregister the group with this id. Returns -ENOENT when there is none. Sleeps. */
int speaker_registry_remove(u64 id, bool restore)
{
	struct speaker_group *g;
	LIST_HEAD(batch);

	mutex_lock(&speaker_registry);
	g = speaker_find(id);
	if (g)
		speaker_retire_locked(g, &batch);
	mutex_unlock(&speaker_registry);
	if (!g)
		return -ENOENT;

	speaker_finish_retire(&batch, restore);
	speaker_reap(false);
	return 0;
}

/*
 * Unregister every group and free all programs that are not in force, for
 * module unload. Returns how many groups were still registered. Sleeps.
 */
unsigned int speaker_registry_clear(void)
{
	struct speaker_group *g, *next;
	unsigned int still_registered = 0;
	LIST_HEAD(batch);

	mutex_lock(&speaker_registry);
	list_for_each_entry_safe(g, next, &speaker_groups, node) {
		speaker_retire_locked(g, &batch);
		still_registered++;
	}
	mutex_unlock(&speaker_registry);
	speaker_finish_retire(&batch, false);
	/*
	 * TODO: a PTRACE_SECCOMP_GET_FILTER that read a filter's program
	 * pointer before its last swap, and is still copying that program, can
	 * read freed memory when this unload frees it.
	 */
	speaker_reap(true);
	return still_registered;
}

/* Fill the counts of a VERSION request. */
void speaker_registry_counts(struct speaker_version *version)
{
	mutex_lock(&speaker_registry);
	version->max_groups = READ_ONCE(max_groups);
	version->groups = speaker_nr_groups;
	version->retired = speaker_nr_retired;
	mutex_unlock(&speaker_registry);
}
