"""passes/scale_reparam.py: RepQ-ViT post-LayerNorm scale reparameterization, exact in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reshift
from reshift import ir, passes
from reshift.ir.builder import GraphBuilder
from reshift.passes.scale_reparam import channel_params, reparam_ratios

from .conftest import max_relative_error


def ln_qkv(rng, dim=24, bias=True):
    """A LayerNorm with uneven per-channel affine feeding q, k, v linears at once (and an MLP LN)."""
    b = GraphBuilder("ln_qkv")
    x = b.input("x", f"f32[N,6,{dim}]")
    gamma = b.constant((rng.random(dim) * 4 + 0.1).astype(np.float32))
    beta = b.constant((rng.standard_normal(dim) * 2).astype(np.float32))
    h = b.layer_norm(x, gamma, beta)
    outs = []
    for _ in range(3):
        w = b.constant((rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32))
        outs.append(b.linear(h, w, b.constant(rng.standard_normal(dim).astype(np.float32)) if bias else None))
    y = b.add(b.add(outs[0], outs[1]), outs[2])
    return b.build(y)


def batches(rng, n=2, dim=24):
    return [{"x": (rng.standard_normal((4, 6, dim)) * 3 + 1).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("stat", ["mean", "median"])
@pytest.mark.parametrize("bias", [True, False])
def test_reparam_is_exact_on_ln_feeding_qkv(rng, stat, bias):
    g = ln_qkv(rng, bias=bias)
    calib = batches(rng)
    test = batches(rng, 1)[0]
    g2, report = passes.run(g, "scale_reparam", calibration=calib, reparam_stat=stat, inputs=test)
    assert report.matches == {"scale_reparam": 1}
    assert report.max_error < 1e-5
    detail = next(iter(report.details.values()))
    assert detail["stat"] == stat and len(detail["readers"]) == 3
    # quantizing the new LN output per tensor with (s~, z~) = per channel with (s, z) before
    env, env2 = ir.interpret(g, test, return_all=True), ir.interpret(g2, test, return_all=True)
    ln = next(n for n in g2.nodes if n.op == "layer_norm").outputs[0].name
    obs = np.concatenate([ir.interpret(g, c, return_all=True)[ln].reshape(-1, 24) for c in calib])
    s, z = channel_params(obs.min(0).astype(np.float64), obs.max(0).astype(np.float64), 8)
    r1, r2, s_l, z_l = reparam_ratios(s, z, stat)
    per_channel = np.rint(env[ln] / s) + z
    per_tensor = np.rint(env2[ln] / s_l) + z_l
    assert np.mean(np.abs(per_channel - per_tensor) < 1e-3) > 0.99  # equal up to float rounding at .5


def test_reparam_ratios_math():
    s, z = np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 40.0])
    r1, r2, s_l, z_l = reparam_ratios(s, z, "mean")
    np.testing.assert_allclose(r1, [0.5, 1.0, 1.5])
    assert s_l == 2.0 and z_l == 23.0 and list(r2) == [-13.0, -3.0, 17.0]
    assert reparam_ratios(s, z, "median")[2:] == (2.0, 20.0)


def post_norm(rng, dim=8):
    """BERT-style: the LayerNorm output feeds the residual add and a linear."""
    b = GraphBuilder("post_norm")
    x = b.input("x", f"f32[N,{dim}]")
    gamma = b.constant((rng.random(dim) * 4 + 0.1).astype(np.float32))
    h = b.layer_norm(x, gamma, b.constant((rng.standard_normal(dim) * 2).astype(np.float32)))
    w = b.constant((rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32))
    return b.build(b.add(h, b.linear(h, w, b.constant(rng.standard_normal(dim).astype(np.float32)))))


def test_post_norm_gets_a_reparameterized_copy(rng):
    g = post_norm(rng)
    calib = [{"x": (rng.standard_normal((16, 8)) * 3).astype(np.float32)}]
    test = {"x": (rng.standard_normal((16, 8)) * 3).astype(np.float32)}
    g2, report = passes.run(g, "scale_reparam", calibration=calib, inputs=test, a_bits=4)
    assert report.matches == {"scale_reparam": 1} and report.max_error < 1e-5
    lns = [n for n in g2.nodes if n.op == "layer_norm"]
    assert len(lns) == 2 and next(iter(report.details.values()))["duplicated"] == lns[1].name
    add, linear = next(n for n in g2.nodes if n.op == "add"), next(n for n in g2.nodes if n.op == "linear")
    assert lns[0].outputs[0] in add.inputs and linear.inputs[0] is lns[1].outputs[0]
    np.testing.assert_array_equal(lns[0].inputs[1].data, g.nodes[0].inputs[1].data)  # residual: original affine
    g3, again = passes.run(g2, "scale_reparam", calibration=calib, a_bits=4)  # a second run changes nothing
    assert not again.matches and len([n for n in g3.nodes if n.op == "layer_norm"]) == 2


def test_refuses_post_norm_when_off_and_without_linears(rng):
    g = post_norm(rng)
    calib = [{"x": rng.standard_normal((4, 8)).astype(np.float32)}]
    _, report = passes.run(g, "scale_reparam", calibration=calib, reparam_post_norm=False)
    assert not report.matches and "only linears can absorb" in report.refusals[0].reason
    b = GraphBuilder()
    x = b.input("x", "f32[N,8]")
    g = b.build(b.linear(b.layer_norm(x), b.constant(np.eye(8, dtype=np.float32)), None))
    _, report = passes.run(g, "scale_reparam", calibration=calib)
    assert "constant affine" in report.refusals[0].reason
    b = GraphBuilder()
    x = b.input("x", "f32[N,8]")
    h = b.layer_norm(x, b.constant(np.ones(8, np.float32)), b.constant(np.zeros(8, np.float32)))
    w = b.constant(np.eye(8, dtype=np.float32))
    g = b.build(b.add(b.linear(h, w, None), b.linear(h, w, None)))  # tied weights cannot absorb r1
    _, report = passes.run(g, "scale_reparam", calibration=calib)
    assert not report.matches and "no linear with unshared constant weights" in report.refusals[0].reason


def test_reparam_exact_on_vit_blocks_and_helps_w4a4(rng):
    from examples.models.vit import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch=4, dim=48, depth=2, num_heads=3, num_classes=10).eval()
    g = reshift.frontend.from_torch(model, (torch.randn(2, 3, 16, 16),))
    calib = [{"x": rng.standard_normal((8, 3, 16, 16)).astype(np.float32)} for _ in range(2)]
    test = {"x": rng.standard_normal((8, 3, 16, 16)).astype(np.float32)}
    g2, report = passes.run(g, "scale_reparam", calibration=calib, inputs=test, a_bits=4)
    assert report.matches == {"scale_reparam": 4} and report.max_error < 1e-5
    assert any("gather" in r.reason for r in report.refusals)  # the final LN feeds the class-token gather
    out = g.outputs[0].name
    ref = ir.interpret(g, test)[out]
    uniform, _ = passes.run(g, "w4a4", calibration=calib)
    repq, _ = passes.run(g, "w4a4_repq", calibration=calib)
    assert max_relative_error(ir.interpret(repq, test)[out], ref) < max_relative_error(
        ir.interpret(uniform, test)[out], ref
    )
