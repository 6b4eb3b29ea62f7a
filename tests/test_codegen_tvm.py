"""codegen/tvm: every registry op and every reference model, built for cpu, against ir.interpret.

Ops are grouped into a few graphs (one compile each); each graph runs at two batch sizes.
Cross builds (arm64, cuda sm_90) are checked for what they contain, not run.
"""

from __future__ import annotations

import functools
import os
import struct

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from reshift.codegen.tvm import (  # noqa: E402
    LOWERINGS,
    TARGET_PRESETS,
    build,
    describe_host_cpu,
    export_library,
    lower,
    resolve_target,
)
from reshift.errors import CodegenError  # noqa: E402
from reshift.ir import OPS, Graph, GraphBuilder, interpret  # noqa: E402
from reshift.ir.types import numpy_dtype  # noqa: E402
from tests.system_tools import require_tool  # noqa: E402

RNG = np.random.default_rng(0)


def f32(*shape: int, low: float = -2.0, high: float = 2.0) -> np.ndarray:
    return RNG.uniform(low, high, shape).astype(np.float32)


def run_vm(executable, graph: Graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    vm = relax.VirtualMachine(executable, tvm.cpu())
    out = vm["main"](*(tvm.runtime.tensor(feeds[v.name]) for v in graph.inputs))
    outs = [out] if len(graph.outputs) == 1 else [out[i] for i in range(len(graph.outputs))]
    return [o.numpy() for o in outs]


def assert_matches(actual: np.ndarray, reference: np.ndarray, rtol: float, what: str) -> None:
    assert actual.shape == reference.shape, f"{what}: shape {actual.shape} != {reference.shape}"
    assert actual.dtype == reference.dtype, f"{what}: dtype {actual.dtype} != {reference.dtype}"
    if reference.dtype.kind in "biu":
        np.testing.assert_array_equal(actual, reference, err_msg=what)
        return
    special = ~np.isfinite(reference)  # NaN and inf must sit in the same places (equal_nan compares them)
    np.testing.assert_array_equal(actual[special], reference[special], err_msg=f"{what}: non-finite values differ")
    ref = np.where(special, 0.0, reference.astype(np.float64))
    actual = np.where(special, 0.0, actual)
    scale = max(float(np.max(np.abs(ref))) if ref.size else 0.0, 1e-30)
    error = float(np.max(np.abs(actual.astype(np.float64) - ref))) / scale if ref.size else 0.0
    assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol}"


def check_graph(graph: Graph, make_feeds, batches=(1, 3), rtol: float = 1e-5) -> None:
    """Build ``graph`` for cpu once; at each batch size compare every output with the interpreter."""
    result = build(graph, "cpu")
    for batch in batches:
        feeds = make_feeds(batch)
        expected = interpret(graph, feeds)
        for value, actual in zip(graph.outputs, run_vm(result.executable, graph, feeds), strict=True):
            assert_matches(actual, expected[value.name], rtol, f"{value.name} (batch {batch})")


# -- op graphs ---------------------------------------------------------------------------------------
# Each builder returns (graph, feeds(batch)); together they must use every op in the registry.
def graph_unary():
    b = GraphBuilder("unary")
    x = b.input("x", "f32[N,4,5]")
    pos = b.input("pos", "f32[N,4,5]")
    outs = [b.op(name, x) for name in ("relu", "sigmoid", "silu", "tanh", "erf", "exp", "sin", "cos", "neg", "abs")]
    outs += [b.op(name, pos) for name in ("log", "sqrt", "rsqrt", "reciprocal")]
    outs += [
        b.gelu(x),
        b.gelu(x, approximate="tanh"),
        b.clip(x, min=-0.5, max=1.0),
        b.clip(x, min=0.25),
        b.clip(x, max=-0.1),
    ]
    outs += [
        b.cast(x, dtype="int32"),
        b.cast(x, dtype="bool"),
        b.cast(x, dtype="float16"),
        b.logical_not(b.cast(x, dtype="bool")),
    ]
    outs.append(b.identity(b.add(x, pos)))
    xi = b.input("xi", "i32[N,6]")
    outs += [b.cast(xi, dtype="float32"), b.clip(xi, min=-2.5, max=3.5), b.abs(xi), b.neg(xi)]

    def feeds(n):
        x = f32(n, 4, 5)
        x[0, 0, :3] = [0.0, 0.5, -0.5]  # exact zero and halves for the casts
        return {"x": x, "pos": f32(n, 4, 5, low=0.1, high=3.0), "xi": RNG.integers(-9, 9, (n, 6)).astype(np.int32)}

    return b.build(*outs), feeds


