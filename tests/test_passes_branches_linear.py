"""passes/branches_linear.py (+ the BN rules in branches.py): RePaViT idle channels, DeiT heads,
parallel-branch fusion, BatchNorm before a layer and after a sum of branches.

Positive cases merge exactly (1e-5 relative, reference interpreter); negative cases refuse with the
reason in the report. The RePaViT block and DeiT-S (distilled) reach their deploy form's linear count.
"""

from __future__ import annotations

import numpy as np
import pytest

from reshift import ir, passes
from tests.helpers import parse, refused, relative_error, run_exact

# -- RePaViT: idle channels of an FFN fold into a linear shortcut merged with the residual ----------
FFN = """
graph g(%x: f32[N,5,8]) {
  const %w1: f32[32,8] = ...
  const %b1: f32[32] = ...
  const %perm: i64[32] = PERM
  const %w2: f32[8,32] = ...
  const %b2: f32[8] = ...
  %h: f32[N,5,32] = linear(%x, %w1, %b1) @fc1
  %p: f32[N,5,32] = gather(%h, %perm) {axis=2} @perm
  %a: f32[N,5,8] = slice(%p) {starts=[0], ends=[8], axes=[2], steps=[1]} @active
  %i: f32[N,5,24] = slice(%p) {starts=[8], ends=[32], axes=[2], steps=[1]} @idle
  %g: f32[N,5,8] = gelu(%a) @act
  %c: f32[N,5,32] = concat(%g, IDLE) {axis=2} @cat
  %f: f32[N,5,8] = linear(%c, %w2, %b2) @fc2
  %y: f32[N,5,8] = add(%f, %x) @residual
  return %y
}
"""


def ffn(rng, idle="%i", extra="", perm=None):
    perm = rng.permutation(32) if perm is None else perm
    text = FFN.replace("PERM", str(list(map(int, perm)))).replace("IDLE", idle)
    if extra:
        text = text.replace("  return %y", extra + "\n  return %y, %z")
    return parse(text, rng)


def test_idle_channels_fold_into_the_residual(rng):
    g2, report = run_exact(ffn(rng), rng)
    assert g2.op_histogram()["linear"] == 2 and "gather" not in g2.op_histogram()  # [fc1a | shortcut] + fc2a
    assert report.matches["fold_idle_channels"] == 1 and report.matches["merge_residual_linear_in_sum"] == 1
    assert report.matches["fuse_parallel_branches"] == 1
    assert g2.op_histogram()["gelu"] == 1


def test_idle_channels_through_a_split(rng):
    text = FFN.replace("PERM", "[0]").replace("IDLE", "%i")
    text = text.replace("  const %perm: i64[32] = [0]\n", "").replace(
        "  %p: f32[N,5,32] = gather(%h, %perm) {axis=2} @perm\n"
        "  %a: f32[N,5,8] = slice(%p) {starts=[0], ends=[8], axes=[2], steps=[1]} @active\n"
        "  %i: f32[N,5,24] = slice(%p) {starts=[8], ends=[32], axes=[2], steps=[1]} @idle\n",
        "  %a: f32[N,5,8], %i: f32[N,5,24] = split(%h) {axis=-1, sizes=[8, 24]} @split\n",
    )
    g2, report = run_exact(parse(text, rng), rng)
    assert report.matches["fold_idle_channels"] == 1 and g2.op_histogram()["linear"] == 2


def test_idle_channels_refused_when_the_idle_part_is_used_elsewhere(rng):
    g2, report = run_exact(ffn(rng, extra="  %z: f32[N,5,24] = relu(%i) @spy"), rng)
    assert "gather" in g2.op_histogram()
    assert "cannot leave the FFN" in refused(report, "fold_idle_channels")[0]


def test_idle_channels_refused_when_every_part_is_activated(rng):
    text = FFN.replace("IDLE", "%j").replace("  %c:", "  %j: f32[N,5,24] = gelu(%i) @act2\n  %c:")
    g2, report = run_exact(parse(text.replace("PERM", str(list(range(32)))), rng), rng)
    assert g2.op_histogram()["gelu"] == 2
    assert "no idle channel" in refused(report, "fold_idle_channels")[0]


def test_idle_channels_refused_when_fc1_weight_is_shared(rng):
    g2, report = run_exact(ffn(rng, extra="  %z: f32[N,5,32] = linear(%x, %w1, _) @other"), rng)
    assert "gather" in g2.op_histogram()
    assert "also read by other" in refused(report, "fold_idle_channels")[0]


