"""The kernel module's qemu stage (tests/kmod/stage.py): build, boot Debian's kernel, run the guest suite.

Needs qemu-system-x86, build-essential, busybox-static, linux-headers-amd64
and the kernel image that .ci/setup.d/50-kmod.sh caches. A failure shows the
end of the guest's console.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import require_system
from tests.kmod import stage
from tests.kmod.guest.suite import TESTS
from tests.kmod.kernel import KernelMissing, find_kernel

pytestmark = pytest.mark.system

#: The stage has 3 minutes in CI on a 2-core machine. On a 2-core machine
#: shared with other work it took 37 to 105 s. qemu is killed after this long.
QEMU_TIMEOUT = 150.0
STAGE_BUDGET = 180.0


def console_tail(output: str, lines: int = 120) -> str:
    return "\n".join(output.splitlines()[-lines:])


def test_qemu_stage(tmp_path: Path) -> None:
    missing = stage.tools_missing()
    require_system("qemu", not missing, f"missing {', '.join(missing)}")
    try:
        find_kernel()
    except KernelMissing as exc:
        require_system("qemu", False, str(exc))

    result = stage.run_stage(tmp_path, timeout=QEMU_TIMEOUT)

    tail = console_tail(result.output)
    assert not result.problems, f"kernel problems: {result.problems}\n{tail}"
    assert result.failed == 0, f"{result.failed} guest tests failed:\n{tail}"
    assert result.passed == len(TESTS), f"{result.passed} of {len(TESTS)} guest tests ran:\n{tail}"
    assert result.seconds <= STAGE_BUDGET, f"the stage took {result.seconds:.0f} s, over its {STAGE_BUDGET:.0f} s budget"