def graph_binary():
    b = GraphBuilder("binary")
    a = b.input("a", "f32[N,3,4]")
    c = b.input("c", "f32[1,3,1]")
    pos = b.input("pos", "f32[N,3,4]")
    w = b.constant(f32(4))
    outs = [b.op(name, a, c) for name in ("add", "sub", "mul", "div", "maximum", "minimum")]
    outs += [b.op(name, a, w) for name in ("add", "mul")]
    outs += [b.pow(pos, c), b.pow(pos, b.constant(np.array(2.0, np.float32)))]
    outs += [b.pow(a, b.constant(np.array(3.0, np.float32))), b.pow(a, b.constant(np.array([[[3.0]]], np.float32)))]
    outs += [b.op(name, a, c) for name in ("equal", "less", "less_equal", "greater", "greater_equal")]
    ga, gc = b.greater(a, c), b.less(pos, c)
    outs += [b.logical_and(ga, gc), b.logical_or(ga, gc), b.where(ga, a, pos), b.where(gc, c, a)]
    i, j = b.input("i", "i64[N,5]"), b.input("j", "i64[5]")
    outs += [b.op(name, i, j) for name in ("add", "sub", "mul", "div", "maximum", "minimum", "equal", "greater")]
    k = b.input("k", "i32[N,5]")
    outs.append(b.pow(k, b.constant(np.array([0, 1, 2, 3, 5], np.int32))))

    def feeds(n):
        a = f32(n, 3, 4)
        return {
            "a": a,
            "c": np.round(f32(1, 3, 1), 1),
            "pos": f32(n, 3, 4, low=0.1, high=2.0),
            "i": RNG.integers(-20, 20, (n, 5)),
            "j": np.array([3, -3, 7, -7, 1], np.int64),
            "k": RNG.integers(-4, 5, (n, 5)).astype(np.int32),
        }

    return b.build(*outs), feeds


def graph_contraction():
    b = GraphBuilder("contraction")
    x = b.input("x", "f32[N,3,9,10]")
    outs = [
        b.conv2d(x, b.constant(f32(8, 3, 3, 3)), b.constant(f32(8)), stride=(2, 1), padding=(1, 0, 2, 1)),
        b.conv2d(x, b.constant(f32(6, 1, 3, 3)), None, padding=(2, 2, 2, 2), dilation=(2, 2), groups=3),
    ]
    s = b.input("s", "f32[N,7,16]")
    outs += [b.linear(s, b.constant(f32(5, 16)), b.constant(f32(5))), b.linear(s, b.constant(f32(4, 16)), None)]
    outs += [b.matmul(s, b.constant(f32(16, 3))), b.matmul(s, b.transpose(s, perm=(0, 2, 1)))]
    outs.append(b.matmul(b.constant(f32(16)), b.constant(f32(16, 2))))
    return b.build(*outs), lambda n: {"x": f32(n, 3, 9, 10), "s": f32(n, 7, 16)}


def graph_norm():
    b = GraphBuilder("norm")
    x = b.input("x", "f32[N,4,5,6]")
    bn = [b.constant(f32(4)), b.constant(f32(4)), b.constant(f32(4)), b.constant(f32(4, low=0.5, high=2.0))]
    outs = [b.batch_norm(x, *bn, eps=1e-3)]
    outs += [b.layer_norm(x, b.constant(f32(6)), b.constant(f32(6))), b.layer_norm(x, None, None, axis=-2, eps=1e-6)]
    outs += [b.layer_norm(x, b.constant(f32(5, 6)), None, axis=2)]
    outs += [b.softmax(x, axis=1), b.softmax(x), b.log_softmax(x, axis=-1), b.log_softmax(x, axis=2)]
    for name in ("reduce_mean", "reduce_sum", "reduce_max", "reduce_min"):
        outs += [b.op(name, x), b.op(name, x, axes=(1,), keepdims=False), b.op(name, x, axes=(-1, 2))]
    return b.build(*outs), lambda n: {"x": f32(n, 4, 5, 6)}


