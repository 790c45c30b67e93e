"""Export to a Kubernetes Security Profiles Operator ``SeccompProfile`` (YAML).

The layout follows the SeccompProfile CRD of security-profiles-operator
v1.0.0 (API group security-profiles-operator.x-k8s.io, versions v1 and
v1beta1). Kubernetes enforces one profile for a container's whole life, so
the usual export is the union of the phases. The CRD has no
``defaultErrnoRet``: an errno default action returns EPERM, and the exporter
warns when another errno was configured.
"""

from __future__ import annotations

import errno
import re
from typing import Any, Literal

from speaker.compile.actions import ActionKind
from speaker.compile.plan import FilterPlan
from speaker.profiles.docker_json import plan_to_json

API_GROUP = "security-profiles-operator.x-k8s.io"
ApiVersion = Literal["v1", "v1beta1"]

# Kubernetes object names are DNS-1123 subdomains: lower-case alphanumerics,
# '-' and '.', starting and ending with an alphanumeric, at most 253 characters.
_NAME_INVALID = re.compile(r"[^a-z0-9.-]+")
MAX_NAME_LENGTH = 253


def object_name(text: str) -> str:
    """Turn ``text`` (an image or container name) into a valid Kubernetes object name."""
    name = _NAME_INVALID.sub("-", text.lower()).strip("-.")
    name = name[:MAX_NAME_LENGTH].rstrip("-.")
    return name or "speaker-profile"


def plan_to_spo(
    plan: FilterPlan,
    name: str,
    *,
    api_version: ApiVersion = "v1",
    annotations: dict[str, str] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Return a SeccompProfile object for ``plan`` and the warnings about what it cannot express."""
    if plan.notified:
        raise ValueError("a SeccompProfile cannot use a notify layout: export a phase or the union")
    document = plan_to_json(plan, flavor="oci")
    warnings = list(document.warnings)
    if plan.default_action.kind is ActionKind.ERRNO and plan.default_action.errno != errno.EPERM:
        warnings.append(
            f"the SeccompProfile CRD has no defaultErrnoRet, so denied syscalls fail with EPERM, "
            f"not {errno.errorcode.get(plan.default_action.errno, plan.default_action.errno)}"
        )
    spec: dict[str, Any] = {
        "defaultAction": document.data["defaultAction"],
        "architectures": document.data["architectures"],
        "syscalls": [
            {key: rule[key] for key in ("action", "errnoRet", "names") if key in rule} for rule in document.data["syscalls"]
        ],
    }
    metadata: dict[str, Any] = {"name": object_name(name)}
    if annotations:
        metadata["annotations"] = dict(annotations)
    resource = {"apiVersion": f"{API_GROUP}/{api_version}", "kind": "SeccompProfile", "metadata": metadata, "spec": spec}
    return resource, warnings


def dump_yaml(resource: dict[str, Any]) -> str:
    """Return ``resource`` as block-style YAML with keys in their given order.

    Raises RuntimeError when PyYAML is not installed.
    """
    # Imported here so that the rest of SPEAKER works without PyYAML.
    try:
        import yaml
    except ImportError:
        raise RuntimeError("the SeccompProfile export needs PyYAML: pip install pyyaml") from None
    return yaml.safe_dump(resource, sort_keys=False, default_flow_style=False)