def test_idle_channels_refused_when_low_rank(rng):
    text = FFN.replace("PERM", str(list(range(32)))).replace("IDLE", "%i")
    text = text.replace("ends=[8]", "ends=30").replace("starts=[8]", "starts=[30]")
    text = text.replace("ends=30", "ends=[30]").replace("f32[N,5,8] = slice", "f32[N,5,30] = slice")
    text = text.replace("f32[N,5,24] = slice", "f32[N,5,2] = slice").replace("%g: f32[N,5,8]", "%g: f32[N,5,30]")
    g2, report = run_exact(parse(text, rng), rng)
    assert "cost less than one merged" in refused(report, "fold_idle_channels")[0]


# -- DeiT: two heads on two tokens -> one head ------------------------------------------------------
HEADS = """
graph g(%t: f32[N,4,6]) {
  const %i0: i64[] = [A]
  const %i1: i64[] = [B]
  const %w1: f32[3,6] = ...
  const %b1: f32[3] = ...
  const %w2: f32[3,6] = ...
  const %b2: f32[3] = ...
  const %two: f32[] = [2.0]
  %x0: f32[N,6] = gather(%t, %i0) {axis=1} @cls
  %x1: f32[N,6] = gather(%t, %i1) {axis=1} @dist
  %a: f32[N,3] = linear(%x0, %w1, %b1) @head
  %b: f32[N,3] = linear(%x1, %w2, %b2) @head_dist
  %s: f32[N,3] = add(%a, %b) @sum
  %y: f32[N,3] = div(%s, %two) @avg
  return %y
}
"""


@pytest.mark.parametrize("a, b, picker", [(0, 1, "slice"), (1, 0, "slice"), (0, 3, "gather"), (-4, -1, "gather")])
def test_token_heads_become_one_head(rng, a, b, picker):
    g2, report = run_exact(parse(HEADS.replace("[A]", f"[{a}]").replace("[B]", f"[{b}]"), rng), rng)
    assert g2.op_histogram() == {"linear": 1, picker: 1, "reshape": 1}
    assert report.matches["merge_token_heads"] == 1


def test_token_heads_refused_on_the_same_token(rng):
    g2, report = run_exact(parse(HEADS.replace("[A]", "[1]").replace("[B]", "[1]"), rng), rng)
    assert g2.op_histogram()["linear"] == 2 and "same token" in refused(report, "merge_token_heads")[0]


# -- parallel-branch fusion ------------------------------------------------------------------------
QKV = """
graph g(%x: f32[N,5,8]) {
  const %wq: f32[8,8] = ...
  const %wk: f32[8,8] = ...
  const %bk: f32[8] = ...
  const %wv: f32[4,8] = ...
  %q: f32[N,5,8] = linear(%x, %wq, _) @q
  %k: f32[N,5,8] = linear(%x, %wk, %bk) @k
  %v: f32[N,5,4] = linear(%x, %wv, _) @v
  OUT
}
"""


def test_parallel_linears_become_one_wide_linear_and_split(rng):
    out = "%s: f32[N,5,8] = mul(%q, %k) @qk\n  %r: f32[N,5,4] = relu(%v) @r\n  return %s, %r"
    g2, report = run_exact(parse(QKV.replace("OUT", out), rng), rng)
    assert g2.op_histogram() == {"linear": 1, "split": 1, "mul": 1, "relu": 1}


def test_parallel_linears_concatenated_back_need_no_split(rng):
    out = "%c: f32[N,5,20] = concat(%q, %k, %v) {axis=-1} @cat\n  return %c"
    g2, report = run_exact(parse(QKV.replace("OUT", out), rng), rng)
    assert g2.op_histogram() == {"linear": 1} and report.matches["remove_concat_of_split"] == 1


CONVS = """
graph g(%x: f32[N,4,6,6]) {
  const %w1: f32[4,4,3,3] = ...
  const %w2: f32[6,4,KERNEL] = ...
  %a: f32[N,4,6,6] = conv2d(%x, %w1, _) {padding=[1, 1, 1, 1]} @a
  %b: f32[N,6,6,6] = conv2d(%x, %w2, _) {padding=[PAD]} @b
  %c: f32[N,10,6,6] = concat(%a, %b) {axis=1} @cat
  return %c
}
"""


def test_parallel_convs_concatenated_become_one_conv(rng):
    g2, _ = run_exact(parse(CONVS.replace("KERNEL", "3,3").replace("PAD", "1, 1, 1, 1"), rng), rng)
    assert g2.op_histogram() == {"conv2d": 1}


def test_parallel_convs_with_other_kernels_are_refused(rng):
    g2, report = run_exact(parse(CONVS.replace("KERNEL", "1,1").replace("PAD", "0, 0, 0, 0"), rng), rng)
    assert g2.op_histogram()["conv2d"] == 2
    assert "differ in kernel/attrs" in refused(report, "fuse_parallel_branches")[0]