POOL_CASES = [
    dict(kernel=(3, 3), stride=(2, 2), padding=(1, 1, 1, 1)),
    dict(kernel=(2, 2), stride=(2, 2)),
    dict(kernel=(3, 2), stride=(2, 3), padding=(1, 0, 0, 1), ceil_mode=True),
    dict(kernel=(3, 3), stride=(3, 3), ceil_mode=True),
    dict(kernel=(2, 3), stride=(1, 2), padding=(0, 1, 1, 1)),
]


def graph_pool():
    b = GraphBuilder("pool")
    x = b.input("x", "f32[N,2,9,10]")
    outs = []
    for case in POOL_CASES:
        outs.append(b.max_pool2d(x, **case))
        outs.append(b.avg_pool2d(x, **case))
        outs.append(b.avg_pool2d(x, count_include_pad=False, **case))
    outs.append(b.max_pool2d(x, kernel=(3, 3), stride=(2, 1), dilation=(2, 2), padding=(1, 1, 1, 1), ceil_mode=True))
    outs.append(b.max_pool2d(x, kernel=(2, 2), dilation=(1, 3)))
    return b.build(*outs), lambda n: {"x": f32(n, 2, 9, 10)}


def graph_shape():
    b = GraphBuilder("shape")
    x = b.input("x", "f32[N,4,6]")
    outs = [b.reshape(x, shape=("N", -1)), b.reshape(x, shape=(-1, 3)), b.reshape(x, shape=("4*N", 6))]
    outs += [b.expand(b.constant(f32(1, 6)), shape=("N", 4, 6)), b.expand(x, shape=(2, 1, 1, 1))]
    outs += [b.transpose(x, perm=(2, 0, 1)), b.concat(x, b.neg(x), axis=-1), b.concat(x, x, x, axis=0)]
    outs += list(b.split(x, axis=2, sizes=(1, 2, 3)))
    outs += [
        b.slice(x, starts=(1,), ends=(100,), axes=(1,), steps=(2,)),
        b.slice(x, starts=(-1, 5), ends=(-100, 0), axes=(2, 1), steps=(-2, -1)),
        b.slice(x, starts=(-3,), ends=(-1,), axes=(-1,), steps=(1,)),
        b.slice(x, starts=(4,), ends=(1,), axes=(2,), steps=(-3,)),
    ]
    table = b.constant(f32(10, 3))
    ids = b.input("ids", "i64[N,5]")
    outs += [b.gather(table, ids), b.gather(x, b.constant(np.array([2, -1, 0], np.int64)), axis=-1)]
    outs += [b.gather(x, b.constant(np.array(1, np.int32)), axis=1)]
    outs += [b.pad(x, pads=(0, 1, 0, 0, 2, 3), value=-1.5), b.pad(x, pads=(0, 0, 0, 0, 0, 0))]
    outs += [
        b.arange(shape=("N",)),
        b.arange(shape=(5,), start=1.5, step=-0.5, dtype="float32"),
        b.arange(shape=(4,), start=0.5, step=1.0),
    ]
    y = b.input("y", "f32[3*N,2]")
    outs.append(b.reshape(y, shape=("N", 6)))
    return b.build(*outs), lambda n: {"x": f32(n, 4, 6), "ids": RNG.integers(-10, 10, (n, 5)), "y": f32(3 * n, 2)}


