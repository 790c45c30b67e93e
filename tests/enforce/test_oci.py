"""Parsing the container process state that runc sends with the listener fd."""

from __future__ import annotations

import json

import pytest

from speaker.notify.oci import ProcessStateError, parse_process_state

# The message runc 1.1.5 sent on this machine for `docker run`, as the
# supervisor received it (container id shortened).
RUNC_MESSAGE = (
    b'{"ociVersion":"1.0.2-dev","fds":["seccompFd"],"pid":11602,"metadata":"speaker-runtime",'
    b'"state":{"ociVersion":"1.0.2-dev","id":"9932b8b831ac","status":"creating","pid":11602,'
    b'"bundle":"/run/containerd/io.containerd.runtime.v2.task/moby/9932b8b831ac"}}'
)


def test_runc_message_parsed() -> None:
    state = parse_process_state(RUNC_MESSAGE)
    assert state.container_id == "9932b8b831ac"
    assert state.pid == 11602
    assert state.init_pid == 11602
    assert state.status == "creating"
    assert state.metadata == "speaker-runtime"
    assert state.seccomp_fd_index == 0


def test_partial_message_is_json_error() -> None:
    with pytest.raises(json.JSONDecodeError):
        parse_process_state(RUNC_MESSAGE[:100])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda doc: doc.pop("state"), "missing key 'state'"),
        (lambda doc: doc.update(fds=["other"]), "does not name 'seccompFd'"),
        (lambda doc: doc.update(pid="1"), "key 'pid' must be int"),
        (lambda doc: doc.update(pid=True), "key 'pid' must be int"),
        (lambda doc: doc["state"].update(id=""), "'state.id' is empty"),
        (lambda doc: doc["state"].pop("status"), "missing key 'state.status'"),
    ],
)
def test_invalid_message_names_key(change, message: str) -> None:
    document = json.loads(RUNC_MESSAGE)
    change(document)
    with pytest.raises(ProcessStateError, match=message):
        parse_process_state(json.dumps(document).encode())
