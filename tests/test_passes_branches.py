"""passes/branches.py (and the affine folds in fold.py): structural reparameterization.

Every rule has a positive case (merged, exact to 1e-5 relative) and negative cases (refused, with
the reason), a property test over random branch combinations, and the reference nets (RepVGG,
MobileOne, ACNet, DBB) whose training form must reach their deploy form's conv count.
The IR pads only with constants (conv2d with zeros, ``pad`` with one value): reflect/replicate
padding has no representation, so no rule can meet it.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from reshift import ir, passes
from tests.helpers import inputs_for, parse, refused, relative_error, run_exact

# -- identity branch ----------------------------------------------------------------------------
IDENTITY = """
graph g(%x: f32[N,4,6,6]) {
  const %w: f32[4,{cin},3,3] = ...
  %c: f32[N,4,6,6] = conv2d(%x, %w, _) {padding=[{pad}], dilation=[{dil}], groups={groups}} @conv
  %y: f32[N,4,6,6] = add(%c, %x) @add
  return %y
}
"""
BN_IDENTITY = """
graph g(%x: f32[N,4,6,6]) {
  const %w: f32[4,2,3,3] = ...
  const %b: f32[4] = ...
  const %s: f32[4] = [0.5, 1.5, 1.0, 2.0]
  const %t: f32[4] = [0.1, -0.2, 0.3, 0.0]
  const %m: f32[4] = [0.2, 0.1, -0.3, 0.5]
  const %v: f32[4] = [1.0, 0.5, 2.0, 0.7]
  %c: f32[N,4,6,6] = conv2d(%x, %w, %b) {padding=[1, 1, 1, 1], groups=2} @conv
  %n: f32[N,4,6,6] = batch_norm(%x, %s, %t, %m, %v) {eps=0.001} @bn
  %y: f32[N,4,6,6] = add(%n, %c) @add
  return %y
}
"""


def identity_graph(rng, groups=1, pad="1, 1, 1, 1", dil="1, 1"):
    text = IDENTITY.replace("{cin}", str(4 // groups)).replace("{pad}", pad).replace("{dil}", dil)
    return parse(text.replace("{groups}", str(groups)), rng)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_identity_branch_becomes_centre_tap(rng, groups):
    g2, report = run_exact(identity_graph(rng, groups), rng)
    assert g2.op_histogram() == {"conv2d": 1} and report.matches["merge_identity_into_conv"] == 1


def test_bn_identity_branch_on_grouped_conv(rng):
    g2, report = run_exact(parse(BN_IDENTITY, rng), rng)
    assert g2.op_histogram() == {"conv2d": 1} and report.matches["merge_bn_identity_into_conv"] == 1


def test_identity_off_centre_tap_is_still_exact(rng):
    g2, _ = run_exact(identity_graph(rng, pad="2, 0, 0, 2"), rng)
    assert g2.op_histogram() == {"conv2d": 1}


def test_identity_refused_when_no_tap_reads_x_in_place(rng):
    g2, report = run_exact(identity_graph(rng, pad="1, 1, 3, 3", dil="2, 2"), rng)
    assert "add" in g2.op_histogram() and "reads x in place" in refused(report, "merge_identity_into_conv")[0]


def test_identity_refused_when_conv_output_is_used_elsewhere(rng):
    text = IDENTITY.replace("return %y", "%z: f32[N,4,6,6] = relu(%c) @r\n  return %y, %z")
    text = text.replace("{cin}", "4").replace("{pad}", "1, 1, 1, 1").replace("{dil}", "1, 1").replace("{groups}", "1")
    g2, report = run_exact(parse(text, rng), rng)
    assert "add" in g2.op_histogram() and "also used by" in refused(report, "merge_identity_into_conv")[0]


# -- parallel convs -------------------------------------------------------------------------------
def parallel(k1, a1, k2, a2, out="6,6", cin1=4, cin2=4, c1=4):
    return f"""
