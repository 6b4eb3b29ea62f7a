"""Recovery fine-tuning (reshift.recover) and the IR -> torch generator (codegen/torch): the trainable
module equals the interpreter on the re-coded graph, loss decreases, determinism, resume, refusals, CLI."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import reshift
from reshift import ir, passes
from reshift.cli import main
from reshift.codegen.torch import to_torch
from reshift.errors import CodegenError, InputError
from tests.helpers import parse

TINY = """
graph tiny(%x: f32[N,8,16]) {
  const %ln_w: f32[16] = ...
  const %ln_b: f32[16] = ...
  const %wq: f32[16,16] = ...
  const %wk: f32[16,16] = ...
  const %wv: f32[16,16] = ...
  const %wo: f32[16,16] = ...
  const %w1: f32[32,16] = ...
  const %b1: f32[32] = ...
  const %w2: f32[16,32] = ...
  const %wy: f32[4,16] = ...
  %h: f32[N,8,16] = layer_norm(%x, %ln_w, %ln_b) @ln
  %q: f32[N,8,16] = linear(%h, %wq, _) @q
  %k: f32[N,8,16] = linear(%h, %wk, _) @k
  %v: f32[N,8,16] = linear(%h, %wv, _) @v
  %kt: f32[N,16,8] = transpose(%k) {perm=[0, 2, 1]} @kt
  %s: f32[N,8,8] = matmul(%q, %kt) @qk
  %p: f32[N,8,8] = softmax(%s) {axis=-1} @softmax
  %a: f32[N,8,16] = matmul(%p, %v) @pv
  %o: f32[N,8,16] = linear(%a, %wo, _) @o
  %r: f32[N,8,16] = add(%x, %o) @res1
  %f1: f32[N,8,32] = linear(%r, %w1, %b1) @fc1
  %g: f32[N,8,32] = gelu(%f1) @gelu
  %f2: f32[N,8,16] = linear(%g, %w2, _) @fc2
  %r2: f32[N,8,16] = add(%r, %f2) @res2
  %y: f32[N,8,4] = linear(%r2, %wy, _) @head
  return %y
}
"""
CONV = """
graph convs(%x: f32[N,4,7,6]) {
  const %w0: f32[6,2,3,3] = ...
  const %b0: f32[6] = ...
  const %w1: f32[3,6,1,1] = ...
  %h: f32[N,6,3,3] = conv2d(%x, %w0, %b0) {stride=[2, 2], padding=[1, 1, 0, 0], groups=2} @conv0
  %r: f32[N,6,3,3] = relu(%h) @relu
  %y: f32[N,3,3,3] = conv2d(%r, %w1, _) @conv1
  return %y
}
"""
OPTIONS = {"skip": [], "group_size": 8, "bcq_q": 2}
PIPELINES = ["shift", "bcq", "ternary", "w4a4", "w8a8", "w4a4_log2", "w4a4_adalog"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids oversubscription on a shared host (25x faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_graph() -> ir.Graph:
    rng = np.random.default_rng(0)
    g = parse(TINY, rng)
    for c in g.constants.values():
        c.data = (c.data * (0.3 if c.data.ndim == 2 else 0.1)).astype(np.float32)
    g.constants["ln_w"].data = (1 + g.constants["ln_w"].data).astype(np.float32)
    return g


def batches(n: int, seed: int = 1, shape=(8, 16), size: int = 16) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n * size, *shape)).astype(np.float32)}


def module_output(module, x: np.ndarray) -> np.ndarray:
    module.eval()
    with torch.no_grad():
        return next(iter(module({"x": torch.from_numpy(x)}).values())).numpy()


def rel(a, b) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_trained_module_equals_interpreter_on_recoded_graph(pipeline):
    """After training steps (state off its initial grid), eval forward == interpret(written-back graph)."""
    g = tiny_graph()
    x = batches(1, seed=7)["x"][:3]
    recovered, report = reshift.recover(g, pipeline, batches(2), steps=6, lr=3e-3, batch_size=16, **OPTIONS)
    ir.verify(recovered)
    rewritten, _ = passes.run(g, pipeline, calibration=[{"x": batches(2)["x"][:16]}], **OPTIONS)
    assert recovered.op_histogram() == rewritten.op_histogram()
    module = to_torch(recovered)
    assert rel(module_output(module, x), ir.interpret(recovered, {"x": x})["y"]) < 1e-5
    assert report.steps == 6 and len(report.losses) == 6 and report.trained_ops


def test_shift_conv_module_equals_interpreter_after_training():
    rng = np.random.default_rng(3)
    g = parse(CONV, rng)
    data = {"x": rng.standard_normal((8, 4, 7, 6)).astype(np.float32)}
    recovered, report = reshift.recover(g, "shift", data, steps=5, lr=3e-3, batch_size=4, skip=[])
    assert recovered.op_histogram()["shift_conv2d"] == 2
    x = data["x"][:2]
    assert rel(module_output(to_torch(recovered), x), ir.interpret(recovered, {"x": x})["y"]) < 1e-5
    assert report.trained_ops == {"shift_conv2d": 2}


@pytest.mark.parametrize("pipeline", ["none", "shift", "ternary", "w4a4_adalog"])
def test_untrained_module_equals_interpreter(pipeline):
    """Step 0: the generated module reproduces the pass's own codes exactly (nothing lost on the way in)."""
    g = tiny_graph()
    rewritten, _ = passes.run(g, pipeline, calibration=[{"x": batches(1)["x"]}], **OPTIONS)
    module = to_torch(rewritten)
    x = batches(1, seed=5)["x"][:4]
    assert rel(module_output(module, x), ir.interpret(rewritten, {"x": x})["y"]) < 1e-5
    recoded = module.to_graph()
    np.testing.assert_array_equal(ir.interpret(recoded, {"x": x})["y"], ir.interpret(rewritten, {"x": x})["y"])


