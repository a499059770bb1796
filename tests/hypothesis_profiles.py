"""Hypothesis profiles: under CI (the ``CI`` environment variable set, as .ci/run does) every property
test draws the same examples on every run (``derandomize``), so a red build is reproducible and a green
one is not luck; locally examples stay random (and the failing ones are kept in .hypothesis/)."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)


def load_profile() -> str:
    """Load the CI profile where ``CI`` is set (and not 0/false), the default one otherwise; return its name."""
    name = "ci" if os.environ.get("CI", "").lower() not in ("", "0", "false") else "default"
    settings.load_profile(name)
    return name
