"""The Hypothesis profile conftest.py loads (tests/hypothesis_profiles.py), and CI sets what selects it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.mark.parametrize("ci,derandomized", [("1", True), ("true", True), ("", False), ("0", False)])
def test_hypothesis_is_derandomised_under_ci(ci: str, derandomized: bool) -> None:
    """The profile conftest loads: with CI set, every run draws the same examples (and keeps no database)."""
    import subprocess
    import sys

    code = ("import hypothesis_profiles; from hypothesis import settings;"
            " print(hypothesis_profiles.load_profile(), settings.default.derandomize, settings.default.database is None)")
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci else {})
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    assert out == (["ci", "True", "True"] if derandomized else ["default", "False", "False"])


def test_the_ci_entry_point_sets_ci_before_the_tests() -> None:
    lines = (Path(__file__).parents[1] / ".ci" / "run").read_text().splitlines()
    assert lines.index("export CI=1  # Hypothesis draws the same examples on every run (tests/hypothesis_profiles.py)") \
        < lines.index("make test")
