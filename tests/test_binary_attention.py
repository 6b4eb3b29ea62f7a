"""binary_attention (ShiftAddViT): the reference's linear form, the pass with its refusals, ONNX export."""

from __future__ import annotations

import numpy as np
import pytest

from reshift import ir, passes
from reshift.errors import IRTypeError, PassError
from reshift.ir.builder import GraphBuilder
from reshift.ir.ops_attention import binary_attention_mults, binary_attention_ref, binary_codes, matching_weights
from reshift.passes.binary_attention import LOCAL_TAPS, fit_local_mix, local_mix_ref

from .helpers import refused

T, H, D = 9, 2, 8
C = H * D


def _linear_form(qh, kh, v, causal=False):
    """The additions-only form of the op's docstring, per query (float64)."""
    cq, ck = binary_codes(qh) > 0, binary_codes(kh) > 0
    out = np.empty(qh.shape[:-1] + (v.shape[-1],))
    for idx in np.ndindex(qh.shape[:-2]):
        for i in range(qh.shape[-2]):
            keys = slice(0, i + 1) if causal else slice(None)
            kk, vv = ck[idx][keys], v[idx][keys].astype(np.float64)
            s_v, a = vv.sum(0), np.stack([vv[kk[:, bit]].sum(0) for bit in range(kk.shape[1])])
            n = kk.sum(0)
            num = s_v + sum(a[bit] if cq[idx][i, bit] else s_v - a[bit] for bit in range(kk.shape[1]))
            den = len(vv) + sum(n[bit] if cq[idx][i, bit] else len(vv) - n[bit] for bit in range(kk.shape[1]))
            out[idx + (i,)] = num / den
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_reference_equals_the_additions_only_linear_form(rng, causal):
    qh, kh = rng.standard_normal((2, 3, 7, 5)), rng.standard_normal((2, 3, 7, 5))
    v = rng.standard_normal((2, 3, 7, 4)).astype(np.float32)
    y = binary_attention_ref(qh.astype(np.float32), kh.astype(np.float32), v, causal)
    np.testing.assert_allclose(y, _linear_form(qh, kh, v, causal), rtol=1e-6, atol=1e-6)


def test_reference_edges_codes_counts_and_nan():
    assert binary_codes(np.float32([0.0, -0.0, 1e-45, -1e-45, np.inf, -np.inf, np.nan])).tolist() == [
        1,
        1,
        1,
        -1,
        1,
        -1,
        -1,
    ]
    q = np.float32([[1, 1, 1], [-1, -1, -1]])
    k = np.float32([[1, 1, 1], [1, -1, 1]])
    np.testing.assert_array_equal(matching_weights(q, k, False), [[4, 3], [1, 2]])  # 1 + matching bits
    v = np.float32([[2.0, 0.0], [0.0, 4.0]])
    np.testing.assert_allclose(binary_attention_ref(q, k, v), [[8 / 7, 12 / 7], [2 / 3, 8 / 3]], rtol=1e-7)
    # every key opposite every query: weights 1, the normalizer stays positive: the mean of V
    np.testing.assert_allclose(
        binary_attention_ref(-np.ones((1, 3), np.float32), np.ones((2, 3), np.float32), v), [[1.0, 2.0]]
    )
    np.testing.assert_array_equal(binary_attention_ref(q, k, v, causal=True)[0], v[0])  # only itself
    v_nan = v.copy()
    v_nan[1, 0] = np.nan
    out = binary_attention_ref(q, k, v_nan)
    assert np.isnan(out[:, 0]).all() and not np.isnan(out[:, 1]).any()


def test_type_check_refuses_mismatches():
    b = GraphBuilder("bad")
    qh, kh, v = b.input("qh", "f32[N,2,5,16]"), b.input("kh", "f32[N,2,7,16]"), b.input("v", "f32[N,2,7,8]")
    b.binary_attention(qh, kh, v)
    with pytest.raises(IRTypeError, match="causal attention needs as many queries as keys"):
        b.binary_attention(qh, kh, v, causal=True)
    with pytest.raises(IRTypeError, match="same number of code bits"):
        b.binary_attention(b.input("q8", "f32[N,2,5,8]"), kh, v)
    with pytest.raises(IRTypeError, match="leading"):
        b.binary_attention(qh, kh, b.input("v3", "f32[N,3,7,8]"))
    with pytest.raises(IRTypeError, match="float32"):
        b.binary_attention(b.input("q16", "f16[N,2,5,16]"), kh, v)


