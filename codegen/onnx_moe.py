"""Standard-ONNX decomposition of ``moe_linear`` (``ir/ops_moe.py``): both experts on every row,
then a per-row ``Where`` on the router's decision (onnxruntime has no token dispatch; the function
is the same).

The row's int8 codes are ``shift_linear``'s (``ReduceMax``/``Div``/``Round``/``Clip``); the router
score ``q @ router`` and the shift accumulation run as float ``MatMul`` on integer values, exact while
partial sums stay below 2^24 (``127 * 127 * K`` bounds the router's: K up to 1040); then
``(acc * s) * router_scale > -router_bias`` as in the reference.
"""

from __future__ import annotations

import numpy as np

from reshift.codegen.onnx import register_decomposition
from reshift.errors import CodegenError


@register_decomposition("moe_linear")
def _moe_linear(em, node, ins):
    values = node.inputs[1:8]
    if not all(v is not None and v.is_constant for v in values):
        raise CodegenError(f"moe_linear node {node.name}: the decomposition needs constant router and expert weights")
    router, router_scale, router_bias, weight, sign, exponent, _ = (v.data for v in values)
    x = node.inputs[0]
    e_max = 2 ** node.attrs["exponent_bits"] - 1
    amax = em.reduce("ReduceMax", em.one("Abs", [ins[0]]), [-1], True)
    s = em.one("Div", [amax, em.scalar(127.0, x)])
    safe = em.one("Where", [em.one("Greater", [s, em.scalar(0.0, x)]), s, em.scalar(1.0, x)])
    q = em.one("Clip", [em.one("Round", [em.one("Div", [ins[0], safe])]), em.scalar(-127.0, x), em.scalar(127.0, x)])
    w_int = sign.astype(np.float32) * np.exp2(e_max - exponent.astype(np.float32))
    acc = em.one("MatMul", [q, em.const(np.ascontiguousarray(w_int.T), f"{node.name}_shift_weight_t")])
    y_shift = em.one("Mul", [em.one("Mul", [em.one("Mul", [acc, em.scalar(2.0**-e_max, x)]), s]), ins[7]])
    y_mult = em.one("MatMul", [ins[0], em.const(np.ascontiguousarray(weight.T), f"{node.name}_weight_t")])
    score = em.one("MatMul", [q, em.const(router.astype(np.float32)[:, None], f"{node.name}_router_col")])
    p = em.one("Mul", [em.one("Mul", [score, s]), em.const(router_scale.astype(np.float32), f"{node.name}_rscale")])
    to_shift = em.one("Greater", [p, em.const(-router_bias.astype(np.float32), f"{node.name}_rthreshold")])
    if len(ins) > 8 and ins[8]:
        return em.final(node, "Add", [em.one("Where", [to_shift, y_shift, y_mult]), ins[8]])
    return em.final(node, "Where", [to_shift, y_shift, y_mult])
