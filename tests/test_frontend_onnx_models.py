"""ONNX models as users bring them: old opsets (upgraded on import) and the model's own I/O names.

The conformance slice runs the ONNX package's backend test models (``onnx/backend/test/data``)
through import and the interpreter against the outputs the package ships
(``benchmarks/onnx_conformance.py`` is the full run, with a CPU build).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import reshift
from benchmarks.onnx_conformance import SUITES, backend_data_dir, cases, run_case
from reshift.errors import InputError, ModelLoadError
from reshift.frontend import from_onnx, onnx_upgrade
from reshift.ir import interpret

F = TensorProto.FLOAT


def old_model(opset: int = 9, input_name: str = "gpu_0/data_0", output_name: str = "prob:0") -> onnx.ModelProto:
    """Gemm + Relu + Reshape + Softmax at an old opset, with names the IR cannot spell."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), "fc/w:0")
    b = numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "fc/b:0")  # Gemm-9 needs C
    shape = numpy_helper.from_array(np.array([-1, 2, 3], np.int64), "shape")
    nodes = [
        helper.make_node("Gemm", [input_name, "fc/w:0", "fc/b:0"], ["g"], transB=1),
        helper.make_node("Relu", ["g"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["s"]),
        helper.make_node("Softmax", ["s"], [output_name], axis=2),
    ]
    graph = helper.make_graph(
        nodes,
        "old",
        [helper.make_tensor_value_info(input_name, F, [3, 4])],
        [helper.make_tensor_value_info(output_name, F, [3, 2, 3])],
        [w, b, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def test_old_opset_is_upgraded_and_says_so():
    model = old_model(opset=9)
    graph = from_onnx(model)
    assert graph.notes == ["upgraded from opset 9 to 13 with onnx.version_converter"]
    assert "note:    upgraded from opset 9" in graph.summary()
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    (want,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"gpu_0/data_0": x}
    )
    np.testing.assert_allclose(interpret(graph, {"gpu_0/data_0": x})["prob:0"], want, rtol=1e-5, atol=1e-6)


def test_current_opset_has_no_note():
    assert from_onnx(old_model(opset=13)).notes == []


def test_opset_newer_than_supported_is_refused():
    model = old_model(opset=13)
    model.opset_import[0].version = 22
    with pytest.raises(ModelLoadError, match="opset 22 is not supported"):
        from_onnx(model)


def test_converter_failure_names_the_opset(monkeypatch):
    def fail(model, version):
        raise RuntimeError("No adapter for op Foo at version 9")

    monkeypatch.setattr(onnx_upgrade.version_converter, "convert_version", fail)
    with pytest.raises(ModelLoadError, match=r"opset 9 could not be upgraded to 13.*No adapter for op Foo"):
        from_onnx(old_model(opset=9))


def test_model_names_work_in_interpret_and_errors():
    graph = from_onnx(old_model(opset=13, input_name="0", output_name="1"))
    assert graph.inputs[0].name != "0"  # the IR spells it differently ...
    x = np.ones((3, 4), np.float32)
    assert list(interpret(graph, {"0": x})) == ["1"]  # ... but the user never sees that
    np.testing.assert_array_equal(interpret(graph, {graph.inputs[0].name: x})["1"], interpret(graph, {"0": x})["1"])
    with pytest.raises(InputError, match=r"takes inputs \['0'\]; missing \['0'\]; unexpected \['x'\]"):
        interpret(graph, {"x": x})


def test_model_names_survive_passes():
    graph = from_onnx(old_model(opset=13))
    optimized, _ = reshift.passes.run(graph, "exact")
    assert [optimized.user_name(v) for v in optimized.inputs] == ["gpu_0/data_0"]
    assert [optimized.user_name(v) for v in optimized.outputs] == ["prob:0"]


@pytest.mark.slow
def test_model_names_in_the_artifact_and_the_cli(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "old.onnx"
    onnx.save(old_model(opset=9), path)
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    compiled = reshift.compile(str(path), target="cpu")
    want = interpret(from_onnx(str(path)), {"gpu_0/data_0": x})["prob:0"]
    np.testing.assert_allclose(compiled.run_dict({"gpu_0/data_0": x})["prob:0"], want, rtol=1e-5, atol=1e-6)
    out_dir = compiled.save(tmp_path / "art")
    meta = json.loads((out_dir / "meta.json").read_text())
    assert [s["name"] for s in meta["inputs"]] == ["gpu_0/data_0"] and [s["name"] for s in meta["outputs"]] == [
        "prob:0"
    ]
    np.savez(tmp_path / "in.npz", **{"gpu_0/data_0": x})
    ran = subprocess.run(
        [
            sys.executable,
            "-m",
            "reshift",
            "run",
            str(out_dir),
            "--input",
            str(tmp_path / "in.npz"),
            "-o",
            str(tmp_path / "out.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out.npz")["prob:0"], want, rtol=1e-5, atol=1e-6)


# Models of the ONNX package's backend tests that import and interpret correctly today; the slice
# fails when one of them regresses, and when any model is computed wrong or crashes.
CONFORMANCE_FLOOR = 120


def test_onnx_backend_models_import_and_interpret():
    root = backend_data_dir()
    found = [c for c in cases(root, suites=[s for s in SUITES if s != "light"])]
    if not found:
        pytest.skip(f"no ONNX backend test data under {root}")
    records = {name: run_case(path, sets, build=False) for name, path, sets in found}
    bad = {name: r for name, r in records.items() if r["status"] in ("wrong", "crash")}
    assert not bad, bad
    ok = sum(r["status"] == "ok" for r in records.values())
    assert ok >= CONFORMANCE_FLOOR, f"{ok} of {len(records)} backend models pass, expected >= {CONFORMANCE_FLOOR}"


def test_calibrated_pipeline_on_a_layer_that_reads_the_renamed_input():
    """Calibration captures the graph input itself (a layer's input): the model's names still bind."""
    graph = from_onnx(old_model(opset=13, input_name="0", output_name="3"))
    x = np.random.default_rng(3).standard_normal((3, 4)).astype(np.float32)
    quantized, _ = reshift.passes.run(graph, "shift", calibration=[{"0": x}], skip=())
    assert "shift_linear" in quantized.op_histogram()
    assert list(interpret(quantized, {"0": x})) == ["3"]
