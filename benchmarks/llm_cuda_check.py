"""LLM decoding on a GPU: the tiny families' greedy tokens, and TinyLlama-shape BCQ decode speed vs transformers.

    .venv/bin/python benchmarks/llm_cuda_check.py prepare DIR                 # here: build for cuda-sm90 (nvcc)
    python3 benchmarks/llm_cuda_check.py run DIR --json OUT.json              # on the GPU machine (< 8 min)
    .venv/bin/python benchmarks/llm_cuda_check.py prepare DIR --target cpu --shapes small   # dry run, here
    .venv/bin/python benchmarks/llm_cuda_check.py run DIR --device cpu        # the same flow on the CPU

``prepare`` (no GPU needed) compiles, with ``reshift.llm.compile(..., target=...)``:
- every tiny family of ``tests/llm_tiny.py`` (exact; llama and qwen2 also BCQ 3-bit), with its
  expected greedy tokens: transformers' own ``generate`` (fp32, CPU) for ``exact``, and for BCQ
  the numpy reference decoder (``reshift/llm/reference.py``) on the dequantized weights;
- the speed models: Llama with TinyLlama-1.1B shapes (dim 2048, 22 layers, FFN 5632, 32 / 4 heads,
  vocab 32000), BCQ 3-bit with ``lm_head`` dense fp32 and with ``lm_head`` in BCQ too. Their weights
  are *random packed codes* (the BCQ fit is replaced by :func:`random_bcq_params`: decode speed
  depends on the shapes and bytes, not on fitted values), and ``weights.npz`` (0.6-0.9 GB) is not
  kept: ``run`` draws it again from the recorded shapes, so the prepared directory stays a few MB
  and travels to the GPU machine (its working-tree limit is 64 MiB); each one's CUDA source is
  written beside it (``bcq3.cu``) for profiling there. Measured here (2 cores, load average ~9):
  4.5 min and 2.2 GB peak RSS for both TinyLlama-shape builds, 6.4 MB prepared; ``--only speed``
  / ``--only tiny`` builds one half.

On the GPU machine (python3.12 with torch and transformers, no TVM, no network), ``run`` needs
reshift importable (``python3 -m pip install --no-deps --no-build-isolation -e .``: its package-dir
layout) and a TVM *runtime* for that Python, carried in: the ``apache-tvm-ffi`` cp312 wheel and the
``tvm`` package without ``libtvm_compiler.so`` (260 MB; ``TVM_USE_RUNTIME_LIB=1``), as
``benchmarks/cuda_check.py`` ran. Not tried yet: no GPU was lent to the session that wrote this.

``run`` needs numpy and the TVM runtime (plus torch and transformers for the baselines): it loads
each artifact with ``reshift.runtime.llm.load(dir, device)``, checks the greedy tokens, then times
decode after a 128-token prompt (``LLM.benchmark``: best of 3, 64 new tokens) against transformers
``LlamaForCausalLM`` in bf16 with a static cache, without and with ``torch.compile``
(``mode="reduce-overhead"``: CUDA graphs), on the same random-init shapes, and writes one JSON.
Ratios are reshift tokens/s over transformers tokens/s (the issue's target: >= 2x at 3 bits).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # llm_tiny
sys.path.insert(0, str(ROOT / "benchmarks"))

PROMPT = [3, 17, 42, 9, 100, 7, 55, 21, 8, 64, 2, 90]
NEW_TOKENS = 32
TINY_CASES = [(f, "exact") for f in ("llama", "llama3", "qwen2", "mistral", "phi3", "gemma", "gpt2", "opt")] + [
    ("llama", "bcq"),
    ("qwen2", "bcq"),
]
SHAPES = {
    "tinyllama": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "small": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=2048,
    ),
}
SPEED_CASES = [("bcq3", False), ("bcq3_lm_head", True)]  # (name, lm_head in BCQ)
BITS, GROUP, MAX_SEQ, PROMPT_LEN, DECODE = 3, 128, 512, 128, 64


def llama_config(shapes: dict) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        **shapes,
    }


# -- random packed weights (the shapes reshift.llm.compiler.prepare would produce) ----------------------
def _member_shapes(spec) -> dict[str, tuple[int, int]]:
    h, kv, d, hid, f = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size, spec.ffn_size
    shapes = {"q": (h * d, hid), "k": (kv * d, hid), "v": (kv * d, hid), "o": (hid, h * d)}
    shapes.update({"gate": (f, hid), "up": (f, hid), "down": (hid, f)})
    return shapes


def random_bcq_params(spec, bits: int, max_seq: int, quantize_lm_head: bool, seed: int = 0):
    """``(params, forms, report)`` shaped exactly as ``prepare`` makes them for BCQ (random codes, scales 0.01)."""
    from reshift.codegen.tvm.kernels.packing import ROWS, slot_layout
    from reshift.codegen.tvm.llm import fused_linears
    from reshift.passes.bcq import bits_per_weight

    rng = np.random.default_rng(seed)
    hid = spec.hidden_size
    params: dict[str, np.ndarray] = {"embed": (rng.standard_normal((spec.vocab_size, hid), np.float32) * 0.02)}
    params["rope.cos"], params["rope.sin"] = spec.rope_tables(max_seq)
    for i in range(spec.num_layers):
        params[f"layers.{i}.norm1.w"] = np.ones(hid, np.float32)
        params[f"layers.{i}.norm2.w"] = np.ones(hid, np.float32)
    params["norm.w"] = np.ones(hid, np.float32)
    member = _member_shapes(spec)
    forms, report = {}, []
    _, words_per_group = slot_layout(GROUP)
    for fused, members in fused_linears(spec):
        shapes = [member[m.rsplit(".", 1)[1]] if m != "lm_head" else (spec.vocab_size, hid) for m in members]
        out, k = sum(s[0] for s in shapes), shapes[0][1]
        blocks = -(-out // ROWS)
        quantize = fused != "lm_head" or quantize_lm_head
        if quantize:
            groups = -(-k // GROUP)
            params[fused + ".words"] = rng.integers(0, 2**32, (blocks, groups, bits, words_per_group, ROWS), np.uint32)
            params[fused + ".alpha"] = (rng.random((blocks, groups, bits, ROWS), np.float32) * 0.01).astype(np.float32)
            forms[fused] = {"kind": "bcq", "out_features": out, "in_features": k, "group_size": GROUP, "bits": bits}
            stored = bits_per_weight(bits, GROUP)
        else:
            params[fused + ".panels"] = rng.standard_normal((blocks, k, ROWS), np.float32) * 0.02
            forms[fused] = {"kind": "dense", "out_features": out, "in_features": k}
            stored = 32
        params[fused + ".bias"] = np.zeros(blocks * ROWS, np.float32)
        for m, (o, kk) in zip(members, shapes, strict=True):
            report.append(
                {
                    "name": m,
                    "shape": [o, kk],
                    "bits": bits if quantize else 32,
                    "weight_error": 0.0,
                    "bytes_fp32": 4 * o * kk,
                    "bytes": int(np.ceil(o * kk * stored / 8)),
                }
            )
    return params, forms, report


def _compile_random(config: dict, out: Path, target: str, quantize_lm_head: bool):
    """``reshift.llm.compile`` on a config alone: the weights are :func:`random_bcq_params` (no fit, no checkpoint)."""
    import reshift.llm.compiler as compiler
    from reshift.llm.config import spec_from_config

    spec = spec_from_config(config)
    saved = compiler.open_model, compiler.prepare
    compiler.open_model = lambda _model: (spec, {}, config)
    compiler.prepare = lambda spec_, _w, _p, bits, _c, max_seq, lm_head, **_kw: random_bcq_params(
        spec_, int(bits), max_seq, lm_head
    )
    try:
        return compiler.compile(
            "random", "bcq", BITS, target=target, max_seq_len=MAX_SEQ, quantize_lm_head=quantize_lm_head, out_dir=out
        )
    finally:
        compiler.open_model, compiler.prepare = saved


# -- prepare (here; no GPU) -----------------------------------------------------------------------------
def _reference_tokens(model, pipeline: str) -> list[int]:
    """transformers' greedy tokens (exact), or the numpy reference decoder's on the dequantized BCQ weights."""
    from llm_tiny import hf_greedy

    if pipeline == "exact":
        return hf_greedy(model, PROMPT, NEW_TOKENS)
    from reshift.llm.compiler import prepare, read_model
    from reshift.llm.reference import forward

    spec, weights, _ = read_model(model)
    dequant: dict[str, np.ndarray] = {}
    prepare(spec, weights, pipeline, BITS, None, 128, False, dequant)
    w = {**weights, **dequant}
    shape = (spec.num_layers, spec.num_kv_heads, 128, spec.head_dim)
    ck, cv = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    logits = forward(spec, w, np.array(PROMPT), 0, ck, cv)
    tokens = []
    for step in range(NEW_TOKENS):
        tokens.append(int(np.argmax(logits)))
        logits = forward(spec, w, np.array(tokens[-1:]), len(PROMPT) + step, ck, cv)
    return tokens


def _npz_shapes(path: Path) -> dict[str, list]:
    """``{name: [shape, dtype]}`` of an ``.npz`` from its array headers (the arrays are not read)."""
    import zipfile

    out = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            with archive.open(member) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
            out[member.removesuffix(".npy")] = [list(shape), np.dtype(dtype).name]
    return out


def prepare(directory: Path, target: str, shapes: str, only: str = "all") -> None:
    from llm_tiny import tiny_model

    import reshift.llm

    directory.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"target": target, "shapes": shapes, "tiny": [], "speed": []}
    for family, pipeline in TINY_CASES if only in ("all", "tiny") else []:
        t0 = time.perf_counter()
        name = f"{family}-{pipeline}"
        model = tiny_model(family)
        llm = reshift.llm.compile(model, pipeline, BITS, target=target, max_seq_len=128, out_dir=directory / name)
        manifest["tiny"].append(
            {
                "name": name,
                "expected": _reference_tokens(model, pipeline),
                "reference": "transformers fp32" if pipeline == "exact" else "numpy reference",
            }
        )
        print(f"{name:16s} built for {target} in {time.perf_counter() - t0:5.1f} s", flush=True)
        del llm
    config = llama_config(SHAPES[shapes])
    for name, lm_head in SPEED_CASES if only in ("all", "speed") else []:
        t0 = time.perf_counter()
        llm = _compile_random(config, directory / name, target, lm_head)
        recipe = _npz_shapes(llm.path / "weights.npz")
        (llm.path / "weights.npz").unlink()  # drawn again by run(): 0.6-0.9 GB do not travel
        if getattr(llm, "kernel_source", None):  # the CUDA C++ beside the fatbin, for profiling on the GPU
            (directory / f"{name}.cu").write_text(llm.kernel_source)
        (llm.path / "weights_recipe.json").write_text(json.dumps(recipe))
        manifest["speed"].append({"name": name, "lm_head_bcq": lm_head, "weight_bytes": llm.report["weight_bytes"]})
        print(
            f"{name:16s} built for {target} in {time.perf_counter() - t0:5.1f} s "
            f"({llm.report['weight_bytes'] / 1e6:.0f} MB of weights, drawn again at run time)",
            flush=True,
        )
        del llm
    manifest["config"] = config
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))


# -- run (on the GPU machine) ---------------------------------------------------------------------------
def _draw_weights(path: Path) -> None:
    """Random weights of the recorded shapes into ``weights.npz``, and the artifact's checksums made to match."""
    from reshift.runtime.artifact import sha256_file, write_meta

    recipe = json.loads((path / "weights_recipe.json").read_text())
    rng = np.random.default_rng(0)
    arrays = {}
    for name, (shape, dtype) in recipe.items():
        if dtype == "uint32":
            arrays[name] = rng.integers(0, 2**32, shape, np.uint32)
        elif ".norm" in name or name.startswith("norm."):
            arrays[name] = np.ones(shape, dtype)
        elif name.endswith(".alpha"):
            arrays[name] = (rng.random(shape, np.float32) * 0.01).astype(dtype)
        elif name.endswith(".bias"):
            arrays[name] = np.zeros(shape, dtype)
        else:  # embed, dense weights, rope tables (their values do not change the time)
            arrays[name] = (rng.standard_normal(shape, np.float32) * 0.02).astype(dtype)
    np.savez(path / "weights.npz", **arrays)
    meta = json.loads((path / "llm.json").read_text())
    meta.pop("meta_sha256", None)
    meta["weights_sha256"] = sha256_file(path / "weights.npz")
    meta["weights_note"] = "random weights drawn by benchmarks/llm_cuda_check.py run (speed only)"
    write_meta(path, meta, name="llm.json")