# -- BatchNorm before a layer and after a sum of branches -------------------------------------------
BN_PARAMS = """
  const %s: f32[4] = [0.5, 1.5, 1.0, 2.0]
  const %t: f32[4] = [0.1, -0.2, 0.3, 0.0]
  const %m: f32[4] = [0.2, 0.1, -0.3, 0.5]
  const %v: f32[4] = [1.0, 0.5, 2.0, 0.7]
"""
BN_BEFORE_CONV = f"""
graph g(%x: f32[N,4,6,6]) {{{BN_PARAMS}
  const %w: f32[6,2,3,3] = ...
  %n: f32[N,4,6,6] = batch_norm(%x, %s, %t, %m, %v) {{eps=0.001}} @bn
  %y: f32[N,6,OUT,OUT] = conv2d(%n, %w, _) {{padding=[PAD], groups=2}} @conv
  %z: f32[N,4,6,6] = relu(%n) @other
  return %y, %z
}}
"""


def test_bn_before_unpadded_grouped_conv_folds(rng):
    g2, report = run_exact(parse(BN_BEFORE_CONV.replace("OUT", "4").replace("PAD", "0, 0, 0, 0"), rng), rng)
    assert report.matches["fold_bn_before_conv"] == 1 and g2.op_histogram()["batch_norm"] == 1  # relu keeps it


def test_bn_before_padded_conv_is_refused(rng):
    g2, report = run_exact(parse(BN_BEFORE_CONV.replace("OUT", "6").replace("PAD", "1, 1, 1, 1"), rng), rng)
    assert "no bias at the border" in refused(report, "fold_bn_before_conv")[0]


def test_bn_after_a_sum_of_unmergeable_convs_folds_into_both(rng):
    text = f"""
graph g(%x: f32[N,4,6,6]) {{{BN_PARAMS}
  const %w1: f32[4,4,3,3] = ...
  const %w2: f32[4,4,3,3] = ...
  %a: f32[N,4,6,6] = conv2d(%x, %w1, _) {{padding=[1, 1, 1, 1]}} @a
  %b: f32[N,4,6,6] = conv2d(%x, %w2, _) {{padding=[2, 2, 2, 2], dilation=[2, 2]}} @b
  %c: f32[N,4,6,6] = add(%a, %b) @sum
  %y: f32[N,4,6,6] = batch_norm(%c, %s, %t, %m, %v) {{eps=0.001}} @bn
  return %y
}}
"""
    g2, report = run_exact(parse(text, rng), rng)
    assert "batch_norm" not in g2.op_histogram() and report.matches["fold_bn_after_conv_sum"] == 1


# -- reference nets ---------------------------------------------------------------------------------
def _linears(graph) -> int:
    return graph.op_histogram().get("linear", 0)


@pytest.mark.parametrize(
    "factory, kwargs, shape",
    [
        ("repavit", {"dim": 32, "num_heads": 2, "depth": 2}, (2, 9, 32)),
        ("deit", {"depth": 1, "img_size": 32, "num_classes": 10}, (2, 3, 32, 32)),
    ],
)
def test_transformer_reaches_deploy_form(factory, kwargs, shape):
    import torch

    from examples.models.deit import deit_s_distilled
    from examples.models.repavit import repavit_block
    from reshift import frontend

    build = {"repavit": repavit_block, "deit": deit_s_distilled}[factory]
    model, deployed = build(**kwargs), build(**kwargs, deploy=True)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    g, gd = frontend.from_torch(model, (x,)), frontend.from_torch(deployed, (x,))
    g2, report = passes.run(g, "exact")
    gd2, _ = passes.run(gd, "exact")
    # fuse_parallel_branches then puts fc1a and the shortcut (both read x) in one GEMM in both forms
    assert _linears(g2) == _linears(gd2) <= _linears(gd) < _linears(g) + (factory == "repavit") * kwargs["depth"] + 1
    assert "batch_norm" not in g2.op_histogram()
    xs = {g.inputs[0].name: x.numpy()}
    out = ir.interpret(g2, xs)[g2.outputs[0].name]
    with torch.no_grad():
        assert relative_error(out, model(x).numpy()) < 1e-5
        assert relative_error(out, deployed(x).numpy()) < 1e-5


def test_fused_repvgg_compiled_with_tvm_matches_training_form():
    """The reshift artifact (TVM, CPU) of the fused RepVGG-A0 agrees with the training form."""
    import torch

    from examples.models import MODELS
    from reshift import api

    pytest.importorskip("tvm")
    model = MODELS["repvgg_a0_train"].build()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    compiled = api.compile(model, (x,), target="cpu", pipeline="exact")
    assert "batch_norm" not in compiled.graph.op_histogram()
    out = compiled(x.numpy())
    out = out[0] if isinstance(out, (list, tuple)) else out
    with torch.no_grad():
        assert relative_error(np.asarray(out), model(x).numpy()) < 1e-5
