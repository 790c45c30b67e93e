"""Kubernetes Security Profiles Operator export, validated against the SeccompProfile CRD's schema."""

from __future__ import annotations

import json
import subprocess

import jsonschema
import pytest
import yaml

from speaker.compile import Action, CompileSettings, Layout, plan_layout
from speaker.compile.actions import ActionKind
from speaker.events import Phase
from speaker.profiles import load_profile
from speaker.profiles.spo import object_name, plan_to_spo
from tests.conftest import DATA, PYTHON, ROOT

SCHEMA = json.loads((DATA / "profiles" / "spo-seccompprofile-v1.schema.json").read_text())
REDIS = DATA / "profiles" / "redis-1"


def test_schema_is_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("phase", ["booting", "running", "shutdown", "union"])
def test_export_validates_against_crd_schema(phase: str) -> None:
    result = subprocess.run(
        [PYTHON, "-m", "speaker", "profile", "export", str(REDIS), "--format", "spo", "--phase", phase],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    resource = yaml.safe_load(result.stdout)
    jsonschema.Draft202012Validator(SCHEMA).validate(resource)
    assert resource["metadata"]["name"] == f"speaker-demo-redis-{phase}"
    allowed = next(rule["names"] for rule in resource["spec"]["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW")
    profile = load_profile(REDIS)
    expected = profile.union() if phase == "union" else profile.phase(Phase(phase))
    assert set(allowed) == expected | {"exit", "exit_group", "restart_syscall", "rt_sigreturn"}


def test_schema_rejects_what_the_crd_rejects() -> None:
    plan = plan_layout(load_profile(REDIS).lists(), Layout.UNION, CompileSettings())
    resource, _ = plan_to_spo(plan, "redis")
    validator = jsonschema.Draft202012Validator(SCHEMA)
    broken = json.loads(json.dumps(resource))
    broken["spec"]["defaultErrnoRet"] = 1
    assert not validator.is_valid(broken)
    broken = json.loads(json.dumps(resource))
    broken["spec"]["syscalls"][0]["names"] = []
    assert not validator.is_valid(broken)
    broken = json.loads(json.dumps(resource))
    broken["metadata"]["name"] = "Redis_Profile"
    assert not validator.is_valid(broken)


def test_errno_other_than_eperm_warns() -> None:
    settings = CompileSettings(default_action=Action(ActionKind.ERRNO, 13))
    plan = plan_layout(load_profile(REDIS).lists(), Layout.UNION, settings)
    resource, warnings = plan_to_spo(plan, "redis")
    assert resource["spec"]["defaultAction"] == "SCMP_ACT_ERRNO"
    assert any("EACCES" in warning and "EPERM" in warning for warning in warnings)


def test_notify_layout_refused() -> None:
    plan = plan_layout(load_profile(REDIS).lists(), Layout.NOTIFY, CompileSettings())
    with pytest.raises(ValueError, match="cannot use a notify layout"):
        plan_to_spo(plan, "redis")


@pytest.mark.parametrize(
    ("text", "name"),
    [("speaker-demo/redis:latest", "speaker-demo-redis-latest"), ("__", "speaker-profile"), ("A.B", "a.b")],
)
def test_object_name_is_dns_subdomain(text: str, name: str) -> None:
    assert object_name(text) == name
