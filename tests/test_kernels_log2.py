"""log2_matmul (RepQ-ViT shift-add attention): reference edges, TVM kernel bit-exact, int32 guard."""

from __future__ import annotations

import numpy as np
import pytest

from reshift import ir
from reshift.ir.builder import GraphBuilder
from reshift.ir.ops_quant import SQRT2, log2_matmul_ref, log2_quant_ref, quantize_uniform_ref

V_ATTRS = {"v_scale": 0.03, "v_zero_point": 120, "v_bits": 8}


def attention_graph(heads: int, tokens: int, dim: int, **attrs):
    b = GraphBuilder("log2_attention")
    p = b.input("p", f"f32[N,{heads},{tokens},{tokens}]")
    v = b.input("v", f"f32[N,{heads},{tokens},{dim}]")
    return b.build(b.log2_matmul(p, v, **{**V_ATTRS, **attrs}))


def probabilities(rng, shape) -> np.ndarray:
    logits = rng.standard_normal(shape) * 3
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def fake_quant(p, v, bits, base_kind, scale, v_scale, v_zero_point, v_bits, base=2.0):
    return log2_quant_ref(p, bits, base_kind, base, scale, 16) @ quantize_uniform_ref(
        v, (v_scale,), (float(v_zero_point),), v_bits, -1
    )


# AdaLog bases 2^(p/16): 5/16 (16 residues), 8/16 (the log-sqrt2 levels as a table), 12/16 (4 residues)
KINDS = [("log2", 2.0), ("log_sqrt2", 2.0), ("adaptive", 2 ** (5 / 16)), ("adaptive", 2**0.5), ("adaptive", 2**0.75)]


@pytest.mark.parametrize("kind,base", KINDS)
def test_reference_is_the_fake_quant_product(rng, kind, base):
    p, v = probabilities(rng, (2, 3, 9, 9)), rng.standard_normal((2, 3, 9, 16)).astype(np.float32)
    y = log2_matmul_ref(p, v, 4, kind, 1.0, **V_ATTRS, base=base)
    ref = fake_quant(p, v, 4, kind, 1.0, **V_ATTRS, base=base)
    assert np.abs(y - ref).max() <= 1e-6 * np.abs(ref).max()


def test_reference_edges_one_powers_zero_below_and_odd_codes():
    v = np.float32([[1.0, -2.0], [3.0, 0.5], [-1.0, 4.0], [2.0, 2.0], [5.0, -5.0]])
    attrs = {"v_scale": 0.5, "v_zero_point": 0, "v_bits": 8, "v_signed": True}  # v_int = 2 v exactly
    # probability 1, exact powers of two, 0, below the smallest level (log-sqrt2 4-bit: 2^-7), one odd code
    p = np.float32([[1.0, 0.0, 0.0, 0.0, 0.0], [0.5, 0.25, 0.0, 2.0**-7, 2.0**-9], [0.0, 2**-0.5, 0, 0, 0]])
    y = log2_matmul_ref(p, v, 4, "log_sqrt2", 1.0, **attrs)
    np.testing.assert_array_equal(y[0], v[0])
    np.testing.assert_array_equal(y[1], 0.5 * v[0] + 0.25 * v[1] + 2.0**-7 * v[3])  # 2^-9 is the zero code
    np.testing.assert_array_equal(y[2], np.float32(np.float64(SQRT2) * 0.5 * v[1].astype(np.float64)))
    nan = log2_matmul_ref(np.float32([[np.nan, 1, 0, 0, 0], [1, 0, 0, 0, 0]]), v, 4, "log2", 1.0, **attrs)
    assert np.isnan(nan[0]).all() and not np.isnan(nan[1]).any()
    v_nan = v.copy()
    v_nan[4, 1] = np.nan  # a NaN in column 1 poisons that column for every row, as the float matmul does
    out = log2_matmul_ref(p, v_nan, 4, "log2", 1.0, **attrs)
    assert np.isnan(out[:, 1]).all() and not np.isnan(out[:, 0]).any()


def test_type_check_refuses_int32_overflow_and_adaptive():
    b = GraphBuilder("bad")
    p, v = b.input("p", "f32[N,197,197]"), b.input("v", "f32[N,197,64]")
    with pytest.raises(Exception, match="overflows the int32"):
        b.log2_matmul(p, v, bits=6, base_kind="log_sqrt2", **V_ATTRS)
    with pytest.raises(Exception, match="overflows the int32"):  # 6-bit base 2^(15/16): levels reach 2^-58
        b.log2_matmul(p, v, bits=6, base_kind="adaptive", base=2 ** (15 / 16), **V_ATTRS)
    with pytest.raises(Exception, match=r"adaptive base 1.3 must be 2\^\(p/16\)"):
        b.log2_matmul(p, v, bits=4, base_kind="adaptive", base=1.3, **V_ATTRS)
    with pytest.raises(Exception, match="base_kind"):
        b.log2_matmul(p, v, bits=4, base_kind="log10", **V_ATTRS)
    b.log2_matmul(p, v, bits=4, base_kind="log2", **V_ATTRS)  # 255 * 197 * 2^14 < 2^31
    b.log2_matmul(p, v, bits=4, base_kind="adaptive", base=2 ** (15 / 16), **V_ATTRS)  # 2^13


