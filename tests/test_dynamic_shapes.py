"""Several symbolic dims per graph: ONNX ``[batch, seq]`` models compiled once, CNNs with a symbolic width
specialized per shape (reshift.specializing), symbol naming and the CLI's refusal; all against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import reshift
from reshift import ir
from reshift.cli import main
from reshift.errors import SymbolicShapeError
from reshift.frontend import from_onnx
from reshift.specializing import SpecializingModel

RNG = np.random.default_rng(0)


def _init(name: str, array) -> onnx.TensorProto:
    array = np.asarray(array)
    return numpy_helper.from_array(array.astype(np.float32) if array.dtype.kind == "f" else array, name)


def _attention_model() -> onnx.ModelProto:
    """One attention block as exporters write it: shapes read back with Shape/Gather/Concat, position
    ids sliced from a table (``table[:, :S]``, as BERT's), a padding mask, a size used as a tensor
    (``arange(N) * S``)."""
    d, heads = 16, 2
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["sx"]),
        helper.make_node("Gather", ["sx", "i0"], ["n"]),
        helper.make_node("Gather", ["sx", "i1"], ["t"]),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
        helper.make_node("Unsqueeze", ["t", "ax0"], ["t1"]),
        helper.make_node("Slice", ["pos_table", "start0", "t1", "ax1"], ["pos_ids"]),
        helper.make_node("Gather", ["pos_emb", "pos_ids"], ["pos"]),
        helper.make_node("Gather", ["emb", "input_ids"], ["tok"]),
        helper.make_node("Add", ["tok", "pos"], ["x"]),
        helper.make_node("Concat", ["n1", "t1", "heads_shape"], ["qkv_shape"], axis=0),
        helper.make_node("Concat", ["n1", "t1", "model_dim"], ["out_shape"], axis=0),
        helper.make_node("MatMul", ["x", "w_qkv"], ["qkv0"]),
        helper.make_node("Add", ["qkv0", "b_qkv"], ["qkv1"]),
        helper.make_node("Reshape", ["qkv1", "qkv_shape"], ["qkv2"]),
        helper.make_node("Transpose", ["qkv2"], ["qkv"], perm=[2, 0, 3, 1, 4]),
        helper.make_node("Gather", ["qkv", "i0"], ["q"], axis=0),
        helper.make_node("Gather", ["qkv", "i1"], ["k"], axis=0),
        helper.make_node("Gather", ["qkv", "i2"], ["v"], axis=0),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["s0"]),
        helper.make_node("Mul", ["s0", "scale"], ["s1"]),
        helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "mf"], ["inv"]),
        helper.make_node("Mul", ["inv", "neg"], ["bias0"]),
        helper.make_node("Unsqueeze", ["bias0", "ax12"], ["bias"]),
        helper.make_node("Add", ["s1", "bias"], ["s2"]),
        helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o0"]),
        helper.make_node("Transpose", ["o0"], ["o1"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["o1", "out_shape"], ["o2"]),
        helper.make_node("MatMul", ["o2", "w_o"], ["o3"]),
        helper.make_node("Add", ["o3", "x"], ["r"]),
        helper.make_node("LayerNormalization", ["r", "ln_w", "ln_b"], ["ln"], axis=-1),
        helper.make_node("Range", ["i0", "n", "i1"], ["rows"]),
        helper.make_node("Mul", ["rows", "t"], ["offsets"]),
        helper.make_node("Cast", ["offsets"], ["offsets_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["offsets_f", "tenth"], ["shift0"]),
        helper.make_node("Unsqueeze", ["shift0", "ax12"], ["shift"]),
        helper.make_node("Add", ["ln", "shift"], ["out"]),
    ]
    inits = [
        _init("emb", RNG.standard_normal((50, d))),
        _init("pos_emb", RNG.standard_normal((32, d))),
        _init("pos_table", np.arange(32, dtype=np.int64)[None]),
        _init("start0", np.array([0], np.int64)),
        _init("ax1", np.array([1], np.int64)),
        _init("tenth", np.array(0.1, np.float32)),
        _init("w_qkv", RNG.standard_normal((d, 3 * d)) * 0.3),
        _init("b_qkv", RNG.standard_normal(3 * d) * 0.1),
        _init("w_o", RNG.standard_normal((d, d)) * 0.3),
        _init("ln_w", 1 + 0.1 * RNG.standard_normal(d)),
        _init("ln_b", 0.1 * RNG.standard_normal(d)),
        _init("heads_shape", np.array([3, heads, d // heads], np.int64)),
        _init("model_dim", np.array([d], np.int64)),
        _init("scale", np.array(1 / np.sqrt(d // heads), np.float32)),
        _init("one", np.array(1.0, np.float32)),
        _init("neg", np.array(-1e4, np.float32)),
        *(_init(f"i{i}", np.array(i, np.int64)) for i in range(3)),
        _init("ax0", np.array([0], np.int64)),
        _init("ax12", np.array([1, 2], np.int64)),
    ]
    graph = helper.make_graph(
        nodes,
        "attention",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "sequence", d])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _cnn_model() -> onnx.ModelProto:
    """A recognizer-like CNN over ``x: [N, 3, 16, W]``: conv, pool, strided conv, mean over the height."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("ReduceMean", ["c2"], ["y"], axes=[2], keepdims=0),
    ]
    inits = [
        _init("w1", RNG.standard_normal((8, 3, 3, 3)) * 0.3),
        _init("b1", RNG.standard_normal(8) * 0.1),
        _init("w2", RNG.standard_normal((4, 8, 3, 3)) * 0.3),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "w"])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _text_inputs(n: int, t: int) -> dict[str, np.ndarray]:
    mask = np.ones((n, t), np.int64)
    mask[0, t // 2 :] = 0  # a padded row
    return {"input_ids": RNG.integers(0, 50, (n, t)).astype(np.int64), "attention_mask": mask}


def test_batch_and_sequence_symbols_compile_once():
    model = _attention_model()
    graph = from_onnx(model)
    assert [str(v.type) for v in graph.inputs] == ["i64[N,sequence]", "i64[N,sequence]"]
    cm = reshift.compile(model)
    session = ort.InferenceSession(model.SerializeToString())
    for n, t in ((1, 5), (3, 5), (3, 12), (2, 17)):  # two batches at one length, three lengths
        inputs = _text_inputs(n, t)
        want = session.run(None, inputs)[0]
        np.testing.assert_allclose(ir.interpret(graph, inputs)["out"], want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(cm(**inputs), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(reshift.errors.InputError, match="sequence"):
        cm(input_ids=np.zeros((2, 5), np.int64), attention_mask=np.ones((2, 6), np.int64))
    # the position table has 32 rows: a longer sequence is refused, not read past the table
    assert graph.symbol_bounds == {"sequence": 32}
    for run in (cm, lambda **kw: ir.interpret(graph, kw)):
        with pytest.raises(reshift.errors.InputError, match="up to 32"):
            run(**_text_inputs(1, 33))


def test_symbol_names_from_dim_params():
    x = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", "seq len", None, "?", "?"])
    y = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", "seq len", "batch"])
    out = helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch", "seq len", None, "?", "?"])
    graph = helper.make_graph([helper.make_node("Identity", ["a"], ["s"])], "g", [x, y], [out])
    g = from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    # axis 0 is N (its dim_param too, wherever it appears); a named axis keeps its name; an unnamed one
    # or a placeholder ("?", as Paddle exports write) is fresh every time
    assert [str(v.type) for v in g.inputs] == ["f32[N,seq_len,S1,S2,S3]", "f32[N,seq_len,N]"]


def test_cnn_with_symbolic_width_specializes_per_shape(capsys):
    model = _cnn_model()
    with pytest.raises(SymbolicShapeError, match=r"node 'conv1' \(Conv\).*W is axis 3 of input 'x'") as info:
        from_onnx(model)
    assert info.value.symbols == {"W": [("x", 3)]}
    cm = reshift.compile(model, max_shapes=2)
    assert isinstance(cm, SpecializingModel)
    session = ort.InferenceSession(model.SerializeToString())
    for shape in ((1, 3, 16, 24), (2, 3, 16, 24), (1, 3, 16, 40), (1, 3, 16, 24)):
        x = RNG.standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(cm(x), session.run(None, {"x": x})[0], rtol=1e-4, atol=1e-5)
    assert cm.compiles == 2  # batch 2 and the repeated width reuse their builds (the batch stays symbolic)
    assert "reshift: compiling cnn for x=1,3,16,40 (shape 2 of at most 2)" in capsys.readouterr().err
    cm(RNG.standard_normal((1, 3, 16, 32)).astype(np.float32))  # evicts the least recently used: W=40
    assert cm.compiles == 3 and [key[0][1][-1] for key in cm.cache] == [24, 32]
    with pytest.raises(reshift.errors.InputError, match="input_shapes"):
        cm.save("unused")


def test_cli_compile_refuses_symbolic_width(tmp_path, capsys):
    path = tmp_path / "cnn.onnx"
    onnx.save(_cnn_model(), path)
    assert main(["compile", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "W is axis 3 of input 'x'" in err and "--input-shape x=" in err
    assert main(["inspect", str(path), "--input-shape", "x=1,3,16,24"]) == 0


def test_specializing_keeps_the_batch_wherever_its_dim_param_appears():
    x = helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", "samples"])
    state = helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 128])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "samples"])
    graph = helper.make_graph([helper.make_node("Identity", ["audio"], ["y"])], "vad", [x, state], [out])
    model = SpecializingModel(helper.make_model(graph), SymbolicShapeError("unused"), {})
    assert [dims for _, dims, _ in model.inputs] == [["N", None], [2, "N", 128]]
    inputs = {"audio": np.zeros((3, 512), np.float32), "state": np.zeros((2, 3, 128), np.float32)}
    assert [(name, shape) for name, shape, _ in model._pins(inputs)] == [("audio", (3, 512))]  # state: nothing to pin


def test_bench_binds_non_batch_symbols_to_a_length_within_the_bound():
    from reshift.cli import random_inputs, symbol_sizes

    specs = [
        {"name": "ids", "shape": ["N", "sequence"], "dtype": "int64"},
        {"name": "h", "shape": ["4*N*sequence", 8], "dtype": "float32"},
    ]
    assert symbol_sizes({"inputs": specs}, 2) == {"N": 2, "sequence": 128}
    sizes = symbol_sizes({"inputs": specs, "symbol_bounds": {"sequence": 64}}, 2)
    inputs = random_inputs(specs, 2, sizes=sizes)
    assert sizes == {"N": 2, "sequence": 64} and inputs["ids"].shape == (2, 64) and inputs["h"].shape == (512, 8)


def test_torch_export_with_a_sequence_dim():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)

    class Encoder(torch.nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.emb, self.qkv, self.ln = torch.nn.Embedding(50, d), torch.nn.Linear(d, 3 * d), torch.nn.LayerNorm(d)

        def forward(self, ids):
            x = self.emb(ids)
            n, t, d = x.shape
            q, k, v = self.qkv(x).reshape(n, t, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
            y = (torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1) @ v).transpose(1, 2).reshape(n, t, d)
            return self.ln(x + y)

    class Causal(torch.nn.Module):
        def forward(self, x):
            t = x.shape[1]
            scores = (x @ x.transpose(-1, -2)).masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), -1e9)
            return torch.softmax(scores, -1) @ x

    model = Encoder().eval()
    graph = reshift.frontend.from_torch(model, (torch.randint(0, 50, (2, 7)),), dynamic_dims={0: {1: "S"}})
    assert str(graph.inputs[0].type) == "i64[N,S]"
    for n, t in ((1, 3), (3, 11)):
        ids = torch.randint(0, 50, (n, t))
        got = ir.interpret(graph, {graph.inputs[0].name: ids.numpy()})
        np.testing.assert_allclose(next(iter(got.values())), model(ids).detach().numpy(), rtol=1e-5, atol=1e-5)
    # a mask built from S alone is sampled, not traced: refused with the reason, never baked in at one length
    with pytest.raises(reshift.errors.UnsupportedOpError, match=r"constant triu has a shape over .*'S'"):
        reshift.frontend.from_torch(Causal(), (torch.randn(2, 6, 8),), dynamic_dims={0: {1: "S"}})
