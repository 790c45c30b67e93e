// SPDX-License-Identifier: GPL-2.0
/*
 * Per-syscall cost under a seccomp filter, for bench/kmod.py.
 *
 * Usage: spk_bench FILTER
 *
 * Installs FILTER (a file of struct sock_filter instructions, or "-" for no
 * filter) with no_new_privs, prints "ready PID", then reads commands:
 *   measure N   print "cost getppid NS getpriority NS": the mean time of N
 *               calls each, in nanoseconds;
 *   exit        end.
 * getppid is the syscall that an action cache can allow without running
 * the filter. getpriority(PRIO_PROCESS, 0) is allowed only after the
 * filter's BPF program checks its first argument.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what)
{
	fprintf(stderr, "spk_bench: %s: %s\n", what, strerror(errno));
	exit(2);
}

static void install_filter(const char *path)
{
	struct sock_fprog program;
	struct stat st;
	void *insns;
	int fd = open(path, O_RDONLY);

	if (fd < 0 || fstat(fd, &st) < 0)
		die(path);
	insns = malloc(st.st_size);
	if (!insns || read(fd, insns, st.st_size) != st.st_size)
		die(path);
	close(fd);
	program.len = st.st_size / sizeof(struct sock_filter);
	program.filter = insns;
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		die("PR_SET_NO_NEW_PRIVS");
	if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &program) < 0)
		die("seccomp");
	free(insns);
}

static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static double mean_ns(long calls, long nr, long arg0, long arg1)
{
	long long start = now_ns();
	long i;

	for (i = 0; i < calls; i++)
		syscall(nr, arg0, arg1);
	return (double)(now_ns() - start) / calls;
}

int main(int argc, char **argv)
{
	char line[128];

	if (argc != 2) {
		fprintf(stderr, "usage: spk_bench FILTER\n");
		return 2;
	}
	if (strcmp(argv[1], "-") != 0)
		install_filter(argv[1]);
	printf("ready %d\n", getpid());
	fflush(stdout);

	while (fgets(line, sizeof(line), stdin)) {
		long calls;

		if (sscanf(line, "measure %ld", &calls) == 1 && calls > 0) {
			double getppid_ns = mean_ns(calls, SYS_getppid, 0, 0);
			double getpriority_ns = mean_ns(calls, SYS_getpriority, PRIO_PROCESS, 0);

			printf("cost getppid %.1f getpriority %.1f\n", getppid_ns, getpriority_ns);
		} else if (strncmp(line, "exit", 4) == 0) {
			break;
		} else {
			printf("error unknown command %s", line);
		}
		fflush(stdout);
	}
	return 0;
}