graph g(%x: f32[N,{c1},6,6]) {{
  const %w1: f32[4,{cin1},{k1}] = ...
  const %w2: f32[4,{cin2},{k2}] = ...
  const %b2: f32[4] = ...
  %a: f32[N,4,{out}] = conv2d(%x, %w1, _) {{{a1}}} @conv_a
  %b: f32[N,4,{out}] = conv2d(%x, %w2, %b2) {{{a2}}} @conv_b
  %y: f32[N,4,{out}] = add(%a, %b) @add
  return %y
}}
"""


def test_repvgg_3x3_plus_1x1(rng):
    g2, report = run_exact(parse(parallel("3,3", "padding=[1, 1, 1, 1]", "1,1", ""), rng), rng)
    assert g2.op_histogram() == {"conv2d": 1} and report.matches["merge_parallel_convs"] == 1


def test_acnet_3x3_1x3_3x1_strided(rng):
    text = """
graph g(%x: f32[N,4,7,7]) {
  const %w: f32[4,4,3,3] = ...
  const %h: f32[4,4,1,3] = ...
  const %v: f32[4,4,3,1] = ...
  %a: f32[N,4,4,4] = conv2d(%x, %w, _) {stride=[2, 2], padding=[1, 1, 1, 1]} @sq
  %b: f32[N,4,4,4] = conv2d(%x, %h, _) {stride=[2, 2], padding=[0, 1, 0, 1]} @hor
  %c: f32[N,4,4,4] = conv2d(%x, %v, _) {stride=[2, 2], padding=[1, 0, 1, 0]} @ver
  %s: f32[N,4,4,4] = add(%a, %b) @add1
  %y: f32[N,4,4,4] = add(%s, %c) @add2
  return %y
}
"""
    g2, report = run_exact(parse(text, rng), rng)
    assert g2.op_histogram() == {"conv2d": 1} and report.matches["merge_parallel_convs"] == 2


def test_parallel_dense_and_grouped_nest(rng):
    g2, _ = run_exact(parse(parallel("3,3", "padding=[1, 1, 1, 1]", "1,1", "groups=2", cin2=2), rng), rng)
    assert g2.op_histogram() == {"conv2d": 1}


@pytest.mark.parametrize(
    "text, reason",
    [
        (parallel("3,3", "padding=[1, 1, 1, 1]", "3,3", "padding=[2, 2, 0, 0]"), "do not line up"),
        (parallel("3,3", "", "3,3", "stride=[2, 2], padding=[2, 2, 2, 2]", out="4,4"), "differ in stride"),
        (parallel("3,3", "padding=[1, 1, 1, 1]", "3,3", "padding=[2, 2, 2, 2], dilation=[2, 2]"), "differ in dilation"),
        (parallel("1,1", "groups=2", "1,1", "groups=3", cin1=3, cin2=2, c1=6), "do not nest"),
    ],
)
def test_parallel_convs_refused(rng, text, reason):
    text = text.replace("const %w1: f32[4,3,", "const %w1: f32[6,3,").replace("%a: f32[N,4,", "%a: f32[N,4,")
    if "groups=3" in text:  # 6 output channels so both groupings divide them
        text = text.replace("[4,", "[6,").replace("N,4,", "N,6,").replace("f32[4]", "f32[6]")
    g2, report = run_exact(parse(text, rng), rng)
    assert g2.op_histogram()["conv2d"] == 2
    assert any(reason in r for r in refused(report, "merge_parallel_convs")), report.refusals


def test_parallel_convs_refused_when_weight_is_shared(rng):
    text = parallel("3,3", "padding=[1, 1, 1, 1]", "1,1", "").replace(
        "return %y", "%z: f32[N,4,6,6] = conv2d(%x, %w1, _) {padding=[1, 1, 1, 1]} @other\n  return %y, %z"
    )
    g2, report = run_exact(parse(text, rng), rng)
    assert g2.op_histogram()["conv2d"] == 3
    assert any("also read by other" in r for r in refused(report, "merge_parallel_convs"))


# -- sequential 1x1 -> KxK (DBB) ------------------------------------------------------------------
def sequential(bias: str, pad_node: bool, pad_value: float = 0.0, conv_pad: str = "0, 0, 0, 0") -> str:
    mid_size = "8,8" if pad_node else "6,6"
    out = 6 if pad_node or conv_pad != "0, 0, 0, 0" else 4
    pad = (
        f"  %p: f32[N,3,{mid_size}] = pad(%h) {{pads=[0, 0, 1, 1, 0, 0, 1, 1], value={pad_value}}} @pad\n"
        if pad_node
        else ""
    )
    src = "%p" if pad_node else "%h"
    return f"""
