"""binary_attention in recovery fine-tuning: the torch form equals the reference, its sign STE passes
gradients to the hash projections, and reshift.recover lowers the distillation loss of the rewrite."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reshift
from reshift import ir, passes
from reshift.codegen.torch import to_torch
from reshift.codegen.torch.ops_attention import binary_attention_torch
from reshift.ir.ops_attention import binary_attention_ref

from .test_recover import batches, module_output, rel, tiny_graph


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("causal", [False, True])
def test_torch_form_equals_the_reference_and_passes_gradients(rng, causal):
    qh, kh = (
        rng.standard_normal((2, 3, 9, 16)).astype(np.float32),
        rng.standard_normal((2, 3, 9, 16)).astype(np.float32),
    )
    qh[0, 0, 0, :3] = [0.0, -0.0, np.nan]
    v = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    tq, tk, tv = (torch.from_numpy(a).requires_grad_() for a in (qh, kh, v))
    y = binary_attention_torch(tq, tk, tv, causal)
    ref = binary_attention_ref(qh, kh, v, causal)
    assert rel(y.detach().numpy(), ref) < 1e-5
    (y * torch.from_numpy(rng.standard_normal(y.shape).astype(np.float32))).sum().backward()
    for t in (tq, tk, tv):  # the STE: gradients reach the projections, not just V
        assert t.grad is not None and float(t.grad[~torch.isnan(t.grad)].abs().sum()) > 0


def test_code_estimator_is_clipped_per_bit():
    """Forward: the sign codes; backward: 1 / s inside |h| < s (s = STE_CLIP * mean |h| of that bit), 0
    outside and at NaN."""
    from reshift.codegen.torch.ops_attention import STE_CLIP, binary_codes_ste

    h = torch.tensor([[[0.1, -4.0], [-0.3, 1.0], [5.0, float("nan")], [-0.2, 0.5]]], requires_grad=True)
    codes = binary_codes_ste(h)
    np.testing.assert_array_equal(codes.detach().numpy(), [[[1, -1], [-1, 1], [1, -1], [-1, 1]]])
    codes.sum().backward()
    clean = np.nan_to_num(h.detach().numpy())
    s = STE_CLIP * np.abs(clean).mean(axis=(0, 1))  # per bit
    expected = np.where(np.abs(clean) < s, 1.0 / s, 0.0)
    expected[0, 2, 1] = 0.0  # NaN: no gradient
    np.testing.assert_allclose(h.grad.numpy(), expected, rtol=1e-6)
    assert h.grad[0, 2, 0] == 0 and h.grad[0, 0, 1] == 0  # 5.0 and -4.0 lie outside their bits' windows


def test_recovery_trains_the_code_form_and_writes_back_a_graph_equal_to_its_module():
    g = tiny_graph()
    data = batches(4)
    rewritten, _ = passes.run(g, "binary_attention", calibration=[{"x": data["x"][:16]}], hash_bits=8)
    assert rewritten.op_histogram()["binary_attention"] == 1
    recovered, report = reshift.recover(g, "binary_attention", data, steps=40, lr=3e-3, batch_size=16, hash_bits=8)
    assert report.loss_after < 0.9 * report.loss_before, report
    assert recovered.op_histogram() == rewritten.op_histogram()
    x = batches(1, seed=7)["x"][:3]
    assert rel(module_output(to_torch(recovered), x), ir.interpret(recovered, {"x": x})["y"]) < 1e-5


def test_attention_features_are_the_values_right_after_each_binary_attention():
    from reshift.recovery import FEATURE_MODES

    g = tiny_graph()
    data = batches(2)
    rewritten, _ = passes.run(g, "binary_attention", calibration=[{"x": data["x"][:16]}], hash_bits=8)
    (find,) = FEATURE_MODES["attention"]
    assert find(rewritten, g) == ["o"]  # linear @o reads the attention result; its name survives the rewrite
    assert find(g, g) == []  # no binary_attention: nothing to distil
    common = dict(steps=0, batch_size=16, hash_bits=8, rewritten=rewritten)
    _, plain = reshift.recover(g, "binary_attention", data, **common)
    _, distilled = reshift.recover(g, "binary_attention", data, features="attention", feature_weight=1.0, **common)
    assert distilled.loss_before > plain.loss_before
    with pytest.raises(reshift.errors.InputError, match="features='attn'"):
        reshift.recover(g, "binary_attention", data, features="attn", feature_weight=1.0, **common)
