"""Structural reparameterization: training-time branches merged into one conv/linear, exactly.

Convolution is linear in its kernel, so parallel branches reading one input sum into one kernel:
``conv(x, W1) + conv(x, W2) = conv(x, W1 + W2)`` once both kernels live on the same KxK grid.

- RepVGG (Ding et al., CVPR 2021, Sec. 3.3, Fig. 4): BN folded into each branch (``fold.py``),
  the 1x1 kernel zero-padded to 3x3 at the centre, the identity (BN-only) branch written as a
  KxK kernel with a 1 at the centre tap of its own channel (per group for grouped convs).
- ACNet (Ding et al., ICCV 2019, Eq. 4-5, "additivity"): 1x3 and 3x1 kernels added onto the
  3x3 skeleton when the sliding windows line up: ``pad_small + offset == pad_big`` per side.
- MobileOne (Vasu et al., CVPR 2023, Sec. 3.2): k over-parameterized conv+BN branches, a 1x1
  scale branch and an identity BN: an add tree of convs on one input, merged pairwise.
- DBB (Ding et al., CVPR 2021, Sec. 3, transforms I-VI): sequential 1x1 -> KxK merges into
  ``W = W2 . W1`` (Eq. 8) with bias ``b2 + sum(W2 * b1)``, exact only where the KxK conv's padding
  carries ``b1`` (its BNAndPadLayer); zero padding after a biased 1x1 is refused. Average pooling
  is a KxK conv with ``1/K^2`` weights per channel (transform V); concatenated branches (IV).
- BatchNorm around a conv (RepVGG Sec. 3.3 run backwards): before an unpadded conv its scale goes
  into the input channels and its shift into the bias; after a sum of two convs into both.
- Linear layers (RePaViT idle channels, residuals, DeiT heads, parallel-branch fusion into one
  wider op + split) live in ``branches_linear.py``.

Every rule checks stride, dilation, groups and padding alignment and says why it refuses. The IR's
only padding mode is constant (``conv2d`` pads with zeros, ``pad`` with one scalar value), so
reflect/replicate padding cannot reach these rules. All arithmetic is float64, cast back to the
weight's dtype.
"""

from __future__ import annotations

import numpy as np

from reshift.ir.graph import Graph, Value
from reshift.passes.fold import per_channel
from reshift.passes.manager import rule_pass
from reshift.passes.pattern import Any, Const, Match, Op, Opt
from reshift.passes.rules import Rule

# |b1 - pad value| below this (relative to max(1, |b1|)) counts as equal: float32 rounding of one BN
BIAS_PAD_TOLERANCE = 1e-6


# -- helpers ----------------------------------------------------------------------------------
def _f64(m: Match, name: str) -> np.ndarray | None:
    data = m.array(name)
    return None if data is None else data.astype(np.float64)


def _attrs(m: Match, key: str) -> tuple[tuple[int, int], tuple[int, int, int, int], tuple[int, int], int]:
    a = m.nodes[key].attrs
    return tuple(a["stride"]), tuple(a["padding"]), tuple(a["dilation"]), int(a["groups"])


def _kernel(m: Match, w: str) -> tuple[int, int]:
    return tuple(int(d) for d in m[w].type.shape[2:])


def _shared_weights(m: Match, graph: Graph, names: tuple[str, ...]) -> str | None:
    """Refuse when a weight is also read outside the match: merging would duplicate it."""
    users = graph.users()
    matched = {id(n) for n in m.nodes.values()}
    for name in names:
        value = m.get(name)
        if value is None:
            continue
        others = [u.name for u in users.get(value, []) if id(u) not in matched]
        if others:
            return f"weight %{value.name} is also read by {', '.join(others)}; merging would duplicate it"
    return None


def _float32(m: Match, names: tuple[str, ...]) -> str | None:
    for name in names:
        value = m.get(name)
        if value is not None and value.dtype != "float32":
            return f"%{value.name} is {value.dtype}, not float32"
    return None