graph g(%x: f32[N,2,6,6]) {{
  const %w1: f32[3,2,1,1] = ...
  const %b1: f32[3] = {bias}
  const %w2: f32[4,3,3,3] = ...
  %h: f32[N,3,6,6] = conv2d(%x, %w1, %b1) @one
{pad}  %y: f32[N,4,{out},{out}] = conv2d({src}, %w2, _) {{padding=[{conv_pad}]}} @kxk
  return %y
}}
"""


@pytest.mark.parametrize(
    "bias, pad_node, pad_value, conv_pad",
    [
        ("[0.0, 0.0, 0.0, 0.0]".replace(", 0.0]", "]"), False, 0.0, "1, 1, 1, 1"),
        ("[0.5, -1.0, 2.0]", False, 0.0, "0, 0, 0, 0"),
        ("[0.5, 0.5, 0.5]", True, 0.5, "0, 0, 0, 0"),
    ],
)
def test_sequential_1x1_kxk_merges(rng, bias, pad_node, pad_value, conv_pad):
    g2, report = run_exact(parse(sequential(bias, pad_node, pad_value, conv_pad), rng), rng)
    assert g2.op_histogram() == {"conv2d": 1}


@pytest.mark.parametrize(
    "bias, pad_node, pad_value, conv_pad, reason",
    [
        (
            "[0.5, -1.0, 2.0]",
            False,
            0.0,
            "1, 1, 1, 1",
            "zero padding after a biased 1x1 is not equal to padding its input",
        ),
        ("[0.5, -1.0, 2.0]", True, 0.5, "0, 0, 0, 0", "pad value 0.5 differs from the 1x1 bias"),
    ],
)
def test_sequential_1x1_kxk_refused(rng, bias, pad_node, pad_value, conv_pad, reason):
    g2, report = run_exact(parse(sequential(bias, pad_node, pad_value, conv_pad), rng), rng)
    assert g2.op_histogram()["conv2d"] == 2
    assert any(
        reason in r
        for rule in ("merge_sequential_convs", "merge_padded_sequential_convs")
        for r in refused(report, rule)
    )


def test_sequential_refuses_a_3x3_first_conv(rng):
    text = (
        sequential("[0.0, 0.0, 0.0]", False)
        .replace("f32[3,2,1,1]", "f32[3,2,3,3]")
        .replace("@one", "{padding=[1, 1, 1, 1]} @one")
    )
    g2, report = run_exact(parse(text, rng), rng)
    assert "only a stride-1 1x1 composes" in refused(report, "merge_sequential_convs")[0]


PADDED_1X1 = """
graph g(%x: f32[N,2,6,6]) {
  const %w1: f32[3,2,1,1] = ...
  const %b1: f32[3] = [0.5, -1.0, 2.0]
  const %w2: f32[4,3,3,3] = ...
  const %b2: f32[4] = ...
  %h: f32[N,3,8,8] = conv2d(%x, %w1, %b1) {padding=[1, 1, 1, 1]} @one
  %y: f32[N,4,OUT,OUT] = conv2d(%h, %w2, %b2) {padding=[KP, KP, KP, KP]} @kxk
  return %y
}
"""


def test_sequential_merges_a_padded_biased_1x1(rng):
    """DBB's BNAndPad exported as zero padding on the 1x1: its border is b1, the composed bias carries it."""
    g2, report = run_exact(parse(PADDED_1X1.replace("OUT", "6").replace("KP", "0"), rng), rng)
    assert g2.op_histogram() == {"conv2d": 1}
    assert g2.nodes[0].attrs["padding"] == (1, 1, 1, 1)