# -- the pass -------------------------------------------------------------------------------------
def vit_attention(rng, scale=D**-0.5, axis=-1, between=None, probs_out=False):
    """timm ViT layout: fused qkv, reshape / permute / gather, ``softmax(q k^T s) v``, output projection.
    ``between(b, scores)`` edits the scores before the softmax (masks, biases)."""
    b = GraphBuilder("vit_attn")
    x = b.input("x", f"f32[N,{T},{C}]")
    w = (rng.standard_normal((3 * C, C)) * 0.3).astype(np.float32)
    qkv = b.linear(x, b.constant(w), b.constant(rng.standard_normal(3 * C).astype(np.float32) * 0.1))
    qkv = b.transpose(b.reshape(qkv, shape=["N", T, 3, H, D]), perm=[2, 0, 3, 1, 4])
    q, k, v = (b.gather(qkv, b.constant(np.array(i, np.int64)), axis=0) for i in range(3))
    s = b.matmul(q, b.transpose(k, perm=[0, 1, 3, 2]))
    if scale is not None:
        s = b.mul(s, scale if not isinstance(scale, (float, np.ndarray)) else b.constant(np.float32(scale)))
    if between is not None:
        s = between(b, s)
    p = b.softmax(s, axis=axis)
    o = b.reshape(b.transpose(b.matmul(p, v), perm=[0, 2, 1, 3]), shape=["N", T, C])
    out = b.linear(o, b.constant(rng.standard_normal((C, C)).astype(np.float32)), None)
    return b.build(out, p) if probs_out else b.build(out)


def calib(rng, n=2):
    return [{"x": rng.standard_normal((4, T, C)).astype(np.float32)} for _ in range(n)]


def _causal(b, s):
    keep = b.constant(np.tril(np.ones((T, T), bool)))
    return b.where(keep, s, b.constant(np.float32(np.finfo(np.float32).min)))


