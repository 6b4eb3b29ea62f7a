"""passes/gptq.py: GPTQ rounding on a fixed per-channel grid, and its use by the quantize pass."""

from __future__ import annotations

import numpy as np
import pytest

from reshift import ir, passes
from reshift.errors import PassError
from reshift.passes.calibrate import weight_scales
from reshift.passes.gptq import gptq_codes, input_hessian

from .conftest import max_relative_error
from .test_passes_quantize import batches, mlp_attention


def correlated_inputs(rng, n=512, k=32):
    """Inputs whose channels share a few strong factors (as post-LayerNorm activations do)."""
    factors = rng.standard_normal((4, k)) * 2
    return (rng.standard_normal((n, 4)) @ factors + 0.3 * rng.standard_normal((n, k))).astype(np.float32)


def output_error(x, w, codes, scales):
    return np.linalg.norm(x @ (codes * scales[:, None] - w).T) / np.linalg.norm(x @ w.T)


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_nearest_rounding_on_the_layer_output(rng, bits):
    x, w = correlated_inputs(rng), rng.standard_normal((16, 32)).astype(np.float32)
    scales = weight_scales(w, bits, "mse")
    qmax = 2 ** (bits - 1) - 1
    nearest = np.clip(np.rint(w / scales[:, None]), -qmax, qmax)
    codes = gptq_codes(w, scales, input_hessian(x), bits)
    assert codes.dtype == np.int8 and np.abs(codes).max() <= qmax
    assert output_error(x, w, codes, scales) < 0.7 * output_error(x, w, nearest, scales)


def test_gptq_with_uncorrelated_inputs_is_nearest_rounding(rng):
    """A diagonal Hessian has nothing to compensate with: every weight rounds to its nearest level."""
    w = rng.standard_normal((8, 12))
    scales = weight_scales(w, 4, "minmax")
    hessian = np.diag(rng.random(12) + 0.5)
    codes = gptq_codes(w, scales, hessian, 4, dampening=0.0, block=5)
    np.testing.assert_array_equal(codes, np.clip(np.rint(w / scales[:, None]), -7, 7))


def test_gptq_blocks_do_not_change_the_result(rng):
    x, w = correlated_inputs(rng, k=20), rng.standard_normal((6, 20))
    scales, h = weight_scales(w, 4, "mse"), input_hessian(x)
    np.testing.assert_array_equal(gptq_codes(w, scales, h, 4, block=7), gptq_codes(w, scales, h, 4, block=128))


def test_gptq_dead_inputs_and_bad_shapes(rng):
    x = correlated_inputs(rng, k=8)
    x[:, 3] = 0.0  # an input channel the data never excites
    w = rng.standard_normal((4, 8))
    codes = gptq_codes(w, weight_scales(w, 4, "mse"), input_hessian(x), 4)
    assert np.all(codes[:, 3] == 0)
    with pytest.raises(PassError, match="does not match"):
        gptq_codes(w, weight_scales(w, 4, "mse"), np.eye(5), 4)
    with pytest.raises(PassError, match="no finite"):
        input_hessian(np.full((3, 8), np.nan))


def test_quantize_pass_rounds_with_gptq_below_8_bits(rng):
    g = mlp_attention(rng)
    calib, test = batches(rng, 8), batches(rng, 1)[0]  # 256 rows: >= 4 per input of the widest linear (64)
    ref = ir.interpret(g, test)[g.outputs[0].name]
    errors = {}
    for rounding in ("nearest", "gptq"):
        g2, report = passes.run(g, "w4a4", calibration=calib, skip=(), weight_rounding=rounding)
        assert {d["weight_rounding"] for d in report.details.values() if "w_bits" in d} == {rounding}
        errors[rounding] = max_relative_error(ir.interpret(g2, test)[g2.outputs[0].name], ref)
    _, report = passes.run(g, "w4a4", calibration=calib, skip=())
    assert {d["weight_rounding"] for d in report.details.values() if "w_bits" in d} == {"gptq"}  # the default
    _, report = passes.run(g, "w8a8", calibration=calib, skip=())
    assert {d["weight_rounding"] for d in report.details.values() if "w_bits" in d} == {"nearest"}
    assert errors["gptq"] < 1.1 * errors["nearest"]
    _, report = passes.run(g, "w4a4", calibration=calib[:1], skip=())  # 32 rows: too few to fit GPTQ on
    used = {d["weight_rounding"] for d in report.details.values() if "w_bits" in d}
    assert used == {
        "nearest (32 calibration rows < 4 x 16 inputs for gptq)",
        "nearest (32 calibration rows < 4 x 64 inputs for gptq)",
    }
    with pytest.raises(PassError, match="weight_rounding 'adaround'"):
        passes.run(g, "w4a4", calibration=calib, weight_rounding="adaround")
