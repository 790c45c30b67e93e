"""A process that loads a seccomp filter with notify actions and hands its listener to a supervisor.

It plays both sides of runc: it loads the filter (SECCOMP_FILTER_FLAG_NEW_LISTENER),
then connects to the supervisor's socket and sends the fd with the same JSON
message runc 1.1 sends. Then it reads commands from stdin, one JSON list per
line, and prints one JSON result per line:

* ``["call", NAME]``: make syscall NAME with all-zero arguments and print
  ``{"syscall": NAME, "result": RC, "errno": E}``;
* ``["loop", NAME, COUNT]``: make it COUNT times and print the round trip of
  each call in nanoseconds, sorted (for benchmarks);
* ``["exec"]``: execute /bin/sh, which executes this script again with
  ``--after-exec``: it keeps the filter, prints ``{"ready": PID}`` and reads
  commands as before;
* ``["exit"]``.

Usage: notify_target.py SOCKET CONTAINER_ID PID_IN_MESSAGE NAME...
       notify_target.py --after-exec
The NAMEs get SCMP_ACT_NOTIFY; every other syscall is allowed. PID_IN_MESSAGE
is the pid written into the message: 0 leaves out the runtime-init rule, -1
uses this process's own pid.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys
import tempfile
import time

import pyseccomp

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
PR_SET_NO_NEW_PRIVS = 38
SYS_SECCOMP = 317

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_filter(names: list[str]) -> int:
    """Load a filter that notifies ``names`` and allows the rest; return the listener fd."""
    program = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    for name in names:
        program.add_rule(pyseccomp.NOTIFY, name)
    with tempfile.TemporaryFile() as file:
        program.export_bpf(file)
        file.seek(0)
        code = file.read()
    buffer = ctypes.create_string_buffer(code)
    fprog = SockFprog(len(code) // 8, ctypes.addressof(buffer))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    fd = libc.syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, ctypes.byref(fprog))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "seccomp(SECCOMP_SET_MODE_FILTER) failed")
    return fd


def main() -> int:
    if sys.argv[1:] == ["--after-exec"]:
        print(json.dumps({"ready": os.getpid()}), flush=True)
        return serve()
    socket_path, container_id, message_pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    names = sys.argv[4:]
    pid = os.getpid() if message_pid == -1 else message_pid
    fd = load_filter(names)
    message = {
        "ociVersion": "1.0.2-dev",
        "fds": ["seccompFd"],
        "pid": pid,
        "metadata": "notify_target",
        "state": {"ociVersion": "1.0.2-dev", "id": container_id, "status": "creating", "pid": pid, "bundle": "/"},
    }
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.connect(socket_path)
        socket.send_fds(connection, [json.dumps(message).encode()], [fd])
    os.close(fd)
    print(json.dumps({"ready": os.getpid()}), flush=True)
    return serve()


def serve() -> int:
    for line in sys.stdin:
        command = json.loads(line)
        if command[0] == "exit":
            break
        if command[0] == "exec":
            sys.stdout.flush()
            os.execv("/bin/sh", ["sh", "-c", f'exec "{sys.executable}" "{__file__}" --after-exec'])
        name = command[1]
        nr = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
        if command[0] == "call":
            ctypes.set_errno(0)
            result = libc.syscall(nr, 0, 0, 0, 0, 0, 0)
            print(json.dumps({"syscall": name, "result": result, "errno": ctypes.get_errno()}), flush=True)
        elif command[0] == "loop":
            times = []
            clock = time.perf_counter_ns
            if name == "getppid":
                # os.getppid calls the syscall with less overhead than ctypes.
                call = os.getppid
                for _ in range(command[2]):
                    started = clock()
                    call()
                    times.append(clock() - started)
            else:
                for _ in range(command[2]):
                    started = clock()
                    libc.syscall(nr, 0, 0, 0, 0, 0, 0)
                    times.append(clock() - started)
            times.sort()
            print(json.dumps({"syscall": name, "ns": times}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