def _hf_decode(config: dict, device: str, compiled: bool) -> dict[str, Any]:
    """transformers LlamaForCausalLM, bf16, static cache: decode tokens/s = 64 / (t(65 new) - t(1 new))."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{k: v for k, v in config.items() if k not in ("model_type", "architectures")})
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    gen = model.generation_config
    gen.cache_implementation = "static"
    gen.disable_compile = True  # the compiled variant wraps forward itself, the other must stay eager
    if compiled:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    ids = torch.randint(0, cfg.vocab_size, (1, PROMPT_LEN), device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def gen_time(new: int) -> float:
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        sync()
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    for _ in range(2):  # warm-up: compiles prefill and decode graphs
        gen_time(DECODE + 1)
    warm = time.perf_counter() - t0
    full = min(gen_time(DECODE + 1) for _ in range(3))
    first = min(gen_time(1) for _ in range(3))
    return {
        "decode_tokens_per_s": DECODE / max(full - first, 1e-9),
        "prefill_plus_first_ms": first * 1e3,
        "warmup_s": warm,
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


def run(directory: Path, device: str, json_out: Path | None, skip_torch: bool) -> int:
    from reshift.runtime.llm import load

    manifest = json.loads((directory / "manifest.json").read_text())
    started = time.perf_counter()
    result: dict[str, Any] = {
        "target": manifest["target"],
        "shapes": manifest["shapes"],
        "device": device,
        "host": platform.node(),
        "tiny": [],
        "speed": [],
    }
    try:
        import torch

        result["torch"] = torch.__version__
        if device.startswith("cuda") and torch.cuda.is_available():
            result["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        torch = None
    import tvm

    if device.startswith("cuda"):  # before drawing a GB of weights
        from reshift.errors import ArtifactError
        from reshift.runtime.module import load_device_runtime

        try:
            load_device_runtime("cuda")
            why = "" if tvm.cuda(0).exist else "the TVM CUDA runtime loads but sees no GPU"
        except ArtifactError as exc:
            why = str(exc)
        if why:
            print(f"no CUDA device visible to TVM: {why}")
            return 1
    result["tvm"] = tvm.__version__
    print(f"device {device} ({result.get('gpu', 'host CPU')}), TVM {tvm.__version__}, torch {result.get('torch')}")
    failures = 0
    for case in manifest["tiny"]:
        llm = load(directory / case["name"], device=device)
        out = llm.generate(np.array(PROMPT), max_new_tokens=NEW_TOKENS)[len(PROMPT) :].tolist()
        same = out == case["expected"]
        first_diff = next((i for i, (a, b) in enumerate(zip(out, case["expected"], strict=True)) if a != b), None)
        failures += not same
        result["tiny"].append(
            {
                "name": case["name"],
                "match": same,
                "first_difference": first_diff,
                "tokens": out,
                "expected": case["expected"],
                "reference": case["reference"],
            }
        )
        print(
            f"{case['name']:16s} {NEW_TOKENS} greedy tokens {'match' if same else 'DIFFER at ' + str(first_diff)} "
            f"({case['reference']})",
            flush=True,
        )
    config = manifest["config"]
    for case in manifest["speed"]:
        path = directory / case["name"]
        if not (path / "weights.npz").is_file() or "weights_note" not in json.loads((path / "llm.json").read_text()):
            _draw_weights(path)
        llm = load(path, device=device)
        bench = llm.benchmark(prompt_len=PROMPT_LEN, new_tokens=DECODE, repeat=3)
        row = {"name": case["name"], "weight_bytes": case["weight_bytes"], **bench}
        result["speed"].append(row)
        print(
            f"reshift {case['name']:14s} decode {bench['decode_tokens_per_s']:8.1f} tok/s, prefill "
            f"{bench['prefill_tokens_per_s']:8.1f} tok/s, weights {case['weight_bytes'] / 1e6:7.0f} MB",
            flush=True,
        )
        del llm
    if torch is not None and not skip_torch:
        dev = "cuda" if device.startswith("cuda") else "cpu"
        for compiled in (False, True):
            label = "transformers bf16 static cache" + (" + torch.compile" if compiled else "")
            try:
                hf = _hf_decode(config, dev, compiled)
            except Exception as exc:  # noqa: BLE001 -- a baseline failing is reported, not fatal
                hf = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
            result["speed"].append({"name": label, **hf})
            if "error" in hf:
                print(f"{label}: FAILED {hf['error']}", flush=True)
                continue
            print(
                f"{label:44s} decode {hf['decode_tokens_per_s']:8.1f} tok/s, weights "
                f"{hf['weight_bytes'] / 1e6:7.0f} MB (warm-up {hf['warmup_s']:.0f} s)",
                flush=True,
            )
        base = {r["name"]: r for r in result["speed"] if "decode_tokens_per_s" in r and r["name"].startswith("trans")}
        for r in result["speed"]:
            if r["name"].startswith("trans") or "decode_tokens_per_s" not in r:
                continue
            r["ratios"] = {n: r["decode_tokens_per_s"] / b["decode_tokens_per_s"] for n, b in base.items()}
            for n, ratio in r["ratios"].items():
                print(f"  {r['name']} / {n}: {ratio:.2f}x decode tokens/s (target >= 2x)")
    result["seconds"] = time.perf_counter() - started
    print(
        f"{len(manifest['tiny']) - failures}/{len(manifest['tiny'])} tiny artifacts generate the reference tokens; "
        f"{result['seconds']:.0f} s"
    )
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=1))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build the artifacts and their expected tokens (no GPU needed)")
    p.add_argument("dir", type=Path)
    p.add_argument("--target", default="cuda-sm90", help="cuda-sm90 (default), cuda, or cpu for a dry run")
    p.add_argument("--shapes", choices=sorted(SHAPES), default="tinyllama", help="speed models' shapes")
    p.add_argument("--only", choices=("all", "tiny", "speed"), default="all", help="build only these cases")
    r = sub.add_parser("run", help="check and time the prepared artifacts (runtime only, plus torch for baselines)")
    r.add_argument("dir", type=Path)
    r.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run of a cpu-built directory")
    r.add_argument("--json", type=Path, help="write the results here")
    r.add_argument("--skip-torch", action="store_true", help="no transformers baselines")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        os.environ.setdefault("TVM_NUM_THREADS", "2")
        prepare(args.dir, args.target, args.shapes, args.only)
        return 0
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")  # the runtime alone, as on the GPU machine
    return run(args.dir, args.device, args.json, args.skip_torch)


if __name__ == "__main__":
    sys.exit(main())
