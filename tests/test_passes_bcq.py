"""bcq_linear / ternary_linear references and passes/bcq.py: packing, fitting, allocation, passes."""

from __future__ import annotations

import numpy as np
import pytest

from reshift import ir, passes
from reshift.ir.ops_lowbit import bcq_weight, pack_signs, pack_trits, unpack_signs, unpack_trits
from reshift.passes.bcq import (
    LayerSensitivity,
    allocate_bits,
    bits_per_weight,
    fit_bcq,
    fit_ternary,
    ternary_dequant,
)
from reshift.passes.quant_common import capture_activations, relative_output_error

from .helpers import parse
from .test_passes_shift import calibration, gpt2, mlp  # noqa: F401  (gpt2 is a fixture)


def signs(rng, shape):
    return np.where(rng.random(shape) < 0.5, -1, 1).astype(np.int8)


@pytest.mark.parametrize("k", [1, 7, 8, 13, 130])
def test_pack_unpack_round_trip(rng, k):
    b = signs(rng, (3, 5, k))
    packed = pack_signs(b)
    assert packed.shape == (3, 5, -(-k // 8)) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_signs(packed, k), b)
    t = rng.integers(-1, 2, (5, k)).astype(np.int8)
    assert pack_trits(t).shape == (5, -(-k // 4))
    np.testing.assert_array_equal(unpack_trits(pack_trits(t), k), t)


def test_bit_layouts_are_lsb_first():
    assert pack_signs(np.array([1, -1, -1, -1, -1, -1, -1, -1, 1]))[0] == 1
    assert pack_trits(np.array([1, -1, 0, 0]))[0] == 0b01_01_00_10
    with pytest.raises(ValueError, match="code 3"):
        unpack_trits(np.array([[0xFF]], np.uint8), 4)


def bcq_graph(rng, out=3, k=13, q=2, group=5, bias=True):
    b = ir.GraphBuilder("bcq")
    x = b.input("x", f"f32[N,{k}]")
    codes = signs(rng, (q, out, k))
    alpha = rng.random((out, -(-k // group), q)).astype(np.float32)
    bias_v = b.constant(rng.standard_normal(out).astype(np.float32)) if bias else None
    y = b.bcq_linear(x, b.constant(pack_signs(codes)), b.constant(alpha), bias_v, group_size=group, in_features=k)
    return b.build(y), codes, alpha


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_bcq_reference_matches_float64_dequantized_weight(rng, batch):
    g, codes, alpha = bcq_graph(rng)  # K=13: neither a multiple of the group (5) nor of 8
    w = sum(np.repeat(alpha[:, :, i].astype(np.float64), 5, axis=1)[:, :13] * codes[i] for i in range(2))
    bias = next(c.data for c in g.constants.values() if c.data.shape == (3,) and c.data.dtype == np.float32)
    x = rng.standard_normal((batch, 13)).astype(np.float32)
    y = ir.interpret(g, {"x": x})[g.outputs[0].name]
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T + bias, rtol=1e-5, atol=1e-5)


def test_bcq_reference_one_plane_unit_alpha_is_exact_and_nan_propagates(rng):
    g, codes, alpha = bcq_graph(rng, q=1, bias=False)
    for c in g.constants.values():
        if c.data.dtype == np.float32:
            c.data[:] = 1.0
    x = rng.integers(-4, 5, (4, 13)).astype(np.float32)
    x[2, 3] = np.nan
    y = ir.interpret(g, {"x": x})[g.outputs[0].name]
    clean = [0, 1, 3]
    np.testing.assert_array_equal(y[clean], x[clean] @ codes[0].T.astype(np.float32))
    assert np.isnan(y[2]).all()


def test_ternary_reference(rng):
    t = rng.integers(-1, 2, (3, 10)).astype(np.int8)
    scale = rng.random((3, 3)).astype(np.float32)
    b = ir.GraphBuilder()
    x = b.input("x", "f32[N,10]")
    g = b.build(b.ternary_linear(x, b.constant(pack_trits(t)), b.constant(scale), None, group_size=4, in_features=10))
    xs = rng.standard_normal((17, 10)).astype(np.float32)
    w = np.repeat(scale.astype(np.float64), 4, axis=1)[:, :10] * t
    np.testing.assert_allclose(ir.interpret(g, {"x": xs})[g.outputs[0].name], xs @ w.T, rtol=1e-5, atol=1e-6)


def test_lowbit_type_inference_rejects_wrong_shapes(rng):
    b = ir.GraphBuilder()
    x = b.input("x", "f32[N,13]")
    with pytest.raises(ir.types.IRTypeError, match="alpha"):
        b.bcq_linear(
            x,
            b.constant(np.zeros((2, 3, 2), np.uint8)),
            b.constant(np.zeros((3, 2, 2), np.float32)),
            group_size=5,
            in_features=13,
        )


# -- fitting ----------------------------------------------------------------------------------
def correlated(rng, rows, k):
    """Activations with strongly unequal, correlated channels (as after LayerNorm in an LLM)."""
    mix = rng.standard_normal((k, k)) * np.exp(1.5 * rng.standard_normal(k))[None, :]
    return rng.standard_normal((rows, k)) @ mix


def test_fit_bcq_als_is_monotone_and_beats_greedy(rng):
    w = rng.standard_normal((32, 100))
    for q in (1, 2, 3, 4):
        fit = fit_bcq(w, q, group_size=32, iters=8)
        history = np.array(fit.history)
        assert np.all(np.diff(history) <= 1e-9 * history[0]), history
        assert q == 1 or history[-1] < 0.97 * history[0]
        assert np.isclose(np.linalg.norm(w - fit.weight(32)), history[-1])
        assert set(np.unique(fit.codes)) <= {-1, 1} and fit.alpha.shape == (32, 4, q)
    errors = [relative_output_error(w, fit_bcq(w, q, 32).weight(32), None) for q in (1, 2, 3, 4)]
    assert errors == sorted(errors, reverse=True)


def test_fit_bcq_is_exact_on_representable_weights(rng):
    codes = signs(rng, (2, 4, 16)).astype(np.float64)
    w = 0.75 * codes[0] + 0.25 * codes[1]
    assert relative_output_error(w, fit_bcq(w, 2, group_size=16).weight(16), None) < 1e-9


def test_activation_aware_fit_has_lower_output_error(rng):
    w = rng.standard_normal((48, 96))
    x = correlated(rng, 512, 96)
    for q in (2, 3):
        weight_only = relative_output_error(w, fit_bcq(w, q, 32).weight(32), x)
        aware = relative_output_error(w, fit_bcq(w, q, 32, x=x).weight(32), x)
        assert aware < 0.8 * weight_only, (q, aware, weight_only)


def test_fit_ternary(rng):
    w = rng.standard_normal((8, 70))
    t0, s0 = fit_ternary(w, 32, refit=False)
    assert set(np.unique(t0)) <= {-1, 0, 1}
    np.testing.assert_allclose(s0[:, 0], np.abs(w[:, :32]).mean(1))
    t1, s1 = fit_ternary(w, 32, refit=True)
    e0, e1 = (relative_output_error(w, ternary_dequant(t, s, 32), None) for t, s in ((t0, s0), (t1, s1)))
    assert e1 < e0
    exact = 0.5 * rng.integers(-1, 2, (4, 32))
    t, s = fit_ternary(exact, 32)
    np.testing.assert_allclose(ternary_dequant(t, s, 32), exact)
    x = correlated(rng, 256, 70)
    t2, s2 = fit_ternary(w, 32, x=x)
    assert relative_output_error(w, ternary_dequant(t2, s2, 32), x) <= relative_output_error(
        w, ternary_dequant(t1, s1, 32), x
    )


def test_gptq_act_order_and_rounds_lower_output_error(rng):
    w = rng.standard_normal((32, 96))
    x = correlated(rng, 512, 96)
    plain = relative_output_error(w, fit_bcq(w, 2, 32, x=x, act_order=False).weight(32), x)
    ordered = relative_output_error(w, fit_bcq(w, 2, 32, x=x).weight(32), x)
    rounds = relative_output_error(w, fit_bcq(w, 2, 32, x=x, rounds=3).weight(32), x)
    assert ordered < plain and rounds <= ordered + 1e-12, (plain, ordered, rounds)


def test_gptq_fit_zeroes_dead_inputs_and_keeps_codes_in_range(rng):
    w = rng.standard_normal((8, 40))
    x = correlated(rng, 256, 40)
    x[:, 5] = 0.0  # an input that is zero on every calibration row
    fit = fit_bcq(w, 3, 16, x=x)
    assert set(np.unique(fit.codes)) <= {-1, 1} and fit.alpha.shape == (8, 3, 3)
    t, s = fit_ternary(w, 16, x=x)
    assert set(np.unique(t)) <= {-1, 0, 1} and s.shape == (8, 3)
    # the dead column cannot change the output, so the fit ignores it (it is fitted as weight 0)
    alive = np.arange(40) != 5
    assert relative_output_error(w[:, alive], fit.weight(16)[:, alive], x[:, alive]) < 0.3


def test_calibrated_ternary_beats_weight_only_on_held_out_rows(rng):
    w = rng.standard_normal((32, 128))
    x = correlated(rng, 1024, 128)
    fit_rows, held_out = x[:512], x[512:]
    t0, s0 = fit_ternary(w, 32)
    t1, s1 = fit_ternary(w, 32, x=fit_rows)
    e0 = relative_output_error(w, ternary_dequant(t0, s0, 32), held_out)
    e1 = relative_output_error(w, ternary_dequant(t1, s1, 32), held_out)
    assert e1 < 0.8 * e0, (e0, e1)


def test_capture_activations_reads_a_shared_input_once(rng):
    g = mlp(rng)
    x = g.inputs[0]
    xs = capture_activations(g, calibration(rng, batches=2, rows=8), [x, x, x])
    assert xs[x.name].shape == (16, 16)  # 2 batches x 8 rows, not tripled for q, k and v


# -- bit allocation ---------------------------------------------------------------------------
def test_allocate_bits_meets_budget_and_beats_uniform(rng):
    layers = []
    for i, gain in enumerate((0.1, 1.0, 10.0, 100.0)):  # activation scale sets each layer's sensitivity
        w = rng.standard_normal((32, 128))
        x = gain * rng.standard_normal((128, 128))
        errors = {q: float(np.sum((x @ (w - fit_bcq(w, q, 128).weight(128)).T) ** 2)) for q in (2, 3, 4)}
        layers.append(LayerSensitivity(f"fc{i}", w.size, errors))
    budget = 3.0  # uniform q=3 costs 3.375 bits with 128-wide groups, so uniform must be q=2
    choice = allocate_bits(layers, budget, group_size=128)
    params = sum(layer.params for layer in layers)
    used = sum(layer.params * bits_per_weight(choice[layer.name], 128) for layer in layers) / params
    assert used <= budget
    total = sum(layer.errors[choice[layer.name]] for layer in layers)
    uniform = sum(layer.errors[2] for layer in layers)
    assert total < 0.5 * uniform
    assert choice["fc3"] == 4 and choice["fc0"] == 2
    with pytest.raises(ValueError, match="budget"):
        allocate_bits(layers, 2.0, group_size=128)


# -- the passes -------------------------------------------------------------------------------
def test_bcq_pass_on_mlp_with_calibration(rng):
    g = mlp(rng)
    inputs = {"x": rng.standard_normal((5, 16)).astype(np.float32)}
    g2, report = passes.run(g, "exact+bcq", calibration=calibration(rng), inputs=inputs, group_size=16)
    ir.verify(g2)
    assert g2.op_histogram()["bcq_linear"] == 2 and report.matches["linear_to_bcq"] == 2
    for layer in report.details.values():
        assert layer["bits"] == 3 and layer["error_kind"] == "output" and layer["error"] < 0.15
    assert report.max_error < 0.2
    node = next(n for n in g2.nodes if n.op == "bcq_linear")
    assert node.attrs == {"group_size": 16, "in_features": 32, "lut_dtype": "float32"}
    assert node.inputs[1].data.shape == (3, 32, 4)


def test_bcq_pass_bit_budget_mixes_bits(rng):
    g = mlp(rng, widths=(16, 64, 64, 64, 64, 8))
    g2, report = passes.run(g, "bcq", calibration=calibration(rng), bits=3.0, group_size=32)
    bits = {name: d["bits"] for name, d in report.details.items()}
    sizes = {n.name: n.inputs[1].data.size for n in g.nodes if n.name in bits}
    average = sum(sizes[n] * bits_per_weight(q, 32) for n, q in bits.items()) / sum(sizes.values())
    assert average <= 3.0 and len(set(bits.values())) >= 1 and g2.op_histogram()["bcq_linear"] == 3


def test_ternary_pass_and_refusals(rng):
    g = mlp(rng, widths=(16, 32, 32, 32, 8), shared=True)
    g2, report = passes.run(g, "ternary", group_size=16)
    reasons = {r.node: r.reason for r in report.refusals}
    assert "shared with" in reasons["fc1"] and "first" in reasons["fc0"] and "last" in reasons["fc3"]
    assert g2.op_histogram().get("ternary_linear", 0) == 0
    g2, report = passes.run(mlp(rng), "ternary", group_size=16, skip=["*fc1*"])
    assert g2.op_histogram()["ternary_linear"] == 3 and "skip pattern" in report.refusals[0].reason
    b = ir.GraphBuilder()
    x, w = b.input("x", "f32[N,4]"), b.input("w", "f32[3,4]")
    _, report = passes.run(b.build(b.linear(x, w, None)), "bcq", skip=[])
    assert "not a constant" in report.refusals[0].reason


def test_bcq_and_ternary_on_gpt2(gpt2):  # noqa: F811
    graph, calib, inputs = gpt2
    g2, report = passes.run(graph, "bcq", calibration=calib, inputs=inputs, bits=3.0, bcq_iters=4)
    assert g2.op_histogram()["bcq_linear"] == 7
    details = report.details
    print("gpt2 bcq:", {k: (d["bits"], round(d["error"], 4)) for k, d in details.items()}, report.max_error)
    sizes = {n.name: n.inputs[1].data.size for n in graph.nodes if n.name in details}
    average = sum(sizes[n] * d["bits_per_weight"] for n, d in details.items()) / sum(sizes.values())
    assert average <= 3.0 and max(d["error"] for d in details.values()) < 0.3
    assert report.max_error < 0.5
    g3, report3 = passes.run(graph, "ternary", calibration=calib, inputs=inputs)
    print("gpt2 ternary:", {k: round(d["error"], 4) for k, d in report3.details.items()}, report3.max_error)
    assert g3.op_histogram()["ternary_linear"] == 7 and report3.max_error < 1.0


def test_bcq_weight_helper_matches_fit(rng):
    w = rng.standard_normal((6, 21))
    fit = fit_bcq(w, 3, group_size=8)
    got = bcq_weight(pack_signs(fit.codes), fit.alpha.astype(np.float32), 8, 21)
    np.testing.assert_allclose(got, fit.weight(8), rtol=1e-5, atol=1e-6)


# -- sequential calibration -----------------------------------------------------------------
QKV = """
graph qkv(%x: f32[N,16]) {
  const %wq: f32[16,16] = ...
  const %wk: f32[16,16] = ...
  const %wv: f32[16,16] = ...
  const %wo: f32[8,16] = ...
  %q: f32[N,16] = linear(%x, %wq, _) @q
  %k: f32[N,16] = linear(%x, %wk, _) @k
  %v: f32[N,16] = linear(%x, %wv, _) @v
  %s: f32[N,16] = add(%q, %k) @s
  %t: f32[N,16] = add(%s, %v) @t
  %r: f32[N,16] = relu(%t) @act
  %y: f32[N,8] = linear(%r, %wo, _) @out
  return %y
}
"""


def test_calibration_stages_follow_dependencies(rng):
    from reshift.passes.pattern import match
    from reshift.passes.quant_common import LINEAR, calibration_stages

    g = mlp(rng)
    producers = g.producers()
    candidates = [match(LINEAR, n, producers) for n in g.nodes if n.op == "linear"]
    names = [[m.root.name for m in stage] for stage in calibration_stages(g, candidates)]
    assert names == [["fc0"], ["fc1"], ["fc2"], ["fc3"]]
    assert [len(stage) for stage in calibration_stages(g, candidates[1:])] == [1, 1, 1]
    g = parse(QKV, rng)
    producers = g.producers()
    candidates = [match(LINEAR, n, producers) for n in g.nodes if n.op == "linear"]
    names = [[m.root.name for m in stage] for stage in calibration_stages(g, candidates)]
    assert names == [["q", "k", "v"], ["out"]]  # q, k and v read one input: one stage, one capture


def test_compensated_target_is_w_without_drift_and_fits_the_float_output(rng):
    from reshift.passes.quant_common import compensated_target, hessian

    w = rng.standard_normal((6, 12))
    x = correlated(rng, 400, 12)
    np.testing.assert_allclose(compensated_target(w, x, x, hessian(x)), w, atol=1e-12)
    x_float = x + 0.1 * rng.standard_normal(x.shape)
    v = compensated_target(w, x, x_float, hessian(x, damp=0.0))
    best = np.linalg.lstsq(x, x_float @ w.T, rcond=None)[0].T  # argmin_V ||X_f W^T - X V^T||
    np.testing.assert_allclose(v, best, rtol=1e-8, atol=1e-8)


def end_to_end_error(g, g2, inputs):
    ref, got = ir.interpret(g, inputs)[g.outputs[0].name], ir.interpret(g2, inputs)[g2.outputs[0].name]
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("pipeline", ["bcq", "ternary"])
def test_sequential_calibration_lowers_end_to_end_error(rng, pipeline):
    """Fitting each layer to the float model's output from its quantized inputs (sequential,
    asymmetric) undoes part of the earlier layers' error; plain sequential GPTQ only changes H."""
    g = mlp(rng, widths=(16, 64, 64, 64, 8))
    channel_scale = np.exp(0.5 * rng.standard_normal(16))
    calib = [{"x": (rng.standard_normal((512, 16)) * channel_scale).astype(np.float32)}]
    held_out = {"x": (rng.standard_normal((512, 16)) * channel_scale).astype(np.float32)}
    errors, kinds = {}, {}
    for mode, extra in {
        "independent": {"sequential": False},
        "sequential": {"asymmetric": False},
        "sequential asymmetric": {},
    }.items():
        g2, report = passes.run(g, pipeline, calibration=calib, group_size=16, skip=[], bcq_q=3, **extra)
        errors[mode] = end_to_end_error(g, g2, held_out)
        kinds[mode] = {d["calibration"] for d in report.details.values()} if pipeline == "bcq" else {mode}
    assert kinds == {m: {m} for m in errors}, kinds
    assert errors["sequential asymmetric"] < 0.9 * errors["independent"], errors


def test_sequential_calibration_captures_shared_inputs_once_and_refuses_under_a_budget(rng):
    g = parse(QKV, rng)
    calib = [{"x": correlated(rng, 128, 16).astype(np.float32)}]
    g2, report = passes.run(g, "bcq", calibration=calib, group_size=16, skip=[], bcq_q=2)
    assert g2.op_histogram()["bcq_linear"] == 4
    assert {d["calibration"] for d in report.details.values()} == {"sequential asymmetric"}
    # a bits budget compares every layer's error at once: calibration stays independent
    _, report = passes.run(g, "bcq", calibration=calib, group_size=16, skip=[], bits=5.0, bit_choices=(2, 3))
    assert {d["calibration"] for d in report.details.values()} == {"independent"}
    # without calibration data nothing is captured: weight-only fit, no calibration detail
    _, report = passes.run(g, "bcq", group_size=16, skip=[], bcq_q=2)
    assert all("calibration" not in d and d["error_kind"] == "weight" for d in report.details.values())


# -- the vectorized fit: same objective as before, Hessians shared ------------------------------
# Relative errors of the implementation before vectorizing (commit dd67a5ff, one column at a time,
# float64 throughout) on the data of `frozen_case`; the vectorized fit must not be worse (2% slack
# for the float32 GPTQ loop). Keys: w = weight-only, x = calibrated, f = fitted to the float model's
# outputs (x_float), t = calibrated ternary; "many" rows (192 >= K = 160) and "few" (64 < K).
REFERENCE_ERRORS = {
    "many": {"w2": 0.319276, "x2": 0.160102, "f2": 0.159658, "w3": 0.170053, "x3": 0.078263, "f3": 0.078238,
             "w4": 0.08782, "x4": 0.038543, "f4": 0.039051, "t": 0.277436},
    "few": {"x2": 0.114497, "f2": 0.114173, "x3": 0.04762, "f3": 0.047622, "x4": 0.022959, "f4": 0.023304,
            "t": 0.228508},
}  # fmt: skip


def frozen_case():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 160))
    x = correlated(rng, 192, 160)
    return w, x, x + 0.05 * rng.standard_normal(x.shape)


@pytest.mark.parametrize("rows", ["many", "few"])
def test_vectorized_fit_is_no_worse_than_the_reference(rows):
    w, x, x_float = frozen_case()
    if rows == "few":
        x, x_float = x[:64], x_float[:64]
    got = {}
    for q in (2, 3, 4):
        if rows == "many":
            got[f"w{q}"] = relative_output_error(w, fit_bcq(w, q, 32).weight(32), None)
        got[f"x{q}"] = relative_output_error(w, fit_bcq(w, q, 32, x=x).weight(32), x)
        got[f"f{q}"] = relative_output_error(w, fit_bcq(w, q, 32, x=x, x_float=x_float).weight(32), x, x_float)
    t, s = fit_ternary(w, 32, x=x)
    got["t"] = relative_output_error(w, ternary_dequant(t, s, 32), x)
    worse = {k: (v, REFERENCE_ERRORS[rows][k]) for k, v in got.items() if v > 1.02 * REFERENCE_ERRORS[rows][k]}
    assert not worse, worse


def test_hessian_factor_matches_the_explicit_inverse(rng):
    from reshift.passes.bcq import hessian_factor
    from reshift.passes.quant_common import compensated_target, hessian

    for rows in (24, 200):  # fewer and more rows than inputs
        x = correlated(rng, rows, 40)
        x[:, 3] = 0.0
        factor = hessian_factor(x, 0.01)
        h = hessian(x, 0.01)
        np.testing.assert_allclose(factor.h, h, rtol=1e-12)
        hp = h[np.ix_(factor.perm, factor.perm)]
        u = np.linalg.cholesky(np.linalg.inv(hp)).T
        np.testing.assert_allclose(factor.u, u, rtol=2e-4, atol=2e-6 * np.abs(u).max())
        np.testing.assert_allclose(factor.root.T @ factor.root + np.diag(factor.d), h, rtol=1e-9, atol=1e-9)
        w = rng.standard_normal((6, 40))
        x_float = x + 0.1 * rng.standard_normal(x.shape)
        from reshift.passes.bcq_fit import compensated_target as fast_target

        np.testing.assert_allclose(fast_target(w, x, x_float, factor), compensated_target(w, x, x_float, h), rtol=1e-6)


def test_shared_hessian_gives_identical_fits(rng, monkeypatch):
    from reshift.passes import bcq

    x = correlated(rng, 96, 32)
    w1, w2 = rng.standard_normal((8, 32)), rng.standard_normal((16, 32))
    factor = bcq.hessian_factor(x, 0.01)
    for w in (w1, w2):
        for q in (2, 3):
            shared, own = fit_bcq(w, q, 16, x=x, factor=factor), fit_bcq(w, q, 16, x=x)
            np.testing.assert_array_equal(shared.codes, own.codes)
            np.testing.assert_array_equal(shared.alpha, own.alpha)
    # the pass computes one factor per input value: q, k and v share theirs
    calls = []
    real = bcq.hessian_factor
    monkeypatch.setattr(bcq, "hessian_factor", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = parse(QKV, rng)
    calib = [{"x": correlated(rng, 128, 16).astype(np.float32)}]
    g2, report = passes.run(g, "bcq", calibration=calib, group_size=16, skip=[], bcq_q=2, sequential=False)
    assert len(calls) == 2 and g2.op_histogram()["bcq_linear"] == 4
    monkeypatch.setattr(bcq, "hessian_factor", real)
    xs = capture_activations(g, calib, [g.inputs[0]])
    for name in ("q", "k", "v"):
        weight = next(n for n in g.nodes if n.name == name).inputs[1].data
        own = fit_bcq(weight, 2, 16, x=xs[g.inputs[0].name])
        np.testing.assert_array_equal(g2.constants[f"{name}_bits"].data, pack_signs(own.codes))


def test_pass_report_lists_bits_error_and_bytes_per_layer(rng, capsys):
    g = mlp(rng, widths=(16, 64, 64, 64, 8))
    g2, report = passes.run(g, "bcq", calibration=calibration(rng), bits=5.5, group_size=16)
    for name, layer in report.details.items():
        stored = g2.constants[f"{name}_bits"].data.nbytes + g2.constants[f"{name}_alpha"].data.nbytes
        assert layer["bytes"] == stored and layer["float_bytes"] == 4 * 64 * 64
        assert layer["bits"] in (2, 3, 4) and 0 < layer["error"] < 1 and layer["seconds"] >= 0
    text = str(report)
    assert "'bytes'" in text and "'bits'" in text and "'error'" in text
    _, report = passes.run(g, "ternary", group_size=16)
    assert all(d["bytes"] <= d["float_bytes"] / 8 for d in report.details.values())  # 2 + 32/16 bits
    assert capsys.readouterr().err == ""  # no progress bar unless on a terminal or asked


def test_progress_bar_on_request(rng, capsys):
    passes.run(mlp(rng), "bcq", calibration=calibration(rng), group_size=16, progress=True)
    err = capsys.readouterr().err
    assert "linear_to_bcq" in err and "2/2" in err


def test_a_layer_whose_hessian_exceeds_the_tensor_limit_fits_its_weights_alone(rng, monkeypatch):
    """VGG's 25088-input classifier needs a 4.7 GiB Hessian: refused with the reason, never a MemoryError."""
    g = parse(QKV, rng)  # 16 inputs: a 16x16 float64 Hessian is 2 KiB, over the limit; 4 rows of 16 fit
    calib = [{"x": correlated(rng, 4, 16).astype(np.float32)}]
    monkeypatch.setenv("RESHIFT_MAX_TENSOR_BYTES", "1536")
    g2, report = passes.run(g, "bcq", calibration=calib, group_size=16, skip=[], bcq_q=2)
    assert g2.op_histogram()["bcq_linear"] == 4
    for details in report.details.values():
        assert details["error_kind"] == "weight"
        assert (
            details["calibration"].startswith("off: the 16x16 Hessian")
            and "RESHIFT_MAX_TENSOR_BYTES" in details["calibration"]
        )
