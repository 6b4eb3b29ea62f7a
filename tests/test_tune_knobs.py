"""Knob search over reshift's own kernels (codegen/tvm/knobs.py, tune_knobs.py) and its database.

Every candidate of a kernel must give the default's output bit for bit (and match numpy); a build
given the database uses the stored knobs and says so (``build.tuned``), with the untuned output;
an entry whose knobs do not fit the shape, or name other knobs, is ignored with a warning.
Tiny shapes and 2-3 candidates keep it fast.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from reshift.codegen.tvm import build, knobs, resolve_target, tune  # noqa: E402
from reshift.codegen.tvm.kernels import conv2d_ocvec_cpu, dense_cpu, int8_fused, int8_gemm  # noqa: E402
from reshift.codegen.tvm.tune import target_db_dir  # noqa: E402
from reshift.codegen.tvm.tune_knobs import measure, requests, search  # noqa: E402
from reshift.ir import GraphBuilder, interpret  # noqa: E402

RNG = np.random.default_rng(5)
TARGET = resolve_target("cpu").target()
DENSE = {"rows": 13, "k": 40, "blocks": 4, "batches": 1}  # 4 panels: tiles 3x4, 5x3 (no), 7x2, 15x1
INT8 = {"rows": 11, "blocks": 6, "k4": 9}  # 6 panels: 3 and 2 and 1 divide
OCVEC = conv2d_ocvec_cpu.shape_key(
    1, 3, (3, 3), (1, 1), (1, 1), 10, 100, (8, 8), 32, conv2d_ocvec_cpu.OutputLayout.plain(8, 8), True
)


def _graph():
    """A conv (ocvec kernel, 8x8 output) then a linear (dense kernel) at batch 2."""
    b = GraphBuilder("tiny")
    x = b.input("x", "f32[2,3,8,8]")
    w = b.constant(RNG.standard_normal((32, 3, 3, 3)).astype(np.float32))
    y = b.relu(b.conv2d(x, w, None, stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1))
    flat = b.reshape(y, shape=(2, 32 * 64))
    return b.build(b.linear(flat, b.constant(RNG.standard_normal((24, 2048)).astype(np.float32))))


def _run(result, x):
    vm = relax.VirtualMachine(result.executable, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


@pytest.fixture
def few(monkeypatch):
    """At most three candidates per kernel."""
    for name, space in list(knobs.SPACES.items()):
        fewer = dataclasses.replace(space, candidates=lambda s, space=space: space.candidates(s)[:3])
        monkeypatch.setitem(knobs.SPACES, name, fewer)


SPACES = [(dense_cpu.KNOBS, DENSE), (conv2d_ocvec_cpu.KNOBS, OCVEC), (int8_fused.GEMM_KNOBS, INT8)]


def _skip_without_vnni():
    with TARGET:
        if not int8_gemm.has_vnni():
            pytest.skip("the fused int8 GEMM needs AVX-512 VNNI")


@pytest.mark.parametrize("space, shape", SPACES, ids=["dense", "ocvec", "int8_gemm"])
def test_candidates_are_bit_identical_to_the_default(space, shape):
    if space is int8_fused.GEMM_KNOBS:
        _skip_without_vnni()
    candidates = space.candidates(shape)
    default = space.default(shape)
    assert candidates[0] == default and len(candidates) >= 3
    assert all(space.check(shape, c) is None for c in candidates)
    reference, _ = measure(space.instance(shape, default, np.random.default_rng(0)), TARGET, 1)
    for knobs_ in candidates[1:4]:
        outputs, ms = measure(space.instance(shape, knobs_, np.random.default_rng(0)), TARGET, 1)
        assert ms > 0
        assert np.array_equal(outputs[0], reference[0]), knobs_


def test_dense_candidate_matches_numpy():
    knobs_ = {"rows_tile": 7, "panels": 2, "kc": 16, "row_block": 7}  # 3 K blocks, 1 row tile per L2 block
    assert dense_cpu.check_knobs(DENSE, knobs_) is None
    instance = dense_cpu.instance(DENSE, knobs_, np.random.default_rng(0))
    (y,), _ = measure(instance, TARGET, 1)
    x, w, b = instance.inputs
    expected = x @ w.transpose(1, 0, 2).reshape(DENSE["k"], -1) + b
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_int8_gemm_candidate_matches_numpy():
    _skip_without_vnni()
    instance = int8_fused.gemm_instance(INT8, {"rows_tile": 4, "panels": 3}, np.random.default_rng(0))
    (y,), _ = measure(instance, TARGET, 1)
    q, info, w, wsum, scale, bias = instance.inputs
    acc = q.astype(np.int64) @ w.transpose(1, 3, 0, 2).reshape(4 * INT8["k4"], -1).astype(np.int64)
    acc = (acc - info[:, 1:2].astype(np.int64) * wsum).astype(np.float32)
    np.testing.assert_array_equal(y, acc * (info[:, 0:1] * scale) + bias)


@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 5, 7, 8, 24, 63, 96])
@pytest.mark.parametrize("k", [1, 7, 384, 2048, 2049, 11008])
def test_dense_default_knobs_fit_every_shape(blocks, k):
    """5 x 3 where 3 divides the panels, else 7 x 2, else 15 x 1; K whole up to FULL_K, else L1 blocks."""
    shape = {"rows": 64, "k": k, "blocks": blocks, "batches": 1}
    chosen = dense_cpu.default_knobs(shape)
    assert dense_cpu.check_knobs(shape, chosen) is None
    want = (5, 3) if blocks % 3 == 0 else (7, 2) if blocks % 2 == 0 else (15, 1)
    assert (chosen["rows_tile"], chosen["panels"]) == want
    assert (chosen["kc"] == k) == (k <= dense_cpu.FULL_K)


def test_check_refuses_knobs_that_do_not_fit():
    assert "divide" in dense_cpu.check_knobs(DENSE, {"rows_tile": 5, "panels": 3, "kc": 40, "row_block": 192})
    assert "accumulator" in dense_cpu.check_knobs(DENSE, {"rows_tile": 8, "panels": 2, "kc": 40, "row_block": 192})
    assert "kc" in dense_cpu.check_knobs(DENSE, {"rows_tile": 3, "panels": 4, "kc": 41, "row_block": 192})
    assert "divide" in conv2d_ocvec_cpu.check_knobs(OCVEC, {"pt": 3, "vo": 2})
    assert "vo" in conv2d_ocvec_cpu.check_knobs({**OCVEC, "oc": 48}, {"pt": 4, "vo": 2})
    assert "divide" in int8_fused.check_gemm_knobs(INT8, {"rows_tile": 3, "panels": 4})
    assert "accumulator" in int8_fused.check_gemm_knobs(INT8, {"rows_tile": 6, "panels": 3})


def test_search_keeps_the_default_unless_clearly_faster():
    entry = search(dense_cpu.KNOBS, DENSE, TARGET, repeat=3)
    assert entry["knobs"] in dense_cpu.candidate_knobs(DENSE) and not entry["rejected"]
    assert entry["tuned_ms"] <= entry["default_ms"]
    if entry["knobs"] != entry["default"]:
        assert entry["tuned_ms"] <= entry["default_ms"] * 0.9701  # 5 significant digits stored


def test_lowering_records_each_instance():
    seen = requests(_graph(), TARGET)
    assert sorted(kernel for kernel, _ in seen.values()) == ["conv2d_ocvec_f32", "dense_f32"]


def test_tune_then_build_uses_the_database(tmp_path, few):
    graph = _graph()
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    plain = build(graph, "cpu")
    assert plain.tuned == []
    seen = []
    db = tune(graph, "cpu", trials=0, db_dir=tmp_path, knob_progress=lambda done, total: seen.append((done, total)))
    entries = json.loads((db / knobs.DB_NAME).read_text())["kernels"]
    assert len(entries) == 2 and seen[-1][0] == seen[-1][1] == 6  # 3 candidates of each kernel
    tuned = build(graph, "cpu", tuning_db=tmp_path)
    assert sorted(c.kernel for c in tuned.tuned) == ["conv2d_ocvec_f32", "dense_f32"]
    assert np.array_equal(_run(tuned, x), _run(plain, x))
    expected = interpret(graph, {"x": x})[graph.outputs[0].name]
    np.testing.assert_allclose(_run(tuned, x), expected, rtol=1e-4, atol=1e-4)


def _write(tmp_path, kernel, shape, knobs_):
    path = target_db_dir(tmp_path, TARGET) / knobs.DB_NAME
    entry = {"knobs": knobs_, "default_ms": 2.0, "tuned_ms": 1.0}
    knobs.save(path, {knobs.key(kernel, shape): entry})


def _dense_shape(graph):
    return next(shape for kernel, shape in requests(graph, TARGET).values() if kernel == "dense_f32")


def test_stored_knobs_change_the_kernel_not_the_result(tmp_path):
    graph = _graph()
    shape = _dense_shape(graph)
    chosen = {"rows_tile": 1, "panels": 1, "kc": 100, "row_block": 1}
    assert chosen != dense_cpu.default_knobs(shape)
    _write(tmp_path, "dense_f32", shape, chosen)
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    tuned = build(graph, "cpu", tuning_db=tmp_path)
    assert [(c.kernel, c.knobs) for c in tuned.tuned] == [("dense_f32", chosen)]
    assert "2.000 -> 1.000 ms" in tuned.tuned[0].line()
    assert np.array_equal(_run(tuned, x), _run(build(graph, "cpu"), x))


@pytest.mark.parametrize(
    "bad, why",
    [
        ({"rows_tile": 5, "panels": 3, "kc": 100, "row_block": 192}, "divide"),  # 2 panels: 3 does not divide
        ({"rows_tile": 3, "panels": 2}, "expected the knobs"),
        ({"rows_tile": "3", "panels": 2, "kc": 100, "row_block": 192}, "integers"),
    ],
)
def test_invalid_stored_knobs_are_ignored_with_a_warning(tmp_path, bad, why):
    graph = _graph()
    _write(tmp_path, "dense_f32", _dense_shape(graph), bad)
    with pytest.warns(UserWarning, match=why):
        result = build(graph, "cpu", tuning_db=tmp_path)
    assert result.tuned == []
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert np.array_equal(_run(result, x), _run(build(graph, "cpu"), x))


def test_unreadable_database_is_ignored_with_a_warning(tmp_path):
    path = target_db_dir(tmp_path, TARGET) / knobs.DB_NAME
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        assert build(_graph(), "cpu", tuning_db=tmp_path).tuned == []


def test_cpu_tensor_intrinsics_load_without_the_cuda_module():
    """MetaSchedule's CPU tuning gets x86/arm intrinsics without parsing CUDA's (45-90 s here): the
    real CUDA module is never loaded, and the stand-in is gone so a later import loads the real one."""
    import subprocess
    import sys

    probe = (
        "import sys; from reshift.codegen.tvm.tune import load_cpu_tensor_intrinsics as load; "
        "load(); load(); from tvm.s_tir import TensorIntrin; "
        "TensorIntrin.get('dot_16x4_vnni'); TensorIntrin.get('dot_4x4_i8i8s32_sdot'); "
        "import tvm.s_tir.tensor_intrin as p; "
        "assert 'tvm.s_tir.tensor_intrin.cuda' not in sys.modules and not hasattr(p, 'cuda')"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