@pytest.mark.parametrize("between,causal", [(None, False), (_causal, True)])
def test_pass_replaces_softmax_attention_with_the_fitted_code_form(rng, between, causal):
    g = vit_attention(rng, between=between)
    data = calib(rng)
    g2, report = passes.run(g, "binary_attention", calibration=data, inputs=data[0], hash_bits=4)
    assert report.matches == {"binary_attention": 1}
    assert [n.op for n in g2.nodes].count("softmax") == 0
    (node,) = [n for n in g2.nodes if n.op == "binary_attention"]
    assert node.attrs["causal"] is causal and node.inputs[0].shape[-1] == 4
    (detail,) = report.details.values()
    assert detail["init"] in ("pca_itq", "random") and 0 < detail["mults_removed"] < 1
    before, after = detail["mults_per_head"]
    assert detail["local_taps"] == LOCAL_TAPS
    assert before == T * T * D * 2 + 2 * T * T and after == 2 * T * D * 4 + T * D + LOCAL_TAPS * T * D
    # the op, recomputed from the rewritten graph's own hash projections, is what the graph computes
    env = ir.interpret(g2, data[0], return_all=True)
    qh, kh, v = (env[i.name] for i in node.inputs)
    coded = env[node.outputs[0].name]
    np.testing.assert_array_equal(coded, binary_attention_ref(qh, kh, v, causal))
    # plus the local token mix: a depthwise conv2d of v over the tokens, its taps a graph constant
    (conv,) = [n for n in g2.nodes if n.op == "conv2d"]
    (add,) = [n for n in g2.nodes if n.op == "add" and node.outputs[0] in n.inputs]
    assert conv.inputs[0] is node.inputs[2] and conv.attrs["groups"] == H
    taps = conv.inputs[1].data.reshape(H, LOCAL_TAPS)
    np.testing.assert_allclose(env[conv.outputs[0].name], local_mix_ref(v, taps, causal), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(env[add.outputs[0].name], coded + env[conv.outputs[0].name])
    # lossy but fitted: the reported error is the error of the attention output on calibration, and
    # the least-squares taps never make it worse than the code form alone (zero taps are a candidate)
    assert detail["output_error"] <= detail["code_form_error"] < 1.0


@pytest.mark.parametrize("causal", [False, True])
def test_local_mix_fit_recovers_known_taps_and_causal_taps_see_no_later_token(rng, causal):
    v = rng.standard_normal((6, H, T, D))
    truth = rng.standard_normal((H, 5))
    residual = local_mix_ref(v, truth, causal)
    np.testing.assert_allclose(fit_local_mix(v, residual, 5, causal), truth, rtol=1e-4, atol=1e-5)
    later = v.copy()
    later[:, :, 4:] += 10.0  # tokens 4.. change
    moved = np.abs(local_mix_ref(later, truth, causal) - residual).max(axis=(0, 1, 3))
    assert (moved[:4] == 0).all() if causal else moved[:4].max() > 0
    assert fit_local_mix(v[:, :1, :, :].squeeze(1), residual[:, 0], 5, causal).shape == (1, 5)  # rank 3: one head


def test_causal_site_output_ignores_later_tokens_with_the_local_mix(rng):
    g = vit_attention(rng, between=_causal)
    data = calib(rng)
    g2, report = passes.run(g, "binary_attention", calibration=data, hash_bits=4)
    assert next(iter(report.details.values()))["local_taps"] == LOCAL_TAPS
    x = data[0]["x"]
    later = x.copy()
    later[:, 5:] = rng.standard_normal(later[:, 5:].shape)
    out, moved = (ir.interpret(g2, {"x": a})[g2.outputs[0].name] for a in (x, later))
    np.testing.assert_array_equal(out[:, :5], moved[:, :5])


def test_local_mix_options_and_sites_without_one(rng):
    g = vit_attention(rng)
    data = calib(rng)
    g0, report = passes.run(g, "binary_attention", calibration=data, binary_local_taps=0)
    (detail,) = report.details.values()
    assert "conv2d" not in g0.op_histogram() and detail["local_taps"] == 0
    assert detail["output_error"] == detail["code_form_error"] and "no_local_mix" not in detail
    with pytest.raises(ValueError, match="binary_local_taps"):
        passes.run(g, "binary_attention", calibration=data, binary_local_taps=-1)
    # cross-attention (5 queries, 9 keys): no token-aligned mix; the site is still rewritten, and says why
    b = GraphBuilder("cross")
    q, k, v = (
        b.input("q", f"f32[N,{H},5,{D}]"),
        b.input("k", f"f32[N,{H},{T},{D}]"),
        b.input("v", f"f32[N,{H},{T},{D}]"),
    )
    cross = b.build(b.matmul(b.softmax(b.matmul(q, b.transpose(k, perm=[0, 1, 3, 2])), axis=-1), v))
    feeds = {"q": rng.standard_normal((2, H, 5, D)), "k": rng.standard_normal((2, H, T, D))}
    feeds = {n: a.astype(np.float32) for n, a in feeds.items()} | {
        "v": rng.standard_normal((2, H, T, D)).astype(np.float32)
    }
    g2, report = passes.run(cross, "binary_attention", calibration=[feeds])
    (detail,) = report.details.values()
    assert report.matches == {"binary_attention": 1} and "conv2d" not in g2.op_histogram()
    assert detail["local_taps"] == 0 and "differ in length" in detail["no_local_mix"]


def test_fit_keeps_the_better_candidate_and_bits_option(rng):
    g = vit_attention(rng)
    data = calib(rng)
    errors = {}
    for init in ("pca_itq", "random", "auto"):
        _, report = passes.run(g, "binary_attention", calibration=data, binary_init=init, hash_bits=8)
        (detail,) = report.details.values()
        errors[init] = detail["code_form_error"]
        assert detail["bits"] == 8 and (init == "auto" or detail["init"] == init)
    assert errors["auto"] == min(errors["pca_itq"], errors["random"])
    with pytest.raises(ValueError, match="binary_init"):
        passes.run(g, "binary_attention", calibration=data, binary_init="ksh")


def test_more_bits_track_softmax_attention_better(rng):
    """On softer attention (small scores) the code form approaches softmax as the bit count grows."""
    g = vit_attention(rng, scale=0.05)
    data = calib(rng, 3)
    err = {}
    for bits in (2, 32):
        _, report = passes.run(g, "binary_attention", calibration=data, hash_bits=bits, binary_init="pca_itq")
        err[bits] = next(iter(report.details.values()))["code_form_error"]
    assert err[32] < err[2]


def test_pass_needs_calibration(rng):
    with pytest.raises(PassError, match="calibration"):
        passes.run(vit_attention(rng), "binary_attention")


REFUSALS = [
    (dict(axis=2), "not the key axis"),
    (dict(scale=-0.25), "not positive"),
    (dict(scale=np.full((1, H, 1, 1), 0.3, np.float32)), "non-scalar constant"),
    (dict(between=lambda b, s: b.add(s, b.constant(np.zeros((H, T, T), np.float32)))), "bias or float mask"),
    (
        dict(
            between=lambda b, s: b.where(b.constant(np.triu(np.ones((T, T), bool))), s, b.constant(np.float32(-3e38)))
        ),
        "not the causal triangle",
    ),
    (
        dict(between=lambda b, s: b.where(b.constant(np.ones((T, T), bool)), s, b.constant(np.float32(0.5)))),
        "edits the scores",
    ),
    (
        dict(between=lambda b, s: b.where(b.greater(s, b.constant(np.float32(0))), s, b.constant(np.float32(-3e38)))),
        "run-time mask",
    ),
    (dict(probs_out=True), "also read elsewhere"),
]


@pytest.mark.parametrize("kwargs,reason", REFUSALS)
def test_pass_refuses_what_the_code_form_cannot_express(rng, kwargs, reason):
    g = vit_attention(rng, **kwargs)
    g2, report = passes.run(g, "binary_attention", calibration=calib(rng, 1))
    assert report.matches == {}
    assert any(reason in r for r in refused(report, "binary_attention")), refused(report, "binary_attention")
    assert [n.op for n in g2.nodes] == [n.op for n in g.nodes]


def test_pass_refuses_a_runtime_scale_and_non_float32(rng):
    b = GraphBuilder("runtime_scale")
    q, k, v = (b.input(n, f"f32[N,{H},{T},{D}]") for n in "qkv")
    s = b.mul(b.matmul(q, b.transpose(k, perm=[0, 1, 3, 2])), b.input("s", "f32[]"))
    g = b.build(b.matmul(b.softmax(s, axis=-1), v))
    data = [{n: rng.standard_normal((2, H, T, D)).astype(np.float32) for n in "qkv"} | {"s": np.float32(0.3)}]
    _, report = passes.run(g, "binary_attention", calibration=data)
    assert any("run-time value" in r for r in refused(report, "binary_attention"))
    b = GraphBuilder("half")
    q, k, v = (b.input(n, f"f16[N,{H},{T},{D}]") for n in "qkv")
    g = b.build(b.matmul(b.softmax(b.matmul(q, b.transpose(k, perm=[0, 1, 3, 2])), axis=-1), v))
    _, report = passes.run(g, "binary_attention", calibration=[{n: np.zeros((1, H, T, D), np.float16) for n in "qkv"}])
    assert any("float16" in r for r in refused(report, "binary_attention"))


def test_pass_accepts_sdpa_from_torch_without_transpose_node(rng):
    """k^T given directly (no transpose node to strip): the pass transposes it back itself."""
    b = GraphBuilder("kt_input")
    q, kt, v = (
        b.input("q", f"f32[N,{H},{T},{D}]"),
        b.input("kt", f"f32[N,{H},{D},{T}]"),
        b.input("v", f"f32[N,{H},{T},{D}]"),
    )
    g = b.build(b.matmul(b.softmax(b.div(b.matmul(q, kt), b.constant(np.float32(8.0))), axis=-1), v))
    data = [
        {
            "q": rng.standard_normal((2, H, T, D)).astype(np.float32),
            "kt": rng.standard_normal((2, H, D, T)).astype(np.float32),
            "v": rng.standard_normal((2, H, T, D)).astype(np.float32),
        }
    ]
    g2, report = passes.run(g, "binary_attention", calibration=data)
    assert report.matches == {"binary_attention": 1}
    assert "transpose" in [n.op for n in g2.nodes]


# -- ONNX -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_onnx_decomposition_runs_in_onnxruntime(rng, causal, tmp_path):
    import onnxruntime as ort

    from reshift.codegen.onnx import CUSTOM_DOMAIN, to_onnx

    b = GraphBuilder("ba")
    qh, kh, v = b.input("qh", "f32[N,3,11,16]"), b.input("kh", "f32[N,3,11,16]"), b.input("v", "f32[N,3,11,8]")
    g = b.build(b.binary_attention(qh, kh, v, causal=causal))
    feeds = {n: rng.standard_normal((2, 3, 11, 16 if n != "v" else 8)).astype(np.float32) for n in ("qh", "kh", "v")}
    feeds["qh"][0, 0, 0, :4] = [0.0, -0.0, np.nan, -1e-45]
    ref = ir.interpret(g, feeds)[g.outputs[0].name]
    model = to_onnx(g, tmp_path / "ba.onnx")
    (out,) = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6 * np.abs(feeds["v"]).max())
    domain = to_onnx(g, custom_ops="domain")
    assert [(n.op_type, n.domain) for n in domain.graph.node] == [("binary_attention", CUSTOM_DOMAIN)]
    from reshift.frontend import from_onnx

    back = from_onnx(domain)
    assert [n.op for n in back.nodes] == ["binary_attention"] and back.nodes[0].attrs["causal"] is causal