def _dense(w: np.ndarray, groups: int) -> np.ndarray:
    """A grouped OIHW kernel as the equivalent block-diagonal dense kernel."""
    out_ch, in_per_group = w.shape[:2]
    dense = np.zeros((out_ch, in_per_group * groups) + w.shape[2:], dtype=w.dtype)
    out_per_group = out_ch // groups
    for g in range(groups):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        dense[rows, g * in_per_group : (g + 1) * in_per_group] = w[rows]
    return dense


def _grouped(dense: np.ndarray, groups: int) -> np.ndarray:
    """The inverse of :func:`_dense`: the diagonal blocks of a block-diagonal kernel."""
    out_per_group, in_per_group = dense.shape[0] // groups, dense.shape[1] // groups
    return np.concatenate(
        [
            dense[g * out_per_group : (g + 1) * out_per_group, g * in_per_group : (g + 1) * in_per_group]
            for g in range(groups)
        ]
    )


def _nested_groups(g1: int, g2: int) -> int | str:
    """Groups of a merged kernel: the coarser grouping, when one grouping refines the other."""
    if max(g1, g2) % min(g1, g2):
        return f"groups {g1} and {g2} do not nest; the merged kernel has no group layout"
    return min(g1, g2)


def _conv_out(size: int, k: int, s: int, p0: int, p1: int, d: int) -> int:
    return (size + p0 + p1 - d * (k - 1) - 1) // s + 1


def _bias_or_zero(m: Match, name: str, n: int) -> np.ndarray:
    b = _f64(m, name)
    return np.zeros(n) if b is None else b


def _cast(m: Match, w: str, array: np.ndarray) -> np.ndarray:
    return array.astype(m[w].data.dtype)


# -- parallel convs on one input: RepVGG 3x3 + 1x1, ACNet 3x3 + 1x3 + 3x1, MobileOne's k copies --
PARALLEL_CONVS = Op(
    "add",
    Op("conv2d", Any("x"), Const("w1"), Opt(Const("b1")), name="conv_a"),
    Op("conv2d", Any("x"), Const("w2"), Opt(Const("b2")), name="conv_b"),
    name="add",
)


def _parallel_layout(m: Match) -> tuple[tuple[int, int], tuple[int, int, int, int], list[tuple[int, int]]] | str:
    """Merged kernel size, padding and per-branch (top, left) offsets, or why they do not line up."""
    (_, pad_a, dil, _), (_, pad_b, _, _) = _attrs(m, "conv_a"), _attrs(m, "conv_b")
    ka, kb = _kernel(m, "w1"), _kernel(m, "w2")
    size = (max(ka[0], kb[0]), max(ka[1], kb[1]))
    begin = (max(pad_a[0], pad_b[0]), max(pad_a[1], pad_b[1]))
    offsets = []
    for k, pad in ((ka, pad_a), (kb, pad_b)):
        offset = []
        for axis in range(2):
            shift = begin[axis] - pad[axis]
            o, rest = divmod(shift, dil[axis])
            if rest or not 0 <= o <= size[axis] - k[axis]:
                return (
                    f"{ka[0]}x{ka[1]} kernel at padding {list(pad_a)} and {kb[0]}x{kb[1]} at padding {list(pad_b)}"
                    f" do not line up: a {k[0]}x{k[1]} kernel would sit {shift} taps into a {size[0]}x{size[1]} one"
                )
            offset.append(o)
        offsets.append(tuple(offset))
    end = []
    for axis in range(2):
        end.append(
            max(
                pad[axis + 2] + dil[axis] * (size[axis] - k[axis] - o[axis])
                for k, pad, o in ((ka, pad_a, offsets[0]), (kb, pad_b, offsets[1]))
            )
        )
    return size, (begin[0], begin[1], end[0], end[1]), offsets


