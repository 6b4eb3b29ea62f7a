"""The runtime: artifact save/load round trip, corrupted artifacts, input checks, DLPack, no torch/onnx,
calls from several threads and memory over many calls."""

from __future__ import annotations

import ctypes.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import reshift
from reshift.cli import main as cli_main
from reshift.errors import ArtifactError, InputError
from reshift.ir import interpret, parse
from reshift.runtime.artifact import write_meta
from tests.helpers import TWO_HEADS

GRAPH = TWO_HEADS


@pytest.fixture(scope="module")
def graph():
    return parse(GRAPH)


@pytest.fixture(scope="module")
def compiled(graph):
    return reshift.compile(graph, pipeline="none")


@pytest.fixture(scope="module")
def artifact(compiled, tmp_path_factory):
    return compiled.save(tmp_path_factory.mktemp("artifact") / "two_heads")


@pytest.fixture
def inputs(rng):
    return {"x": rng.standard_normal((5, 4)).astype(np.float32), "bias": rng.standard_normal(3).astype(np.float32)}


@pytest.fixture
def copy_of(artifact, tmp_path):
    def make():
        target = tmp_path / "copy"
        shutil.copytree(artifact, target)
        return target

    return make


@pytest.fixture(scope="module")
def other_artifact(graph, tmp_path_factory):
    """Another model with the same interface (weights doubled): its files must not pass for ours."""
    text = GRAPH.replace("two_heads", "other_heads").replace("[0.5, -1.0,", "[1.0, -2.0,")
    return reshift.compile(parse(text), pipeline="none").save(tmp_path_factory.mktemp("other") / "other_heads")


def test_artifact_layout_and_meta(artifact):
    assert sorted(p.name for p in artifact.iterdir()) == ["meta.json", "model.so"]
    meta = json.loads((artifact / "meta.json").read_text())
    assert [s["name"] for s in meta["inputs"]] == ["x", "bias"]
    assert meta["inputs"][0]["shape"] == ["N", 4] and meta["inputs"][0]["dtype"] == "float32"
    assert [s["name"] for s in meta["outputs"]] == ["r", "s"]
    assert meta["target"]["name"] == "cpu" and meta["target"]["device_type"] == "cpu"
    assert meta["target"]["tvm_target"]["kind"] == "llvm"
    assert meta["pipeline"] == "none" and meta["reshift_version"] == reshift.__version__
    assert len(meta["so_sha256"]) == 64 and len(meta["graph_sha256"]) == 64 and meta["created"]
    assert len(meta["meta_sha256"]) == 64


def test_round_trip_matches_interpreter(graph, artifact, inputs):
    model = reshift.load(artifact)
    r, s = model(inputs["x"], inputs["bias"])
    expected = interpret(graph, inputs)
    np.testing.assert_allclose(r, expected["r"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s, expected["s"], rtol=1e-5, atol=1e-6)
    by_name = model(bias=inputs["bias"], x=inputs["x"])
    np.testing.assert_array_equal(by_name[0], r)
    assert model.input_names == ["x", "bias"] and model.output_names == ["r", "s"]
    assert isinstance(model, reshift.runtime.LoadedModel)


def test_symbolic_batch_and_outputs_stay_valid(artifact, rng):
    model = reshift.load(artifact)
    bias = np.zeros(3, np.float32)
    first = model(np.ones((1, 4), np.float32), bias)[0]
    kept = first.copy()
    second = model(rng.standard_normal((9, 4)).astype(np.float32), bias)[0]
    assert second.shape == (9, 3)
    np.testing.assert_array_equal(first, kept)  # a later call must not overwrite earlier outputs


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((np.ones((2, 5), np.float32), np.ones(3, np.float32)), {}, "axis 1"),
        ((np.ones((2, 4), np.float64), np.ones(3, np.float32)), {}, "dtype float32, got float64"),
        ((np.ones((2, 4, 1), np.float32), np.ones(3, np.float32)), {}, "rank"),
        ((np.ones((2, 4), np.float32),), {}, "missing input(s) ['bias']"),
        ((), {"x": np.ones((2, 4), np.float32), "b": np.ones(3, np.float32)}, "unexpected input 'b'"),
        ((np.ones((2, 4), np.float32), np.ones(3, np.float32), np.ones(1)), {}, "got 3 positional"),
    ],
)
def test_wrong_inputs_raise_input_error(artifact, args, kwargs, message):
    model = reshift.load(artifact)
    with pytest.raises(InputError) as info:
        model(*args, **kwargs)
    assert message in str(info.value)