# -- graphs from the torch frontend ---------------------------------------------------------------
def test_pass_matches_every_attention_of_a_torch_vit(rng):
    torch = pytest.importorskip("torch")
    from examples.models.vit import VisionTransformer, init_transformer_weights

    torch.manual_seed(0)
    model = VisionTransformer(16, 4, 32, 2, 2, 5)
    init_transformer_weights(model)
    g = reshift_from_torch(model.eval(), torch.randn(2, 3, 16, 16))
    calib = [{"x": rng.standard_normal((4, 3, 16, 16)).astype(np.float32)}]
    g2, report = passes.run(g, "binary_attention", calibration=calib)
    assert report.matches == {"binary_attention": 2} and not refused(report, "binary_attention")
    # 17 tokens, 16 dims, 16 bits: few multiplications removed at this size (92% at ViT-S 197 tokens)
    before, after = binary_attention_mults(17, 17, 16, 16, 16, LOCAL_TAPS)
    assert all(d["mults_removed"] == pytest.approx(1 - after / before) for d in report.details.values())
    assert binary_attention_mults(197, 197, 64, 64, 16)[1] / binary_attention_mults(197, 197, 64, 64, 16)[0] < 0.09
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    assert np.isfinite(ir.interpret(g2, {"x": x})[g2.outputs[0].name]).all()


@pytest.mark.parametrize("causal", [True, False])
def test_pass_on_torch_sdpa_causal_and_bool_mask(rng, causal):
    torch = pytest.importorskip("torch")

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            if causal:
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            window = torch.ones(T, T, dtype=torch.bool).tril().triu(-2)  # sliding window of 3
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=window)

    example = tuple(torch.randn(2, H, T, D) for _ in range(3))
    g = reshift_from_torch(Attention(), example)
    calib = [{v.name: rng.standard_normal((2, H, T, D)).astype(np.float32) for v in g.inputs}]
    g2, report = passes.run(g, "binary_attention", calibration=calib)
    if causal:
        assert report.matches == {"binary_attention": 1}
        (node,) = [n for n in g2.nodes if n.op == "binary_attention"]
        assert node.attrs["causal"] is True
    else:
        assert report.matches == {}
        assert any("not the causal triangle" in r for r in refused(report, "binary_attention"))


def reshift_from_torch(model, example):
    from reshift.frontend import from_torch

    return from_torch(model, example if isinstance(example, tuple) else (example,))