def test_sequential_refuses_a_padded_biased_1x1_before_a_padded_kxk(rng):
    """The KxK's own zero border is not the 1x1's bias border."""
    g2, report = run_exact(parse(PADDED_1X1.replace("OUT", "8").replace("KP", "1"), rng), rng)
    assert g2.op_histogram()["conv2d"] == 2
    assert "zero padding after a biased 1x1" in refused(report, "merge_sequential_convs")[0]


def test_sequential_refuses_a_padded_1x1_with_a_pad_node(rng):
    text = PADDED_1X1.replace("OUT", "8").replace("KP", "0")
    text = text.replace(
        "  %y: f32[N,4,8,8] = conv2d(%h,",
        "  %p: f32[N,3,10,10] = pad(%h) {pads=[0, 0, 1, 1, 0, 0, 1, 1], value=0.5} @pad\n"
        "  %y: f32[N,4,8,8] = conv2d(%p,",
    )
    g2, report = run_exact(parse(text, rng), rng)
    assert g2.op_histogram()["conv2d"] == 2
    assert "a pad node pads its output" in refused(report, "merge_padded_sequential_convs")[0]


# -- avg pool, offsets before a conv, affine after ------------------------------------------------
AVG = """
graph g(%x: f32[N,4,6,6]) {
  const %w: f32[4,4,1,1] = ...
  %h: f32[N,4,6,6] = conv2d(%x, %w, _) @one
  %y: f32[N,4,6,6] = avg_pool2d(%h) {kernel=[3, 3], padding=[1, 1, 1, 1], count_include_pad=COUNT} @pool
  return %y
}
"""


def test_avg_pool_after_1x1_merges(rng):
    g2, report = run_exact(parse(AVG.replace("COUNT", "true"), rng), rng)
    assert g2.op_histogram() == {"conv2d": 1} and report.matches["avg_pool_as_conv"] == 1


def test_avg_pool_without_pad_count_is_refused(rng):
    g2, report = run_exact(parse(AVG.replace("COUNT", "false"), rng), rng)
    assert "avg_pool2d" in g2.op_histogram()
    assert "count_include_pad" in refused(report, "avg_pool_as_conv")[0]


def test_standalone_avg_pool_stays(rng):
    text = """
graph g(%x: f32[N,4,6,6]) {
  %y: f32[N,4,3,3] = avg_pool2d(%x) {kernel=[2, 2], stride=[2, 2]} @pool
  return %y
}
"""
    g2, report = run_exact(ir.parse(text), rng)
    assert g2.op_histogram() == {"avg_pool2d": 1} and "plain pooling" in refused(report, "avg_pool_as_conv")[0]


OFFSET = """
graph g(%x: f32[N,4,6,6]) {
  const %c: f32[4,1,1] = [0.5, -1.0, 2.0, 0.25]
  const %w: f32[4,4,3,3] = ...
  %s: f32[N,4,6,6] = add(%x, %c) @shift
  %y: f32[N,4,OUT,OUT] = conv2d(%s, %w, _) {padding=[PAD]} @conv
  return %y
}
"""


def test_constant_added_before_unpadded_conv_is_a_bias(rng):
    g2, report = run_exact(parse(OFFSET.replace("OUT", "4").replace("PAD", "0, 0, 0, 0"), rng), rng)
    assert g2.op_histogram() == {"conv2d": 1} and report.matches["fold_add_before_conv"] == 1


def test_constant_added_before_padded_conv_is_refused(rng):
    g2, report = run_exact(parse(OFFSET.replace("OUT", "6").replace("PAD", "1, 1, 1, 1"), rng), rng)
    assert "add" in g2.op_histogram() and "no bias at the border" in refused(report, "fold_add_before_conv")[0]


