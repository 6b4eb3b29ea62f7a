"""ONNX ``LSTM`` and ``GRU``, unrolled over a static sequence length into registry ops.

The input projection of every time step is one GEMM (``linear`` over the whole sequence), the
recurrent projection one ``linear`` per step; gates follow the ONNX operator spec:

    LSTM (gate order i, o, f, c):  i = sigma(x Wi + h Ri + Wbi + Rbi + Pi . c),  f likewise,
                                   c' = f . c + i . tanh(x Wc + h Rc + Wbc + Rbc),
                                   o = sigma(x Wo + h Ro + Wbo + Rbo + Po . c'),  h' = o . tanh(c')
    GRU (gate order z, r, h):      z = sigma(x Wz + h Rz + Wbz + Rbz),  r likewise,
                                   n = tanh(x Wh + (r . h) Rh + Rbh + Wbh)       (linear_before_reset=0)
                                   n = tanh(x Wh + r . (h Rh + Rbh) + Wbh)       (linear_before_reset=1)
                                   h' = (1 - z) . n + z . h

Only the default activations are supported, no ``clip``, ``input_forget`` or per-sequence
lengths: a model that sets them is refused with the attribute named. A missing initial state is
zero, which the first step uses by dropping the recurrent terms (no zero tensor of the symbolic
batch size is needed).
"""

from __future__ import annotations

import numpy as np

from reshift.frontend.onnx_ops import NotConvertible, converter

DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"]}


def _check_supported(node, ins, at, seq_len) -> None:
    op = node.op_type
    acts = [a.decode() if isinstance(a, bytes) else a for a in at["activations"]] if "activations" in at else None
    directions = 2 if at.get("direction", "forward") == "bidirectional" else 1
    if acts is not None and [a.capitalize() for a in acts] != DEFAULT_ACTIVATIONS[op] * directions:
        raise NotConvertible(f"activations {acts} are not supported (only {DEFAULT_ACTIVATIONS[op]})")
    if at.get("clip") is not None:
        raise NotConvertible("the clip attribute is not supported")
    if at.get("input_forget", 0):
        raise NotConvertible("input_forget=1 is not supported")
    if isinstance(seq_len, str):
        raise NotConvertible("the sequence length is symbolic; unrolling needs it static (pin it with input_shapes)")
    if len(ins) > 4 and ins[4] is not None:
        lens = ins[4]
        if not isinstance(lens, np.ndarray) or not np.all(lens == seq_len):
            raise NotConvertible("per-sequence lengths (sequence_lens) shorter than the sequence are not supported")


def _step_input(ctx, projected, t: int, width: int):
    """Time step ``t`` of the projected sequence ``[S, B, width]`` as ``[B, width]``."""
    row = ctx.op("slice", projected, starts=[t], ends=[t + 1], axes=[0], steps=[1])
    return ctx.op("reshape", row, shape=[-1, width])


def _state(ctx, state, d: int, hidden: int):
    """Direction ``d`` of an initial state ``[D, B, H]`` as ``[B, H]``; None when absent (zero)."""
    if state is None:
        return None
    row = ctx.op("slice", state, starts=[d], ends=[d + 1], axes=[0], steps=[1])
    return ctx.op("reshape", row, shape=[-1, hidden])


def _lstm_direction(ctx, x, w, r, b, p, h, c, steps, hidden):
    """One direction of an LSTM; ``[h_t]`` in step order and the last ``c``."""
    projected = ctx.op("linear", x, np.ascontiguousarray(w), np.ascontiguousarray(b[: 4 * hidden] + b[4 * hidden :]))
    outputs = []
    for t in steps:
        gates = _step_input(ctx, projected, t, 4 * hidden)
        if h is not None:
            gates = ctx.op("add", gates, ctx.op("linear", h, np.ascontiguousarray(r)))
        gi, go, gf, gc = ctx.op("split", gates, axis=1, sizes=[hidden] * 4)
        if p is not None and c is not None:
            gi = ctx.op("add", gi, ctx.op("mul", c, p[:hidden]))
            gf = ctx.op("add", gf, ctx.op("mul", c, p[2 * hidden :]))
        i, f, g = ctx.op("sigmoid", gi), ctx.op("sigmoid", gf), ctx.op("tanh", gc)
        c = ctx.op("mul", i, g) if c is None else ctx.op("add", ctx.op("mul", f, c), ctx.op("mul", i, g))
        if p is not None:
            go = ctx.op("add", go, ctx.op("mul", c, p[hidden : 2 * hidden]))
        h = ctx.op("mul", ctx.op("sigmoid", go), ctx.op("tanh", c))
        outputs.append(h)
    return outputs, c