def graph_index():
    """cumsum, gather_elements, gather_nd, scatter_nd, resize2d (ir/ops_index.py) and bool reductions."""
    b = GraphBuilder("index")
    x = b.input("x", "f32[N,4,6]")
    ids = b.input("ids", "i64[N,4,3]")
    counts = b.input("counts", "i64[N,5]")
    points, rows = b.input("points", "i32[N,3,1]"), b.input("rows", "f32[3,6]")
    outs = [b.cumsum(x, axis=2), b.cumsum(x, axis=1, exclusive=True), b.cumsum(x, axis=-1, reverse=True)]
    outs += [b.cumsum(counts, axis=1, exclusive=True, reverse=True), b.gather_elements(x, ids, axis=2)]
    outs += [b.gather_nd(x, points, batch_dims=1), b.gather_nd(x, b.constant(np.array([[0, 3], [-1, -4]])))]
    corner = b.constant(np.array([[0, 1], [-1, 3], [0, 1]]))  # a repeated row: combined in order
    outs += [b.scatter_nd(x, corner, rows, reduction=r) for r in ("add", "mul", "max")]
    by_row = b.transpose(x, perm=(1, 0, 2))  # [4, N, 6]: rows 2 and 0 replaced by x's rows 1 and 2
    picked = b.transpose(b.slice(x, starts=(1,), ends=(3,), axes=(1,), steps=(1,)), perm=(1, 0, 2))
    outs.append(b.scatter_nd(by_row, b.constant(np.array([[2], [-4]])), picked))
    image = b.reshape(x, shape=("N", 1, 4, 6))
    for mode in ("half_pixel", "align_corners", "asymmetric"):
        outs += [b.resize2d(image, size=(8, 9), coordinate_transformation=mode), b.resize2d(image, size=(3, 1))]
        outs.append(b.resize2d(image, size=(7, 3), mode="cubic", coordinate_transformation=mode))
    outs.append(b.resize2d(image, size=(9, 1), mode="cubic", exclude_outside=True, cubic_coeff_a=-0.5))
    outs.append(b.resize2d(image, size=(3, 4), mode="cubic", scales=(0.8, 0.7)))  # sampled at 1 / scale
    outs += [b.resize2d(image, size=(2, 9), mode=m, antialias=True, exclude_outside=True) for m in ("linear", "cubic")]
    for resample in ("nearest", "linear", "cubic"):
        crop = {"roi": (-0.2, 0.1, 0.9, 1.3), "extrapolation_value": -3.0}
        outs.append(
            b.resize2d(image, size=(5, 7), mode=resample, coordinate_transformation="tf_crop_and_resize", **crop)
        )
    positive = b.greater(x, b.constant(np.array(0.0, np.float32)))
    outs += [b.reduce_max(positive, axes=(2,), keepdims=True), b.reduce_min(positive, axes=(1, 2), keepdims=False)]

    def feeds(n):
        return {
            "x": f32(n, 4, 6),
            "ids": RNG.integers(-6, 6, (n, 4, 3)),
            "counts": RNG.integers(-9, 9, (n, 5)),
            "points": RNG.integers(-4, 4, (n, 3, 1)).astype(np.int32),
            "rows": f32(3, 6),
        }

    return b.build(*outs), feeds


def graph_select():
    """topk (ties: lower index first), isnan and isinf (ir/ops_select.py)."""
    b = GraphBuilder("select")
    x = b.input("x", "f32[N,5,6]")
    outs = [*b.topk(x, k=3), *b.topk(x, k=2, axis=1, largest=False), *b.topk(b.neg(x), k=6, sorted=False)]
    special = b.reciprocal(b.relu(x))  # +inf where x <= 0
    special = b.concat(special, b.neg(special), b.log(x), axis=2)  # -inf, NaN where x < 0
    outs += [b.isnan(special), b.isinf(special), b.isinf(special, detect_negative=False)]
    outs += [b.isinf(special, detect_positive=False), b.isinf(special, detect_positive=False, detect_negative=False)]
    return b.build(*outs), lambda n: {"x": np.round(f32(n, 5, 6)).astype(np.float32)}  # few values: many ties


