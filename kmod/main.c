// SPDX-License-Identifier: GPL-2.0
/*
 * /dev/speaker: per-phase seccomp programs for containers.
 *
 * This file contains the device, its ioctls and the module's entry points.
 * registry.c keeps the registered containers, group.c swaps their
 * programs, and shutdown.c switches them to shutdown on their stop signal.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/capability.h>
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/sched/signal.h>
#include <linux/sched/task.h>
#include <linux/seccomp.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#include "speaker.h"

static long speaker_ioctl_version(void __user *arg)
{
	struct speaker_version version = { .abi_version = SPEAKER_ABI_VERSION };

	speaker_registry_counts(&version);
	return copy_to_user(arg, &version, sizeof(version)) ? -EFAULT : 0;
}

static long speaker_ioctl_register(void __user *arg)
{
	struct speaker_register req;
	struct seccomp_filter *filter;
	struct speaker_group *g;
	struct task_struct *task;
	struct pid *pid, *tgid;
	int err = 0;

	if (copy_from_user(&req, arg, sizeof(req)))
		return -EFAULT;
	if (req.abi_version != SPEAKER_ABI_VERSION)
		return -EPROTO;
	if (req.flags & ~(SPEAKER_REGISTER_NEWEST | SPEAKER_REGISTER_ADOPT))
		return -EINVAL;
	if (req.stop_signal >= _NSIG || req.pid <= 0)
		return -EINVAL;

	pid = find_get_pid(req.pid);
	task = pid ? get_pid_task(pid, PIDTYPE_PID) : NULL;
	put_pid(pid);
	if (!task)
		return -ESRCH;
	tgid = get_task_pid(task, PIDTYPE_TGID);
	filter = tgid ? speaker_pick_filter(task, req.flags & SPEAKER_REGISTER_NEWEST, &err) : NULL;
	put_task_struct(task);
	if (!tgid)
		return -ESRCH;
	if (!filter) {
		put_pid(tgid);
		return err;
	}
	g = speaker_group_create(filter, tgid, req.stop_signal);
	if (!g) {
		speaker_put_filter(filter);
		put_pid(tgid);
		return -ENOMEM;
	}
	return speaker_registry_add(g, &req, arg);
}

/* Number of instructions seccomp would count for the chain with prog in place of filter's program. */
static unsigned long speaker_path_length(struct seccomp_filter *filter, struct bpf_prog *prog)
{
	unsigned long total = prog->len;
	struct seccomp_filter *walk;

	for (walk = *sf_prev(filter); walk; walk = *sf_prev(walk))
		total += READ_ONCE(*sf_prog(walk))->len + 4;
	return total;
}

/* Copy a LOAD request back with its error fields set, and return err. */
static long speaker_load_failed(void __user *arg, struct speaker_load *req, int reason, u32 bad_insn, long err)
{
	req->error_reason = reason;
	req->error_insn = bad_insn;
	if (copy_to_user(arg, req, sizeof(*req)))
		return -EFAULT;
	return err;
}