def _check_parallel_convs(m: Match, graph: Graph) -> str | None:
    (sa, _, da, ga), (sb, _, db, gb) = _attrs(m, "conv_a"), _attrs(m, "conv_b")
    for what, a, b in (("stride", sa, sb), ("dilation", da, db)):
        if a != b:
            return f"branches differ in {what}: {list(a)} vs {list(b)}"
    groups = _nested_groups(ga, gb)
    if isinstance(groups, str):
        return groups
    out_a, out_b = m["conv_a"].type, m["conv_b"].type
    if out_a != out_b or m["add"].type != out_a:
        return f"branch outputs {out_a} and {out_b} differ (the add broadcasts)"
    layout = _parallel_layout(m)
    if isinstance(layout, str):
        return layout
    size, padding, _ = layout
    for axis in range(2):
        in_size, out_size = m["x"].type.shape[2 + axis], out_a.shape[2 + axis]
        if not isinstance(in_size, int):
            return f"spatial size {in_size} is symbolic"
        merged = _conv_out(in_size, size[axis], sa[axis], padding[axis], padding[axis + 2], da[axis])
        if merged != out_size:
            return (
                f"merged {size[0]}x{size[1]} conv at padding {list(padding)} gives size {merged},"
                f" branches give {out_size}"
            )
    return _float32(m, ("w1", "w2", "b1", "b2")) or _shared_weights(m, graph, ("w1", "w2", "b1", "b2"))


def _merge_parallel_convs(m: Match, ctx) -> Value:
    size, padding, offsets = _parallel_layout(m)
    stride, _, dilation, ga = _attrs(m, "conv_a")
    gb = _attrs(m, "conv_b")[3]
    groups = min(ga, gb)
    weights = [_grouped(_dense(_f64(m, name), g), groups) for name, g in (("w1", ga), ("w2", gb))]
    weight = np.zeros(weights[0].shape[:2] + size)
    for w, (top, left) in zip(weights, offsets, strict=True):
        weight[:, :, top : top + w.shape[2], left : left + w.shape[3]] += w
    bias = None
    if m.get("b1") is not None or m.get("b2") is not None:
        n = weight.shape[0]
        bias = ctx.constant(_cast(m, "w1", _bias_or_zero(m, "b1", n) + _bias_or_zero(m, "b2", n)), "merged_bias")
    return ctx.op(
        "conv2d",
        m["x"],
        ctx.constant(_cast(m, "w1", weight), "merged_weight"),
        bias,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )


# -- identity branch: RepVGG's BN-only shortcut as a centre-tap kernel --------------------------
def _identity_branch(shortcut: Op) -> Op:
    conv = Op("conv2d", Any("x"), Const("w"), Opt(Const("b")), name="conv")
    return Op("add", conv, shortcut, name="add", commutative=True)


def _identity_tap(m: Match) -> tuple[int, int] | str:
    stride, padding, dilation, _ = _attrs(m, "conv")
    if stride != (1, 1):
        return f"conv has stride {list(stride)}; an identity branch needs stride 1"
    k = _kernel(m, "w")
    tap = []
    for axis in range(2):
        t, rest = divmod(padding[axis], dilation[axis])
        if rest or not 0 <= t < k[axis]:
            return (
                f"no tap of the {k[0]}x{k[1]} kernel (padding {list(padding)}, dilation {list(dilation)})"
                " reads x in place"
            )
        tap.append(t)
    return tuple(tap)


def _check_identity_branch(m: Match, graph: Graph) -> str | None:
    x, out = m["x"].type, m["conv"].type
    if x != out or m["add"].type != out:
        return f"conv maps {x} to {out}; an identity branch needs the same shape"
    tap = _identity_tap(m)
    if isinstance(tap, str):
        return tap
    names = ("w", "b", "scale", "shift", "mean", "var")
    return _float32(m, names) or _shared_weights(m, graph, names)


