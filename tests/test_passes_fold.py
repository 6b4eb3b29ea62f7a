"""passes/fold.py and the pass machinery: every rule with positive and negative cases."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from reshift import ir, passes
from reshift.errors import PassError
from reshift.passes import Any, Const, Op, Rule, apply_rules
from reshift.passes.pattern import match


def bn_params(rng, c):
    return dict(
        scale=(rng.random(c) + 0.5).astype(np.float32),
        shift=rng.standard_normal(c).astype(np.float32),
        mean=rng.standard_normal(c).astype(np.float32),
        var=(rng.random(c) + 0.2).astype(np.float32),
    )


def conv_bn_graph(rng, *, bias=True, extra_use=False):
    b = ir.GraphBuilder("conv_bn")
    x = b.input("x", "f32[N,3,8,8]")
    w = b.constant(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    bias_v = b.constant(rng.standard_normal(4).astype(np.float32), "b") if bias else None
    y = b.conv2d(x, w, bias_v, padding=(1, 1, 1, 1), name="conv")
    p = bn_params(rng, 4)
    z = b.batch_norm(y, *(b.constant(p[k], k) for k in ("scale", "shift", "mean", "var")), eps=1e-3, name="bn")
    outs = [b.relu(z)] + ([b.sigmoid(y)] if extra_use else [])
    return b.build(*outs)


def random_inputs(graph, rng, batch=2):
    return {v.name: rng.standard_normal(v.type.concrete_shape({"N": batch})).astype(np.float32) for v in graph.inputs}


@pytest.mark.parametrize("bias", [True, False])
def test_fold_batch_norm_into_conv_is_exact(rng, bias):
    g = conv_bn_graph(rng, bias=bias)
    g2, report = passes.run(g, "exact", inputs=random_inputs(g, rng))
    assert g2.op_histogram() == {"conv2d": 1, "relu": 1}
    assert report.matches["fold_batch_norm_into_conv"] == 1
    assert report.max_error < 1e-5
    xs = random_inputs(g, rng, batch=3)
    np.testing.assert_allclose(ir.interpret(g2, xs)["relu_0"], ir.interpret(g, xs)["relu_0"], rtol=1e-5, atol=1e-5)


def test_fold_batch_norm_refuses_when_conv_output_is_shared(rng):
    g = conv_bn_graph(rng, extra_use=True)
    g2, report = passes.run(g, "exact")
    assert g2.op_histogram()["batch_norm"] == 1
    reasons = [r.reason for r in report.refusals if r.rule == "fold_batch_norm_into_conv"]
    assert reasons and "also used by" in reasons[0]


def test_fold_batch_norm_into_linear_only_on_feature_axis(rng):
    p = bn_params(rng, 4)
    for shape, expect_fold in (("f32[N,6]", True), ("f32[N,4,6]", False)):
        b = ir.GraphBuilder()
        x = b.input("x", shape)
        y = b.linear(x, b.constant(rng.standard_normal((4, 6)).astype(np.float32)), None)
        if not expect_fold:  # BatchNorm1d on [N, 4, C] normalizes axis 1, of size 4
            y = b.linear(x, b.constant(rng.standard_normal((4, 6)).astype(np.float32)), None)
        z = b.batch_norm(y, *(b.constant(p[k]) for k in ("scale", "shift", "mean", "var")), name="bn")
        g = b.build(z)
        g2, report = passes.run(g, "exact", inputs=random_inputs(g, rng))
        assert ("batch_norm" not in g2.op_histogram()) == expect_fold
        if expect_fold:
            assert report.max_error < 1e-5
        else:
            assert any("rank-3" in r.reason for r in report.refusals)


NOOPS = """
graph noops(%x: f32[N,4]) {
  const %zero: f32[4] = [0.0, 0.0, 0.0, 0.0]
  const %one: f32[] = [1.0]
  const %two: f32[] = [2.0]
  %a: f32[N,4] = identity(%x) @a
  %b: f32[N,4] = add(%zero, %a) @b
  %c: f32[N,4] = mul(%b, %one) @c
  %d: f32[N,4] = reshape(%c) {shape=[N, 4]} @d
  %e: f32[N,4] = transpose(%d) {perm=[0, 1]} @e
  %f: f32[N,4] = cast(%e) {dtype="float32"} @f
  %g: f32[N,4] = mul(%f, %two) @g
  %h: f32[4,N] = transpose(%g) {perm=[1, 0]} @h
  return %h
}
"""


def test_remove_noops_keeps_real_ops(rng):
    g = ir.parse(NOOPS)
    g2, report = passes.run(g, "exact", inputs=random_inputs(g, rng))
    assert g2.op_histogram() == {"mul": 1, "transpose": 1}
    assert report.max_error == 0.0
    assert not report.refusals  # a node that is not a no-op is not news


def test_noop_checks_say_why_not():
    from reshift.passes.fold import NOOP_RULES

    g = ir.parse(NOOPS)
    stats = apply_rules(g, [replace(rule, report_refusals=True) for rule in NOOP_RULES])
    refused = {r.rule: r.reason for r in stats.refusals}
    assert "not all 1.0" in refused["remove_mul_one"] and "moves axes" in refused["remove_identity_transpose"]


def test_noop_removal_keeps_graph_output_names():
    g = ir.parse("graph g(%x: f32[2]) {\n %y: f32[2] = relu(%x) @r\n %out: f32[2] = identity(%y) @i\n return %out\n}")
    g2, _ = passes.run(g, "exact")
    assert [v.name for v in g2.outputs] == ["out"] and g2.op_histogram() == {"relu": 1}


def test_noop_on_input_feeding_output_is_refused():
    g = ir.parse("graph g(%x: f32[2]) {\n %out: f32[2] = identity(%x) @i\n return %out\n}")
    g2, report = passes.run(g, "exact")
    assert g2.op_histogram() == {"identity": 1}
    assert any("graph output" in r.reason for r in report.refusals)


def test_constant_folding_and_dead_code():
    g = ir.parse(
        "graph g(%x: f32[N,3]) {\n"
        " const %a: f32[3] = [1.0, 2.0, 3.0]\n"
        " const %unused: f32[1] = [5.0]\n"
        " %a2: f32[3] = mul(%a, %a) @sq\n"
        " %a3: f32[3] = neg(%a2) @ng\n"
        " %dead: f32[N,3] = exp(%x) @dead\n"
        " %y: f32[N,3] = add(%x, %a3) @add\n"
        " return %y\n}"
    )
    g2, report = passes.run(g, "exact")
    assert g2.op_histogram() == {"add": 1}
    folded = [c.data for c in g2.constants.values()]
    assert len(folded) == 1 and np.array_equal(folded[0], [-1.0, -4.0, -9.0])
    assert report.matches["fold_constants"] == 2


def test_constant_folding_refuses_blow_up():
    g = ir.parse(
        "graph g(%x: f32[2048,2048]) {\n const %a: f32[1] = [1.0]\n"
        " %b: f32[2048,2048] = expand(%a) {shape=[2048, 2048]} @big\n"
        " %y: f32[2048,2048] = add(%x, %b) @add\n return %y\n}"
    )
    g2, report = passes.run(g, "exact")
    assert "expand" in g2.op_histogram()
    assert any("elements" in r.reason for r in report.refusals)


def test_pattern_binds_repeated_names_to_one_value():
    pattern = Op("add", Op("relu", Any("x"), name="r1"), Op("exp", Any("x"), name="r2"))
    same = ir.parse(
        "graph g(%x: f32[2]) {\n %a: f32[2] = relu(%x) @a\n %b: f32[2] = exp(%x) @b\n"
        " %c: f32[2] = add(%a, %b) @c\n return %c\n}"
    )
    other = ir.parse(
        "graph g(%x: f32[2], %y: f32[2]) {\n %a: f32[2] = relu(%x) @a\n %b: f32[2] = exp(%y) @b\n"
        " %c: f32[2] = add(%a, %b) @c\n return %c\n}"
    )
    assert match(pattern, same.nodes[-1], same.producers()) is not None
    assert match(pattern, other.nodes[-1], other.producers()) is None


def test_rule_check_reason_is_reported():
    rule = Rule("never", Op("relu", Any("x")), lambda m, g: "relu is sacred", lambda m, ctx: m["x"])
    g = ir.parse("graph g(%x: f32[2]) {\n %a: f32[2] = relu(%x) @a\n %b: f32[2] = exp(%a) @b\n return %b\n}")
    stats = apply_rules(g, [rule])
    assert not stats.changed and stats.refusals[0].reason == "relu is sacred"


def test_const_pattern_needs_a_constant():
    g = ir.parse("graph g(%x: f32[2], %y: f32[2]) {\n %a: f32[2] = add(%x, %y) @a\n return %a\n}")
    assert match(Op("add", Any("x"), Const("c"), commutative=True), g.nodes[0], g.producers()) is None


def test_unknown_pipeline_is_a_clear_error():
    with pytest.raises(PassError, match="unknown pipeline 'turbo'"):
        passes.run(ir.parse("graph g(%x: f32[2]) {\n return %x\n}"), "turbo")


def test_run_does_not_mutate_its_input(rng):
    g = conv_bn_graph(rng)
    before = ir.print_graph(g)
    passes.run(g, "exact")
    assert ir.print_graph(g) == before
