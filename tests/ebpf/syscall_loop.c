/*
 * Make syscalls in a tight loop and print how many, as an independent count
 * for the ebpf tests. Built static, so that it runs in an image with nothing
 * else in it.
 *
 *   syscall_loop storm SECONDS   getppid until SECONDS have passed
 *   syscall_loop abi COUNT       COUNT getppid (x86_64), COUNT getpid through
 *                                int 0x80 (i386), COUNT getpid with the x32 bit
 *
 * Output: one line per ABI, "ABI NUMBER COUNT", with the syscall number as
 * the kernel reports it. The x32 call fails with ENOSYS on kernels without
 * CONFIG_X86_X32_ABI, but it still enters the kernel and is still counted.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define X86_64_GETPPID 110L
#define I386_GETPID 20L
#define X32_GETPID (0x40000000L | 39L)

static long syscall_x86_64(long number)
{
	long result;
	__asm__ volatile("syscall" : "=a"(result) : "a"(number) : "rcx", "r11", "memory");
	return result;
}

static long syscall_i386(long number)
{
	long result;
	__asm__ volatile("int $0x80" : "=a"(result) : "a"(number) : "memory");
	return result;
}

static double now(void)
{
	struct timespec ts;
	/* Served by the vDSO, so it adds no syscall to the counts. */
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	if (argc == 3 && strcmp(argv[1], "storm") == 0) {
		double end = now() + atof(argv[2]);
		long calls = 0;
		do {
			for (int i = 0; i < 1024; i++)
				syscall_x86_64(X86_64_GETPPID);
			calls += 1024;
		} while (now() < end);
		printf("x86_64 %ld %ld\n", X86_64_GETPPID, calls);
		return 0;
	}
	if (argc == 3 && strcmp(argv[1], "abi") == 0) {
		long count = atol(argv[2]);
		for (long i = 0; i < count; i++) {
			syscall_x86_64(X86_64_GETPPID);
			syscall_i386(I386_GETPID);
			syscall_x86_64(X32_GETPID);
		}
		printf("x86_64 %ld %ld\nx86 %ld %ld\nx32 %ld %ld\n", X86_64_GETPPID, count, I386_GETPID, count,
		       X32_GETPID, count);
		return 0;
	}
	fprintf(stderr, "usage: %s storm SECONDS | abi COUNT\n", argv[0]);
	return 2;
}
