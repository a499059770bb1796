"""Hypothesis under CI: every property test draws the same examples on every run, so a red build is
reproducible and a green one is not luck. Hypothesis ships a ``ci`` profile for this (``derandomize=True``,
no example database, no deadline, blobs printed); ``load_profile()`` loads it wherever ``CI`` is set to
something other than empty/0/false (.ci/run exports CI=1), and the default profile elsewhere (random
examples, failing ones kept in .hypothesis/)."""

from __future__ import annotations

import os

from hypothesis import settings


def load_profile() -> str:
    """Load Hypothesis' ``ci`` profile where ``CI`` is set, the default one otherwise; return its name."""
    name = "ci" if os.environ.get("CI", "").lower() not in ("", "0", "false") else "default"
    settings.load_profile(name)
    return name
