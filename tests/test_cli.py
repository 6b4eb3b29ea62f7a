"""The command line: compile, run, bench, inspect, tune on a small ONNX model; bad input exits 2."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from reshift.cli import main
from reshift.frontend import from_onnx
from reshift.ir import interpret


def _model(unsupported_op: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1, name="fc"),
        helper.make_node("Relu", ["h"], ["y"], name="act"),
    ]
    initializers = [
        numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])]
    if unsupported_op:
        nodes.append(helper.make_node("NonZero", ["y"], ["nonzero"], name="where_positive"))
        outputs = [helper.make_tensor_value_info("nonzero", TensorProto.INT64, [2, None])]
    graph = helper.make_graph(
        nodes, "gemm_relu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])], outputs, initializers
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    onnx.save(_model(), root / "model.onnx")
    onnx.save(_model(unsupported_op=True), root / "nonzero.onnx")
    (root / "garbage.onnx").write_bytes(b"\x08\x07this is not a protobuf\xff\xfe" * 10)
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    np.savez(root / "in.npz", x=x)
    np.savez(root / "positional.npz", x)  # saved as arr_0: matched by position
    np.savez(root / "wrong.npz", x=np.ones((5, 7), np.float32))
    assert main(["compile", str(root / "model.onnx"), "-o", str(root / "out")]) == 0
    return root


def test_compile_writes_artifact(files, capsys):
    assert sorted(p.name for p in (files / "out").iterdir()) == ["meta.json", "model.so"]


def test_run_prints_and_saves(files, capsys):
    assert main(["run", str(files / "out"), "--input", str(files / "in.npz")]) == 0
    out = capsys.readouterr().out
    assert "y: float32[5, 3]" in out
    assert main(["run", str(files / "out"), "--input", str(files / "positional.npz"), "-o", str(files / "o.npz")]) == 0
    x = np.load(files / "in.npz")["x"]
    expected = interpret(from_onnx(files / "model.onnx"), {"x": x})["y"]
    np.testing.assert_allclose(np.load(files / "o.npz")["y"], expected, rtol=1e-5, atol=1e-6)


def test_inspect_artifact_and_model(files, capsys):
    assert main(["inspect", str(files / "out")]) == 0
    out = capsys.readouterr().out
    assert "input  x: float32['N', 4]" in out and "target cpu" in out and "sha256" in out
    assert main(["inspect", str(files / "model.onnx")]) == 0
    assert "pipeline exact" in capsys.readouterr().out


def test_bench_artifact_and_onnx(files, capsys):
    assert main(["bench", str(files / "out"), "--batch", "2", "--repeat", "3", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "host:" in out and "reshift (tvm)" in out and "items/s" in out
    args = ["bench", str(files / "model.onnx"), "--batch", "4", "--repeat", "3", "--warmup", "1", "--threads", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "onnxruntime" in out and "speedup over onnxruntime" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compile", "{root}/missing.onnx", "-o", "{root}/x"], "no such file"),
        (["compile", "{root}/garbage.onnx", "-o", "{root}/x"], "garbage.onnx"),
        (["compile", "{root}/nonzero.onnx", "-o", "{root}/x"], "NonZero"),
        (["compile", "{root}/model.onnx", "-o", "{root}/x", "--target", "vax"], "unknown target 'vax'"),
        (["run", "{root}/out", "--input", "{root}/missing.npz"], "no such input file"),
        (["run", "{root}/out", "--input", "{root}/model.onnx"], "not a readable .npz"),
        (["run", "{root}/out", "--input", "{root}/wrong.npz"], "expected shape"),
        (["run", "{root}/nowhere", "--input", "{root}/in.npz"], "no such artifact directory"),
        (["bench", "{root}/missing.onnx"], "no such file"),
        (["inspect", "{root}/garbage.onnx"], "garbage.onnx"),
    ],
)
def test_bad_input_exits_2_without_traceback(files, capsys, argv, message):
    assert main([a.format(root=files) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert f"reshift {argv[0]}: error:" in err


def test_pass_options_reach_the_passes(files, tmp_path, capsys):
    """``--option KEY=VALUE`` (Python literals, else text) go to the pipeline's passes."""
    argv = ["inspect", str(files / "model.onnx"), "--pipeline", "shift", "--option", "skip=[]"]
    assert main([*argv, "--option", "shift_bits=4"]) == 0
    out = capsys.readouterr().out
    assert "ops:     shift_linear x1" in out and "shift_weights fc: {'bits': 5" in out  # 1 sign + 4 exponent bits
    art = tmp_path / "art"
    compile_argv = ["compile", str(files / "model.onnx"), "-o", str(art), "--pipeline", "shift", "--option", "skip=[]"]
    assert main(compile_argv) == 0
    assert (art / "model.so").is_file()
    assert main([*argv, "--option", "shift_levels=9"]) == 2
    assert "shift_levels=9 must be in 1..8" in capsys.readouterr().err
    assert main([*argv, "--option", "shift_bits"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert main([*argv, "--option", "shift_bit=4"]) == 2  # a typo is refused, not silently ignored
    assert "did you mean 'shift_bits'?" in capsys.readouterr().err
    assert main([*argv, "--option", "bcq_q=2"]) == 0  # another pipeline's option: a one-line warning
    err = capsys.readouterr().err
    assert "reshift inspect: warning: option 'bcq_q' is ignored: pipeline 'shift' does not read it" in err
    assert "UserWarning" not in err


def test_tune_exits_0_or_2_cleanly(files, tmp_path):
    """MetaSchedule may be unusable in this TVM build: then tune must exit 2 with a message, not crash.

    Two trials take MetaSchedule 60-90 s here (2 cores): worker start-up, not the trials."""
    argv = ["tune", str(files / "model.onnx"), "--trials", "2", "--db", str(tmp_path / "db")]
    out = subprocess.run([sys.executable, "-m", "reshift", *argv], capture_output=True, text=True, timeout=600)
    assert out.returncode in (0, 2), out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    if out.returncode == 2:
        assert "reshift tune: error:" in out.stderr


def test_tune_knobs_only_reports_what_it_tuned(files, tmp_path, capsys):
    """``--trials 0``: only the knob search over reshift's own kernels; it lists every instance."""
    assert main(["tune", str(files / "model.onnx"), "--trials", "0", "--db", str(tmp_path / "db")]) == 0
    out = capsys.readouterr().out
    assert "kernel knobs:" in out and "dense_f32 [" in out and " ms (" in out
    assert list((tmp_path / "db").glob("*/reshift_knobs.json"))


def test_console_script_compile_and_run(files, tmp_path):
    out_dir = tmp_path / "art"
    done = subprocess.run(
        [sys.executable, "-m", "reshift", "compile", str(files / "model.onnx"), "-o", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "done build for cpu" in done.stderr and "Scope" not in done.stderr
    ran = subprocess.run(
        [sys.executable, "-m", "reshift", "run", str(out_dir), "--input", str(files / "in.npz")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0 and "y: float32[5, 3]" in ran.stdout


def _two_symbolic_dims(path) -> None:
    """A model whose input has a symbolic batch AND a symbolic width (as OCR recognizers do)."""
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, "w"])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_input_shape_pins_symbolic_dims(tmp_path, capsys):
    _two_symbolic_dims(tmp_path / "wide.onnx")
    assert main(["inspect", str(tmp_path / "wide.onnx")]) == 0  # the width is its own symbol
    assert "%x: f32[N,3,w]" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "wide.onnx"), "--input-shape", "x=1,3,320"]) == 0
    assert "%x: f32[1,3,320]" in capsys.readouterr().out


@pytest.mark.parametrize("spec", ["x", "x=", "=1,2", "x=1,a", "x=0,3"])
def test_malformed_input_shape_exits_2(tmp_path, capsys, spec):
    _two_symbolic_dims(tmp_path / "wide.onnx")
    assert main(["inspect", str(tmp_path / "wide.onnx"), "--input-shape", spec]) == 2
    assert "expected NAME=D1,D2,..." in capsys.readouterr().err


def test_bench_inputs_are_random_for_every_float_dtype():
    from reshift.cli import random_inputs

    specs = [{"name": name, "shape": ["N", 3], "dtype": name} for name in ("float32", "float64", "float16")]
    inputs = random_inputs(specs, batch=2)
    for name, array in inputs.items():
        assert array.dtype == np.dtype(name) and array.shape == (2, 3)
        assert np.all(array != 0), name  # zeros would time a degenerate input
