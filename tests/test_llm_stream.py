"""reshift.llm's streamed compile: the lazy safetensors reader (f32 / f16 / bf16, shards), weights
canonicalized one block at a time, calibration captured block by block, and the same parameters as
preparing the whole model in memory."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from reshift.errors import ModelLoadError, PassError
from reshift.llm.compiler import calibration_rows, open_model, prepare, read_model
from reshift.llm.reference import forward
from reshift.llm.stream import BlockWeights, SafetensorsCheckpoint

sys.path.insert(0, str(Path(__file__).parent))
from llm_tiny import tiny_model  # noqa: E402

PROMPT = [3, 17, 42, 9, 100, 7, 55]
CALIB = np.array([PROMPT * 3, PROMPT[::-1] * 3])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    model = tiny_model("llama")
    path = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(path)
    return model, path


def _same_params(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("pipeline,bits,calibration", [("bcq", 3, None), ("bcq", 3, CALIB), ("ternary", 0, CALIB)])
def test_streamed_prepare_equals_in_memory(llama_dir, pipeline, bits, calibration):
    """Streaming from the safetensors directory gives the very parameters, forms and report of
    preparing the whole float32 model in memory (weight-only and calibrated)."""
    model, path = llama_dir
    spec, weights, _ = read_model(model)
    p_mem, f_mem, r_mem = prepare(spec, weights, pipeline, bits, calibration, 64, False)
    spec_s, blocks, _ = open_model(path)
    assert isinstance(blocks, BlockWeights) and spec_s == spec
    p_str, f_str, r_str = prepare(spec_s, blocks, pipeline, bits, calibration, 64, False)
    _same_params(p_mem, p_str)
    assert f_mem == f_str
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in r_mem]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in r_str]
    if calibration is not None:
        assert all("output_error" in r for r in r_str if r["name"] != "lm_head")


def test_block_by_block_calibration_equals_whole_forward(llama_dir):
    """The rows captured block by block are those of one whole float forward; q/k/v (and gate/up)
    get one shared array, so their Hessian is computed once."""
    model, _ = llama_dir
    spec, weights, _ = read_model(model)
    rows = calibration_rows(spec, weights, CALIB)
    whole: dict[str, list[np.ndarray]] = {}
    for seq in CALIB:
        shape = (spec.num_layers, spec.num_kv_heads, len(seq), spec.head_dim)
        forward(spec, weights, seq, 0, np.zeros(shape, np.float32), np.zeros(shape, np.float32), capture=whole)
    assert sorted(rows) == sorted(whole)
    for name, parts in whole.items():
        np.testing.assert_array_equal(rows[name], np.concatenate(parts)[:512], err_msg=name)
    assert rows["layers.1.q"] is rows["layers.1.k"] is rows["layers.1.v"]
    assert rows["layers.1.gate"] is rows["layers.1.up"] and rows["layers.1.o"] is not rows["layers.1.q"]
    assert rows["lm_head"].shape == (2, spec.hidden_size)  # one row per sequence: its last position


class _Recording(Mapping):
    def __init__(self, raw):
        self.raw, self.read = raw, []

    def __getitem__(self, name):
        self.read.append(name)
        return self.raw[name]

    def shape(self, name):
        return self.raw.shape(name)

    def __contains__(self, name):
        return name in self.raw

    def __iter__(self):
        return iter(self.raw)

    def __len__(self):
        return len(self.raw)


def test_blocks_read_only_their_own_tensors(llama_dir):
    """Checking the checkpoint reads no tensor; block 1 reads exactly block 1's."""
    model, path = llama_dir
    spec, _, _ = open_model(path)
    raw = _Recording(SafetensorsCheckpoint.of_directory(path))
    blocks = BlockWeights.streamed(spec, raw)
    assert raw.read == []
    layer = blocks.layer(1)
    assert raw.read and all(n.startswith("model.layers.1.") for n in raw.read)
    assert sorted(layer) == sorted(k for k in read_model(model)[1] if k.startswith("layers.1."))
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in layer.values())


