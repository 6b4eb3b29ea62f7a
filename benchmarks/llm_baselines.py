"""Baselines of benchmarks/llm.py besides llama.cpp: onnxruntime-genai int4 and transformers (static cache).

Each runs in its own subprocess (peak RSS = VmHWM of that process) with the same threads, the same
random in-vocabulary prompt and the same timing as ``reshift.llm``'s ``benchmark``: one warm-up,
then the best of ``repeat`` prefills of the prompt and the best of ``repeat`` runs of ``new`` greedy
decode steps after it.

- **onnxruntime-genai** (``--ortgenai [32,128]``, block sizes): ``python -m onnxruntime_genai.models.builder
  -p int4 -e cpu`` with ``accuracy_level=4`` (int8 activations in MatMulNBits, the builder's CPU default
  and its fastest kernel) and ``block_size=B``, from the local HF directory (plus a placeholder word-level
  tokenizer the builder insists on), cached under ``--work``; ``genai_config.json`` patched to
  ``intra_op_num_threads`` = threads, ``inter_op_num_threads`` = 1. Prefill is ``Generator.append_tokens``
  of the prompt; decode is ``new`` ``generate_next_token`` calls after the first (each runs the model on
  the previous token). Model bytes: the ONNX files on disk.
- **transformers** (``--transformers [fp32,bf16,bf16-compile]``): ``LlamaForCausalLM.from_pretrained`` in
  that dtype, SDPA attention, a ``StaticCache`` of prompt + new + 1 positions, ``torch.set_num_threads``,
  ``logits_to_keep=1`` (what ``generate`` asks for), greedy. ``-compile`` runs the decode step under
  ``torch.compile`` (inductor, ``fullgraph``, static shapes, ``freezing``); its warm-up (the compilation) is
  printed and a child that fails or runs past ``compile_timeout`` seconds in all is a row marked skipped, with
  the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ORT_BLOCKS = (32, 128)
TORCH_VARIANTS = ("fp32", "bf16", "fp32-compile", "bf16-compile")

PEAK = """
def peak_rss_mb():  # VmHWM restarts at exec; ru_maxrss would carry the parent's peak over
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

ORT_BENCH = (
    PEAK
    + """
import json, time
import numpy as np
import onnxruntime_genai as og
model = og.Model({out!r})
vocab, prompt_len, new, repeat = {vocab}, {prompt}, {new}, {repeat}
prompt = np.random.default_rng(0).integers(3, vocab, prompt_len).astype(np.int32)

def once():
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt_len + new + 2, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt)      # the prompt's forward pass: logits of its last position
    gen.generate_next_token()      # picks the first new token from those logits
    t1 = time.perf_counter()
    for _ in range(new):
        gen.generate_next_token()  # one forward pass of the previous token, then argmax
    t2 = time.perf_counter()
    tokens = list(gen.get_sequence(0))
    del gen
    return t1 - t0, t2 - t1, tokens

once()
runs = [once() for _ in range(repeat)]
pre, dec = min(r[0] for r in runs), min(r[1] for r in runs)
tokens = runs[0][2]
print(json.dumps({{"prompt_tokens": prompt_len, "new_tokens": new, "prefill_tokens_per_s": prompt_len / pre,
                  "decode_tokens_per_s": new / dec, "prefill_ms": pre * 1e3, "decode_ms_per_token": dec * 1e3 / new,
                  "generated": len(tokens) - prompt_len, "rss_mb": peak_rss_mb()}}))
"""
)