@pytest.mark.parametrize(
    "heads,tokens,dim,kind,scale,base",
    [
        (3, 1, 64, "log_sqrt2", 1.0, 2.0),
        (2, 7, 32, "log2", 1.0, 2.0),
        (6, 197, 64, "log_sqrt2", 1.0, 2.0),
        (1, 7, 5, "log_sqrt2", 0.5, 2.0),
        (2, 13, 32, "log_sqrt2", 0.8, 2.0),
        (2, 13, 32, "adaptive", 1.0, 2 ** (5 / 16)),
        (3, 37, 32, "adaptive", 0.9, 2**0.75),
        (1, 7, 5, "adaptive", 0.5, 2**0.5),
    ],
)
def test_compiled_kernel_is_bit_exact(rng, heads, tokens, dim, kind, scale, base):
    import reshift

    g = attention_graph(heads, tokens, dim, bits=4, base_kind=kind, scale=scale, base=base)
    p = probabilities(rng, (2, heads, tokens, tokens))
    v = (rng.standard_normal((2, heads, tokens, dim)) * 2).astype(np.float32)
    flat = p.reshape(-1)
    edges = np.float32([1.0, 0.0, -0.0, 0.5, 0.25, 2.0**-7, 2.0**-7.3, 2.0**-20, 2**-0.5, np.inf, -1.0, 1e-45])
    flat[: min(len(edges), flat.size)] = edges[: flat.size]
    p[1, 0, 0, 0] = np.nan
    v[1, -1, -1, -1] = np.nan
    v[0, 0, 0, :2] = [1e9, -1e9]  # saturates to the end codes
    out = reshift.compile(g, pipeline="none")(p, v)
    ref = ir.interpret(g, {"p": p, "v": v})[g.outputs[0].name]
    np.testing.assert_array_equal(out, ref)


def test_compiled_codes_match_log2_on_level_boundaries():
    """Codes from exponent/mantissa bits or threshold compares (no logarithm) agree with the reference's
    float64 log2 at every level and on both sides of every rounding threshold, for every kind."""
    import reshift

    centers = 2.0 ** -(np.arange(0, 40) / 4.0)  # levels and the thresholds between log-sqrt2 levels
    for a in (5 / 16, 12 / 16):  # the adaptive bases' levels and thresholds
        centers = np.concatenate([centers, 2.0 ** -(np.arange(0, 32) / 2.0 * a)])
    near = np.concatenate([np.nextafter(centers.astype(np.float32), 0), centers.astype(np.float32)])
    near = np.concatenate([near, np.nextafter(centers.astype(np.float32), 2)]).astype(np.float32)
    k = near.size
    for kind, base in KINDS:
        b = GraphBuilder("codes")
        p, v = b.input("p", f"f32[{k},{k}]"), b.input("v", f"f32[{k},16]")
        attrs = {"bits": 4, "base_kind": kind, "base": base, "v_scale": 1.0, "v_zero_point": 0, "v_bits": 2}
        g = b.build(b.log2_matmul(p, v, **attrs))
        eye = np.diag(near).astype(np.float32)  # row i picks level(near[i]) * v[i]
        vin = np.ones((k, 16), np.float32)
        out = reshift.compile(g, pipeline="none")(eye, vin)
        np.testing.assert_array_equal(out, ir.interpret(g, {"p": eye, "v": vin})[g.outputs[0].name])
        np.testing.assert_array_equal(out[:, 0], log2_quant_ref(near, 4, kind, base, 1.0, 16))


@pytest.mark.parametrize("kind,base", [("log_sqrt2", 2.0), ("adaptive", 2 ** (5 / 16))])
def test_cuda_build_of_the_portable_kernel(kind, base):
    """GPU targets take the TE reductions (one per accumulator class); here they are built, not run."""
    from reshift.codegen.tvm import build

    g = attention_graph(3, 37, 32, bits=4, base_kind=kind, base=base)
    cuda = build(g, "cuda-sm90")
    source = next(m for m in cuda.executable.mod.imports[0].imports if m.kind == "cuda").inspect_source()
    assert "__global__" in source and source.count("<<") >= 1  # the shifts survive into the device code


# -- 6- and 8-bit codes: the floor on the smallest level ---------------------------------------------
FLOORED = [(6, "log_sqrt2", 2.0), (8, "log2", 2.0), (6, "adaptive", 2 ** (15 / 16)), (8, "adaptive", 2 ** (5 / 16))]


