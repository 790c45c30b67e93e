// SPDX-License-Identifier: GPL-2.0
/*
 * The layout of struct seccomp_filter, which kernel/seccomp.c keeps private.
 *
 * The module only touches a filter through the offsets below, and only on a
 * kernel release whose offsets were read with pahole from that release's own
 * vmlinux. On any other release the module refuses to load, because a wrong
 * offset would corrupt kernel memory. kmod/tools/seccomp-layout.sh prints the
 * table line for a running kernel (from /sys/kernel/btf/vmlinux) or for a
 * vmlinux file.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/bpf.h>
#include <linux/filter.h>
#include <linux/printk.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/utsname.h>
#include <generated/utsrelease.h>

#include "speaker.h"

static const struct speaker_layout speaker_layouts[] = {
	/*
	 * pahole -C seccomp_filter on the vmlinux unpacked from
	 * /boot/vmlinuz-6.1.0-57-amd64 of linux-image-6.1.0-57-amd64 6.1.192-3.
	 */
	{
		.release = "6.1.0-57-amd64",
		.refs = 0, .users = 4, .cache = 16, .cache_size = 128,
		.prev = 144, .prog = 152, .notif = 160, .size = 224,
	},
	/*
	 * pahole -C seccomp_filter on the vmlinux (BTF) shipped in
	 * linux-headers-6.12.95+deb12-amd64 6.12.95-1~bpo12+1 (bookworm-backports).
	 */
	{
		.release = "6.12.95+deb12-amd64",
		.refs = 0, .users = 4, .cache = 16, .cache_size = 128,
		.prev = 144, .prog = 152, .notif = 160, .size = 224,
	},
};

const struct speaker_layout *speaker_layout;

/* Select the layout of the running kernel, or fail with -ENOEXEC. */
int speaker_layout_init(void)
{
	const char *running = init_utsname()->release;
	size_t i;

	if (strcmp(running, UTS_RELEASE) != 0) {
		pr_err("built for kernel %s but running %s; rebuild the module for this kernel\n", UTS_RELEASE,
		       running);
		return -ENOEXEC;
	}
	for (i = 0; i < ARRAY_SIZE(speaker_layouts); i++) {
		const struct speaker_layout *layout = &speaker_layouts[i];

		if (strcmp(layout->release, running) != 0)
			continue;
		if (layout->cache_size != SPEAKER_CACHE_WORDS * sizeof(unsigned long)) {
			pr_err("struct seccomp_filter layout for %s has a %u-byte action cache, but this kernel's syscall tables need %zu bytes\n",
			       running, layout->cache_size, SPEAKER_CACHE_WORDS * sizeof(unsigned long));
			return -ENOEXEC;
		}
		speaker_layout = layout;
		return 0;
	}
	pr_err("no verified struct seccomp_filter layout for kernel %s; run kmod/tools/seccomp-layout.sh on this host, add its line to kmod/layout.c and rebuild\n",
	       running);
	return -ENOEXEC;
}

/*
 * Drop one reference to a filter, freeing it and its single-reference
 * ancestors when the count reaches zero. This mirrors the kernel's own put,
 * which modules cannot call. A count of zero means that no task, listener or
 * stacked filter uses the filter any more.
 */
void speaker_put_filter(struct seccomp_filter *f)
{
	while (f && refcount_dec_and_test(sf_refs(f))) {
		struct seccomp_filter *prev = *sf_prev(f);

		bpf_prog_destroy(*sf_prog(f));
		kfree(f);
		f = prev;
	}
}

/*
 * Return whether a filter looks like a struct seccomp_filter at the expected
 * offsets. A classic BPF seccomp program always keeps its original
 * instructions on x86_64, because the kernel's action cache is computed from
 * them. This check catches a wrong layout table entry before any write.
 */
bool speaker_filter_plausible(struct seccomp_filter *f)
{
	struct bpf_prog *prog = READ_ONCE(*sf_prog(f));
	unsigned int refs = refcount_read(sf_refs(f));
	unsigned int users = refcount_read(sf_users(f));

	if (!prog || !prog->orig_prog)
		return false;
	if (prog->orig_prog->len == 0 || prog->orig_prog->len > BPF_MAXINSNS)
		return false;
	return users >= 1 && refs >= users;
}
