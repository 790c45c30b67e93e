// SPDX-License-Identifier: GPL-2.0
/*
 * A stand-in container for the kernel module tests: a tree of processes and
 * threads that share one seccomp filter, and that report which probe
 * syscalls their filter lets through.
 *
 * Usage: spk_group FILTER PROCESSES THREADS [STACK_MEMBER STACK_FILTER]
 *
 * FILTER is a file of struct sock_filter instructions. The leader installs
 * it with no_new_privs, then starts PROCESSES-1 child processes, and each
 * process runs THREADS threads in all. Member m is thread m % THREADS of
 * process m / THREADS, and member 0 is the leader's main thread. Member
 * STACK_MEMBER stacks STACK_FILTER on top of FILTER: member 0 stacks it
 * for the leader's main thread alone, and the first member of a child
 * process stacks it before starting its threads, which then share it.
 *
 * The leader prints "ready PID" and then reads one command per line:
 *   probe   print "probe R0 R1 ..." with the probe results of every member;
 *   spin    make every member except the leader run the probes in a loop;
 *   calm    stop the loop and print "calm N", N being the loop passes;
 *   exit    end every member and print "bye".
 * Each result has one letter per probe below: D when the filter denied the
 * syscall with errno DENY_ERRNO, E when it failed with EPERM (which no probe
 * returns on its own, so a filter denied it), A when the syscall ran.
 *
 * SIGTERM and SIGUSR1 handlers in the leader run the probes inside the
 * handler and print "signal NUMBER R". Child processes print nothing for
 * them, and their other threads block both signals.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/futex.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysinfo.h>
#include <sys/times.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

/* The errno that the test filters return for a denied syscall. */
#define DENY_ERRNO 4000
#define MAX_MEMBERS 512
#define PROBE_COUNT 11

/* i386 syscall numbers, called through int 0x80 so that seccomp gets AUDIT_ARCH_I386. */
#define I386_TIMES 43
#define I386_GETPPID 64
#define I386_GETRUSAGE 77
#define I386_SYSINFO 116

enum command { COMMAND_NONE, COMMAND_PROBE, COMMAND_SPIN, COMMAND_CALM, COMMAND_EXIT };

struct shared {
	_Atomic int generation;
	_Atomic int command;
	_Atomic int done;
	_Atomic long spins;
	char results[MAX_MEMBERS][PROBE_COUNT + 1];
};

static struct shared *shared;
static int members;

static long futex(_Atomic int *word, int op, int value)
{
	return syscall(SYS_futex, word, op, value, NULL, NULL, 0);
}

static long i386_syscall2(long nr, long arg0, long arg1)
{
	long ret;

	asm volatile("int $0x80"
		     : "=a"(ret)
		     : "a"(nr), "b"(arg0), "c"(arg1)
		     : "memory", "r8", "r9", "r10", "r11");
	return ret;
}

static char native_result(long ret)
{
	if (ret == -1 && errno == DENY_ERRNO)
		return 'D';
	return ret == -1 && errno == EPERM ? 'E' : 'A';
}

static char i386_result(long ret)
{
	if (ret == -DENY_ERRNO)
		return 'D';
	return ret == -EPERM ? 'E' : 'A';
}

/* Run every probe and write one letter per probe. Async-signal-safe. */
static void run_probes(char *out)
{
	struct sysinfo info;
	struct tms tms;
	struct rusage usage;
	struct utsname names;
	int saved = errno;

	out[0] = native_result(syscall(SYS_sysinfo, &info));
	out[1] = native_result(syscall(SYS_times, &tms));
	out[2] = native_result(syscall(SYS_getrusage, RUSAGE_SELF, &usage));
	out[3] = native_result(syscall(SYS_getppid));
	out[4] = native_result(syscall(SYS_uname, &names));
	out[5] = native_result(syscall(SYS_getpriority, PRIO_PROCESS, 0));
	out[6] = native_result(syscall(SYS_getpriority, PRIO_PGRP, 0));
	out[7] = i386_result(i386_syscall2(I386_SYSINFO, 0, 0));
	out[8] = i386_result(i386_syscall2(I386_TIMES, 0, 0));
	out[9] = i386_result(i386_syscall2(I386_GETRUSAGE, 0, 0));
	out[10] = i386_result(i386_syscall2(I386_GETPPID, 0, 0));
	out[PROBE_COUNT] = '\0';
	errno = saved;
}

