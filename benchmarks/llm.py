"""LLM generation speed: prefill and decode tokens/s, peak RSS and weight bytes per pipeline.

    .venv/bin/python benchmarks/llm.py                      # random-weight tiny Llama in a temp dir
    .venv/bin/python benchmarks/llm.py MODEL_DIR            # a local Hugging Face directory
    .venv/bin/python benchmarks/llm.py --tinyllama-shapes   # TinyLlama-1.1B shapes, random weights (slow to fit)
    .venv/bin/python benchmarks/llm.py --tinyllama-shapes --layers 2   # the same shapes, 2 of the 22 layers
    .venv/bin/python benchmarks/llm.py --tinyllama-shapes --pipelines bcq3,bcq2 --lm-head --llamacpp  # vs llama.cpp

Each pipeline is compiled in one subprocess and timed in another that loads the artifact with the
runtime alone (``reshift.llm.load``), so the peak RSS printed is the runtime's. ``--threads``
(default 2) sets TVM_NUM_THREADS for both. The roofline column is this machine's measured read
bandwidth (numpy sums over 1 GiB in ``--threads`` threads at once) divided by the weight bytes one
decoded token reads (every linear, ``lm_head`` included; the embedding reads one row); a last-level
cache larger than the model (the tiny default) lets decode beat it.

``--llamacpp [Q4_0,Q3_K_S,Q2_K,TQ2_0,TQ1_0]`` adds llama.cpp rows (``benchmarks/llamacpp.py``: built from
the sources vendored in the llama-cpp-python sdist, the same weights as GGUF, ``llama-quantize``-d, one
``llama-bench`` process per type with the same threads, prompt and decoded tokens) and the ratio
tables reshift / llama.cpp. ``--ortgenai [32,128]`` adds onnxruntime-genai int4 rows (its model builder, those
block sizes, ``accuracy_level=4``) and ``--transformers [fp32,bf16,fp32-compile,bf16-compile]`` transformers rows
(static cache; ``-compile``: the decode step under ``torch.compile``), both from ``benchmarks/llm_baselines.py``;
``--all-baselines`` is all three. ``--json`` also writes a bar chart beside it (matplotlib, the bench extra).
Building the 1.1B int4 model and loading it in fp32 take several GB: run the whole benchmark under
``flock /tmp/reshift_big.lock`` on a shared host.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from llm_baselines import ORT_BLOCKS, PEAK, TORCH_VARIANTS, ortgenai_rows, run_child, transformers_rows  # noqa: E402

LLAMACPP_ALL = "Q4_0,Q3_K_S,Q2_K,TQ2_0,TQ1_0"
ORT_ALL = ",".join(map(str, ORT_BLOCKS))
TORCH_ALL = ",".join(TORCH_VARIANTS)
TINY = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, vocab_size=4096)  # fmt: skip
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000)  # fmt: skip


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A minimal safetensors writer (F32 / F16), so that no torch is needed to make the model."""
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        kind = {"float32": "F32", "float16": "F16"}[array.dtype.name]
        blob = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": kind, "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for blob in blobs:
            f.write(blob)


def write_random_llama(directory: Path, shapes: dict, dtype: str = "float32", seed: int = 0) -> Path:
    """A Llama-architecture HF directory (config.json + model.safetensors) with random weights."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, f, v = shapes["hidden_size"], shapes["intermediate_size"], shapes["vocab_size"]
    kv = h // shapes["num_attention_heads"] * shapes["num_key_value_heads"]

    def rand(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)

    t = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": np.ones(h, dtype), "lm_head.weight": rand(v, h)}
    for i in range(shapes["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({
            p + "input_layernorm.weight": np.ones(h, dtype), p + "post_attention_layernorm.weight": np.ones(h, dtype),
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(f, h), p + "mlp.up_proj.weight": rand(f, h),
            p + "mlp.down_proj.weight": rand(h, f),
        })  # fmt: skip
    write_safetensors(directory / "model.safetensors", t)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5,
              "max_position_embeddings": 2048, "rope_theta": 10000.0, "hidden_act": "silu",
              "tie_word_embeddings": False, "torch_dtype": dtype, **shapes}  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory


def read_bandwidth_gbs(threads: int = 2) -> float:
    """DRAM read GB/s with ``threads`` threads, as the kernels read: best of 4 sums of 1 GiB split in
    ``threads`` parts summed at once (numpy's sum releases the GIL). One thread reads about 0.6x of
    two here (14 vs 23 GB/s), and an earlier one-thread figure put onnxruntime-genai above its roofline."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(1 << 28, np.float32)
    parts = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.sum, parts))
        for _ in range(4):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def _child(code: str, threads: int) -> dict:
    """:func:`llm_baselines.run_child` for reshift's own children: a failure ends the benchmark."""
    try:
        return run_child(code, threads)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None