def _merge_identity_branch(m: Match, ctx) -> Value:
    stride, padding, dilation, groups = _attrs(m, "conv")
    top, left = _identity_tap(m)
    weight = _f64(m, "w")
    channels = weight.shape[0]
    scale, shift = np.ones(channels), np.zeros(channels)
    if "bn" in m.nodes:
        eps = m.nodes["bn"].attrs["eps"]
        scale = _f64(m, "scale") / np.sqrt(_f64(m, "var") + eps)
        shift = _f64(m, "shift") - _f64(m, "mean") * scale
    in_per_group = weight.shape[1]
    weight[np.arange(channels), np.arange(channels) % in_per_group, top, left] += scale
    bias = _bias_or_zero(m, "b", channels) + shift
    return ctx.op(
        "conv2d",
        m["x"],
        ctx.constant(_cast(m, "w", weight), "merged_weight"),
        ctx.constant(_cast(m, "w", bias), "merged_bias"),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )


_BN_OF_X = Op("batch_norm", Any("x"), Const("scale"), Const("shift"), Const("mean"), Const("var"), name="bn")


# -- sequential 1x1 -> KxK (DBB transform III) --------------------------------------------------
def _sequential(inner: Op) -> Op:
    return Op("conv2d", inner, Const("w2"), Opt(Const("b2")), name="conv_b")


_FIRST_CONV = Op("conv2d", Any("x"), Const("w1"), Opt(Const("b1")), name="conv_a")


def _pad_spatial(m: Match) -> tuple[tuple[int, int, int, int], float] | str:
    """The ``pad`` node's (top, left, bottom, right) and value; zeros when there is none."""
    if "pad" not in m.nodes:
        return (0, 0, 0, 0), 0.0
    attrs = m.nodes["pad"].attrs
    pads, value = list(attrs["pads"]), float(attrs["value"])
    if len(pads) != 8 or pads[0] or pads[1] or pads[4] or pads[5]:
        return f"pad {pads} touches the batch or channel axis"
    if min(pads) < 0:
        return f"pad {pads} crops"
    return (pads[2], pads[3], pads[6], pads[7]), value


def _sequential_groups(m: Match) -> int | str:
    return _nested_groups(_attrs(m, "conv_a")[3], _attrs(m, "conv_b")[3])


def _check_sequential_convs(m: Match, graph: Graph) -> str | None:
    """DBB transform III: ``KxK(1x1(x))`` is one KxK conv.

    A zero padding on the 1x1 (DBB's BNAndPad as exported) composes too: the 1x1's output border
    is its bias ``b1``, exactly what the composed bias ``b2 + sum W2 b1`` adds on the composed
    conv's zero-padded border, so the composed conv takes the 1x1's padding.
    """
    stride, padding, dilation, _ = _attrs(m, "conv_a")
    k = _kernel(m, "w1")
    if k != (1, 1) or stride != (1, 1):
        return f"first conv is {k[0]}x{k[1]}, stride {list(stride)}; only a stride-1 1x1 composes"
    if any(padding) and "pad" in m.nodes:
        return f"the 1x1 pads its input {list(padding)} and a pad node pads its output; not composed"
    groups = _sequential_groups(m)
    if isinstance(groups, str):
        return groups
    pad = _pad_spatial(m)
    if isinstance(pad, str):
        return pad
    (pads, value), conv_padding = pad, _attrs(m, "conv_b")[1]
    b1 = _bias_or_zero(m, "b1", m["w1"].type.shape[0])
    tolerance = BIAS_PAD_TOLERANCE * max(1.0, float(np.max(np.abs(b1), initial=0.0)))
    if any(pads) and np.max(np.abs(b1 - value), initial=0.0) > tolerance:
        return f"pad value {value} differs from the 1x1 bias; the border would not be the 1x1 of a padded input"
    if any(conv_padding) and np.max(np.abs(b1), initial=0.0) > tolerance:
        return "zero padding after a biased 1x1 is not equal to padding its input"
    if any(conv_padding) and any(pads) and value != 0.0:
        return f"conv pads with zeros outside a pad of value {value}"
    names = ("w1", "b1", "w2", "b2")
    return _float32(m, names) or _shared_weights(m, graph, names)