def test_missing_directory_and_files(tmp_path, copy_of):
    with pytest.raises(ArtifactError, match="no such artifact directory"):
        reshift.load(tmp_path / "nowhere")
    broken = copy_of()
    (broken / "model.so").unlink()
    with pytest.raises(ArtifactError, match="has no model.so"):
        reshift.load(broken)
    (broken / "meta.json").unlink()
    with pytest.raises(ArtifactError, match="has no meta.json"):
        reshift.load(broken)


def test_corrupted_meta(copy_of):
    broken = copy_of()
    (broken / "meta.json").write_text('{"format": 1, "inputs": [')
    with pytest.raises(ArtifactError, match="corrupted"):
        reshift.load(broken)
    (broken / "meta.json").write_text(json.dumps({"format": 1, "inputs": []}))
    with pytest.raises(ArtifactError, match="missing outputs, target, so_sha256"):
        reshift.load(broken)


def _flip_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _append(path):
    with open(path, "ab") as f:
        f.write(b"\0garbage")


def _edit_meta(path):
    meta = json.loads(path.read_text())
    meta["inputs"][0]["shape"] = ["N", 5]  # a plausible edit: still well-formed, now wrong
    path.write_text(json.dumps(meta, indent=2))


CORRUPTIONS = {
    "so-bit-flip": ("model.so", _flip_bit, "model.so does not match its checksum in meta.json"),
    "so-truncated": ("model.so", _truncate, "model.so does not match its checksum in meta.json"),
    "so-appended": ("model.so", _append, "model.so does not match its checksum in meta.json"),
    "so-swapped": ("model.so", "other", "model.so does not match its checksum in meta.json"),
    "meta-swapped": ("meta.json", "other", "model.so does not match its checksum in meta.json"),
    "meta-edited": ("meta.json", _edit_meta, "meta.json does not match its own checksum"),
    "meta-bit-flip": ("meta.json", _flip_bit, "meta.json"),
}


@pytest.fixture(params=list(CORRUPTIONS))
def corrupted(request, copy_of, other_artifact):
    """A copy of the artifact with one file damaged or replaced, and the message that must refuse it."""
    name, damage, message = CORRUPTIONS[request.param]
    broken = copy_of()
    if damage == "other":
        shutil.copyfile(other_artifact / name, broken / name)
    else:
        damage(broken / name)
    return broken, message


def test_corrupted_or_swapped_files_are_refused_at_load(corrupted):
    broken, message = corrupted
    with pytest.raises(ArtifactError, match=message) as info:
        reshift.load(broken)
    assert str(broken) in str(info.value) and "recompile" in str(info.value)