def graph_lowbit():
    from reshift.ir.ops_lowbit import pack_signs, pack_trits

    b = GraphBuilder("lowbit")
    x = b.input("x", "f32[N,3,20]")
    out, k = 6, 20
    sign = RNG.integers(-1, 2, (out, k)).astype(np.int8)
    exponent = RNG.integers(0, 16, (out, k)).astype(np.uint8)
    outs = [
        b.shift_linear(
            x, b.constant(sign), b.constant(exponent), b.constant(f32(out, low=0.5, high=1.5)), b.constant(f32(out))
        ),
        b.shift_linear(
            x,
            b.constant(sign),
            b.constant(exponent % 4),
            b.constant(f32(out, low=0.5, high=1.5)),
            None,
            exponent_bits=2,
        ),
    ]
    bits = pack_signs(np.where(RNG.random((3, out, k)) < 0.5, -1, 1))
    outs.append(
        b.bcq_linear(
            x,
            b.constant(bits),
            b.constant(f32(out, 3, 3, low=0, high=1)),
            b.constant(f32(out)),
            group_size=8,
            in_features=k,
        )
    )
    trits = pack_trits(RNG.integers(-1, 2, (out, k)))
    outs.append(b.ternary_linear(x, b.constant(trits), b.constant(f32(out, 2)), None, group_size=16, in_features=k))

    def feeds(n):
        x = f32(n, 3, 20)
        x[0, 0] = 0.0  # an all-zero row quantizes to scale 0
        x[0, 1, :4] = [127 / 254, -127 / 254, 1.5, -1.5]  # round-half-even cases when max|row| is 2
        x[0, 1, 4] = 2.0
        if n > 1:
            x[1, 2, 3] = np.inf  # a non-finite row gives NaN outputs
        return {"x": x}

    return b.build(*outs), feeds


def graph_conv_nd():
    """conv3d and conv_transpose2d/3d (ir/ops_nn.py): strides, asymmetric padding, dilation, groups."""
    b = GraphBuilder("conv_nd")
    v = b.input("v", "f32[N,4,5,6,7]")
    x = b.input("x", "f32[N,4,5,6]")
    outs = [
        b.conv3d(
            v,
            b.constant(f32(6, 2, 2, 3, 2)),
            b.constant(f32(6)),
            stride=(1, 2, 1),
            padding=(1, 0, 1, 0, 2, 1),
            dilation=(2, 1, 1),
            groups=2,
        ),
        b.conv3d(v, b.constant(f32(3, 4, 1, 1, 1)), None),
        b.conv_transpose2d(
            x,
            b.constant(f32(4, 3, 3, 2)),
            b.constant(f32(6)),
            stride=(2, 3),
            padding=(1, 0, 1, 0),
            output_padding=(1, 2),
            dilation=(1, 2),
            groups=2,
        ),
        b.conv_transpose2d(x, b.constant(f32(4, 2, 3, 3)), None, stride=(2, 2), padding=(1, 1, 1, 1)),
        b.conv_transpose3d(
            v,
            b.constant(f32(4, 2, 2, 3, 2)),
            b.constant(f32(4)),
            stride=(2, 1, 2),
            padding=(1, 0, 0, 0, 1, 1),
            output_padding=(1, 0, 1),
            groups=2,
        ),
    ]
    return b.build(*outs), lambda n: {"v": f32(n, 4, 5, 6, 7), "x": f32(n, 4, 5, 6)}


OP_GRAPHS = {
    fn.__name__: fn
    for fn in (
        graph_unary,
        graph_binary,
        graph_contraction,
        graph_norm,
        graph_pool,
        graph_shape,
        graph_index,
        graph_select,
        graph_lowbit,
        graph_conv_nd,
    )
}


def test_every_registry_op_has_a_lowering_and_a_test():
    assert sorted(set(OPS) - set(LOWERINGS)) == []
    tested = set()
    for make in OP_GRAPHS.values():
        tested |= {node.op for node in make()[0].nodes}
    # ops lowered only by a kernel in codegen/tvm/kernels/ are tested with that kernel
    kernel_ops = {name for name, fn in LOWERINGS.items() if ".kernels." in fn.__module__}
    assert sorted(set(OPS) - tested - kernel_ops) == [], "ops without a graph in test_codegen_tvm.py"