def test_layer_scale_into_linear_and_refusal_across_tokens(rng):
    text = """
graph g(%x: f32[N,5,6]) {
  const %w: f32[6,6] = ...
  const %gamma: f32[6] = ...
  const %w2: f32[6,6] = ...
  const %tok: f32[5,1] = [1.0, 2.0, 3.0, 4.0, 5.0]
  %h: f32[N,5,6] = linear(%x, %w, _) @fc
  %y: f32[N,5,6] = mul(%gamma, %h) @ls
  %z: f32[N,5,6] = linear(%y, %w2, _) @fc2
  %o: f32[N,5,6] = mul(%z, %tok) @per_token
  return %o
}
"""
    g2, report = run_exact(parse(text, rng), rng)
    assert report.matches.get("fold_mul_into_linear") == 1
    reasons = refused(report, "fold_mul_into_linear")
    assert any("not per output channel" in r for r in reasons)
    shared = parse(text.replace("linear(%y, %w2, _)", "linear(%y, %w, _)"), rng)
    g3, report = run_exact(shared, rng)
    assert g3.op_histogram()["mul"] == 2 and "also read elsewhere" in refused(report, "fold_mul_into_linear")[0]


# -- linear merges ----------------------------------------------------------------------------------
def test_residual_and_parallel_linears(rng):
    text = """
graph g(%x: f32[N,6]) {
  const %w1: f32[6,6] = ...
  const %b1: f32[6] = ...
  const %w2: f32[6,6] = ...
  %a: f32[N,6] = linear(%x, %w1, %b1) @fa
  %b: f32[N,6] = linear(%x, %w2, _) @fb
  %s: f32[N,6] = add(%a, %b) @sum
  %y: f32[N,6] = add(%x, %s) @res
  return %y
}
"""
    g2, report = run_exact(parse(text, rng), rng)
    assert g2.op_histogram() == {"linear": 1}
    assert report.matches["merge_parallel_linears"] == 1 and report.matches["merge_residual_linear"] == 1


SEQ_LINEAR = """
graph g(%x: f32[N,8]) {
  const %w1: f32[HID,8] = ...
  const %b1: f32[HID] = ...
  const %w2: f32[8,HID] = ...
  %h: f32[N,HID] = linear(%x, %w1, %b1) @fc1
  %y: f32[N,8] = linear(%h, %w2, _) @fc2
  return %y
}
"""


def test_sequential_linears_merge_unless_low_rank(rng):
    g2, _ = run_exact(parse(SEQ_LINEAR.replace("HID", "16"), rng), rng)
    assert g2.op_histogram() == {"linear": 1}
    g3, report = run_exact(parse(SEQ_LINEAR.replace("HID", "2"), rng), rng)
    assert g3.op_histogram() == {"linear": 2}
    assert "low-rank" in refused(report, "merge_sequential_linears")[0]


def test_deit_averaged_heads_fold_the_half(rng):
    text = """
graph g(%x1: f32[N,6], %x2: f32[N,6]) {
  const %w1: f32[3,6] = ...
  const %b1: f32[3] = ...
  const %w2: f32[3,6] = ...
  const %two: f32[] = [2.0]
  %a: f32[N,3] = linear(%x1, %w1, %b1) @head
  %b: f32[N,3] = linear(%x2, %w2, _) @head_dist
  %s: f32[N,3] = add(%a, %b) @sum
  %y: f32[N,3] = div(%s, %two) @avg
  return %y
}
"""
    g2, report = run_exact(parse(text, rng), rng)
    assert g2.op_histogram() == {"linear": 2, "add": 1} and report.matches["fold_averaged_heads"] == 1


# -- property: random branch combinations are merged exactly or refused ---------------------------
@st.composite
def branch_sets(draw):
    channels = draw(st.sampled_from([4, 6]))
    size = draw(st.integers(5, 8))
    stride = draw(st.sampled_from([1, 2]))
    branches = []
    for _ in range(draw(st.integers(2, 3))):
        kh, kw = draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([1, 3, 5]))
        pads = [draw(st.integers(0, 2)) for _ in range(4)]
        groups = draw(st.sampled_from([g for g in (1, 2, 3) if channels % g == 0]))
        branch_stride = stride if draw(st.booleans()) else draw(st.sampled_from([1, 2]))
        branches.append((kh, kw, pads, groups, branch_stride, draw(st.booleans()), draw(st.booleans())))
    identity = draw(st.sampled_from([None, "x", "bn"]))
    return channels, size, branches, identity, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(branch_sets())