@pytest.mark.parametrize("pipeline", ["shift", "ternary", "bcq", "w4a4"])
def test_recovery_lowers_the_distillation_loss(pipeline):
    g = tiny_graph()
    _, report = reshift.recover(g, pipeline, batches(4), steps=40, lr=1e-3, batch_size=16, **OPTIONS)
    assert report.loss_after < 0.95 * report.loss_before, report


def test_deepshift_ps_moves_exponents_and_signs():
    """DeepShift-PS trains the shift codes themselves, not only the float parameters around them."""
    g = tiny_graph()
    before, _ = passes.run(g, "shift", **OPTIONS)
    after, _ = reshift.recover(
        g, "shift", batches(4), steps=40, lr=1e-3, batch_size=16, train="quantizers", lr_scales={"shift": 50}, **OPTIONS
    )
    codes = lambda graph: np.concatenate(  # noqa: E731
        [
            np.concatenate([n.inputs[1].data.ravel(), n.inputs[2].data.ravel()])
            for n in graph.nodes
            if n.op == "shift_linear"
        ]
    )
    assert np.mean(codes(before) != codes(after)) > 0.001
    assert {n.inputs[2].data.dtype for n in after.nodes if n.op == "shift_linear"} == {np.dtype(np.uint8)}
    # the default 7-level codes (exponents 0..6) stay 7-level: the recovered layers keep the int8 kernel
    assert max(int(n.inputs[2].data.max()) for n in after.nodes if n.op == "shift_linear") <= 6