@pytest.mark.parametrize("name", sorted(OP_GRAPHS))
def test_op_graph_matches_interpreter(name):
    graph, feeds = OP_GRAPHS[name]()
    check_graph(graph, feeds)


def test_symbolic_batch_is_one_var():
    graph, _ = graph_shape()
    func = lower(graph)["main"]
    names = {str(d) for p in func.params for d in p.ty.shape}
    assert "N" in names and "3xN" not in names


def test_unknown_op_is_a_codegen_error():
    graph, _ = graph_norm()
    graph.nodes[0].op = "no_such_op"
    with pytest.raises(CodegenError, match="no_such_op.*node"):
        lower(graph)


def test_targets_and_presets():
    assert {"cpu", "arm64", "cuda", "cuda-sm80", "cuda-sm87", "cuda-sm90"} <= set(TARGET_PRESETS)
    cpu = resolve_target("cpu")
    assert cpu.tvm_target["kind"] == "llvm" and cpu.tvm_target["num-cores"] >= 1 and cpu.device_type == "cpu"
    arm = resolve_target("arm64")
    assert arm.cross_compiler == "aarch64-linux-gnu-gcc" and arm.tvm_target["mtriple"] == "aarch64-linux-gnu"
    cuda = resolve_target("cuda-sm87")
    assert cuda.tvm_target["arch"] == "sm_87" and cuda.device_type == "cuda"
    raw = resolve_target({"kind": "llvm", "mcpu": "skylake-avx512"})
    assert raw.tvm_target["mcpu"] == "skylake-avx512"
    with pytest.raises(CodegenError, match="cpu.*arm64"):
        resolve_target("tpu")
    with pytest.raises(CodegenError, match="invalid TVM target"):
        resolve_target({"kind": "llvm", "no_such_key": 1})
    assert "cores" in describe_host_cpu()


def test_export_and_reload(tmp_path):
    graph, feeds = graph_contraction()
    result = build(graph, "cpu")
    path = export_library(result, tmp_path / "m.so")
    loaded = tvm.runtime.load_module(str(path))
    inputs = feeds(2)
    expected = interpret(graph, inputs)
    for value, actual in zip(graph.outputs, run_vm(loaded, graph, inputs), strict=True):
        assert_matches(actual, expected[value.name], 1e-5, value.name)


def test_tune_refuses_cleanly(tmp_path):
    from reshift.codegen.tvm import tune, tuning_available

    graph, _ = graph_contraction()
    with pytest.raises(CodegenError, match="arm64"):
        tune(graph, "arm64", trials=1, db_dir=tmp_path)
    with pytest.raises(CodegenError, match="symbolic batch"):
        tune(graph, "cpu", trials=1, db_dir=tmp_path)
    # pyproject pins apache-tvm-ffi 0.1.14.post1, with which MetaSchedule works (NOTES_tvm.md 7b);
    # a real tuning run takes minutes and is exercised by `benchmarks/e2e.py --tune-trials N`
    assert tuning_available() is None


# -- reference models --------------------------------------------------------------------------------
@functools.cache
def _model_graph(name: str):
    """The exported, exact-pass graph of a reference model (cached: the cross-build tests reuse it)."""
    import torch

    from examples.models import MODELS
    from reshift import frontend, passes

    spec = MODELS[name]
    torch.manual_seed(0)
    model = spec.build().eval()
    graph = frontend.from_torch(model, spec.example_inputs(2))
    graph, _ = passes.run(graph, "exact")
    return graph, spec


def _model_feeds(graph: Graph, spec, batch: int) -> dict[str, np.ndarray]:
    import torch

    torch.manual_seed(batch)
    return {
        v.name: t.numpy().astype(numpy_dtype(v.dtype))
        for v, t in zip(graph.inputs, spec.example_inputs(batch), strict=True)
    }


def _model_names() -> list[str]:
    try:
        from examples.models import MODELS
    except ImportError:
        return []
    return sorted(MODELS)