COMPILE = (
    PEAK
    + """
import json, sys, time
import reshift.llm
t0 = time.perf_counter()
llm = reshift.llm.compile({model!r}, pipeline={pipeline!r}, bits={bits}, max_seq_len={max_seq}, out_dir={out!r},
                          quantize_lm_head={lm_head}, decode_lut={decode_lut!r})
r = llm.report
print(json.dumps({{"compile_s": time.perf_counter() - t0, "fit_s": r["fit_seconds"], "weight_bytes": r["weight_bytes"],
                  "linear_bytes": r["linear_bytes"], "rss_mb": peak_rss_mb(), "decode_lut": llm.meta["decode_lut"]}}))
"""
)
BENCH = (
    PEAK
    + """
import json, sys
sys.modules["torch"] = None
import reshift.llm
llm = reshift.llm.load({out!r})
s = llm.benchmark(prompt_len={prompt}, new_tokens={new}, repeat={repeat})
s["rss_mb"] = peak_rss_mb()
print(json.dumps(s))
"""
)


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def parse_pipeline(spec: str, bits: float) -> tuple[str, float, str, str | None]:
    """``exact``, ``ternary``, ``bcq`` (``--bits``) or ``bcqN``, optionally ``:float32`` / ``:int8`` (the
    decode GEMV's tables; default: the compiler's) -> (pipeline, bits, row name, decode_lut)."""
    spec, _, lut = spec.partition(":")
    suffix = f":{lut}" if lut else ""
    if lut and lut not in ("float32", "int8"):
        raise SystemExit(f"pipeline {spec}:{lut}: the decode tables are float32 or int8")
    if spec.startswith("bcq"):
        bits = float(spec[3:]) if spec != "bcq" else bits
        bits = int(bits) if bits == int(bits) else bits  # 2, 3, 4 planes everywhere; a fraction is a budget
        return "bcq", bits, f"bcq{bits:g}{suffix}", lut or None
    return spec, bits, spec + suffix, lut or None


def short_name(row: dict) -> str:
    """A ratio-table column header: the llama.cpp type, ``ort b32``, ``hf bf16-compile``."""
    if "quant" in row:
        return row["quant"]
    return row["pipeline"].replace("ort-genai int4 ", "ort ").replace("transformers ", "hf ")


