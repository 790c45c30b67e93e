/* Make COUNT getppid() calls, sleeping DELAY_US microseconds after each one,
 * then, if a third argument is given, one getppid() with the x32 bit set
 * (ENOSYS on a kernel without the x32 ABI, but seccomp still logs it).
 * Usage: storm COUNT [DELAY_US [x32]] */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>

int main(int argc, char **argv)
{
	long count = argc > 1 ? atol(argv[1]) : 1000;
	long delay_us = argc > 2 ? atol(argv[2]) : 0;
	struct timespec pause = { delay_us / 1000000, (delay_us % 1000000) * 1000 };

	for (long i = 0; i < count; i++) {
		syscall(SYS_getppid);
		if (delay_us > 0)
			nanosleep(&pause, NULL);
	}
	if (argc > 3)
		syscall(0x40000000 | SYS_getppid);
	printf("%ld\n", count);
	return 0;
}
