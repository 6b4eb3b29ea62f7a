"""reshift.llm end to end: greedy tokens and logits against transformers, BCQ against the numpy
reference, the KV cache updated in place, save -> load without torch, sampling, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import reshift.llm
from reshift.errors import ArtifactError, InputError, ModelLoadError, PassError, ReshiftError
from reshift.llm.compiler import prepare, read_model
from reshift.llm.config import UnsupportedFeatureError, spec_from_config
from reshift.llm.reference import forward

sys.path.insert(0, str(Path(__file__).parent))
from llm_tiny import hf_greedy, tiny_config, tiny_model  # noqa: E402

PROMPT = [3, 17, 42, 9, 100, 7, 55]
FAST = ["llama", "qwen2", "gpt2"]
SLOW = ["llama3", "mistral", "phi3", "gemma", "opt"]


@pytest.fixture(scope="module")
def compiled():
    cache: dict[tuple, tuple] = {}

    def get(family: str, pipeline: str = "exact", **kw):
        key = (family, pipeline, repr(sorted(kw.items())))
        if key not in cache:
            model = tiny_model(family)
            cache[key] = (model, reshift.llm.compile(model, pipeline=pipeline, max_seq_len=128, **kw))
        return cache[key]

    return get


def _check_against_transformers(model, llm) -> None:
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits[0].numpy()
    logits = llm.prefill(np.array(PROMPT))
    np.testing.assert_allclose(logits, ref[-1], atol=1e-4, rtol=1e-4)
    step = llm.decode(11)  # one decode step reads the cache the prefill wrote
    with torch.no_grad():
        ref2 = model(torch.tensor([PROMPT + [11]])).logits[0, -1].numpy()
    np.testing.assert_allclose(step, ref2, atol=1e-4, rtol=1e-4)
    ours = llm.generate(np.array(PROMPT), max_new_tokens=64)
    assert ours.tolist()[: len(PROMPT)] == PROMPT
    assert ours.tolist()[len(PROMPT) :] == hf_greedy(model, PROMPT, 64)


@pytest.mark.parametrize("family", FAST)
def test_greedy_matches_transformers(compiled, family):
    _check_against_transformers(*compiled(family))


@pytest.mark.slow
@pytest.mark.parametrize("family", SLOW)
def test_greedy_matches_transformers_more_families(compiled, family):
    _check_against_transformers(*compiled(family))


def test_spec_flags():
    """The template's flags for each family (window, rope scaling, tied, norms) read as the config says."""
    assert spec_from_config(tiny_config("mistral").to_dict()).windows == [8, 8]
    llama3 = spec_from_config(tiny_config("llama3").to_dict())
    assert llama3.rope_scaling["rope_type"] == "llama3" and llama3.tied_embeddings
    gemma = spec_from_config(tiny_config("gemma").to_dict())
    assert gemma.act == "gelu_tanh" and gemma.embed_scale == 8.0 and gemma.head_dim == 24  # the config's, not 64 / 4
    gpt2 = spec_from_config(tiny_config("gpt2").to_dict())
    assert gpt2.norm == "layer" and gpt2.learned_positions == 512 and not gpt2.gated
    assert spec_from_config(tiny_config("opt").to_dict()).position_offset == 2


@pytest.mark.parametrize("pipeline,bits", [("bcq", 3), ("ternary", "ternary")])
def test_lowbit_every_linear_matches_reference(compiled, pipeline, bits):
    """BCQ 3-bit / ternary: the LUT-GEMV build computes the numpy decoder on the dequantized weights."""
    model, llm = compiled("llama", pipeline)
    report = llm.report["layers"]
    assert {r["bits"] for r in report if r["name"] != "lm_head"} == {bits}
    assert len(report) == 2 * 7 + 1 and all(0 < r["weight_error"] < 1 for r in report[:-1])
    assert report[-1]["name"] == "lm_head" and report[-1]["bits"] == 32
    lowbit = report[:-1]  # as stored: K = 64 fills half of a 128-column group, so 7.25 (ternary 5) bits/weight
    assert sum(r["bytes"] for r in lowbit) < 0.25 * sum(r["bytes_fp32"] for r in lowbit)
    spec, weights, _ = read_model(model)
    dequant: dict[str, np.ndarray] = {}
    prepare(spec, weights, pipeline, 3, None, 128, False, dequant)
    shape = (spec.num_layers, spec.num_kv_heads, 128, spec.head_dim)
    ck, cv = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    ref = forward(spec, {**weights, **dequant}, np.array(PROMPT), 0, ck, cv)
    np.testing.assert_allclose(llm.prefill(np.array(PROMPT)), ref, atol=2e-4, rtol=1e-4)
    int8 = llm.meta["decode_lut"] == "int8"  # the default where the CPU has AVX-512 VBMI + VNNI
    float_step = forward(spec, {**weights, **dequant}, np.array([5]), len(PROMPT), ck.copy(), cv.copy())
    ref_step = forward(spec, {**weights, **dequant}, np.array([5]), len(PROMPT), ck, cv, int8_tables=int8)
    step = llm.decode(5)
    np.testing.assert_allclose(step, ref_step, atol=2e-4, rtol=1e-4)
    if int8:  # the int8 tables are a different computation: the float reference is far off at this tolerance
        assert not np.allclose(step, float_step, atol=2e-4, rtol=1e-4)
        assert np.abs(step - float_step).max() < 0.05 * np.abs(float_step).max()