def test_cli_run_on_corrupted_artifact_exits_2(corrupted, inputs, tmp_path, capsys):
    broken, message = corrupted
    np.savez(tmp_path / "in.npz", **inputs)
    assert cli_main(["run", str(broken), "--input", str(tmp_path / "in.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reshift run: error: ") and message in err
    assert "Traceback" not in err and "\n\n" not in err.strip()  # one paragraph


def test_meta_without_own_checksum_still_loads(copy_of, inputs):
    """Artifacts written before meta.json carried ``meta_sha256`` stay loadable (model.so is still checked)."""
    old = copy_of()
    meta = json.loads((old / "meta.json").read_text())
    del meta["meta_sha256"]
    (old / "meta.json").write_text(json.dumps(meta))
    assert reshift.load(old)(**inputs)[0].shape == (5, 3)


@pytest.mark.parametrize(
    "target, message",
    [
        (
            {"name": "arm64", "tvm_target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}, "device_type": "cpu"},
            "aarch64",
        ),
        (
            {"name": "cuda", "tvm_target": {"kind": "cuda", "arch": "sm_90"}, "device_type": "cuda"},
            "cannot run on device",
        ),
    ],
)
def test_target_mismatch(copy_of, target, message):
    broken = copy_of()
    meta = json.loads((broken / "meta.json").read_text())
    meta["target"] = target
    write_meta(broken, meta)  # a consistent meta.json for another target, not a corrupted one
    with pytest.raises(ArtifactError, match=message):
        reshift.load(broken, device="cpu")


def test_four_threads_match_sequential_calls(artifact):
    """One LoadedModel called from 4 threads at once (different batch sizes) gives the sequential outputs."""
    model = reshift.load(artifact)
    rng = np.random.default_rng(7)
    cases = [
        (rng.standard_normal((int(n), 4)).astype(np.float32), rng.standard_normal(3).astype(np.float32))
        for n in rng.integers(1, 33, size=16)
    ]
    expected = [model(*case) for case in cases]
    mismatches: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            for step in range(150):
                index = (offset * 5 + step) % len(cases)
                r, s = model(*cases[index])
                if not (np.array_equal(r, expected[index][0]) and np.array_equal(s, expected[index][1])):
                    mismatches.append((offset, step))
        except BaseException as exc:  # noqa: BLE001 -- reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread is stuck in the model"
    assert not errors and not mismatches, (errors[:3], mismatches[:5])


def test_many_calls_hold_memory_flat(artifact):
    """RSS after 2,000 more calls stays within a few MB of its level after warm-up (benchmarks/soak_runtime.py: 10k)."""
    psutil = pytest.importorskip("psutil")
    model = reshift.load(artifact)
    x, bias = np.ones((8, 4), np.float32), np.zeros(3, np.float32)
    for _ in range(300):
        model(x, bias)
    process = psutil.Process()
    warm = process.memory_info().rss
    for _ in range(2000):
        model(x, bias)
    growth_mb = (process.memory_info().rss - warm) / 2**20
    assert growth_mb < 4, f"RSS grew {growth_mb:.1f} MB over 2,000 calls after warm-up"


def test_torch_tensors_in_and_out(artifact, graph, inputs):
    torch = pytest.importorskip("torch")
    model = reshift.load(artifact)
    x = torch.from_numpy(inputs["x"]).requires_grad_(True)
    bias = torch.from_numpy(inputs["bias"])
    r, s = model(x, bias)
    assert isinstance(r, torch.Tensor) and isinstance(s, torch.Tensor)
    expected = interpret(graph, inputs)
    np.testing.assert_allclose(r.numpy(), expected["r"], rtol=1e-5, atol=1e-6)
    transposed = torch.from_numpy(np.ascontiguousarray(inputs["x"].T)).T  # non-contiguous input
    np.testing.assert_allclose(model(transposed, bias)[1].numpy(), expected["s"], rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="dtype float32, got float64"):
        model(x.double(), bias)


@pytest.mark.parametrize("runtime_only", [False, True], ids=["full-tvm", "tvm-runtime-only"])
def test_runtime_never_imports_torch_or_onnx(artifact, inputs, tmp_path, runtime_only):
    """Also with TVM_USE_RUNTIME_LIB=1, the deployment setting: no compiler library, no tvm.relax."""
    np.savez(tmp_path / "in.npz", **inputs)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any import of torch or onnx now raises ImportError
        sys.modules["onnx"] = None
        import numpy as np
        import reshift.runtime
        model = reshift.runtime.load({str(artifact)!r})
        data = np.load({str(tmp_path / "in.npz")!r})
        r, s = model(data["x"], bias=data["bias"])
        assert r.shape == (5, 3) and s.shape == (5, 3)
        assert sys.modules["torch"] is None and sys.modules["onnx"] is None
        assert "reshift.frontend.torch" not in sys.modules and "reshift.api" not in sys.modules
        print("ok", float(r.sum()))
        """
    )
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"} if runtime_only else None
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")


# -- CUDA artifacts (built here, no GPU): kernels compiled ahead of time, served at load ----------
@pytest.fixture(scope="module")
def cuda_artifact(graph, tmp_path_factory):
    from reshift.codegen.tvm.build import _find_cuda_path

    if _find_cuda_path() is None and shutil.which("nvcc") is None:
        pytest.skip("no CUDA toolkit (nvcc) on this machine")
    compiled = reshift.compile(graph, target="cuda-sm90", pipeline="none")
    return compiled, compiled.save(tmp_path_factory.mktemp("cuda") / "two_heads")


@pytest.fixture
def restore_cuda_hook():
    import tvm_ffi

    original = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
    yield
    if original is not None:
        tvm_ffi.register_global_func("tvm_callback_cuda_compile", original, override=True)


def test_cuda_artifact_ships_compiled_kernels(cuda_artifact, restore_cuda_hook):
    import tvm_ffi

    from reshift.runtime import cuda_kernels

    compiled, directory = cuda_artifact
    meta = json.loads((directory / "meta.json").read_text())
    fatbin = (directory / "kernels.fatbin").read_bytes()
    assert meta["cuda_kernels"]["bytes"] == len(fatbin) > 0
    source = next(m for m in compiled.build.executable.mod.imports[0].imports if m.kind == "cuda").inspect_source()
    assert meta["cuda_kernels"]["source_sha256"] == cuda_kernels.source_sha256(source)
    cuda_kernels.register_prebuilt(directory, meta)
    hook = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
    assert bytes(hook(source)) == fatbin  # what TVM's loader gets for this exact source
    with pytest.raises(Exception, match="no prebuilt binary"):
        hook(source + "// another kernel")


def test_cuda_artifact_with_corrupted_kernels(cuda_artifact, tmp_path):
    from reshift.runtime import cuda_kernels

    copy = tmp_path / "copy"
    shutil.copytree(cuda_artifact[1], copy)
    meta = json.loads((copy / "meta.json").read_text())
    with open(copy / "kernels.fatbin", "r+b") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(ArtifactError, match="kernels.fatbin does not match its checksum"):
        cuda_kernels.register_prebuilt(copy, meta)
    (copy / "kernels.fatbin").unlink()
    with pytest.raises(ArtifactError, match="kernels.fatbin is missing"):
        cuda_kernels.register_prebuilt(copy, meta)


@pytest.mark.skipif(ctypes.util.find_library("cuda") is not None, reason="this machine has an NVIDIA driver")
def test_cuda_artifact_without_driver_names_the_library(cuda_artifact):
    with pytest.raises(ArtifactError, match=r"libtvm_runtime_cuda\.so\) cannot be loaded.*libcuda"):
        reshift.load(cuda_artifact[1], device="cuda")


VIEWS = """
graph views(%x: f32[2,6]) {
  %y: f32[3,4] = reshape(%x) {shape=[3, 4]} @flat
  %z: f32[2,6] = relu(%x) @act
  return %y, %z
}
"""


def test_outputs_own_their_memory():
    """Inputs DLPack cannot share are staged in buffers reused across calls: no output may alias one
    (a reshape's output is a view of its input in the VM), nor the caller's input."""
    model = reshift.compile(parse(VIEWS), pipeline="none")
    unaligned = np.arange(13, dtype=np.float32)[1:].reshape(2, 6)  # 4 bytes past an aligned start
    first, _ = model(unaligned)
    kept = first.copy()
    second, _ = model(-unaligned)
    np.testing.assert_array_equal(first, kept)  # the staging buffer was rewritten, the output not
    np.testing.assert_array_equal(second, -kept)
    aligned = np.empty(32, np.float32)
    offset = (-aligned.ctypes.data % 64) // 4
    x = aligned[offset : offset + 12].reshape(2, 6)  # 64-byte aligned: shared with the VM by DLPack
    x[...] = unaligned
    y, z = model.run_dict({"x": x}).values()
    assert not np.shares_memory(y, x) and not np.shares_memory(z, x)
    np.testing.assert_array_equal(y, kept)
    with pytest.raises(InputError, match="dtype float32, got float64"):  # checks are cached per signature
        model(unaligned.astype(np.float64))
    with pytest.raises(InputError, match="axis 0"):
        model(np.ones((3, 6), np.float32))


def test_unaligned_zero_dim_float64_input_stays_zero_dim():
    """np.ascontiguousarray makes a 0-d array 1-d; the copy path for dtypes without staging keeps its shape."""
    graph = parse("graph scalar(%x: f64[]) {\n  %y: f64[] = neg(%x) @neg\n  return %y\n}")
    model = reshift.compile(graph, target="cpu")
    for value in np.arange(8.0):  # some of these 0-d arrays are 64-byte aligned (DLPack), some are not
        assert np.asarray(model(np.array(value))).shape == () and float(np.asarray(model(np.array(value)))) == -value
