"""Profiles: the model, its formats, and building profiles from traces.

``load_profile`` opens any supported input; ``write_profile_dir`` writes the
full profile directory; ``ProfileBuilder`` turns phase-tagged pipeline
events into profiles. Each format lives in its own module:
``speaker_lists`` (the original per-phase files), ``profile_json``,
``docker_json`` (Docker and OCI) and ``spo`` (Kubernetes Security Profiles
Operator).
"""

from speaker.profiles.builder import ProfileBuilder
from speaker.profiles.directory import read_profile_dir, write_profile_dir
from speaker.profiles.errors import ProfileError
from speaker.profiles.load import load_profile
from speaker.profiles.merge import diff_profiles, merge_profiles, summarize
from speaker.profiles.model import Profile, TraceInfo, Transition

__all__ = [
    "Profile",
    "ProfileBuilder",
    "ProfileError",
    "TraceInfo",
    "Transition",
    "diff_profiles",
    "load_profile",
    "merge_profiles",
    "read_profile_dir",
    "summarize",
    "write_profile_dir",
]