TORCH_BENCH = (
    PEAK
    + """
import inspect, json, time
import numpy as np
import torch
from transformers import LlamaForCausalLM, StaticCache
torch.set_num_threads({threads})
torch.manual_seed(0)
dtype = {{"fp32": torch.float32, "bf16": torch.bfloat16}}[{dtype!r}]
t0 = time.perf_counter()
model = LlamaForCausalLM.from_pretrained({model!r}, dtype=dtype, attn_implementation="sdpa").eval()
load_s = time.perf_counter() - t0
prompt_len, new, repeat = {prompt}, {new}, {repeat}
vocab = model.config.vocab_size
prompt = torch.from_numpy(np.random.default_rng(0).integers(3, vocab, prompt_len)).long()[None]
cache = StaticCache(config=model.config, max_cache_len=prompt_len + new + 1)

CACHE_ARG = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.x renames it

def step(ids, pos, cache):
    out = model(input_ids=ids, cache_position=pos, use_cache=True, logits_to_keep=1, **{{CACHE_ARG: cache}})
    return out.logits[:, -1]

decode_step = step
compile_s = 0.0
if {compile!r}:
    import torch._inductor.config
    torch._inductor.config.freezing = True  # weights as constants: inductor's packed CPU linears (its CPU advice)
    decode_step = torch.compile(step, fullgraph=True, dynamic=False)

def once():
    with torch.no_grad():
        cache.reset()
        t0 = time.perf_counter()
        logits = step(prompt, torch.arange(prompt_len), cache)
        t1 = time.perf_counter()
        token = logits.argmax(-1, keepdim=True)
        for i in range(new):
            logits = decode_step(token, torch.tensor([prompt_len + i]), cache)
            token = logits.argmax(-1, keepdim=True)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1

t0 = time.perf_counter()
once()  # warm-up; with torch.compile, the compilation
compile_s = time.perf_counter() - t0
runs = [once() for _ in range(repeat)]
pre, dec = min(r[0] for r in runs), min(r[1] for r in runs)
print(json.dumps({{"prompt_tokens": prompt_len, "new_tokens": new, "prefill_tokens_per_s": prompt_len / pre,
                  "decode_tokens_per_s": new / dec, "prefill_ms": pre * 1e3, "decode_ms_per_token": dec * 1e3 / new,
                  "load_s": load_s, "warmup_s": compile_s, "torch": torch.__version__, "rss_mb": peak_rss_mb()}}))
"""
)


def _log(msg: str) -> None:
    print(f"[baselines] {msg}", file=sys.stderr, flush=True)


def run_child(code: str, threads: int, timeout: float | None = None) -> dict:
    """``code`` in a fresh interpreter with ``threads`` everywhere; its last stdout line as JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TVM_NUM_THREADS": str(threads)}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- onnxruntime-genai ----------------------------------------------------------------------------


def write_placeholder_tokenizer(directory: Path, vocab: int) -> None:
    """A word-level ``tokenizer.json`` of ``vocab`` pieces (<unk> <s> </s> t3 ...): the model builder loads
    and copies a tokenizer; the benchmark feeds token ids, so only its size and special ids matter."""
    special = dict(single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
    pieces = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": c, **special} for c, i in (("<unk>", 0), ("<s>", 1), ("</s>", 2))],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": pieces, "unk_token": "<unk>"},
    }
    (directory / "tokenizer.json").write_text(json.dumps(tok))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "model_max_length": 2048}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))


def builder_input(hf_dir: Path, work: Path) -> Path:
    """``hf_dir``'s config and weights (symlinked) with a placeholder tokenizer beside them, under ``work``."""
    src = work / "hf_with_tokenizer"
    src.mkdir(parents=True, exist_ok=True)
    for f in hf_dir.iterdir():
        if f.suffix in (".json", ".safetensors") and not f.name.startswith("tokenizer"):
            link = src / f.name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(f.resolve())
    if not (hf_dir / "tokenizer.json").exists():
        write_placeholder_tokenizer(src, json.loads((hf_dir / "config.json").read_text())["vocab_size"])
    return src


def builder_command(src: Path, out: Path, block_size: int, accuracy_level: int = 4) -> list[str]:
    return [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out), "-p", "int4",
            "-e", "cpu", "-c", str(out.parent / "builder_cache"), "--extra_options", f"accuracy_level={accuracy_level}",
            f"block_size={block_size}"]  # fmt: skip


def patch_genai_config(path: Path, threads: int) -> dict:
    """Set the decoder's ONNX Runtime session to ``threads`` intra-op threads (1 inter-op) in genai_config.json."""
    cfg = json.loads(path.read_text())
    try:
        decoder = cfg["model"]["decoder"]
    except KeyError as exc:
        raise ValueError(f"{path}: no model.decoder section (not an onnxruntime-genai config?)") from exc
    opts = decoder.setdefault("session_options", {})
    opts["intra_op_num_threads"] = threads
    opts["inter_op_num_threads"] = 1
    path.write_text(json.dumps(cfg, indent=4))
    return cfg


def onnx_bytes(directory: Path) -> int:
    """Bytes of the ONNX model files (graph + external data), not the tokenizer or configs."""
    return sum(f.stat().st_size for f in directory.iterdir() if f.suffix in (".onnx", ".data") or f.name.endswith(
        ".onnx.data"))  # fmt: skip