static void die(const char *what)
{
	fprintf(stderr, "spk_group: %s: %s\n", what, strerror(errno));
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

/* Wait for the next command, run it, and return it. */
static int member_step(int member, int *seen)
{
	int generation = atomic_load(&shared->generation);
	int command;

	if (generation == *seen) {
		futex(&shared->generation, FUTEX_WAIT, generation);
		return COMMAND_NONE;
	}
	*seen = generation;
	command = atomic_load(&shared->command);
	if (command == COMMAND_PROBE) {
		run_probes(shared->results[member]);
	} else if (command == COMMAND_SPIN) {
		char scratch[PROBE_COUNT + 1];
		long passes = 0;

		while (atomic_load(&shared->generation) == generation) {
			run_probes(scratch);
			passes++;
		}
		atomic_fetch_add(&shared->spins, passes);
		/* The calm command that ended the loop still waits for this member's reply. */
		*seen = atomic_load(&shared->generation);
	}
	if (command != COMMAND_EXIT) {
		atomic_fetch_add(&shared->done, 1);
		futex(&shared->done, FUTEX_WAKE, 1);
	}
	return command;
}

struct member_args {
	int member;
	int seen;
};

static void *member_thread(void *arg)
{
	struct member_args *args = arg;

	while (member_step(args->member, &args->seen) != COMMAND_EXIT)
		;
	return NULL;
}

/* Start this process's extra threads with SIGTERM and SIGUSR1 blocked. */
static void start_threads(int first_member, int threads, int seen, pthread_t *ids)
{
	sigset_t blocked, previous;
	int i;

	sigemptyset(&blocked);
	sigaddset(&blocked, SIGTERM);
	sigaddset(&blocked, SIGUSR1);
	pthread_sigmask(SIG_BLOCK, &blocked, &previous);
	for (i = 1; i < threads; i++) {
		struct member_args *args = calloc(1, sizeof(*args));

		args->member = first_member + i;
		args->seen = seen;
		if (pthread_create(&ids[i], NULL, member_thread, args) != 0)
			die("pthread_create");
	}
	pthread_sigmask(SIG_SETMASK, &previous, NULL);
}

/* Tell every member to run command, and wait until the given number of members replied. */
static void broadcast(int command, int replies)
{
	atomic_store(&shared->done, 0);
	atomic_store(&shared->command, command);
	atomic_fetch_add(&shared->generation, 1);
	futex(&shared->generation, FUTEX_WAKE, 1 << 30);
	for (;;) {
		int done = atomic_load(&shared->done);

		if (done >= replies)
			break;
		futex(&shared->done, FUTEX_WAIT, done);
	}
}

static void leader_signal(int signal)
{
	char line[64] = "signal ";
	size_t length = strlen(line);

	/* Signal numbers have at most two digits, and snprintf is not async-signal-safe. */
	if (signal >= 10)
		line[length++] = '0' + signal / 10;
	line[length++] = '0' + signal % 10;
	line[length++] = ' ';
	run_probes(line + length);
	length += PROBE_COUNT;
	line[length++] = '\n';
	if (write(STDOUT_FILENO, line, length) < 0)
		_exit(3);
}

static void child_signal(int signal)
{
	(void)signal;
}

static void handle_signals(void (*handler)(int))
{
	struct sigaction action;

	memset(&action, 0, sizeof(action));
	action.sa_handler = handler;
	action.sa_flags = SA_RESTART;
	sigaction(SIGTERM, &action, NULL);
	sigaction(SIGUSR1, &action, NULL);
}

static void child_process(int process, int threads, int seen)
{
	pthread_t ids[MAX_MEMBERS];
	int seen_main = seen;

	handle_signals(child_signal);
	start_threads(process * threads, threads, seen, ids);
	while (member_step(process * threads, &seen_main) != COMMAND_EXIT)
		;
	_exit(0);
}

static void leader_loop(int processes)
{
	char line[256];

	while (fgets(line, sizeof(line), stdin)) {
		int i;

		if (strncmp(line, "probe", 5) == 0) {
			broadcast(COMMAND_PROBE, members - 1);
			run_probes(shared->results[0]);
			fputs("probe", stdout);
			for (i = 0; i < members; i++)
				printf(" %s", shared->results[i]);
			putchar('\n');
		} else if (strncmp(line, "spin", 4) == 0) {
			atomic_store(&shared->spins, 0);
			atomic_store(&shared->command, COMMAND_SPIN);
			atomic_fetch_add(&shared->generation, 1);
			futex(&shared->generation, FUTEX_WAKE, 1 << 30);
			puts("spinning");
		} else if (strncmp(line, "calm", 4) == 0) {
			broadcast(COMMAND_CALM, members - 1);
			printf("calm %ld\n", atomic_load(&shared->spins));
		} else if (strncmp(line, "exit", 4) == 0) {
			break;
		} else {
			printf("error unknown command %s", line);
		}
		fflush(stdout);
	}
	atomic_store(&shared->command, COMMAND_EXIT);
	atomic_fetch_add(&shared->generation, 1);
	futex(&shared->generation, FUTEX_WAKE, 1 << 30);
	while (processes-- > 1)
		wait(NULL);
	puts("bye");
	fflush(stdout);
}

int main(int argc, char **argv)
{
	pthread_t ids[MAX_MEMBERS];
	int processes, threads, stack_member = -1;
	int process;

	if (argc != 4 && argc != 6) {
		fprintf(stderr, "usage: spk_group FILTER PROCESSES THREADS [STACK_MEMBER STACK_FILTER]\n");
		return 2;
	}
	processes = atoi(argv[2]);
	threads = atoi(argv[3]);
	if (argc == 6)
		stack_member = atoi(argv[4]);
	members = processes * threads;
	if (processes < 1 || threads < 1 || members > MAX_MEMBERS) {
		fprintf(stderr, "spk_group: need 1 to %d members\n", MAX_MEMBERS);
		return 2;
	}
	if (stack_member > 0 && stack_member % threads != 0) {
		fprintf(stderr, "spk_group: STACK_MEMBER must be 0 or the first member of a child process\n");
		return 2;
	}
	shared = mmap(NULL, sizeof(*shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (shared == MAP_FAILED)
		die("mmap");

	install_filter(argv[1]);
	for (process = 1; process < processes; process++) {
		pid_t child = fork();

		if (child < 0)
			die("fork");
		if (child == 0) {
			if (stack_member / threads == process && stack_member % threads == 0)
				install_filter(argv[5]);
			child_process(process, threads, 0);
		}
	}
	handle_signals(leader_signal);
	start_threads(0, threads, 0, ids);
	if (stack_member == 0)
		install_filter(argv[5]);

	/* Wait until every member sits in its loop, so a probe reaches all of them. */
	broadcast(COMMAND_NONE, members - 1);
	printf("ready %d\n", getpid());
	fflush(stdout);
	leader_loop(processes);
	return 0;
}