@pytest.mark.slow
@pytest.mark.parametrize("name", _model_names())
def test_reference_model_matches_interpreter(name):
    graph, spec = _model_graph(name)
    result = build(graph, "cpu")
    for batch in (1, 4):
        feeds = _model_feeds(graph, spec, batch)
        expected = interpret(graph, feeds)
        for value, actual in zip(graph.outputs, run_vm(result.executable, graph, feeds), strict=True):
            assert_matches(actual, expected[value.name], spec.rtol, f"{name}:{value.name} (batch {batch})")


def _elf_machine(path) -> int:
    with open(path, "rb") as handle:
        header = handle.read(20)
    assert header[:4] == b"\x7fELF"
    return struct.unpack("<H", header[18:20])[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "swin_block"])
def test_cross_builds_arm64(name, tmp_path):
    require_tool("aarch64-linux-gnu-gcc")
    graph, _ = _model_graph(name)
    arm = build(graph, "arm64")
    path = export_library(arm, tmp_path / "arm64.so")
    assert _elf_machine(path) == 183  # EM_AARCH64


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "swin_block"])
def test_cross_builds_cuda(name, tmp_path):
    graph, _ = _model_graph(name)
    cuda = build(graph, "cuda-sm90")
    kinds = [m.kind for m in cuda.executable.mod.imports[0].imports]
    assert "cuda" in kinds
    source = next(m for m in cuda.executable.mod.imports[0].imports if m.kind == "cuda").inspect_source()
    assert "__global__" in source
    path = export_library(cuda, tmp_path / "cuda.so")
    assert _elf_machine(path) == 62 and os.path.getsize(path) > 0  # x86-64 host library with the kernels inside


@pytest.mark.slow
def test_cross_build_cuda_conv_nd():
    """conv3d and conv_transpose2d/3d get dlight CUDA schedules (device code, no host loops)."""
    graph, _ = graph_conv_nd()
    cuda = build(graph, "cuda-sm90")
    assert "cuda" in [m.kind for m in cuda.executable.mod.imports[0].imports]


def test_cross_build_cuda_gather_scatter_resize():
    """gather_elements/gather_nd (TE), scatter_nd (TOPI's GPU extern) and cubic/cropped resize get device kernels."""
    b = GraphBuilder("index_cuda")
    x, ids, points = b.input("x", "f32[N,4,6]"), b.input("ids", "i64[N,4,3]"), b.input("points", "i32[N,3,1]")
    image = b.reshape(x, shape=("N", 1, 4, 6))
    corner = b.constant(np.array([[0, 1], [-1, 3]]))
    outs = [b.gather_elements(x, ids, axis=2), b.gather_nd(x, points, batch_dims=1)]
    outs += [
        b.scatter_nd(x, corner, b.input("rows", "f32[2,6]"), reduction="add"),
        b.resize2d(image, size=(7, 3), mode="cubic"),
    ]
    outs.append(
        b.resize2d(image, size=(5, 7), coordinate_transformation="tf_crop_and_resize", roi=(-0.2, 0.1, 0.9, 1.3))
    )
    modules = build(b.build(*outs), "cuda-sm90").executable.mod.imports[0].imports
    source = next(m for m in modules if m.kind == "cuda").inspect_source()
    for kernel in (
        "gather_elements",
        "gather_nd",
        "scatter_nd_index",
        "scatter_nd",
        "resize2d_cubic",
        "resize2d_linear",
    ):
        assert f"{kernel}_kernel(" in source, kernel


def test_gpu_build_refuses_blocks_outside_thread_bindings():
    """A block left outside every thread binding would run on the host over device memory (segfault)."""
    from reshift.codegen.tvm.build import _host_block

    bound = """
def main(a: T.Buffer((4,), "float32")):
    T.func_attr({"tirx.is_scheduled": True})
    with T.sblock("root"):
        for i in T.thread_binding(4, thread="threadIdx.x"):
            with T.sblock("compute"):
                a[i] = T.float32(0)
"""
    unbound = (
        bound
        + """    for j in range(4):
        with T.sblock("side"):
            a[j] = a[j] + T.float32(1)
"""
    )
    assert _host_block(bound) is None
    assert _host_block(unbound) == 'with T.sblock("side"):'