def test_recovery_is_deterministic_for_a_seed():
    g = tiny_graph()
    a, _ = reshift.recover(g, "ternary", batches(3), steps=8, lr=1e-3, batch_size=16, seed=3, **OPTIONS)
    b, _ = reshift.recover(g, "ternary", batches(3), steps=8, lr=1e-3, batch_size=16, seed=3, **OPTIONS)
    c, _ = reshift.recover(g, "ternary", batches(3), steps=8, lr=1e-3, batch_size=16, seed=4, **OPTIONS)
    data = lambda graph: [v.data for v in graph.constants.values()]  # noqa: E731
    assert all(np.array_equal(x, y) for x, y in zip(data(a), data(b), strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(data(a), data(c), strict=True))


def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path):
    g = tiny_graph()
    kwargs = dict(steps=8, lr=1e-3, batch_size=16, seed=1, **OPTIONS)
    straight, _ = reshift.recover(g, "shift", batches(3), **kwargs)
    ckpt = tmp_path / "recover.pt"
    with pytest.raises(KeyboardInterrupt):
        _run_until(g, ckpt, 4, kwargs)
    resumed, report = reshift.recover(g, "shift", batches(3), checkpoint=ckpt, checkpoint_every=4, **kwargs)
    assert report.resumed_from == 4 and len(report.losses) == 8
    for x, y in zip(straight.constants.values(), resumed.constants.values(), strict=True):
        np.testing.assert_array_equal(x.data, y.data)
    with pytest.raises(InputError, match="another run"):
        reshift.recover(g, "shift", batches(3), checkpoint=ckpt, **dict(kwargs, lr=2e-3))


def _run_until(g, ckpt, stop: int, kwargs):
    """A recovery run that dies right after its first checkpoint (step ``stop``) is in place."""
    import os

    real_replace = os.replace

    def replace_then_die(src, dst):
        real_replace(src, dst)
        raise KeyboardInterrupt

    os.replace = replace_then_die
    try:
        reshift.recover(g, "shift", batches(3), checkpoint=ckpt, checkpoint_every=stop, **kwargs)
    finally:
        os.replace = real_replace


def test_ops_without_torch_implementation_are_refused_by_name():
    text = """
graph g(%x: f32[2,3,4,4]) {
  %y: f32[2,3,8,8] = resize2d(%x) {size=[8, 8], mode="nearest"} @up
  return %y
}
"""
    with pytest.raises(CodegenError, match=r"resize2d x1: up"):
        to_torch(ir.parse(text))


def test_bad_train_data_is_an_input_error(tmp_path):
    g = tiny_graph()
    with pytest.raises(InputError, match="batch 0.*x"):
        reshift.recover(g, "shift", {"x": np.ones((4, 8, 5), np.float32)}, steps=1, **OPTIONS)
    with pytest.raises(InputError, match="does not exist"):
        reshift.recover(g, "shift", tmp_path / "missing.npz", steps=1, **OPTIONS)
    with pytest.raises(InputError, match="empty"):
        reshift.recover(g, "shift", [], steps=1, **OPTIONS)


def test_intermediate_features_join_the_loss():
    g = tiny_graph()
    _, plain = reshift.recover(g, "ternary", batches(2), steps=0, **OPTIONS)
    _, with_features = reshift.recover(g, "ternary", batches(2), steps=0, features=["r"], feature_weight=1.0, **OPTIONS)
    assert with_features.loss_before > plain.loss_before