def _gru_direction(ctx, x, w, r, b, h, steps, hidden, linear_before_reset):
    """One direction of a GRU; ``[h_t]`` in step order."""
    wb, rb = b[: 3 * hidden], b[3 * hidden :]
    zr_bias = wb[: 2 * hidden] + rb[: 2 * hidden]
    projected = ctx.op("linear", x, np.ascontiguousarray(w), np.concatenate([zr_bias, wb[2 * hidden :]]))
    r_zr, r_h = np.ascontiguousarray(r[: 2 * hidden]), np.ascontiguousarray(r[2 * hidden :])
    outputs = []
    for t in steps:
        gates = _step_input(ctx, projected, t, 3 * hidden)
        g_zr, g_h = ctx.op("split", gates, axis=1, sizes=[2 * hidden, hidden])
        if h is not None:
            g_zr = ctx.op("add", g_zr, ctx.op("linear", h, r_zr))
        z, rr = ctx.op("split", ctx.op("sigmoid", g_zr), axis=1, sizes=[hidden, hidden])
        if h is None:  # zero state: (r . 0) Rh + Rbh = Rbh, or r . (0 Rh + Rbh) = r . Rbh
            recurrent = ctx.op("mul", rr, rb[2 * hidden :]) if linear_before_reset else rb[2 * hidden :]
            n = ctx.op("tanh", ctx.op("add", g_h, recurrent))
            h = ctx.op("sub", n, ctx.op("mul", z, n))
        else:
            if linear_before_reset:
                recurrent = ctx.op("mul", rr, ctx.op("linear", h, r_h, np.ascontiguousarray(rb[2 * hidden :])))
            else:
                recurrent = ctx.op("linear", ctx.op("mul", rr, h), r_h, np.ascontiguousarray(rb[2 * hidden :]))
            n = ctx.op("tanh", ctx.op("add", g_h, recurrent))
            h = ctx.op("add", n, ctx.op("mul", z, ctx.op("sub", h, n)))  # (1 - z) n + z h
        outputs.append(h)
    return outputs


@converter("LSTM", "GRU")
def _recurrent(ctx, node, ins, at):
    """ONNX LSTM/GRU (opset 7-14 semantics, ``layout`` 0 or 1) unrolled over the sequence."""
    ins = list(ins) + [None] * (8 - len(ins))
    x, w, r, b = ins[:4]
    if not all(isinstance(a, np.ndarray) for a in (w, r)) or (b is not None and not isinstance(b, np.ndarray)):
        raise NotConvertible("W, R and B must be constants")
    if at.get("layout", 0):
        x = ctx.op("transpose", x, perm=[1, 0, 2])
    seq_len = ctx.shape(x)[0]
    _check_supported(node, ins, at, seq_len)
    gates = 4 if node.op_type == "LSTM" else 3
    hidden = int(at.get("hidden_size", w.shape[1] // gates))
    directions = w.shape[0]
    b = np.zeros((directions, 2 * gates * hidden), w.dtype) if b is None else b
    initial_h = ins[5]
    initial_c = ins[6] if node.op_type == "LSTM" else None
    peephole = ins[7] if node.op_type == "LSTM" else None
    if peephole is not None and not isinstance(peephole, np.ndarray):
        raise NotConvertible("the peephole weights P must be constants")
    if at.get("layout", 0) and initial_h is not None:
        initial_h = ctx.op("transpose", initial_h, perm=[1, 0, 2])
        initial_c = None if initial_c is None else ctx.op("transpose", initial_c, perm=[1, 0, 2])
    reverse = at.get("direction", "forward") == "reverse"
    ys, hs, cs = [], [], []
    for d in range(directions):
        backward = reverse or d == 1
        steps = list(range(seq_len))[::-1] if backward else list(range(seq_len))
        h0 = _state(ctx, initial_h, d, hidden)
        if node.op_type == "LSTM":
            c0 = _state(ctx, initial_c, d, hidden)
            p = None if peephole is None else peephole[d]
            outs, c_last = _lstm_direction(ctx, x, w[d], r[d], b[d], p, h0, c0, steps, hidden)
            cs.append(ctx.op("reshape", c_last, shape=[1, -1, hidden]))
        else:
            lbr = at.get("linear_before_reset", 0)
            outs = _gru_direction(ctx, x, w[d], r[d], b[d], h0, steps, hidden, lbr)
        in_time_order = outs[::-1] if backward else outs
        ys.append(ctx.op("concat", *[ctx.op("reshape", o, shape=[1, 1, -1, hidden]) for o in in_time_order], axis=0))
        hs.append(ctx.op("reshape", outs[-1], shape=[1, -1, hidden]))
    y = ys[0] if directions == 1 else ctx.op("concat", *ys, axis=1)
    y_h = hs[0] if directions == 1 else ctx.op("concat", *hs, axis=0)
    results = [y, y_h]
    if node.op_type == "LSTM":
        results.append(cs[0] if directions == 1 else ctx.op("concat", *cs, axis=0))
    if at.get("layout", 0):
        results[0] = ctx.op("transpose", y, perm=[2, 0, 1, 3])
        results[1:] = [ctx.op("transpose", s, perm=[1, 0, 2]) for s in results[1:]]
    return results