def _merge_sequential_convs(m: Match, ctx) -> Value:
    stride, conv_padding, dilation, g2 = _attrs(m, "conv_b")
    g1 = _attrs(m, "conv_a")[3]
    groups = _sequential_groups(m)
    pads, _ = _pad_spatial(m)
    pads = tuple(p + q for p, q in zip(pads, _attrs(m, "conv_a")[1], strict=True))  # the 1x1's own padding
    w1 = _dense(_f64(m, "w1"), g1)[:, :, 0, 0]  # [mid, in]
    w2 = _dense(_f64(m, "w2"), g2)  # [out, mid, K, K]
    weight = _grouped(np.einsum("omhw,mi->oihw", w2, w1), groups)
    b1 = _bias_or_zero(m, "b1", w1.shape[0])
    bias = _bias_or_zero(m, "b2", w2.shape[0]) + np.einsum("omhw,m->o", w2, b1)
    padding = tuple(p + q for p, q in zip(pads, conv_padding, strict=True))
    return ctx.op(
        "conv2d",
        m["x"],
        ctx.constant(_cast(m, "w2", weight), "merged_weight"),
        ctx.constant(_cast(m, "w2", bias), "merged_bias"),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )


# -- a per-channel constant added before an unpadded conv/linear is a bias ----------------------
def _check_offset_before(m: Match, graph: Graph) -> str | None:
    node = m.nodes["layer"]
    y = m["y"].type
    axis = 1 if node.op == "conv2d" else -1
    if m["shifted"].type != y:
        return f"adding {m['c'].type} broadcasts {y} to {m['shifted'].type}"
    if per_channel(m.array("c"), y.shape[axis], y.rank, axis) is None:
        return f"constant {m['c'].type} is not per input channel of {y}"
    if node.op == "conv2d" and any(node.attrs["padding"]):
        padding = list(node.attrs["padding"])
        return f"conv pads with zeros ({padding}), so a constant added before it is no bias at the border"
    names = ("w", "b", "c")
    return _float32(m, names) or _shared_weights(m, graph, names)


def _fold_offset_before(m: Match, ctx) -> Value:
    node = m.nodes["layer"]
    weight = _f64(m, "w")
    sign = -1.0 if m.nodes["shifted"].op == "sub" else 1.0
    if node.op == "conv2d":
        dense = _dense(weight, node.attrs["groups"])
        c = sign * per_channel(m.array("c"), dense.shape[1], 4, 1)
        shift = np.einsum("oihw,i->o", dense, c)
    else:
        c = sign * per_channel(m.array("c"), weight.shape[1], m["y"].type.rank, -1)
        shift = weight @ c
    bias = _bias_or_zero(m, "b", weight.shape[0]) + shift
    return ctx.op(node.op, m["y"], m["w"], ctx.constant(_cast(m, "w", bias), "folded_bias"), **node.attrs)


def _offset_before(op: str, arith: str) -> Op:
    shifted = Op(arith, Any("y"), Const("c"), name="shifted", commutative=arith == "add")
    return Op(op, shifted, Const("w"), Opt(Const("b")), name="layer")


# -- average pooling is a depthwise conv with 1/K^2 weights (DBB transform V) --------------------
def _pool_in_branch(y: Value, graph: Graph) -> bool:
    """Does the pooled value come from a conv (through pad/add/sub) or also feed a parallel conv?"""
    if any(u.op == "conv2d" for u in graph.users().get(y, [])):
        return True
    producers = graph.producers()
    for _ in range(4):
        node = producers.get(y)
        if node is None:
            return False
        if node.op == "conv2d":
            return True
        if node.op not in ("pad", "add", "sub"):
            return False
        y = node.inputs[0] if not node.inputs[0].is_constant else node.inputs[1]
    return False