def test_softmax_features_are_the_attention_probabilities_both_graphs_compute():
    from reshift.recovery import FEATURE_MODES

    g = tiny_graph()
    student, _ = passes.run(g, "ternary", calibration=[{"x": batches(1)["x"]}], **OPTIONS)

    def names(mode: str, teacher: ir.Graph) -> list[str]:
        return [n for find in FEATURE_MODES[mode] for n in find(student, teacher)]

    assert names("softmax", g) == ["p"] and names("auto+softmax", g) == ["h", "p"]
    assert names("softmax", parse(CONV, np.random.default_rng(0))) == []  # a teacher without them
    _, plain = reshift.recover(g, "ternary", batches(2), steps=0, **OPTIONS)
    _, distilled = reshift.recover(g, "ternary", batches(2), steps=0, features="softmax", feature_weight=1.0, **OPTIONS)
    assert distilled.loss_before > plain.loss_before


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine():
    from reshift.recovery import lr_factor

    assert [lr_factor(s, 10, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 10, 4) == 1.0 and lr_factor(7, 10, 4) == pytest.approx(0.5)
    assert lr_factor(0, 10) == 1.0 and lr_factor(5, 10) == pytest.approx(0.5)


def test_cosine_loss_is_zero_for_an_exact_student_and_positive_for_a_lossy_one():
    g = tiny_graph()
    _, exact = reshift.recover(g, "none", batches(2), steps=0, cosine_weight=1.0, **OPTIONS)
    _, plain = reshift.recover(g, "ternary", batches(2), steps=0, **OPTIONS)
    _, with_cosine = reshift.recover(g, "ternary", batches(2), steps=0, cosine_weight=1.0, **OPTIONS)
    assert exact.loss_before < 1e-6
    assert with_cosine.loss_before > plain.loss_before


def test_adamw_warmup_and_cosine_loss_train_and_write_back_exactly():
    g = tiny_graph()
    kwargs = dict(steps=30, lr=1e-3, batch_size=16, warmup=5, optimizer="adamw", weight_decay=0.01)
    recovered, report = reshift.recover(g, "w4a4", batches(4), cosine_weight=0.5, **kwargs, **OPTIONS)
    assert report.loss_after < 0.95 * report.loss_before, report
    x = batches(1, seed=7)["x"][:3]
    assert rel(module_output(to_torch(recovered), x), ir.interpret(recovered, {"x": x})["y"]) < 1e-5


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"warmup": 5, "steps": 4}, "warmup"),
        ({"optimizer": "sgd"}, "optimizer"),
        ({"cosine_weight": -1.0}, "cosine_weight"),
    ],
)
def test_bad_schedule_and_loss_options_are_input_errors(bad, message):
    kwargs = {"steps": 2, **bad}
    with pytest.raises(InputError, match=message):
        reshift.recover(tiny_graph(), "ternary", batches(1), **kwargs, **OPTIONS)