@pytest.mark.parametrize("bits,kind,base", FLOORED)
def test_floor_drops_exactly_the_levels_past_it(rng, bits, kind, base):
    """With ``floor_exponent = W`` the reference is the fake-quant product with every level whose
    exponent passes ``W`` zeroed; those levels are below ``2^-W``, so the product moves by at most the
    dropped probability mass times max |v|."""
    from reshift.ir.ops_quant import last_kept_code, level_exponent, log_step

    p, v = probabilities(rng, (2, 2, 197, 197)), rng.standard_normal((2, 2, 197, 8)).astype(np.float32)
    floor = 15
    y = log2_matmul_ref(p, v, bits, kind, 1.0, **V_ATTRS, base=base, floor_exponent=floor)
    levels = log2_quant_ref(p, bits, kind, base, 1.0, 16)
    last = last_kept_code(bits, kind, base, 16, floor)
    assert level_exponent(last, kind, base, 16) <= floor < level_exponent(last + 1, kind, base, 16)
    kept = np.where(levels >= np.float32(2.0 ** (-last * log_step(kind, base, 16))), levels, 0)
    v_q = quantize_uniform_ref(v, (V_ATTRS["v_scale"],), (float(V_ATTRS["v_zero_point"]),), 8, -1)
    ref = kept @ v_q
    assert np.abs(y - ref).max() <= 1e-6 * np.abs(ref).max()
    dropped = (levels - kept).sum(-1, keepdims=True)  # per row
    full = levels @ v_q
    assert (np.abs(y - full) <= dropped * np.abs(v_q).max() * (1 + 1e-5) + 1e-6).all()
    assert 0 < dropped.max() < 197 * 2.0**-floor  # something was dropped, and little


def test_floor_type_check_and_pass_choice():
    from reshift.ir.ops_quant import largest_floor_exponent
    from reshift.passes.log2 import MIN_FLOOR_EXPONENT, floor_exponent_for

    assert largest_floor_exponent(8, 197) == 15 and largest_floor_exponent(8, 785) == 13
    assert 255 * 197 * 2**15 < 2**31 <= 255 * 197 * 2**16
    b = GraphBuilder("floor")
    p, v = b.input("p", "f32[N,197,197]"), b.input("v", "f32[N,197,64]")
    b.log2_matmul(p, v, bits=6, base_kind="log_sqrt2", floor_exponent=15, **V_ATTRS)
    with pytest.raises(Exception, match="set floor_exponent <= 15"):
        b.log2_matmul(p, v, bits=6, base_kind="log_sqrt2", floor_exponent=16, **V_ATTRS)
    with pytest.raises(Exception, match="must be -1"):
        b.log2_matmul(p, v, bits=4, base_kind="log_sqrt2", floor_exponent=-2, **V_ATTRS)
    four = {"bits": 4, "base_kind": "log_sqrt2", "base": 2.0, "table_size": 16}
    assert floor_exponent_for(four, 8, 197) is None  # 4-bit codes fit: no floor
    assert floor_exponent_for({**four, "bits": 6}, 8, 197) == 15
    assert floor_exponent_for({**four, "bits": 8}, 8, 40000) < MIN_FLOOR_EXPONENT  # the pass refuses that


@pytest.mark.parametrize("bits,kind,base", FLOORED)
def test_compiled_floored_kernel_is_bit_exact(rng, bits, kind, base):
    import reshift

    g = attention_graph(2, 197, 16, bits=bits, base_kind=kind, base=base, floor_exponent=15)
    p = probabilities(rng, (1, 2, 197, 197))
    p[0, 0, 0, :6] = [2.0**-15, 2.0**-15.4, 2.0**-16, 2.0**-15.6, 1.0, 0.0]  # around the floor
    v = (rng.standard_normal((1, 2, 197, 16)) * 2).astype(np.float32)
    out = reshift.compile(g, pipeline="none")(p, v)
    np.testing.assert_array_equal(out, ir.interpret(g, {"p": p, "v": v})[g.outputs[0].name])


def test_trainable_form_drops_the_levels_past_the_floor(rng):
    """The recovery module of a floored ``log2_matmul`` computes what the reference does."""
    import torch

    from reshift.codegen.torch import to_torch

    g = attention_graph(2, 37, 8, bits=8, base_kind="log2", floor_exponent=6)
    p, v = probabilities(rng, (2, 2, 37, 37)), rng.standard_normal((2, 2, 37, 8)).astype(np.float32)
    ref = ir.interpret(g, {"p": p, "v": v})[g.outputs[0].name]
    with torch.no_grad():
        out = next(iter(to_torch(g)({"p": p, "v": v}).values())).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    deeper = ir.interpret(attention_graph(2, 37, 8, bits=8, base_kind="log2", floor_exponent=17), {"p": p, "v": v})
    assert np.abs(next(iter(deeper.values())) - ref).max() > 0  # the floor at 2^-6 dropped something
