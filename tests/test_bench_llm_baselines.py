"""benchmarks/llm_baselines.py without building or timing a model: config patching, byte counts, row plumbing."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.llm import TINYLLAMA, print_ratios, short_name
from benchmarks.llm_baselines import (
    ORT_BENCH,
    TORCH_BENCH,
    builder_command,
    builder_input,
    onnx_linear_bytes,
    parse_torch_variant,
    patch_genai_config,
    torch_linear_bytes,
    write_placeholder_tokenizer,
)


def test_patch_genai_config_sets_decoder_threads_and_keeps_the_rest(tmp_path):
    path = tmp_path / "genai_config.json"
    cfg = {
        "model": {
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
            },
            "vocab_size": 32000,
        },
        "search": {"max_length": 2048},
    }
    path.write_text(json.dumps(cfg))
    patch_genai_config(path, 2)
    out = json.loads(path.read_text())
    opts = out["model"]["decoder"]["session_options"]
    assert opts["intra_op_num_threads"] == 2 and opts["inter_op_num_threads"] == 1
    assert opts["log_id"] == "onnxruntime-genai" and out["model"]["decoder"]["filename"] == "model.onnx"
    assert out["search"] == {"max_length": 2048}


def test_patch_genai_config_adds_missing_session_options_and_refuses_a_config_without_decoder(tmp_path):
    path = tmp_path / "genai_config.json"
    path.write_text(json.dumps({"model": {"decoder": {}}}))
    assert patch_genai_config(path, 3)["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 3
    path.write_text(json.dumps({"model": {}}))
    with pytest.raises(ValueError, match="no model.decoder"):
        patch_genai_config(path, 2)


def test_placeholder_tokenizer_has_the_vocab_size_and_special_ids(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    write_placeholder_tokenizer(tmp_path, 100)
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == 100
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "t99")] == [0, 1, 2, 99]
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "</s>"


def test_builder_input_links_the_weights_and_adds_a_tokenizer(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"vocab_size": 10}))
    (hf / "model.safetensors").write_bytes(b"x")
    src = builder_input(hf, tmp_path / "work")
    link = src / "model.safetensors"
    assert link.is_symlink() and link.resolve() == (hf / "model.safetensors").resolve()
    assert (src / "tokenizer.json").exists() and not (hf / "tokenizer.json").exists()
    assert builder_input(hf, tmp_path / "work") == src  # a second call relinks without failing


def test_builder_command_is_int4_cpu_with_the_accuracy_level_and_block():
    cmd = builder_command(Path("/m"), Path("/w/int4-b128"), 128)
    assert cmd[1:3] == ["-m", "onnxruntime_genai.models.builder"]
    assert cmd[cmd.index("-p") + 1] == "int4" and cmd[cmd.index("-e") + 1] == "cpu"
    extra = cmd[cmd.index("--extra_options") + 1 :]
    assert extra == ["accuracy_level=4", "block_size=128"]


def test_builder_knows_the_options_passed():
    spec = importlib.util.find_spec("onnxruntime_genai")
    if spec is None:
        pytest.skip("onnxruntime-genai not installed (the bench extra)")
    text = (Path(spec.origin).parent / "models" / "builder.py").read_text()
    assert "accuracy_level = 1/2/3/4" in text and "block_size = 16/32/64/128/256" in text


def test_parse_torch_variant():
    assert parse_torch_variant("fp32") == ("fp32", False)
    assert parse_torch_variant("bf16-compile") == ("bf16", True)
    for bad in ("fp16", "bf16-jit", "compile"):
        with pytest.raises(ValueError, match="expected one of"):
            parse_torch_variant(bad)


def test_torch_linear_bytes_counts_tinyllama_parameters():
    # TinyLlama-1.1B has 1,100,048,384 parameters: linears + lm_head + embedding + 45 norms of 2048
    linear = torch_linear_bytes(TINYLLAMA, "bf16") // 2
    assert linear + 32000 * 2048 + 45 * 2048 == 1_100_048_384
    assert torch_linear_bytes(TINYLLAMA, "fp32") == 2 * torch_linear_bytes(TINYLLAMA, "bf16")


def test_onnx_linear_bytes_reads_external_data_lengths_and_skips_the_embedding(tmp_path):
    emb = numpy_helper.from_array(np.zeros((64, 8), np.float32), "model.embed_tokens.weight")
    cos = numpy_helper.from_array(np.zeros((16, 4), np.float32), "cos_cache")
    w = numpy_helper.from_array(np.zeros((8, 2, 16), np.uint8), "model.layers.0.mlp.up_proj.MatMul.weight_Q4")
    s = numpy_helper.from_array(np.zeros((8, 2), np.float32), "model.layers.0.mlp.up_proj.MatMul.weight_scales")
    node = helper.make_node("Identity", ["x"], ["y"])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], initializer=[emb, cos, w, s]))
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    assert onnx_linear_bytes(path) == 8 * 2 * 16 + 8 * 2 * 4


@pytest.mark.parametrize("compiled", [False, True])
def test_child_templates_format_into_valid_python(compiled):
    compile(ORT_BENCH.format(out="/m", vocab=100, prompt=8, new=4, repeat=1), "ort", "exec")
    code = TORCH_BENCH.format(model="/m", dtype="bf16", compile=compiled, threads=2, prompt=8, new=4, repeat=1)
    compile(code, "torch", "exec")
    assert f"if {compiled!r}:" in code


def _row(name: str, decode: float, prefill: float, **extra) -> dict:
    return {"pipeline": name, "decode_tokens_per_s": decode, "prefill_tokens_per_s": prefill, **extra}


def test_ratio_table_has_a_column_per_baseline_and_leaves_skipped_rows_out(capsys):
    rows = [_row("bcq3", 30.0, 80.0)]
    base = [
        _row("llama.cpp Q4_0", 20.0, 160.0, quant="Q4_0"),
        _row("ort-genai int4 b32", 15.0, 40.0),
        _row("transformers bf16", 3.0, 20.0),
        {"pipeline": "transformers bf16-compile", "skipped": "too slow"},
    ]
    print_ratios(rows, base)
    out = capsys.readouterr().out
    assert [short_name(b) for b in base[:3]] == ["Q4_0", "ort b32", "hf bf16"]
    assert "bf16-compile" not in out
    decode, prefill = out.split("prefill tokens/s")
    assert "1.50x" in decode and "2.00x" in decode and "10.00x" in decode
    assert "0.50x SLOWER" in prefill and "4.00x" in prefill