def test_report_bytes_are_the_stored_parameter_bytes(compiled):
    """Every linear's report ``bytes`` sum to its packed arrays (float16 scales, padding and bias included),
    and ``weight_bytes`` to every stored parameter but the RoPE tables."""
    model, llm = compiled("llama", "bcq")
    spec, weights, _ = read_model(model)
    params, forms, report = prepare(spec, weights, "bcq", 3, None, 128, False)
    stored = {k: a for k, a in params.items() if k.rsplit(".", 1)[-1] in ("words", "alpha", "bias", "panels")}
    assert {a.dtype.name for k, a in stored.items() if k.endswith(".alpha")} == {"float16"}
    assert sum(r["bytes"] for r in report) == sum(a.nbytes for a in stored.values())
    assert llm.report["linear_bytes"] == sum(a.nbytes for a in stored.values())
    assert llm.report["weight_bytes"] == sum(a.nbytes for k, a in params.items() if not k.startswith("rope."))
    q = next(r for r in report if r["name"] == "layers.0.q")
    o, k = q["shape"]
    groups = -(-k // 128)  # K = 64 < G: one group, its 128 bit columns stored whole
    assert q["bytes"] == o * (3 * groups * (128 // 8 + 2) + 4)  # per row: 3 planes x (bits + a float16 alpha) + bias
    assert q["bits_per_weight"] == round(8 * q["bytes"] / (o * k), 3)


def test_bcq_lm_head_and_calibration(compiled):
    model, llm = compiled("gpt2", "bcq", bits=4, quantize_lm_head=True, calibration=np.array([PROMPT * 4]))
    rows = {r["name"]: r for r in llm.report["layers"]}
    assert rows["lm_head"]["bits"] == 4 and "output_error" in rows["layers.0.q"]
    assert llm.report["calibrated"]
    out = llm.generate(np.array(PROMPT), max_new_tokens=8)
    assert out.shape == (len(PROMPT) + 8,) and out.max() < 256


def test_decode_updates_the_cache_in_place(compiled):
    """The VM writes into the runtime's preallocated cache tensors: no copy of the cache is made."""
    model, llm = compiled("llama")
    llm.prefill(np.array(PROMPT))
    ck_before, cv_before = llm.cache_k, llm.cache_v
    snapshot = ck_before.numpy().copy()
    llm.decode(11)
    assert llm.cache_k.same_as(ck_before) and llm.cache_v.same_as(cv_before)
    after = ck_before.numpy()  # the tensor handed to the VM now holds the new row
    pos = len(PROMPT)
    assert not np.allclose(after[:, :, pos], snapshot[:, :, pos])
    np.testing.assert_array_equal(after[:, :, :pos], snapshot[:, :, :pos])
    np.testing.assert_array_equal(after[:, :, pos + 1 :], snapshot[:, :, pos + 1 :])


def test_sampling_reproducible(compiled):
    model, llm = compiled("llama")
    kw = dict(max_new_tokens=16, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    a = llm.generate(np.array(PROMPT), seed=1, **kw)
    b = llm.generate(np.array(PROMPT), seed=1, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, llm.generate(np.array(PROMPT), seed=2, **kw))
    greedy = llm.generate(np.array(PROMPT), max_new_tokens=16)
    np.testing.assert_array_equal(
        llm.generate(np.array(PROMPT), do_sample=True, top_k=1, seed=3, max_new_tokens=16), greedy
    )
    streamed: list[int] = []
    out = llm.generate(
        np.array([PROMPT]), max_new_tokens=5, stream=streamed.append, eos_token_id=int(greedy[len(PROMPT) + 2])
    )
    assert out.shape == (1, len(PROMPT) + 3) and streamed == out[0, len(PROMPT) :].tolist()


def test_save_load_without_torch(compiled, tmp_path):
    model, llm = compiled("qwen2")
    expected = llm.generate(np.array(PROMPT), max_new_tokens=20)
    llm.save(tmp_path / "art")
    code = f"""
import sys, json
sys.modules["torch"] = None
sys.modules["transformers"] = None
import numpy as np
import reshift.llm
llm = reshift.llm.load({str(tmp_path / "art")!r})
ids = llm.generate(np.array({PROMPT}), max_new_tokens=20)
assert "torch" not in [m for m, v in sys.modules.items() if v is not None]
print(json.dumps(ids.tolist()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected.tolist()
    meta = json.loads((tmp_path / "art" / "llm.json").read_text())
    meta["max_seq_len"] = 4 * meta["max_seq_len"]  # a hand edit the cache shape no longer matches
    (tmp_path / "art" / "llm.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="does not match its own checksum"):
        reshift.llm.load(tmp_path / "art")


def test_bad_input(compiled, tmp_path):
    model, llm = compiled("llama")
    with pytest.raises(InputError, match="more than max_seq_len=128"):
        llm.generate(np.arange(129) % 200, max_new_tokens=1)
    with pytest.raises(InputError, match="exceeds max_seq_len"):
        llm.generate(np.array(PROMPT), max_new_tokens=128)
    with pytest.raises(InputError, match="token id 256 is outside the vocabulary"):
        llm.generate(np.array([1, 256, 3]))
    with pytest.raises(InputError, match="outside the vocabulary"):
        llm.generate(np.array([-1]))
    config = tiny_config("llama").to_dict()
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    config.pop("rope_parameters", None)
    with pytest.raises(UnsupportedFeatureError, match="rope scaling type 'yarn'"):
        spec_from_config(config)
    with pytest.raises(UnsupportedFeatureError, match="scale_attn_by_inverse_layer_idx"):
        spec_from_config({**tiny_config("gpt2").to_dict(), "scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(UnsupportedFeatureError, match="model_type='bert'"):
        spec_from_config({"model_type": "bert"})
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(tiny_config("llama").to_dict()))
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        reshift.llm.compile(empty)
    with pytest.raises(PassError, match="unknown pipeline"):
        reshift.llm.compile(model, pipeline="nope")
    assert issubclass(UnsupportedFeatureError, ReshiftError)


def test_cli_compile_generate_bench(tmp_path, capsys):
    """`reshift llm compile DIR`, `reshift generate`, `reshift bench` on a saved HF directory; bad input exits 2."""
    from reshift.cli import main

    model = tiny_model("gpt2", seed=1)
    model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "art"
    assert (
        main(["llm", "compile", str(tmp_path / "hf"), "-o", str(out), "--pipeline", "exact", "--max-seq-len", "96"])
        == 0
    )
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt-ids", ",".join(map(str, PROMPT)), "-n", "12", "--no-eos"]) == 0
    ids = [int(t) for t in capsys.readouterr().out.strip().split(",")]
    assert ids == hf_greedy(model, PROMPT, 12)
    assert main(["bench", str(out)]) == 0
    assert "decode" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    assert "layers.1.fc2" in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt-ids", "1,999", "-n", "2"]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err
    assert main(["generate", str(out), "--prompt-ids", ",".join(["1"] * 97), "-n", "2"]) == 2
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(tiny_config("llama").to_dict()))
    assert main(["llm", "compile", str(tmp_path / "empty"), "-o", str(tmp_path / "x")]) == 2
    cfg = {**tiny_config("llama").to_dict(), "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}
    cfg.pop("rope_parameters", None)
    (tmp_path / "empty" / "config.json").write_text(json.dumps(cfg))
    assert main(["llm", "compile", str(tmp_path / "empty"), "-o", str(tmp_path / "x")]) == 2
    assert "unsupported architecture feature rope scaling type 'yarn'" in capsys.readouterr().err
    args = ["llm", "compile", str(tmp_path / "hf"), "-o", str(tmp_path / "y"), "--target", "cuda"]
    assert main([*args, "--decode-lut", "int8"]) == 2
    assert "decode_lut='int8' builds for CPU targets only" in capsys.readouterr().err


def test_safetensors_reader_bf16_f16(tmp_path):
    """The offline reader widens bf16 and f16 exactly as torch does."""
    from safetensors.torch import save_file

    from reshift.llm.weights import read_safetensors

    a = torch.randn(3, 5)
    save_file({"b": a.bfloat16(), "h": a.half(), "f": a}, str(tmp_path / "m.safetensors"))
    t = read_safetensors(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(t["b"], a.bfloat16().float().numpy())
    np.testing.assert_array_equal(t["h"], a.half().float().numpy())
    np.testing.assert_array_equal(t["f"], a.numpy())


def test_cli_prompt_text_with_tokenizer(compiled, tmp_path, capsys):
    """`reshift generate OUT --prompt TEXT` tokenizes with the artifact's tokenizer.json."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from reshift.cli import main

    model, llm = compiled("llama")
    llm.save(tmp_path / "art")
    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tmp_path / "art" / "tokenizer.json"))
    assert main(["generate", str(tmp_path / "art"), "--prompt", "w3 w17 w42", "-n", "4", "--no-eos", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["prompt_ids"] == [3, 17, 42] and out["new_ids"] == hf_greedy(model, [3, 17, 42], 4)


@pytest.mark.slow
def test_decode_time_does_not_grow_with_cache_size():
    """No per-token copy of the cache: a 64x larger preallocated cache leaves decode time alone.

    The two artifacts are timed in alternation (best of 7 rounds each), so a busy neighbour (the
    other pytest worker compiling) slows both sides alike; a per-token copy of the 4096-slot cache
    would cost several times the tiny model's step."""
    import time

    model = tiny_model("llama")
    llms = [reshift.llm.compile(model, pipeline="exact", max_seq_len=max_seq) for max_seq in (64, 4096)]
    times = [float("inf")] * len(llms)
    for _ in range(7):
        for i, llm in enumerate(llms):
            llm.prefill(np.array(PROMPT))
            t0 = time.perf_counter()
            for tok in range(20):
                llm.decode(tok)
            times[i] = min(times[i], time.perf_counter() - t0)
    assert times[1] < 2.0 * times[0], times


@pytest.mark.slow
def test_sliding_window_prefill_longer_than_window(compiled):
    """Mistral with window 8: a 20-token prompt masks inside the prefill as well as in decode."""
    model, llm = compiled("mistral")
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 256, 20)]
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0, -1].numpy()
    np.testing.assert_allclose(llm.prefill(np.array(prompt)), ref, atol=1e-4, rtol=1e-4)
    assert llm.generate(np.array(prompt), max_new_tokens=32).tolist()[20:] == hf_greedy(model, prompt, 32)


def test_bcq_bit_allocation_under_a_budget(compiled):
    """A fractional ``bits`` is an average budget: q in {2, 3, 4} per fused linear, within budget."""
    from reshift.passes.bcq import bits_per_weight

    model, llm = compiled("llama", "bcq", bits=2.8, calibration=np.array([PROMPT * 3]))
    rows = [r for r in llm.report["layers"] if r["name"] != "lm_head"]
    assert {r["bits"] for r in rows} <= {2, 3, 4} and len({r["bits"] for r in rows}) > 1
    by_name = {r["name"]: r["bits"] for r in rows}
    assert by_name["layers.0.q"] == by_name["layers.0.k"] == by_name["layers.0.v"]
    sizes = [np.prod(r["shape"]) for r in rows]
    average = sum(s * bits_per_weight(r["bits"], 128) for s, r in zip(sizes, rows, strict=True)) / sum(sizes)
    assert average <= 2.8 + 1e-9
    assert llm.generate(np.array(PROMPT), max_new_tokens=4).shape == (len(PROMPT) + 4,)
    with pytest.raises(PassError, match="bits=1.5"):
        reshift.llm.compile(model, bits=1.5)


def test_a_batch_of_one_runs_on_a_batch_1_artifact(compiled):
    """``generate([ids])`` on a ``max_batch=1`` artifact: the batch-1 path, returned as a one-element list."""
    model, llm = compiled("llama")
    seen: list[tuple[int, int]] = []
    out = llm.generate([list(PROMPT)], max_new_tokens=6, stream=lambda j, t: seen.append((j, t)))
    single = llm.generate(np.array(PROMPT), max_new_tokens=6)
    assert isinstance(out, list) and len(out) == 1
    np.testing.assert_array_equal(out[0], single)
    assert seen == [(0, int(t)) for t in single[len(PROMPT) :]]
    with pytest.raises(InputError, match="sequence 0"):
        llm.generate([[list(PROMPT)]], max_new_tokens=2)