static long speaker_ioctl_load(void __user *arg)
{
	unsigned long allow[SPEAKER_CACHE_WORDS];
	struct speaker_load req;
	struct sock_filter *insns;
	struct sock_fprog fprog;
	struct bpf_prog *prog = NULL;
	struct speaker_group *g;
	size_t size;
	u32 bad_insn;
	int reason;
	int err;

	if (copy_from_user(&req, arg, sizeof(req)))
		return -EFAULT;
	if (req.phase < SPEAKER_PHASE_BOOTING || req.phase > SPEAKER_PHASE_SHUTDOWN)
		return -EINVAL;
	if (req.len == 0 || req.len > BPF_MAXINSNS)
		return speaker_load_failed(arg, &req, SPEAKER_LOAD_LENGTH, SPEAKER_NO_INSN, -EINVAL);

	size = (size_t)req.len * sizeof(*insns);
	insns = memdup_user(u64_to_user_ptr(req.filter), size);
	if (IS_ERR(insns))
		return PTR_ERR(insns);
	reason = speaker_check_program(insns, req.len, &bad_insn);
	if (reason < 0) {
		kfree(insns);
		return reason;
	}
	if (reason != SPEAKER_LOAD_OK) {
		kfree(insns);
		return speaker_load_failed(arg, &req, reason, bad_insn, -EINVAL);
	}
	speaker_compute_allow(insns, req.len, allow);

	/*
	 * The kernel copies the program from user memory again. Its saved
	 * original must equal the copy checked and emulated above, or the
	 * action cache could allow what the program denies.
	 */
	fprog.len = req.len;
	fprog.filter = u64_to_user_ptr(req.filter);
	err = bpf_prog_create_from_user(&prog, &fprog, speaker_seccomp_translate, true);
	if (err) {
		kfree(insns);
		if (err == -EINVAL)
			return speaker_load_failed(arg, &req, SPEAKER_LOAD_KERNEL, SPEAKER_NO_INSN, err);
		return err;
	}
	if (!prog->orig_prog || prog->orig_prog->len != req.len || memcmp(prog->orig_prog->filter, insns, size)) {
		kfree(insns);
		bpf_prog_destroy(prog);
		return speaker_load_failed(arg, &req, SPEAKER_LOAD_CHANGED, SPEAKER_NO_INSN, -EAGAIN);
	}
	kfree(insns);

	mutex_lock(&speaker_registry);
	g = speaker_find(req.id);
	if (!g) {
		err = -ENOENT;
	} else if (speaker_path_length(g->filter, prog) > SPEAKER_MAX_INSNS_PER_PATH) {
		err = -E2BIG;
		reason = SPEAKER_LOAD_PATH_LENGTH;
	} else {
		err = speaker_group_set_program(g, req.phase, prog, allow);
	}
	mutex_unlock(&speaker_registry);

	if (err) {
		bpf_prog_destroy(prog);
		if (reason == SPEAKER_LOAD_PATH_LENGTH)
			return speaker_load_failed(arg, &req, reason, SPEAKER_NO_INSN, err);
		return err;
	}
	return speaker_load_failed(arg, &req, SPEAKER_LOAD_OK, SPEAKER_NO_INSN, 0);
}

static long speaker_ioctl_switch(void __user *arg)
{
	struct speaker_switch req;
	struct speaker_group *g;
	int err;

	if (copy_from_user(&req, arg, sizeof(req)))
		return -EFAULT;
	if (req.flags & ~SPEAKER_SWITCH_FORCE || req.phase >= SPEAKER_PHASE_COUNT)
		return -EINVAL;

	mutex_lock(&speaker_registry);
	g = speaker_find(req.id);
	err = g ? speaker_group_switch(g, req.phase, req.flags & SPEAKER_SWITCH_FORCE) : -ENOENT;
	mutex_unlock(&speaker_registry);
	return err;
}

static long speaker_ioctl_query(void __user *arg)
{
	struct speaker_state state;
	struct seccomp_filter *walk;
	struct speaker_group *g;
	unsigned long flags;
	unsigned int i;

	if (copy_from_user(&state, arg, sizeof(state)))
		return -EFAULT;

	mutex_lock(&speaker_registry);
	g = speaker_find(state.id);
	if (!g) {
		mutex_unlock(&speaker_registry);
		return -ENOENT;
	}
	memset(&state, 0, sizeof(state));
	state.id = g->id;
	state.pid = pid_vnr(g->tgid);
	state.stop_signal = g->stop_signal;
	if (pid_has_task(g->tgid, PIDTYPE_TGID))
		state.flags |= SPEAKER_STATE_ALIVE;
	state.filter_refs = refcount_read(sf_refs(g->filter));
	state.filter_users = refcount_read(sf_users(g->filter));
	for (walk = g->filter; walk; walk = *sf_prev(walk))
		state.filter_depth++;

	spin_lock_irqsave(&g->lock, flags);
	state.phase = g->phase;
	for (i = 0; i < SPEAKER_PHASE_COUNT; i++)
		if (g->programs[i].prog)
			state.loaded |= 1U << i;
	if (g->stop_seen)
		state.flags |= SPEAKER_STATE_STOP_SEEN;
	state.switches = g->switches;
	state.switch_ns = g->switch_ns;
	spin_unlock_irqrestore(&g->lock, flags);
	mutex_unlock(&speaker_registry);

	return copy_to_user(arg, &state, sizeof(state)) ? -EFAULT : 0;
}

