"""The fp32 CPU kernels (kernels/dense_cpu.py, kernels/conv2d_cpu.py) against the interpreter.

Odd sizes on purpose: output features and channels not a multiple of 16 or of the 4-channel tile,
pixel counts not a multiple of 16, asymmetric padding, stride 2, dilation, a 1x3 filter, batch
1/3 through one symbolic-batch build. Within 1e-5 relative (max |diff| / max |reference|).
Negative cases: grouped convs and broadcasting activation matmuls keep the reference lowering.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from reshift.codegen.tvm import build, lower  # noqa: E402
from reshift.ir import Graph, GraphBuilder, interpret  # noqa: E402

RNG = np.random.default_rng(11)

# (in ch, out ch, h, w, kernel, stride, padding (t, l, b, r), dilation)
CONVS = [
    (3, 19, 11, 13, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    (5, 8, 9, 7, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    (6, 13, 10, 12, (1, 3), (1, 1), (0, 2, 1, 0), (2, 2)),
    (4, 33, 8, 8, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
    (7, 5, 17, 15, (5, 5), (2, 1), (2, 1, 0, 3), (1, 1)),
    (3, 6, 32, 32, (4, 4), (4, 4), (0, 0, 0, 0), (1, 1)),  # a patch embedding
    (8, 48, 14, 14, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),  # one channel vector, 7-pixel tiles
    (16, 64, 9, 10, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),  # two channel vectors, strided, 5-pixel tiles
    (5, 32, 7, 7, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
]


def _run(graph, batches, inputs):
    executable = build(graph, "cpu").executable
    vm = relax.VirtualMachine(executable, tvm.cpu())
    for batch in batches:
        feed = {name: make(batch) for name, make in inputs.items()}
        expected = interpret(graph, feed)[graph.outputs[0].name]
        actual = vm["main"](*[tvm.runtime.tensor(v) for v in feed.values()]).numpy()
        assert actual.shape == expected.shape
        error = np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max()
        assert error <= 1e-5, f"{graph.name} batch {batch}: relative error {error:.3g}"


@pytest.mark.parametrize("path", ["pixel", "ocvec"])
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}x{c[3]}-k{c[4][0]}{c[4][1]}-s{c[5][0]}")
def test_conv2d_matches_interpreter(conv, path, monkeypatch):
    """Both conv kernels (pixel-vectorized, output-channel-vectorized) where each applies."""
    from reshift.codegen.tvm.kernels.conv2d_ocvec_cpu import choose_tile

    c, oc, h, w, kernel, stride, padding, dilation = conv
    monkeypatch.setenv("RESHIFT_CONV", path)
    b = GraphBuilder("conv")
    x = b.input("x", f"f32[N,{c},{h},{w}]")
    weight = b.constant(RNG.standard_normal((oc, c, *kernel)).astype(np.float32))
    bias = b.constant(RNG.standard_normal(oc).astype(np.float32))
    y = b.conv2d(x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=1)
    graph = b.build(b.relu(y))
    ow = int(graph.nodes[0].outputs[0].shape[3])
    kernel_name = "conv2d_ocvec_f32" if path == "ocvec" and choose_tile(oc, ow) else "conv2d_packed_f32"
    assert kernel_name in lower(graph).script(show_meta=False)
    _run(graph, (1, 3), {"x": lambda n: RNG.standard_normal((n, c, h, w)).astype(np.float32)})


@pytest.mark.parametrize("shape", [(1, 7, 5), (37, 70, 23), (197, 64, 384), (5, 33, 1000), (450, 300, 40)])
def test_linear_matches_interpreter(shape):
    rows, k, out = shape
    b = GraphBuilder("linear")
    x = b.input("x", f"f32[N,{rows},{k}]")
    w = b.constant(RNG.standard_normal((out, k)).astype(np.float32))
    graph = b.build(b.linear(x, w, b.constant(RNG.standard_normal(out).astype(np.float32))))
    assert "dense_packed_f32" in lower(graph).script(show_meta=False)
    _run(graph, (1, 3), {"x": lambda n: RNG.standard_normal((n, rows, k)).astype(np.float32)})


def test_matmul_with_constant_operand():
    b = GraphBuilder("matmul")
    x = b.input("x", "f32[N,19]")
    graph = b.build(b.matmul(x, b.constant(RNG.standard_normal((19, 40)).astype(np.float32))))
    assert "dense_packed_f32" in lower(graph).script(show_meta=False)
    _run(graph, (1, 6), {"x": lambda n: RNG.standard_normal((n, 19)).astype(np.float32)})


# (heads, m, k, n): attention-like shapes, odd widths that need padding, one row, a single 16-wide panel
BMMS = [(6, 197, 64, 197), (2, 13, 7, 5), (3, 1, 33, 48), (1, 17, 40, 64), (4, 31, 19, 100)]


@pytest.mark.parametrize("shape", BMMS, ids=lambda s: "x".join(map(str, s)))
def test_batch_matmul_matches_interpreter(shape):
    heads, m, k, n = shape
    b = GraphBuilder("bmm")
    q = b.input("q", f"f32[N,{heads},{m},{k}]")
    kt = b.input("kt", f"f32[N,{heads},{n},{k}]")
    graph = b.build(b.matmul(q, b.transpose(kt, perm=(0, 1, 3, 2))))  # q @ k^T, the right operand transposed
    assert "batch_matmul_f32" in lower(graph).script(show_meta=False)
    _run(
        graph,
        (1, 3),
        {
            "q": lambda bs: RNG.standard_normal((bs, heads, m, k)).astype(np.float32),
            "kt": lambda bs: RNG.standard_normal((bs, heads, n, k)).astype(np.float32),
        },
    )


def test_batch_matmul_rank3():
    b = GraphBuilder("bmm3")
    p = b.input("p", "f32[N,23,23]")
    v = b.input("v", "f32[N,23,21]")
    graph = b.build(b.matmul(p, v))
    assert "batch_matmul_f32" in lower(graph).script(show_meta=False)
    _run(
        graph,
        (1, 3),
        {
            "p": lambda bs: RNG.standard_normal((bs, 23, 23)).astype(np.float32),
            "v": lambda bs: RNG.standard_normal((bs, 23, 21)).astype(np.float32),
        },
    )


@pytest.mark.parametrize("shape", [(6, 197, 197), (3, 5), (2, 16), (1, 1), (4, 2, 100)], ids=str)
def test_softmax_matches_interpreter(shape):
    b = GraphBuilder("softmax")
    x = b.input("x", "f32[N," + ",".join(map(str, shape)) + "]")
    graph = b.build(b.softmax(x, axis=-1))
    assert "softmax_f32" in lower(graph).script(show_meta=False)
    _run(graph, (1, 3), {"x": lambda n: (4 * RNG.standard_normal((n, *shape))).astype(np.float32)})


@pytest.mark.parametrize(
    "shape, affine", [((197, 384), "both"), ((5, 23), "both"), ((3, 16), "weight"), ((2, 7), "none"), ((1,), "both")]
)
def test_layer_norm_matches_interpreter(shape, affine):
    """Rows not a multiple of 16 (scalar tails), a one-element row, absent affine parameters; inputs
    with a large common offset (the two-pass variance keeps it exact where E[x^2]-E[x]^2 would not)."""
    d = shape[-1]
    b = GraphBuilder("layer_norm")
    x = b.input("x", "f32[N," + ",".join(map(str, shape)) + "]")
    weight = b.constant(RNG.standard_normal(d).astype(np.float32)) if affine != "none" else None
    bias = b.constant(RNG.standard_normal(d).astype(np.float32)) if affine == "both" else None
    graph = b.build(b.layer_norm(x, weight, bias, axis=-1, eps=1e-6))
    assert "layer_norm_f32" in lower(graph).script(show_meta=False)
    _run(graph, (1, 3), {"x": lambda n: (100 + 3 * RNG.standard_normal((n, *shape))).astype(np.float32)})


def test_layer_norm_over_two_axes_or_with_computed_affine_keeps_reference_lowering():
    b = GraphBuilder("layer_norm2")
    x = b.input("x", "f32[N,4,6]")
    g = b.input("g", "f32[6]")
    two_axes = b.layer_norm(x, None, None, axis=-2, eps=1e-5)
    computed = b.layer_norm(x, g, None, axis=-1, eps=1e-5)
    graph = b.build(b.add(two_axes, computed))
    assert "layer_norm_f32" not in lower(graph).script(show_meta=False)
    _run(
        graph,
        (2,),
        {
            "x": lambda n: RNG.standard_normal((n, 4, 6)).astype(np.float32),
            "g": lambda n: RNG.standard_normal(6).astype(np.float32),
        },
    )


def test_grouped_conv_and_broadcast_matmul_keep_reference_lowering():
    b = GraphBuilder("grouped")
    x = b.input("x", "f32[N,8,9,9]")
    w = b.input("w", "f32[9,9]")
    weight = b.constant(RNG.standard_normal((8, 1, 3, 3)).astype(np.float32))
    y = b.conv2d(x, weight, None, stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=8)
    graph = b.build(b.matmul(y, w))  # rank 4 x rank 2 activations: broadcast, reference lowering
    script = lower(graph).script(show_meta=False)
    assert "conv2d_packed_f32" not in script and "dense_packed_f32" not in script
    assert "batch_matmul_f32" not in script
    _run(
        graph,
        (2,),
        {
            "x": lambda n: RNG.standard_normal((n, 8, 9, 9)).astype(np.float32),
            "w": lambda n: RNG.standard_normal((9, 9)).astype(np.float32),
        },
    )


def test_ocvec_conv_needs_a_pixel_tile_and_falls_back(monkeypatch):
    """No divisor of ``ow`` in 4..14 (a 17-wide output): the pixel-vectorized kernel runs instead."""
    from reshift.codegen.tvm.kernels.conv2d_ocvec_cpu import choose_tile

    assert choose_tile(64, 17) is None and choose_tile(64, 3) is None
    assert choose_tile(64, 56) == (7, 2) and choose_tile(48, 14) == (14, 1)
    monkeypatch.setenv("RESHIFT_CONV", "ocvec")
    b = GraphBuilder("conv17")
    x = b.input("x", "f32[N,4,17,17]")
    weight = b.constant(RNG.standard_normal((64, 4, 3, 3)).astype(np.float32))
    y = b.conv2d(x, weight, None, stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1)
    graph = b.build(y)
    script = lower(graph).script(show_meta=False)
    assert "conv2d_packed_f32" in script and "conv2d_ocvec_f32" not in script
    _run(graph, (1,), {"x": lambda n: RNG.standard_normal((n, 4, 17, 17)).astype(np.float32)})


def _conv_chain(readers: str) -> Graph:
    """conv(16->32) -> relu -> the readers of the ReLU (``"conv"``, ``"conv+add"``, ``"conv+output"``,
    ``"two-pads"``, ``"no-relu"``); every conv is 32 channels wide, so the ocvec kernel runs them."""
    b = GraphBuilder("chain")
    x = b.input("x", "f32[N,16,14,14]")

    def conv(v, cin, stride=(1, 1), padding=(1, 1, 1, 1)):
        w = b.constant((RNG.standard_normal((32, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32))
        bias = b.constant(RNG.standard_normal(32).astype(np.float32))
        return b.conv2d(v, w, bias, stride=stride, padding=padding, dilation=(1, 1), groups=1)

    first = conv(x, 16)
    y = first if readers == "no-relu" else b.relu(first)
    second = conv(y, 32, stride=(2, 2))
    if readers == "conv+add":
        return b.build(conv(second, 32), b.add(y, y))
    if readers == "conv+output":
        return b.build(conv(second, 32), y)
    if readers == "two-pads":
        return b.build(b.add(second, conv(y, 32, stride=(2, 2), padding=(0, 0, 1, 1))))
    return b.build(b.relu(conv(b.relu(second), 32)))


@pytest.mark.parametrize(
    "readers, pad_copies", [("conv", 1), ("no-relu", 1), ("conv+add", 2), ("conv+output", 2), ("two-pads", 3)]
)
def test_conv_writes_the_next_convs_padded_input(readers, pad_copies, monkeypatch):
    """A conv whose (ReLU'd) output only ocvec convs with one padding read writes their zero padded
    input itself: no padding copy and no ReLU pass between them. Any other reader, a graph output or
    two different paddings keep the plain tensor and the copies."""
    monkeypatch.setenv("RESHIFT_CONV", "ocvec")
    graph = _conv_chain(readers)
    script = lower(graph).script(show_meta=False)
    assert len(re.findall(r"call_tir\(cls\.conv_pad_rows\d*,", script)) == pad_copies
    outputs = interpret(graph, feed := {"x": RNG.standard_normal((3, 16, 14, 14)).astype(np.float32)})
    vm = relax.VirtualMachine(build(graph, "cpu").executable, tvm.cpu())
    actual = vm["main"](tvm.runtime.tensor(feed["x"]))
    actual = [actual] if len(graph.outputs) == 1 else list(actual)
    for value, got in zip(graph.outputs, actual, strict=True):
        expected = outputs[value.name]
        error = np.abs(got.numpy().astype(np.float64) - expected).max() / np.abs(expected).max()
        assert error <= 1e-5, f"{readers} output {value.name}: relative error {error:.3g}"


def _attention_scores(case: str) -> Graph:
    """``softmax(q @ k^T * c)`` over 21 keys (padded to 32 in the matmul kernel), and variants."""
    b = GraphBuilder("scores")
    q = b.input("q", "f32[N,3,21,8]")
    k = b.input("k", "f32[N,3,8,21]")
    scores = b.matmul(q, k)
    scale = {"scaled": 0.35, "negative": -0.35, "vector": None}.get(case, 0.35)
    if case == "unscaled":
        return b.build(b.softmax(scores, axis=-1))
    c = b.constant(np.full(21, 0.35, np.float32)) if case == "vector" else b.constant(np.array(scale, np.float32))
    scaled = b.mul(scores, c)
    probs = b.softmax(scaled, axis=-1)
    return b.build(probs, scaled) if case == "also-read" else b.build(probs)


@pytest.mark.parametrize(
    "case, fused", [("scaled", True), ("unscaled", True), ("negative", False), ("vector", False), ("also-read", False)]
)
def test_attention_softmax_reads_the_padded_scores(case, fused):
    """The softmax kernel crops the matmul's padded rows and applies a positive scalar scale itself (no
    crop copy, no multiply pass); a negative or per-column scale, or scores read elsewhere, keep both."""
    graph = _attention_scores(case)
    script = lower(graph).script(show_meta=False)
    assert ("R.strided_slice" not in script) == fused
    assert ("R.multiply" not in script) == (fused or case == "unscaled")
    feed = {
        "q": RNG.standard_normal((2, 3, 21, 8)).astype(np.float32),
        "k": RNG.standard_normal((2, 3, 8, 21)).astype(np.float32),
    }
    expected = interpret(graph, feed)
    vm = relax.VirtualMachine(build(graph, "cpu").executable, tvm.cpu())
    actual = vm["main"](*[tvm.runtime.tensor(v) for v in feed.values()])
    actual = [actual] if len(graph.outputs) == 1 else list(actual)
    for value, got in zip(graph.outputs, actual, strict=True):
        error = np.abs(got.numpy() - expected[value.name]).max() / np.abs(expected[value.name]).max()
        assert error <= 1e-5, f"{case} {value.name}: {error:.3g}"