# -- CLI ----------------------------------------------------------------------------------------
def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["x", "w0", "b0"], ["h"], transB=1, name="fc0"),
        helper.make_node("Relu", ["h"], ["r"], name="act"),
        helper.make_node("Gemm", ["r", "w1", "b1"], ["h1"], transB=1, name="fc1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="act1"),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["y"], transB=1, name="fc2"),
    ]
    inits = [
        numpy_helper.from_array((0.3 * rng.standard_normal((16, 8))).astype(np.float32), "w0"),
        numpy_helper.from_array(np.zeros(16, np.float32), "b0"),
        numpy_helper.from_array((0.3 * rng.standard_normal((16, 16))).astype(np.float32), "w1"),
        numpy_helper.from_array(np.zeros(16, np.float32), "b1"),
        numpy_helper.from_array((0.3 * rng.standard_normal((4, 16))).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(4, np.float32), "b2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("recover_cli")
    onnx.save(_mlp(), root / "mlp.onnx")
    rng = np.random.default_rng(2)
    np.savez(root / "train.npz", x=rng.standard_normal((32, 8)).astype(np.float32))
    np.savez(root / "wrong.npz", x=np.ones((32, 5), np.float32))
    (root / "garbage.npz").write_bytes(b"not a zip file at all")
    return root


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--train-data", "wrong.npz"], "train data batch 0"),
        (["--train-data", "garbage.npz"], "not a readable .npz"),
        (["--train-data", "missing.npz"], "does not exist"),
        ([], "needs --train-data"),
    ],
)
def test_cli_bad_train_data_exits_2(cli_files, capsys, extra, message):
    extra = [str(cli_files / e) if e.endswith(".npz") else e for e in extra]
    argv = ["compile", str(cli_files / "mlp.onnx"), "-o", str(cli_files / "bad"), "--pipeline", "shift"]
    assert main(argv + ["--recover-steps", "2", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_train_data_without_steps_exits_2(cli_files, capsys):
    argv = ["compile", str(cli_files / "mlp.onnx"), "-o", str(cli_files / "bad"), "--pipeline", "shift"]
    assert main(argv + ["--train-data", str(cli_files / "train.npz")]) == 2
    assert "--recover-steps" in capsys.readouterr().err


def test_cli_compile_with_recovery_writes_a_working_artifact(cli_files, capsys):
    out = cli_files / "recovered"
    argv = ["compile", str(cli_files / "mlp.onnx"), "-o", str(out), "--pipeline", "ternary", "--calib"]
    argv += [str(cli_files / "train.npz"), "--recover-steps", "5", "--train-data", str(cli_files / "train.npz")]
    assert main(argv + ["--recover-lr", "1e-3", "--recover-batch", "8"]) == 0
    printed = capsys.readouterr().out
    assert "recovery (ternary): 5 steps" in printed and "ternary_linear x1" in printed
    x = np.random.default_rng(4).standard_normal((3, 8)).astype(np.float32)
    y = reshift.load(out)(x)
    assert np.all(np.isfinite(np.asarray(y)))


# -- straight-through quantizers at their edges ---------------------------------------------------
EDGES = np.array(
    [0.0, -0.0, 1.0, 0.5, 0.25, 2.0**-14, 2.0**-30, -1.0, -3.5, 7.49, 7.5, 100.0, np.inf, -np.inf, np.nan], np.float32
)


@pytest.mark.parametrize("base_kind, base", [("log2", 2.0), ("log_sqrt2", 2.0), ("adaptive", 2 ** (5 / 16))])
def test_log2_fake_quant_equals_the_reference_at_edges(base_kind, base):
    from reshift.codegen.torch.ste import log2_fake_quant
    from reshift.ir.ops_quant import log2_quant_ref

    x = np.concatenate([EDGES, np.float32(2.0) ** -np.arange(0, 20, 0.25, dtype=np.float32)])
    ref = log2_quant_ref(x, 4, base_kind, base, 0.5, 16)
    got = log2_fake_quant(torch.from_numpy(x), torch.tensor(np.float32(0.5)), 4, base_kind, base, 16).numpy()
    np.testing.assert_array_equal(got, ref)


def test_uniform_fake_quant_equals_the_reference_at_edges_and_passes_gradients_in_range():
    from reshift.codegen.torch.ste import uniform_fake_quant
    from reshift.ir.ops_quant import quantize_uniform_ref

    ref = quantize_uniform_ref(EDGES, (0.5,), (3.0,), 4, -1)
    scale = torch.tensor(np.float32(0.5), requires_grad=True)
    y = uniform_fake_quant(torch.from_numpy(EDGES), scale, torch.tensor(3.0), 0, 15)
    np.testing.assert_array_equal(y.detach().numpy(), ref)
    edges = EDGES[~np.isnan(EDGES)]  # (a NaN input makes the scale's gradient NaN, as autograd has it)
    x = torch.from_numpy(edges.copy()).requires_grad_()
    uniform_fake_quant(x, scale, torch.tensor(3.0), 0, 15).sum().backward()
    in_range = (np.rint(edges / 0.5) + 3 >= 0) & (np.rint(edges / 0.5) + 3 <= 15) & np.isfinite(edges)
    np.testing.assert_array_equal(x.grad.numpy(), in_range.astype(np.float32))
    codes = np.clip(np.rint(edges / 0.5) + 3, 0, 15) - 3  # d y / d scale with the codes held fixed
    assert float(scale.grad) == pytest.approx(float(np.sum(codes)))


def test_round_ste_rounds_half_to_even_and_passes_the_gradient():
    from reshift.codegen.torch.ste import round_ste

    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, np.inf], requires_grad=True)
    y = round_ste(x)
    np.testing.assert_array_equal(y.detach().numpy(), np.rint(x.detach().numpy()))
    y[:5].sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [1, 1, 1, 1, 1, 0])