def test_reader_widens_bf16_f16_and_reads_shards(tmp_path):
    """bf16 / f16 tensors widen exactly as torch does; a sharded checkpoint (index.json) reads as one."""
    from safetensors.torch import save_file

    a = torch.randn(3, 5)
    save_file({"b": a.bfloat16(), "h": a.half(), "f": a}, str(tmp_path / "m.safetensors"))
    ckpt = SafetensorsCheckpoint([tmp_path / "m.safetensors"])
    assert sorted(ckpt) == ["b", "f", "h"] and ckpt.shape("b") == (3, 5) and ckpt.nbytes() == 15 * (2 + 2 + 4)
    np.testing.assert_array_equal(ckpt["b"], a.bfloat16().float().numpy())
    np.testing.assert_array_equal(ckpt["h"], a.half().float().numpy())
    np.testing.assert_array_equal(ckpt["f"], a.numpy())

    model = tiny_model("llama", seed=1).to(torch.bfloat16)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="60KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    _, w_bf16, _ = read_model(sharded)
    _, w_ref, _ = read_model(model.float())
    assert sorted(w_bf16) == sorted(w_ref)
    for name in w_ref:
        np.testing.assert_array_equal(w_bf16[name], w_ref[name], err_msg=name)


def test_missing_weights_tensor_and_shard_name_what(llama_dir, tmp_path):
    """No weights, a tensor the config needs, a shard the index names, a truncated file: a
    ModelLoadError naming it, raised before any fitting."""
    model, path = llama_dir
    config = (path / "config.json").read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(config)
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights"):
        open_model(empty)

    from safetensors.torch import save_file

    state = {k: v for k, v in model.state_dict().items() if k != "model.layers.1.mlp.down_proj.weight"}
    holed = tmp_path / "holed"
    holed.mkdir()
    (holed / "config.json").write_text(config)
    save_file({k: v.contiguous() for k, v in state.items()}, str(holed / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="'layers.1.mlp.down_proj.weight' is missing"):
        open_model(holed)

    shards = tmp_path / "shards"
    model.save_pretrained(shards, max_shard_size="60KB")
    index = json.loads((shards / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[-1]
    (shards / gone).unlink()
    with pytest.raises(ModelLoadError, match=f"names shard\\(s\\) {gone}"):
        open_model(shards)

    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "config.json").write_text(config)
    data = (path / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="does not fit shape"):
        open_model(cut)


def test_progress_hears_each_linear_and_bad_calibration_fails_first(llama_dir):
    """``progress(name, done, total)`` before each fused linear, ``linear_done`` after with its report
    rows; calibration ids outside the vocabulary fail before any block is read."""
    model, path = llama_dir

    class Recorder:
        def __init__(self):
            self.calls, self.done = [], []

        def __call__(self, name, done, total):
            self.calls.append((name, done, total))

        def linear_done(self, name, rows, seconds):
            self.done.append((name, [r["name"] for r in rows], seconds))

    spec, blocks, _ = open_model(path)
    rec = Recorder()
    prepare(spec, blocks, "bcq", 3, CALIB, 64, False, progress=rec)
    assert [c[1] for c in rec.calls] == list(range(9)) and rec.calls[0] == ("layers.0.qkv", 0, 9)
    assert rec.done[0][:2] == ("layers.0.qkv", ["layers.0.q", "layers.0.k", "layers.0.v"])
    assert rec.done[-1][0] == "lm_head" and all(s >= 0 for _, _, s in rec.done)

    raw = _Recording(SafetensorsCheckpoint.of_directory(path))
    with pytest.raises(PassError, match="calibration token ids must lie in"):
        prepare(spec, BlockWeights.streamed(spec, raw), "bcq", 3, np.array([[1, 2, 999]]), 64, False)
    assert raw.read == []


def test_cli_progress_lines(tmp_path):
    """The CLI's progress prints one line per linear with its bits, errors and seconds when enabled."""
    import io

    from rich.console import Console

    from reshift.cli_llm import FitProgress

    buf = io.StringIO()
    progress = FitProgress(True, console=Console(file=buf, width=120))
    with progress:
        progress("layers.0.qkv", 0, 2)
        row = {"name": "layers.0.q", "bits": 3, "weight_error": 0.2, "output_error": 0.05, "seconds": 1.5}
        progress.linear_done("layers.0.qkv", [row], 1.6)
    text = buf.getvalue()
    assert "layers.0.q" in text and "3 bits" in text and "out_err 0.0500" in text and "1.50 s" in text
    quiet = FitProgress(False)
    with quiet:
        quiet("x", 0, 1)
        quiet.linear_done("x", [row], 0.1)  # draws nothing, raises nothing