def _check_avg_pool(m: Match, graph: Graph) -> str | None:
    attrs = m.nodes["pool"].attrs
    if not _pool_in_branch(m["y"], graph):
        return "neither a conv output (DBB's 1x1 -> avg) nor a branch beside a conv; a plain pooling stays"
    if any(attrs["padding"]) and not attrs["count_include_pad"]:
        return "count_include_pad=False divides border windows by fewer taps; a conv cannot"
    y, out = m["y"].type, m["pool"].type
    kh, kw = attrs["kernel"]
    for axis, k in ((0, kh), (1, kw)):
        size = y.shape[2 + axis]
        if not isinstance(size, int):
            return f"spatial size {size} is symbolic"
        p0, p1 = attrs["padding"][axis], attrs["padding"][axis + 2]
        if _conv_out(size, k, attrs["stride"][axis], p0, p1, 1) != out.shape[2 + axis]:
            return "ceil_mode adds partial windows a conv does not have"
    if y.dtype != "float32":
        return f"input is {y.dtype}, not float32"
    return None


def _avg_pool_as_conv(m: Match, ctx) -> Value:
    attrs = m.nodes["pool"].attrs
    kh, kw = attrs["kernel"]
    channels = m["y"].type.shape[1]
    weight = np.full((channels, 1, kh, kw), 1.0 / (kh * kw), dtype=np.float32)
    return ctx.op(
        "conv2d",
        m["y"],
        ctx.constant(weight, "avg_weight"),
        None,
        stride=attrs["stride"],
        padding=attrs["padding"],
        groups=channels,
    )


# -- BatchNorm around layers: before an unpadded conv / a linear, after a sum of two layers ---------
def _bn_scale_shift(m: Match) -> tuple[np.ndarray, np.ndarray]:
    k = _f64(m, "scale") / np.sqrt(_f64(m, "var") + m.nodes["bn"].attrs["eps"])
    return k, _f64(m, "shift") - _f64(m, "mean") * k


def _bn_before(layer: str, transposed: bool = False) -> Op:
    """``layer(BN(x))``; ``transposed``: BatchNorm1d on tokens, ``transpose . BN . transpose``."""
    source = Op("transpose", Any("x"), name="t_in") if transposed else Any("x")
    bn = Op("batch_norm", source, Const("scale"), Const("shift"), Const("mean"), Const("var"), name="bn")
    if transposed:
        bn = Op("transpose", bn, name="t_out")
    return Op(layer, bn, Const("w"), Opt(Const("b")), name="layer")


def _check_bn_before(m: Match, graph: Graph) -> str | None:
    node = m.nodes["layer"]
    if node.op == "conv2d" and any(node.attrs["padding"]):
        return f"conv pads BN's output with zeros ({list(node.attrs['padding'])}); BN's shift is no bias at the border"
    if "t_in" in m.nodes:
        p_in, p_out = m.nodes["t_in"].attrs["perm"], m.nodes["t_out"].attrs["perm"]
        if p_out[-1] != 1 or any(p_in[p_out[i]] != i for i in range(len(p_out))):
            return f"transposes {list(p_in)} / {list(p_out)} do not put BN's channel axis last and undo each other"
    elif node.op == "linear" and m["x"].type.rank != 2:
        return f"BN normalizes axis 1 of {m['x'].type}, not the linear's input features"
    names = ("w", "b")
    return _float32(m, names) or _shared_weights(m, graph, names)


