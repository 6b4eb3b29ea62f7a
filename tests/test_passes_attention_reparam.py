"""passes/attention_reparam.py: q/k and V channel ranges migrated into the projections, exact in fp32."""

from __future__ import annotations

import numpy as np
import pytest

from reshift import ir, passes
from reshift.errors import PassError
from reshift.ir.builder import GraphBuilder

from .helpers import refused

T, H, D = 5, 2, 4
C = H * D


def _const(b, rng, shape, spread=None):
    w = rng.standard_normal(shape).astype(np.float32)
    if spread is not None:  # uneven output channels: a few carry most of the range
        w *= spread[:, None] if w.ndim == 2 else spread
    return b.constant(w)


def bert_attention(rng, q_also_out=False, relu_before_proj=False):
    """Separate q, k, v projections -> heads -> softmax(q k^T) v -> output projection (BERT layout)."""
    b = GraphBuilder("attn")
    x = b.input("x", f"f32[N,{T},{C}]")
    spread = np.exp(rng.standard_normal(C) * 1.5).astype(np.float32)
    heads = []
    for _ in range(3):
        y = b.linear(x, _const(b, rng, (C, C), spread), _const(b, rng, (C,), spread))
        heads.append((y, b.transpose(b.reshape(y, shape=["N", T, H, D]), perm=[0, 2, 1, 3])))
    (q_lin, q), (_, k), (_, v) = heads
    scores = b.mul(b.matmul(q, b.transpose(k, perm=[0, 1, 3, 2])), b.constant(np.float32(D**-0.5)))
    o = b.matmul(b.softmax(scores, axis=-1), v)
    o = b.reshape(b.transpose(o, perm=[0, 2, 1, 3]), shape=["N", T, C])
    if relu_before_proj:
        o = b.relu(o)
    out = b.linear(o, _const(b, rng, (C, C)), _const(b, rng, (C,)))
    if q_also_out:
        out = b.add(out, q_lin)
    return b.build(out)


def fused_qkv_attention(rng):
    """One qkv projection split by reshape / permute / gather (timm ViT layout)."""
    b = GraphBuilder("vit_attn")
    x = b.input("x", f"f32[N,{T},{C}]")
    spread = np.exp(rng.standard_normal(3 * C) * 1.5).astype(np.float32)
    qkv = b.linear(x, _const(b, rng, (3 * C, C), spread), _const(b, rng, (3 * C,), spread))
    qkv = b.transpose(b.reshape(qkv, shape=["N", T, 3, H, D]), perm=[2, 0, 3, 1, 4])
    q, k, v = (b.gather(qkv, b.constant(np.array(i, np.int64)), axis=0) for i in range(3))
    p = b.softmax(b.matmul(q, b.transpose(k, perm=[0, 1, 3, 2])), axis=-1)
    o = b.reshape(b.transpose(b.matmul(p, v), perm=[0, 2, 1, 3]), shape=["N", T, C])
    return b.build(b.linear(o, _const(b, rng, (C, C)), None))


def batches(rng, n=2):
    return [{"x": rng.standard_normal((3, T, C)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("build", [bert_attention, fused_qkv_attention])
def test_migration_is_exact_and_balances_q_and_k(rng, build):
    g = build(rng)
    calib, test = batches(rng), batches(rng, 1)[0]
    g2, report = passes.run(g, "attention_reparam", calibration=calib, inputs=test)
    assert report.matches == {"migrate_qk": 1, "migrate_v": 1}
    assert report.max_error < 1e-5
    scores, attend = [n for n in g2.nodes if n.op == "matmul"]
    q, kt = scores.inputs
    env = [ir.interpret(g2, c, return_all=True) for c in calib]
    q_max = np.max([np.abs(e[q.name]).max(axis=(0, 2)) for e in env], axis=0)  # [H, D]
    k_max = np.max([np.abs(e[kt.name]).max(axis=(0, 3)) for e in env], axis=0)
    np.testing.assert_allclose(q_max, k_max, rtol=1e-4)  # alpha 0.5: both sqrt(max|q| max|k|)
    v = attend.inputs[1]
    v_max = np.max([np.abs(e[v.name]).max(axis=(0, 2)) for e in env], axis=0)
    np.testing.assert_allclose(v_max, v_max.mean(), rtol=1e-4)  # every V channel at the mean range


def test_second_application_finds_nothing_to_move(rng):
    calib = batches(rng)
    g2, _ = passes.run(bert_attention(rng), "attention_reparam", calibration=calib)
    _, report = passes.run(g2, "attention_reparam", calibration=calib)
    assert not report.matches
    assert refused(report, "migrate_qk") == ["q and k channel ranges are already balanced"]
    assert refused(report, "migrate_v") == ["V channel ranges are already equal"]


def test_refuses_q_channels_read_elsewhere(rng):
    _, report = passes.run(bert_attention(rng, q_also_out=True), "attention_reparam", calibration=batches(rng))
    assert report.matches == {"migrate_v": 1}
    assert refused(report, "migrate_qk") == ["a q or k channel also reaches another reader"]


def test_refuses_attention_output_through_a_nonlinearity(rng):
    g = bert_attention(rng, relu_before_proj=True)
    _, report = passes.run(g, "attention_reparam", calibration=batches(rng))
    assert report.matches == {"migrate_qk": 1}
    (reason,) = refused(report, "migrate_v")
    assert "relu node" in reason and "not one projection" in reason


def test_refuses_matmul_with_a_constant_operand(rng):
    b = GraphBuilder("mm")
    x = b.input("x", f"f32[N,{T},{C}]")
    g = b.build(b.matmul(x, b.constant(rng.standard_normal((C, C)).astype(np.float32))))
    g2, report = passes.run(g, "attention_reparam")  # nothing to migrate: no calibration needed
    assert refused(report, "attention_reparam") == ["right operand is not a projection output"]


def test_needs_calibration(rng):
    with pytest.raises(PassError, match="calibration"):
        passes.run(bert_attention(rng), "attention_reparam")


def test_refuses_broadcast_batches(rng):
    """k from a batch-1 input against q from a batch-N one: the batch dims broadcast, so a channel of k
    meets q channels of every batch row; the pass leaves it alone."""
    b = GraphBuilder("broadcast")
    x, memory = b.input("x", f"f32[N,{T},{C}]"), b.input("m", f"f32[1,{T},{C}]")

    def heads(src):
        y = b.linear(src, _const(b, rng, (C, C)), _const(b, rng, (C,)))
        return b.transpose(b.reshape(y, shape=[-1, T, H, D]), perm=[0, 2, 1, 3])

    g = b.build(b.matmul(heads(x), b.transpose(heads(memory), perm=[0, 1, 3, 2])))
    calib = [
        {"x": rng.standard_normal((3, T, C)).astype(np.float32), "m": rng.standard_normal((1, T, C)).astype(np.float32)}
    ]
    _, report = passes.run(g, "attention_reparam", calibration=calib)
    assert not report.matches
    (reason,) = refused(report, "migrate_qk")
    assert "broadcast matmul" in reason
