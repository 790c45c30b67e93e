"""Run a NotifyAgent with the test phase lists in its own process, for tests that stop or kill it.

Usage: agent_process.py SOCKET PHASE [RESPONSE_TIMEOUT]
Prints one JSON line {"ready": PID, "watchdog": PID} once listening, then
runs until stdin closes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import structlog

from speaker.events import Phase
from speaker.logs import configure
from speaker.notify.agent import AgentSettings, NotifyAgent
from speaker.notify.policy import PhasePolicy
from tests.enforce.conftest import LISTS


def main() -> int:
    socket_path, phase = Path(sys.argv[1]), Phase(sys.argv[2])
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
    configure("json", "info")
    log = structlog.get_logger("speaker").bind(component="agent_process")
    agent = NotifyAgent(AgentSettings(socket_path=socket_path, response_timeout=timeout, shutdown_grace=0.0), log)
    agent.set_policy(PhasePolicy.for_arches(LISTS))
    agent.set_phase("c1", phase)
    agent.start()
    assert agent.watchdog.process is not None
    print(json.dumps({"ready": __import__("os").getpid(), "watchdog": agent.watchdog.process.pid}), flush=True)
    sys.stdin.read()
    agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
