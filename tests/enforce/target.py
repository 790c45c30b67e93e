"""A handle on notify_target.py processes, for the tests and bench/enforce.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TARGET = Path(__file__).resolve().parent / "notify_target.py"
#: Syscalls the target's filter notifies unless a test names others.
NOTIFIED = ("getpgid", "getsid", "getppid", "sched_yield")


class Target:
    """A notify_target.py process: its filter notifies NOTIFIED, and it makes syscalls on request."""

    def __init__(self, socket: Path, container_id: str, message_pid: int = 0, names: tuple[str, ...] = NOTIFIED):
        self.process = subprocess.Popen(
            [sys.executable, str(TARGET), str(socket), container_id, str(message_pid), *names],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        ready = self._read()
        self.pid = ready["ready"]

    def _read(self) -> dict:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"notify_target exited with {self.process.wait()} before it printed a result")
        return json.loads(line)

    def send(self, *command: object) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(list(command)) + "\n")
        self.process.stdin.flush()

    def call(self, name: str) -> tuple[int, int]:
        """Make syscall ``name`` and return (result, errno)."""
        self.send("call", name)
        result = self._read()
        return result["result"], result["errno"]

    def exec(self) -> int:
        """Make the target execute /bin/sh and then itself again; return the pid it reports."""
        self.send("exec")
        return self._read()["ready"]

    def loop(self, name: str, count: int) -> list[int]:
        self.send("loop", name, count)
        return self._read()["ns"]

    def close(self) -> int:
        if self.process.poll() is None:
            try:
                self.send("exit")
            except BrokenPipeError:
                pass
        try:
            return self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