static long speaker_ioctl_cache(void __user *arg)
{
	struct speaker_cache *result;
	struct speaker_group *g;
	unsigned long *cache;
	unsigned int word;
	long err = 0;

	BUILD_BUG_ON(SPEAKER_NATIVE_WORDS * BITS_PER_LONG > SPEAKER_CACHE_BITMAP_WORDS * 64);
	BUILD_BUG_ON(SPEAKER_COMPAT_WORDS * BITS_PER_LONG > SPEAKER_CACHE_BITMAP_WORDS * 64);
	result = kzalloc(sizeof(*result), GFP_KERNEL);
	if (!result)
		return -ENOMEM;
	if (copy_from_user(&result->id, arg, sizeof(result->id))) {
		kfree(result);
		return -EFAULT;
	}

	mutex_lock(&speaker_registry);
	g = speaker_find(result->id);
	if (g) {
		cache = sf_cache(g->filter);
		result->native_bits = SECCOMP_ARCH_NATIVE_NR;
		result->compat_bits = SECCOMP_ARCH_COMPAT_NR;
		for (word = 0; word < SPEAKER_NATIVE_WORDS; word++)
			result->native[word] = READ_ONCE(cache[word]);
		for (word = 0; word < SPEAKER_COMPAT_WORDS; word++)
			result->compat[word] = READ_ONCE(cache[SPEAKER_NATIVE_WORDS + word]);
	} else {
		err = -ENOENT;
	}
	mutex_unlock(&speaker_registry);

	if (!err && copy_to_user(arg, result, sizeof(*result)))
		err = -EFAULT;
	kfree(result);
	return err;
}

static long speaker_ioctl_unregister(void __user *arg)
{
	struct speaker_unregister req;

	if (copy_from_user(&req, arg, sizeof(req)))
		return -EFAULT;
	if (req.flags & ~SPEAKER_UNREGISTER_RESTORE || req.reserved)
		return -EINVAL;
	return speaker_registry_remove(req.id, req.flags & SPEAKER_UNREGISTER_RESTORE);
}

static long speaker_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	void __user *uarg = (void __user *)arg;

	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;

	switch (cmd) {
	case SPEAKER_IOC_VERSION:
		return speaker_ioctl_version(uarg);
	case SPEAKER_IOC_REGISTER:
		return speaker_ioctl_register(uarg);
	case SPEAKER_IOC_LOAD:
		return speaker_ioctl_load(uarg);
	case SPEAKER_IOC_SWITCH:
		return speaker_ioctl_switch(uarg);
	case SPEAKER_IOC_QUERY:
		return speaker_ioctl_query(uarg);
	case SPEAKER_IOC_UNREGISTER:
		return speaker_ioctl_unregister(uarg);
	case SPEAKER_IOC_CACHE:
		return speaker_ioctl_cache(uarg);
	default:
		return -ENOTTY;
	}
}

static const struct file_operations speaker_fops = {
	.owner = THIS_MODULE,
	.open = nonseekable_open,
	.unlocked_ioctl = speaker_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
};

static struct miscdevice speaker_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = SPEAKER_DEVICE_NAME,
	.fops = &speaker_fops,
	.mode = 0600,
};

static int __init speaker_init(void)
{
	int err;

	err = speaker_layout_init();
	if (err)
		return err;
	err = speaker_shutdown_init();
	if (err)
		return err;
	err = misc_register(&speaker_misc);
	if (err) {
		speaker_shutdown_exit();
		return err;
	}
	pr_info("ABI %d loaded, struct seccomp_filter layout of %s\n", SPEAKER_ABI_VERSION,
		speaker_layout->release);
	return 0;
}

static void __exit speaker_exit(void)
{
	unsigned int still_registered;

	speaker_shutdown_exit();
	/* No file is open, or the module would still be in use, so no ioctl runs. */
	misc_deregister(&speaker_misc);
	still_registered = speaker_registry_clear();
	pr_info("unloaded; %u registered containers keep their current programs\n", still_registered);
}

module_init(speaker_init);
module_exit(speaker_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("SPEAKER: switch a container's seccomp program per phase");