def _fold_bn_before(m: Match, ctx) -> Value:
    """``W (k x + t) + b``: k scales the weight's input columns, ``W t`` joins the bias."""
    node = m.nodes["layer"]
    k, t = _bn_scale_shift(m)
    weight = _f64(m, "w")
    if node.op == "conv2d":
        out_ch, in_per_group = weight.shape[:2]
        channel = (np.arange(out_ch)[:, None] // (out_ch // node.attrs["groups"])) * in_per_group
        channel = channel + np.arange(in_per_group)[None, :]  # input channel of weight[o, j]
        new_weight = weight * k[channel][:, :, None, None]
        shift = np.einsum("ojhw,oj->o", weight, t[channel])
    else:
        new_weight, shift = weight * k[None, :], weight @ t
    bias = _bias_or_zero(m, "b", weight.shape[0]) + shift
    return ctx.op(
        node.op,
        m["x"],
        ctx.constant(_cast(m, "w", new_weight), "folded_weight"),
        ctx.constant(_cast(m, "w", bias), "folded_bias"),
        **node.attrs,
    )


def _bn_after_sum(layer: str) -> Op:
    a = Op(layer, Any("x1"), Const("w1"), Opt(Const("b1")), name="layer_a")
    b = Op(layer, Any("x2"), Const("w2"), Opt(Const("b2")), name="layer_b")
    return Op(
        "batch_norm",
        Op("add", a, b, name="add"),
        Const("scale"),
        Const("shift"),
        Const("mean"),
        Const("var"),
        name="bn",
    )


def _check_bn_after_sum(m: Match, graph: Graph) -> str | None:
    out = m["add"].type
    if m["layer_a"].type != out or m["layer_b"].type != out:
        return f"the add broadcasts {m['layer_a'].type} and {m['layer_b'].type}"
    if m.nodes["layer_a"].op == "linear" and out.rank != 2:
        return f"BN normalizes axis 1 of rank-{out.rank} {out}, not the linear's features"
    names = ("w1", "b1", "w2", "b2")
    return _float32(m, names) or _shared_weights(m, graph, names)


def _fold_bn_after_sum(m: Match, ctx) -> Value:
    """``BN(a + b) = k a + k b + t``: both layers scaled per output channel, the shift on one."""
    k, t = _bn_scale_shift(m)
    outs = []
    for key, w, b, shift in (("layer_a", "w1", "b1", t), ("layer_b", "w2", "b2", 0.0)):
        node, weight = m.nodes[key], _f64(m, w)
        new_weight = weight * k.reshape((-1,) + (1,) * (weight.ndim - 1))
        bias = _bias_or_zero(m, b, weight.shape[0]) * k + shift
        outs.append(
            ctx.op(
                node.op,
                node.inputs[0],
                ctx.constant(_cast(m, w, new_weight), "folded_weight"),
                ctx.constant(_cast(m, w, bias), "folded_bias"),
                **node.attrs,
            )
        )
    return ctx.op("add", *outs)


# -- the rule set ---------------------------------------------------------------------------------
BRANCH_RULES = [
    Rule("merge_parallel_convs", PARALLEL_CONVS, _check_parallel_convs, _merge_parallel_convs),
    Rule("merge_identity_into_conv", _identity_branch(Any("x")), _check_identity_branch, _merge_identity_branch),
    Rule("merge_bn_identity_into_conv", _identity_branch(_BN_OF_X), _check_identity_branch, _merge_identity_branch),
    Rule("merge_sequential_convs", _sequential(_FIRST_CONV), _check_sequential_convs, _merge_sequential_convs),
    Rule(
        "merge_padded_sequential_convs",
        _sequential(Op("pad", _FIRST_CONV, name="pad")),
        _check_sequential_convs,
        _merge_sequential_convs,
    ),
    Rule("fold_add_before_conv", _offset_before("conv2d", "add"), _check_offset_before, _fold_offset_before),
    Rule("fold_sub_before_conv", _offset_before("conv2d", "sub"), _check_offset_before, _fold_offset_before),
    Rule("fold_add_before_linear", _offset_before("linear", "add"), _check_offset_before, _fold_offset_before),
    Rule("fold_sub_before_linear", _offset_before("linear", "sub"), _check_offset_before, _fold_offset_before),
    Rule("avg_pool_as_conv", Op("avg_pool2d", Any("y"), name="pool"), _check_avg_pool, _avg_pool_as_conv),
    Rule("fold_bn_before_conv", _bn_before("conv2d"), _check_bn_before, _fold_bn_before, allow_shared_interior=True),
    Rule("fold_bn_after_conv_sum", _bn_after_sum("conv2d"), _check_bn_after_sum, _fold_bn_after_sum),
]

BRANCH_PASSES = [
    rule_pass(
        "fuse_branches",
        BRANCH_RULES,
        "merge parallel/sequential conv branches (RepVGG, ACNet, DBB, MobileOne); linears: branches_linear.py",
    ),
]

__all__ = ["BRANCH_PASSES", "BRANCH_RULES"]
