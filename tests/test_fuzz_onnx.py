"""A seeded slice of the ONNX mutation fuzzer (benchmarks/fuzz_onnx.py; the long run is ``make fuzz``).

Every mutated model must be accepted or refused with a ``reshift.errors`` error whose message
names where the problem is; a raw exception or a hang is a bug. The harness itself is checked
too: a slow case is reported as a hang, a stray exception as raw.
"""

from __future__ import annotations

import time

import pytest

from benchmarks.fuzz_models import SEED_MODELS, seed_model_bytes
from benchmarks.fuzz_onnx import FUZZ_MAX_TENSOR_BYTES, names_location, run_case, summarize
from benchmarks.onnx_mutations import KINDS, mutate

SEED = 14  # not the long run's seed 0, so the slice adds cases rather than repeating them
CASES_PER_MODEL = 100


@pytest.fixture(scope="module")
def seed_models(tmp_path_factory) -> dict[str, bytes]:
    return seed_model_bytes(tmp_path_factory.mktemp("fuzz_seeds"))


@pytest.fixture
def fuzz_limit(monkeypatch):
    monkeypatch.setenv("RESHIFT_MAX_TENSOR_BYTES", str(FUZZ_MAX_TENSOR_BYTES))


def test_seed_models_cover_the_issue(seed_models):
    import onnx

    assert set(seed_models) == set(SEED_MODELS) and len(seed_models) >= 4
    batch = onnx.load_from_string(seed_models["vit_batch"]).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.HasField("dim_value")


@pytest.mark.parametrize("model", list(SEED_MODELS))
def test_seeded_slice_has_no_raw_exception(seed_models, model, tmp_path, fuzz_limit):
    outcomes = [run_case(model, seed_models[model], SEED, i, tmp_path) for i in range(CASES_PER_MODEL)]
    summary = summarize(outcomes)
    assert not summary["failures"], summary["failures"][:3]
    assert summary["overall"]["accepted"] > 0 and summary["overall"]["refused"] > 0
    unnamed = [(o.kind, o.message) for o in outcomes if o.status == "refused" and not names_location(o.message)]
    assert not unnamed, unnamed[:5]


def test_slice_exercises_every_mutator(seed_models):
    kinds = {mutate(m, seed_models[m], SEED, i).kind for m in SEED_MODELS for i in range(CASES_PER_MODEL)}
    assert kinds == set(KINDS)


def test_cases_replay_from_model_seed_and_index(seed_models):
    first, again = (mutate("cnn", seed_models["cnn"], SEED, 3) for _ in range(2))
    assert first == again
    assert mutate("cnn", seed_models["cnn"], SEED, 4).data != first.data


def test_a_slow_case_is_a_hang(seed_models, tmp_path, monkeypatch):
    def slow(path):
        try:
            time.sleep(5)
        except Exception as exc:  # the frontend's own fallbacks must not swallow the timeout
            raise AssertionError("caught") from exc

    monkeypatch.setattr("reshift.frontend.from_onnx", slow)
    outcome = run_case("cnn", seed_models["cnn"], SEED, 0, tmp_path, timeout=0.2)
    assert outcome.status == "hang" and outcome.seconds < 2


def test_a_stray_exception_is_raw(seed_models, tmp_path, monkeypatch):
    def broken(path):
        raise ValueError("cannot reshape array of size 3 into shape (4,)")

    monkeypatch.setattr("reshift.frontend.from_onnx", broken)
    outcome = run_case("cnn", seed_models["cnn"], SEED, 0, tmp_path)
    assert (outcome.status, outcome.error) == ("raw", "ValueError") and "broken" in outcome.trace


@pytest.mark.parametrize(
    "message, named",
    [
        ("m.onnx: node '/conv' (Conv): stride 0", True),
        ("m.onnx: initializer 'w': raw_data holds 3 bytes", True),
        ("m.onnx: not a readable ONNX model (12 bytes; DecodeError)", True),
        ("cannot reshape array of size 3 into shape (4,)", False),
    ],
)
def test_names_location(message, named):
    assert names_location(message) is named


def test_campaign_survives_a_stuck_and_a_dying_worker(seed_models, monkeypatch):
    """A case stuck where the alarm cannot reach it, and one that kills the worker: both are
    reported as hangs against the right index, and the cases after them still run."""
    import os
    import signal

    import benchmarks.fuzz_onnx as fuzz

    def sabotaged(model, data, seed, index, workdir, timeout=10.0):
        if index == 1:
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
            time.sleep(60)
        if index == 3:
            os._exit(3)
        return fuzz.Outcome(model, seed, index, "none", "", "accepted")

    monkeypatch.setattr(fuzz, "run_case", sabotaged)
    cases = [("cnn", SEED, i) for i in range(5)]
    outcomes = fuzz.run_campaign({"cnn": seed_models["cnn"]}, cases, timeout=0.2, memory_limit=0, grace=1)
    statuses = {o.index: (o.status, o.error) for o in outcomes}
    assert statuses == {
        0: ("accepted", ""),
        1: ("hang", "no answer"),
        2: ("accepted", ""),
        3: ("hang", "worker died (exit code 3)"),
        4: ("accepted", ""),
    }