def test_random_branches_merge_exactly_or_refuse(case):
    channels, size, branches, identity, seed = case
    rng = np.random.default_rng(seed)
    b = ir.GraphBuilder("branches")
    x = b.input("x", f"f32[N,{channels},{size},{size}]")
    outs = []

    def bn(v):
        p = [
            rng.random(channels) + 0.5,
            rng.standard_normal(channels),
            rng.standard_normal(channels),
            rng.random(channels) + 0.5,
        ]
        return b.batch_norm(v, *(b.constant(a.astype(np.float32)) for a in p), eps=1e-3)

    target = None
    for kh, kw, pads, groups, stride, bias, with_bn in branches:
        if target is not None:  # pick bottom/right padding so the branch output size matches
            for axis, k in ((0, kh), (1, kw)):
                fits = [p for p in range(5) if (size + pads[axis] + p - k) // stride + 1 == target]
                assume(fits)
                pads[axis + 2] = fits[0]
        w = b.constant(rng.standard_normal((channels, channels // groups, kh, kw)).astype(np.float32))
        bv = b.constant(rng.standard_normal(channels).astype(np.float32)) if bias else None
        try:
            y = b.conv2d(x, w, bv, stride=(stride, stride), padding=tuple(pads), groups=groups)
        except Exception:
            assume(False)
        assume(y.type.shape[2] == y.type.shape[3])
        target = y.type.shape[2]
        outs.append(bn(y) if with_bn else y)
    assume(len({v.type for v in outs}) == 1)
    if identity is not None:
        assume(outs[0].type == x.type)
        outs.append(x if identity == "x" else bn(x))
    total = outs[0]
    for v in outs[1:]:
        total = b.add(total, v)
    g = b.build(total)
    g2, report = passes.run(g, "exact")
    xs = inputs_for(g, rng)
    assert relative_error(ir.interpret(g2, xs)[total.name], ir.interpret(g, xs)[total.name]) < 1e-5
    same = len({(s, tuple(p), gr, k) for k, _, p, gr, s, _, _ in branches}) == 1 and identity is None
    if same:  # identical layouts always line up
        assert g2.op_histogram()["conv2d"] == 1


# -- reference nets: training form reaches the deploy form's conv count, exactly --------------------
def _conv_count(graph) -> int:
    return graph.op_histogram().get("conv2d", 0)


def _deploy_mobileone():
    from examples.models import MODELS, mobileone_to_deploy

    return mobileone_to_deploy(copy.deepcopy(MODELS["mobileone_s0"].build()))


@pytest.mark.parametrize(
    "train, deploy, size",
    [
        ("repvgg_a0_train", "repvgg_a0_deploy", 64),
        ("repvgg_grouped_stage", "repvgg_grouped_stage_deploy", 32),
        ("mobileone_s0", "mobileone_deploy", 64),
        ("acnet_train", "acnet_deploy", 32),
        ("dbb_train", "dbb_deploy", 16),
    ],
)
def test_reference_net_reaches_deploy_form(train, deploy, size):
    import torch

    from examples.models import MODELS, repvgg_grouped_stage
    from reshift import frontend

    spec = MODELS[train]
    model = spec.build()
    x = spec.example_inputs(2)[0]
    if x.shape[-1] != size:
        x = torch.randn(2, x.shape[1], size, size, generator=torch.Generator().manual_seed(0))
    if deploy == "mobileone_deploy":
        deployed = _deploy_mobileone()
    elif deploy == "repvgg_grouped_stage_deploy":
        deployed = repvgg_grouped_stage(deploy=True)
    else:
        deployed = MODELS[deploy].build()
    g = frontend.from_torch(model, (x,))
    g2, report = passes.run(g, "exact")
    assert _conv_count(g2) == _conv_count(frontend.from_torch(deployed, (x,)))
    assert "batch_norm" not in g2.op_histogram() and "avg_pool2d" not in g2.op_histogram()
    xs = {g.inputs[0].name: x.numpy()}
    out = ir.interpret(g2, xs)[g2.outputs[0].name]
    assert relative_error(out, ir.interpret(g, xs)[g.outputs[0].name]) < 1e-5
    with torch.no_grad():
        assert relative_error(out, model(x).numpy()) < 1e-5
