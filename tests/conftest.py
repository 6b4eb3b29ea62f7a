"""Shared test set-up: the repository root on sys.path (for ``examples.models``) and seeded RNGs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

# CI replays the same examples every run (a red CI lands nothing); locally, hypothesis explores.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Under pytest-xdist (`make test` runs two workers on two cores) each worker keeps to one thread:
# TVM's pool spin-waits, and two 2-thread pools on two cores wait on each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(var, "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def max_relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """max|actual - reference| / max|reference| in float64."""
    reference = np.asarray(reference, dtype=np.float64)
    scale = max(float(np.max(np.abs(reference))), 1e-30)
    return float(np.max(np.abs(np.asarray(actual, dtype=np.float64) - reference))) / scale