def print_ratios(rows: list[dict], base: list[dict]) -> None:
    """reshift / baseline tokens/s, one table per phase; SLOWER marks where reshift is slower."""
    base = [b for b in base if "skipped" not in b]
    for key, label in (("decode_tokens_per_s", "decode"), ("prefill_tokens_per_s", "prefill")):
        print(f"{label} tokens/s, reshift / baseline:")
        print(f"{'':<8} " + " ".join(f"{short_name(b):>16}" for b in base))
        for r in rows:
            cells = []
            for b in base:
                x = r[key] / b[key]
                cells.append(f"{x:.2f}x" + (" SLOWER" if x < 1 else ""))
            print(f"{r['pipeline']:<8} " + " ".join(f"{c:>16}" for c in cells))


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (the bench extra): no chart")
        return
    rows = [r for r in rows if "skipped" not in r]
    names = [r["pipeline"] for r in rows]
    family = {"llama.cpp": "tab:gray", "ort-genai": "tab:orange", "transformers": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(max(11, 0.9 * len(rows) + 3), 4.5))
    for ax, key in zip(axes, ("decode_tokens_per_s", "prefill_tokens_per_s"), strict=True):
        colors = [family.get(n.split()[0], "tab:blue") for n in names]
        ax.bar(names, [r[key] for r in rows], color=colors)
        if key.startswith("decode"):
            roof = [r.get("roofline_tokens_per_s") or float("nan") for r in rows]
            ax.plot(names, roof, "k_", markersize=20, label="DRAM roofline")
            ax.legend()
        ax.set_title(f"{key.split('_')[0]} tokens/s (higher is better)")
        ax.tick_params(axis="x", rotation=40)
        for t in ax.get_xticklabels():
            t.set_horizontalalignment("right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"chart: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="local HF model directory (default: a random tiny Llama)")
    ap.add_argument("--tinyllama-shapes", action="store_true", help="random weights with TinyLlama-1.1B's shapes")
    ap.add_argument("--layers", type=int, help="override the number of layers of the generated model")
    ap.add_argument("--pipelines", default="exact,bcq", help="exact, bcq, bcqN, ternary (default: exact,bcq)")
    ap.add_argument("--bits", type=float, default=3)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (default: 128)")
    ap.add_argument("--new", type=int, default=32, help="decoded tokens timed (default: 32)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lm-head", action="store_true", help="bcq: quantize lm_head too (default: fp32)")
    ap.add_argument("--llamacpp", nargs="?", const=LLAMACPP_ALL, help="llama.cpp rows of these types")
    ap.add_argument("--ortgenai", nargs="?", const=ORT_ALL, help="onnxruntime-genai int4 rows of these block sizes")
    ap.add_argument("--transformers", nargs="?", const=TORCH_ALL, help="transformers rows (static cache) of these")
    ap.add_argument("--all-baselines", action="store_true", help="--llamacpp --ortgenai --transformers")
    ap.add_argument("--compile-timeout", type=float, default=1200, help="s for a transformers -compile row in all")
    ap.add_argument("--json", help="write the results here (and a chart beside it)")
    ap.add_argument("--keep", action="store_true", help="keep the generated model and artifacts (temp dir)")
    ap.add_argument("--work", help="a kept folder for model, artifacts and GGUF files; a rerun reuses what it holds")
    ap.add_argument("--compile-only", action="store_true", help="compile the pipelines into --work, time nothing")
    args = ap.parse_args()
    if args.all_baselines:
        args.llamacpp, args.ortgenai = args.llamacpp or LLAMACPP_ALL, args.ortgenai or ORT_ALL
        args.transformers = args.transformers or TORCH_ALL
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="reshift_llm_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.model:
        model = args.model
    elif (work / "hf" / "config.json").exists():
        model = str(work / "hf")  # written by an earlier run with the same --work (seed 0)
    else:
        shapes = dict(TINYLLAMA if args.tinyllama_shapes else TINY)
        if args.layers:
            shapes["num_hidden_layers"] = args.layers
        model = str(write_random_llama(work / "hf", shapes, "float16" if args.tinyllama_shapes else "float32"))
    load_start = os.getloadavg()
    bandwidth = read_bandwidth_gbs(args.threads)
    rows = []
    for spec in args.pipelines.split(","):
        pipeline, bits, name, decode_lut = parse_pipeline(spec, args.bits)
        out = str(work / f"art_{name.replace(':', '_')}")
        code = COMPILE.format(
            model=model,
            pipeline=pipeline,
            bits=bits,
            max_seq=args.max_seq_len,
            out=out,
            lm_head=args.lm_head,
            decode_lut=decode_lut,
        )
        stats = Path(out + ".compile.json")  # what compiled it, beside it: reused while the settings match
        cached = json.loads(stats.read_text()) if args.work and stats.exists() else {}
        if cached.get("code") == code:
            c = cached["stats"]
        else:
            c = _child(code, args.threads)
            stats.write_text(json.dumps({"code": code, "stats": c}))
        if args.compile_only:
            continue
        b = _child(BENCH.format(out=out, prompt=args.prompt, new=args.new, repeat=args.repeat), args.threads)
        roofline = bandwidth * 1e9 / c["linear_bytes"]  # bytes read per token: every linear, lm_head included
        compile_stats = {f"c_{k}": v for k, v in c.items()}
        rows.append({"pipeline": name, **b, **compile_stats, "roofline_tokens_per_s": roofline})
    if args.compile_only:
        print(f"compiled into {work}")
        return
    base = []
    if args.llamacpp:
        from llamacpp import llamacpp_rows

        base = llamacpp_rows(
            Path(model), work / "gguf", args.llamacpp.split(","), args.threads, args.prompt, args.new, args.repeat
        )
    others = []
    if args.ortgenai:
        blocks, ort_work = args.ortgenai.split(","), work / "ortgenai"
        others += ortgenai_rows(Path(model), ort_work, blocks, args.threads, args.prompt, args.new, args.repeat)
    if args.transformers:
        variants = args.transformers.split(",")
        others += transformers_rows(Path(model), variants, args.threads, args.prompt, args.new, args.repeat,
                                    compile_timeout=args.compile_timeout)  # fmt: skip
    for b in base + others:
        b["roofline_tokens_per_s"] = bandwidth * 1e9 / b["linear_bytes"] if b.get("linear_bytes") else None
    load_end = os.getloadavg()
    config = json.loads((Path(model) / "config.json").read_text())
    shapes = {k: config[k] for k in TINY}
    print(f"model: {model}   shapes: {shapes}")
    print(f"CPU: {cpu_name()}   threads: {args.threads}   read bandwidth: {bandwidth:.1f} GB/s   "
          f"load average: {load_start[0]:.1f} at start, {load_end[0]:.1f} at end   prompt {args.prompt}, "
          f"decode {args.new} tokens")  # fmt: skip
    print(f"{'pipeline':<17} {'prefill tok/s':>13} {'decode tok/s':>12} {'roofline':>9} {'linears MB':>10} "
          f"{'model MB':>9} {'peak RSS MB':>11} {'compile s':>9} {'decode LUT':>10}")  # fmt: skip
    for r in rows:
        print(
            f"{r['pipeline']:<17} {r['prefill_tokens_per_s']:>13.1f} {r['decode_tokens_per_s']:>12.1f} "
            f"{r['roofline_tokens_per_s']:>9.1f} {r['c_linear_bytes'] / 1e6:>10.1f} {r['c_weight_bytes'] / 1e6:>9.1f} "
            f"{r['rss_mb']:>11.0f} {r['c_compile_s']:>9.1f} {r.get('c_decode_lut', '-'):>10}"
        )
    print("decode LUT: the decode GEMV's tables (int8: T-MAC's quantized tables, kernels/lut_gemv_int8.py)")
    for b in base + others:
        if "skipped" in b:
            print(f"{b['pipeline']:<17} skipped: {b['skipped']}")
            continue
        roof = f"{b['roofline_tokens_per_s']:>9.1f}" if b.get("roofline_tokens_per_s") else f"{'-':>9}"
        lin = f"{b['linear_bytes'] / 1e6:>10.1f}" if b.get("linear_bytes") else f"{'-':>10}"
        build = b.get("build_s") or b.get("warmup_s")
        print(
            f"{b['pipeline']:<17} {b['prefill_tokens_per_s']:>13.1f} {b['decode_tokens_per_s']:>12.1f} "
            f"{roof} {lin} {b['model_bytes'] / 1e6:>9.1f} {b['rss_mb']:>11.0f} "
            + (f"{build:>9.1f}" if build else f"{'-':>9}")
        )
    if base:
        print(f"llama.cpp build {base[0]['build_commit']} (CPU {base[0]['cpu_info']!r}), OMP_WAIT_POLICY=passive")
        for b in base:
            how = "" if b["prefill_repack"] else "; prefill with --repack 0 (the AMX kernel segfaults)"
            print(f"  {b['quant']}: decode tg{args.new} at depth {b['decode_depth']}{how}; tensors {b['tensor_types']}")
    for b in others:
        if "skipped" not in b:
            print(f"  {b['pipeline']}: {b['settings']}" + (f"; torch {b['torch']}" if "torch" in b else ""))
    if others:
        print("  compile s column for baselines: ORT-genai model builder time; transformers warm-up (torch.compile)")
    if base or others:
        print_ratios(rows, base + others)
    summary = {"model": model, "shapes": shapes, "cpu": cpu_name(), "threads": args.threads,
               "bandwidth_gbs": bandwidth, "load_average": [load_start, load_end], "prompt_tokens": args.prompt,
               "new_tokens": args.new, "results": rows, "llamacpp": base, "baselines": others}  # fmt: skip
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary if base or others else rows, indent=1))
        plot(rows + base + others, Path(args.json).with_suffix(".png"))
    if args.keep or args.work:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
