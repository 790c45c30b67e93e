# A static i386 program without libc: getpid, write one line, exit, all
# through int 0x80, so every syscall uses the i386 ABI.
	.section .data
message:
	.ascii "i386 hello\n"
	.section .text
	.globl _start
_start:
	movl $20, %eax		# getpid
	int $0x80
	movl $4, %eax		# write(1, message, 11)
	movl $1, %ebx
	movl $message, %ecx
	movl $11, %edx
	int $0x80
	movl $1, %eax		# exit(0)
	xorl %ebx, %ebx
	int $0x80