def onnx_linear_bytes(model: Path) -> int:
    """Bytes one decoded token reads in the ONNX model: every initializer but the embedding and rotary tables (a row).

    Read from the external-data entries of ``model.onnx`` (the builder writes every weight to ``.onnx.data``), so
    the weights are not loaded."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    total = 0
    for init in proto.graph.initializer:
        if "embed_tokens" in init.name or init.name in ("cos_cache", "sin_cache"):
            continue
        info = {e.key: e.value for e in init.external_data}
        total += int(info["length"]) if "length" in info else len(init.raw_data)
    return total


def build_ortgenai(hf_dir: Path, work: Path, block_size: int, threads: int) -> Path:
    """The int4 ONNX model (built once per block size under ``work``; the builder's command is kept beside it)."""
    out = work / f"int4-b{block_size}"
    src = builder_input(hf_dir, work)
    cmd = builder_command(src, out, block_size)
    stamp = out / "reshift_builder.json"
    if not (stamp.exists() and json.loads(stamp.read_text())["command"][1:] == cmd[1:]):
        _log(f"onnxruntime-genai model builder, int4 block {block_size} (minutes; several GB of memory)")
        t0 = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        (work / f"int4-b{block_size}.builder.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"onnxruntime-genai builder failed:\n{(done.stdout + done.stderr)[-3000:]}")
        stamp.write_text(json.dumps({"command": cmd, "build_s": time.perf_counter() - t0}))
    patch_genai_config(out / "genai_config.json", threads)
    return out


def ortgenai_rows(hf_dir: Path, work: Path, blocks, threads: int, prompt: int, new: int, repeat: int) -> list[dict]:
    """One row per int4 block size."""
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise SystemExit("onnxruntime-genai is missing: `.venv/bin/python -m pip install -e '.[bench]'`") from exc
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    rows = []
    for block in blocks:
        out = build_ortgenai(hf_dir, work, int(block), threads)
        _log(f"onnxruntime-genai int4 block {block}: timing")
        code = ORT_BENCH.format(out=str(out), vocab=vocab, prompt=prompt, new=new, repeat=repeat)
        r = run_child(code, threads)
        build = json.loads((out / "reshift_builder.json").read_text())
        settings = f"int4 block_size={block} accuracy_level=4, intra_op={threads}"
        rows.append({"pipeline": f"ort-genai int4 b{block}", **r, "model_bytes": onnx_bytes(out),
                     "linear_bytes": onnx_linear_bytes(out / "model.onnx"), "build_s": build["build_s"],
                     "ortgenai": og.__version__, "settings": settings})  # fmt: skip
    return rows


# ---- transformers -----------------------------------------------------------------------------------


def parse_torch_variant(spec: str) -> tuple[str, bool]:
    """``fp32`` / ``bf16`` / ``fp32-compile`` / ``bf16-compile`` -> (dtype, compiled)."""
    dtype, _, rest = spec.partition("-")
    if dtype not in ("fp32", "bf16") or rest not in ("", "compile"):
        raise ValueError(f"transformers variant {spec!r}: expected one of {', '.join(TORCH_VARIANTS)}")
    return dtype, rest == "compile"


def torch_linear_bytes(config: dict, dtype: str) -> int:
    """Weight bytes one decoded token reads in transformers: every linear and lm_head (the embedding, one row)."""
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config.get("num_key_value_heads", config["num_attention_heads"])
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f
    return (config["num_hidden_layers"] * per_layer + v * h) * (4 if dtype == "fp32" else 2)


def transformers_rows(hf_dir: Path, variants, threads: int, prompt: int, new: int, repeat: int,
                      compile_timeout: float = 900) -> list[dict]:  # fmt: skip
    """One row per variant; a compiled variant that fails or runs past ``compile_timeout`` is a skipped row."""
    config = json.loads((hf_dir / "config.json").read_text())
    n_params = torch_linear_bytes(config, "fp32") // 4 + config["vocab_size"] * config["hidden_size"]
    rows = []
    for spec in variants:
        dtype, compiled = parse_torch_variant(spec)
        name = f"transformers {spec}"
        code = TORCH_BENCH.format(model=str(hf_dir), dtype=dtype, compile=compiled, threads=threads, prompt=prompt,
                                  new=new, repeat=repeat)  # fmt: skip
        _log(f"{name}: timing")
        settings = f"static cache, sdpa, {dtype}" + (", torch.compile(fullgraph, freezing) decode" if compiled else "")
        row = {"pipeline": name, "model_bytes": n_params * (4 if dtype == "fp32" else 2),
               "linear_bytes": torch_linear_bytes(config, dtype), "settings": settings}  # fmt: skip
        try:
            row.update(run_child(code, threads, timeout=compile_timeout if compiled else None))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            if not compiled:
                raise
            why = f"past {compile_timeout:.0f} s" if isinstance(exc, subprocess.TimeoutExpired) else str(exc)
            row["skipped"] = f"torch.compile failed or too slow on {threads} threads: {why.strip().splitlines()[-1]}"
            _log(f"{name}: skipped ({row['skipped']})")
        rows.append(row)
    return rows
