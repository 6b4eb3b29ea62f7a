"""ONNX export of reshift's quantizers as standard QDQ (``QuantizeLinear``/``DequantizeLinear``).

* ``quantize_uniform`` -> ``QuantizeLinear`` -> ``DequantizeLinear`` (uint8, or int8 when
  ``signed``; per tensor or per channel along ``axis``). A grid narrower than the byte
  (``bits < 8``, or the symmetric ``[-127, 127]``) gets a float ``Clip`` to the end levels first.
* ``int8_linear`` -> activation QDQ as above (``x_granularity="tensor"``; ``"row"`` computes the
  per-row ``s, z`` with ``ReduceMin``/``ReduceMax`` exactly as the reference), the weight as an
  ``int8`` initializer ``[K, O]`` behind ``DequantizeLinear`` (per output channel, ``axis=1``),
  then ``MatMul`` + ``Add``: the pattern onnxruntime fuses into its integer kernels.
* ``int8_conv2d`` -> activation QDQ per tensor, the ``int8`` OIHW filter behind
  ``DequantizeLinear`` (per output channel, ``axis=0``), then ``Conv`` with the bias: onnxruntime's
  QDQ conv pattern (an image holding NaN is left to the runtime, as above).
* ``log2_quant``: a float64 decomposition (``Log``, ``Round``, ``Pow``, ``Where``) of the reference;
  with ``custom_ops="domain"`` it stays one ``ai.reshift`` node instead.
* ``log2_matmul``: the float graph it replaces, ``MatMul(log2_quant(p), QDQ(v))`` (equal to the
  integer reference within float32 rounding; a ``floor_exponent`` drops the codes past it there too);
  with ``custom_ops="domain"`` one ``ai.reshift`` node.

These lowerings always run (both ``custom_ops`` modes) for the uniform ops, which standard ONNX
expresses; they match the references within float32 rounding (NaN inputs are not specified by
``QuantizeLinear`` and are left to the runtime).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from reshift.codegen.onnx import OnnxEmitter, register_decomposition
from reshift.ir import Node
from reshift.ir.ops_quant import last_kept_code, log_step, uniform_range

STANDARD_QDQ_OPS = ("quantize_uniform", "int8_linear", "int8_conv2d")  # exported as standard ONNX in every mode


def _qdq(em: OnnxEmitter, x: str, scale, zero_point, bits: int, signed: bool, axis: int | None) -> str:
    """``DequantizeLinear(QuantizeLinear(x))`` on the ``bits`` grid; per channel when ``axis`` is set."""
    scale = np.asarray(scale, np.float32)
    zero = np.asarray(np.rint(zero_point), np.int8 if signed else np.uint8)
    lo, hi = uniform_range(bits, signed)
    if (lo, hi) != ((-128, 127) if signed else (0, 255)):
        lo_f = ((lo - zero.astype(np.float32)) * scale).astype(np.float32)
        hi_f = ((hi - zero.astype(np.float32)) * scale).astype(np.float32)
        if scale.size == 1:
            x = em.one("Clip", [x, em.const(lo_f.reshape(()), "qlo"), em.const(hi_f.reshape(()), "qhi")])
        else:  # per channel of the last axis (checked by the caller): bounds broadcast
            x = em.one("Min", [em.one("Max", [x, em.const(lo_f, "qlo")]), em.const(hi_f, "qhi")])
    shape = () if scale.size == 1 else (scale.size,)
    s, z = em.const(scale.reshape(shape), "qscale"), em.const(zero.reshape(shape), "qzero")
    extra = {} if scale.size == 1 else {"axis": axis}
    q = em.one("QuantizeLinear", [x, s, z], **extra)
    return em.one("DequantizeLinear", [q, s, z], **extra)


@register_decomposition("quantize_uniform")
def _quantize_uniform(em, node: Node, ins):
    a = node.attrs
    rank = node.inputs[0].type.rank
    axis = a["axis"] % rank if rank else 0
    scale = np.asarray(a["scale"], np.float32)
    if scale.size > 1 and axis != rank - 1:
        # Max/Min broadcasting of the clip bounds needs the channel axis last; QDQ itself takes any axis
        lo, hi = uniform_range(a["bits"], a["signed"])
        if (lo, hi) != ((-128, 127) if a["signed"] else (0, 255)):
            from reshift.errors import CodegenError

            raise CodegenError(
                f"quantize_uniform node {node.name}: narrow per-channel grids export only on the last axis"
            )
    y = _qdq(em, ins[0], scale, np.asarray(a["zero_point"]), a["bits"], a["signed"], axis)
    return em.final(node, "Identity", [y])


def _row_qdq(em: OnnxEmitter, x: str, bits: int) -> str:
    """Per-row dynamic fake quantization, as ``ops_quant.row_params`` (NaN rows aside)."""
    f = lambda v: em.const(np.asarray(v, np.float32), "c")  # noqa: E731
    qmax = float(2**bits - 1)
    lo = em.one("Min", [em.reduce("ReduceMin", x, [-1], True), f(0.0)])
    hi = em.one("Max", [em.reduce("ReduceMax", x, [-1], True), f(0.0)])
    s = em.one("Div", [em.one("Sub", [hi, lo]), f(qmax)])
    s = em.one("Where", [em.one("Greater", [s, f(0.0)]), s, f(1.0)])
    z = em.one("Clip", [em.one("Round", [em.one("Div", [em.one("Neg", [lo]), s])]), f(0.0), f(qmax)])
    q = em.one("Clip", [em.one("Add", [em.one("Round", [em.one("Div", [x, s])]), z]), f(0.0), f(qmax)])
    return em.one("Mul", [em.one("Sub", [q, z]), s])


@register_decomposition("int8_linear")
def _int8_linear(em, node: Node, ins):
    from reshift.errors import CodegenError

    if not (node.inputs[1].is_constant and node.inputs[2].is_constant):
        raise CodegenError(f"int8_linear node {node.name}: QDQ export needs constant wq and w_scale")
    a = node.attrs
    if a.get("x_granularity", "tensor") == "row":
        x = _row_qdq(em, ins[0], a["x_bits"])
    else:
        x = _qdq(em, ins[0], a["x_scale"], a["x_zero_point"], a["x_bits"], False, None)
    wq, ws = node.inputs[1].data, node.inputs[2].data.astype(np.float32)
    w = em.const(np.ascontiguousarray(wq.T).astype(np.int8), f"{node.name}_wq_t")
    zero = em.const(np.zeros(len(ws), np.int8), f"{node.name}_wzero")
    w = em.one("DequantizeLinear", [w, em.const(ws, f"{node.name}_wscale"), zero], axis=1)
    y = em.one("MatMul", [x, w])
    bias = ins[3] if len(ins) > 3 else ""
    return em.final(node, "Add", [y, bias]) if bias else em.final(node, "Identity", [y])


@register_decomposition("int8_conv2d")
def _int8_conv2d(em, node: Node, ins):
    from reshift.errors import CodegenError

    if not (node.inputs[1].is_constant and node.inputs[2].is_constant):
        raise CodegenError(f"int8_conv2d node {node.name}: QDQ export needs constant wq and w_scale")
    a = node.attrs
    x = _qdq(em, ins[0], a["x_scale"], a["x_zero_point"], a["x_bits"], False, None)
    wq, ws = node.inputs[1].data, node.inputs[2].data.astype(np.float32)
    zero = em.const(np.zeros(len(ws), np.int8), f"{node.name}_wzero")
    w = em.const(np.ascontiguousarray(wq).astype(np.int8), f"{node.name}_wq")
    w = em.one("DequantizeLinear", [w, em.const(ws, f"{node.name}_wscale"), zero], axis=0)
    if len(node.inputs) > 4 and node.inputs[4] is not None:  # the wide centre-tap codes, dequantized
        if not node.inputs[4].is_constant:
            raise CodegenError(f"int8_conv2d node {node.name}: QDQ export needs a constant w_diag")
        out, _, kh, kw = wq.shape
        extra = np.zeros(wq.shape, np.float32)
        extra[np.arange(out), np.arange(out), kh // 2, kw // 2] = node.inputs[4].data.astype(np.float32) * ws
        w = em.one("Add", [w, em.const(extra, f"{node.name}_wdiag")])
    bias = ins[3] if len(ins) > 3 and ins[3] else ""
    return em.final(
        node,
        "Conv",
        [x, w] + ([bias] if bias else []),
        kernel_shape=list(wq.shape[2:]),
        strides=list(a["stride"]),
        pads=list(a["padding"]),
        dilations=list(a["dilation"]),
        group=a["groups"],
    )


@register_decomposition("log2_quant")
def _log2_quant(em, node: Node, ins):
    """``y = scale * 2^(-q a)``, ``q = max(0, rint(-log2(x / scale) / a))`` in float64; 0 for ``x <= 0``
    or ``q`` at or past the zero code; NaN stays NaN."""
    return em.final(node, "Identity", [_log2_levels(em, ins[0], node.attrs)])


@register_decomposition("log2_matmul")
def _log2_matmul(em, node: Node, ins):
    a = node.attrs
    p = _log2_levels(em, ins[0], a)
    v = _qdq(em, ins[1], np.float32(a["v_scale"]), np.asarray(a["v_zero_point"]), a["v_bits"], a["v_signed"], None)
    return em.final(node, "MatMul", [p, v])


def _log2_levels(em, x: str, a: dict) -> str:
    step = log_step(a["base_kind"], a["base"], a["table_size"])
    d = lambda v: em.const(np.asarray(v, np.float64), "c")  # noqa: E731
    x64 = em.one("Cast", [x], to=TensorProto.DOUBLE)
    t = em.one("Mul", [em.one("Log", [em.one("Div", [x64, d(a["scale"])])]), d(-1.0 / (np.log(2.0) * step))])
    q = em.one("Max", [em.one("Round", [t]), d(0.0)])
    level = em.one("Mul", [em.one("Pow", [d(2.0), em.one("Mul", [q, d(-step)])]), d(a["scale"])])
    last = last_kept_code(a["bits"], a["base_kind"], a["base"], a["table_size"], a.get("floor_exponent", -1))
    keep = em.one("And", [em.one("Greater", [x64, d(0.0)]), em.one("LessOrEqual", [q, d(float(last))])])
    y = em.one("Cast", [em.one("Where", [keep, level, d(0.0)])], to=TensorProto.FLOAT)
    return em.one("Where", [em.one("IsNaN", [x]), x, y])


__all__ = ["STANDARD_QDQ_OPS"]
