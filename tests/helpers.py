"""Helpers shared by the pass tests: graphs from text with random weights, exact-pipeline runs."""

from __future__ import annotations

import re

import numpy as np

from reshift import ir, passes

# a small two-output artifact the runtime tests load, corrupt and serve over RPC
TWO_HEADS = """
graph two_heads(%x: f32[N,4], %bias: f32[3]) {
  const %w: f32[3,4] = [0.5, -1.0, 0.25, 2.0, 1.0, 0.0, -0.5, 0.75, -2.0, 1.5, 0.125, -0.25]
  %y: f32[N,3] = linear(%x, %w, %bias) @fc
  %r: f32[N,3] = relu(%y) @act
  %s: f32[N,3] = sigmoid(%y) @gate
  return %r, %s
}
"""
CONST = re.compile(r"const %(\w+): f32\[([\d,]*)\] = \.\.\.")


def parse(text: str, rng, **overrides) -> ir.Graph:
    """The text form with every ``...`` constant filled with random weights (or ``overrides``)."""
    weights = {}
    for name, shape in CONST.findall(text):
        dims = tuple(int(d) for d in shape.split(",") if d)
        weights[name] = overrides.get(name, rng.standard_normal(dims).astype(np.float32))
    return ir.parse(text, weights=weights)


def inputs_for(graph, rng, batch=2):
    return {v.name: rng.standard_normal(v.type.concrete_shape({"N": batch})).astype(np.float32) for v in graph.inputs}


def relative_error(a, b) -> float:
    """max|a - b| / max|b| in float64."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a64 - b64)) / max(np.max(np.abs(b64)), 1e-30))


def run_exact(graph, rng):
    """Run the exact pipeline and check the result against the original on a batch of 2."""
    g2, report = passes.run(graph, "exact")
    xs = inputs_for(graph, rng)
    ref, out = ir.interpret(graph, xs), ir.interpret(g2, xs)
    for name in ref:
        assert relative_error(out[name], ref[name]) < 1e-5, name
    return g2, report


def refused(report, rule: str) -> list[str]:
    return [r.reason for r in report.refusals if r.rule == rule]


def random_shift_conv(b, rng, x, cin: int, cout: int, k: int, levels: int, bits: int, groups: int = 1, **window):
    """A ``shift_conv2d`` of ``x`` with random codes (signs in {-1,0,1}, exponents below ``levels``), scales
    and bias; ``window``: stride, padding, dilation."""
    shape = (cout, cin // groups, k, k)
    return b.shift_conv2d(
        x,
        b.constant(rng.integers(-1, 2, shape).astype(np.int8)),
        b.constant(rng.integers(0, levels, shape).astype(np.uint8)),
        b.constant((rng.random(cout) + 0.1).astype(np.float32)),
        b.constant(rng.standard_normal(cout).astype(np.float32)),
        groups=groups,
        exponent_bits=bits,
        **window,
    )
