"""Batched decode speed: tokens/s at batch 1, 2, 4, 8 (aggregate and per sequence) per pipeline.

    .venv/bin/python benchmarks/llm_batch.py                       # random-weight tiny Llama (benchmarks/llm.py's)
    .venv/bin/python benchmarks/llm_batch.py MODEL_DIR             # a local Hugging Face directory
    .venv/bin/python benchmarks/llm_batch.py --tinyllama-shapes --layers 2   # TinyLlama-1.1B shapes, 2 layers

Each pipeline is compiled once with ``max_batch`` = the largest batch (one subprocess), then timed in
another that loads the artifact with the runtime alone: for every batch ``B``, ``B`` random prompts of
``--prompt`` tokens are prefilled in one ``batch`` call and ``--new`` decode steps of ``B`` tokens are
timed (best of ``--repeat``). The ``b1 decode`` row is the batch-1 ``decode`` function on the same
artifact (``LLM.benchmark``), the speed of a plain ``generate(1-D prompt)``. ``--threads`` (default 2)
sets TVM_NUM_THREADS for both processes. Batching pays where decode is bound by reading the weights:
one read of every linear serves ``B`` tokens (the LUT GEMV register-blocks up to 8 rows).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from llm import PEAK, TINY, TINYLLAMA, _child, cpu_name, parse_pipeline, write_random_llama  # noqa: E402

COMPILE = (
    PEAK
    + """
import json, time
import reshift.llm
t0 = time.perf_counter()
llm = reshift.llm.compile({model!r}, pipeline={pipeline!r}, bits={bits}, max_seq_len={max_seq}, out_dir={out!r},
                          max_batch={max_batch})
r = llm.report
print(json.dumps({{"compile_s": time.perf_counter() - t0, "linear_bytes": r["linear_bytes"], "rss_mb": peak_rss_mb()}}))
"""
)
BENCH = (
    PEAK
    + """
import json, sys
sys.modules["torch"] = None
import reshift.llm
llm = reshift.llm.load({out!r})
rows = [{{"batch": 1, "entry": "decode", **llm.benchmark(prompt_len={prompt}, new_tokens={new}, repeat={repeat})}}]
for b in {batches}:
    s = llm.benchmark_batch(b, prompt_len={prompt}, new_tokens={new}, repeat={repeat})
    rows.append({{"entry": "batch", **s}})
print(json.dumps({{"rows": rows, "rss_mb": peak_rss_mb()}}))
"""
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="local HF model directory (default: a random tiny Llama)")
    ap.add_argument("--tinyllama-shapes", action="store_true", help="random weights with TinyLlama-1.1B's shapes")
    ap.add_argument("--layers", type=int, help="override the number of layers of the generated model")
    ap.add_argument("--pipelines", default="exact,bcq3", help="exact, bcqN, ternary (default: exact,bcq3)")
    ap.add_argument("--batches", default="1,2,4,8", help="batch sizes (default: 1,2,4,8)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence (default: 128)")
    ap.add_argument("--new", type=int, default=32, help="decode steps timed (default: 32)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--work", help="a kept folder for the model and artifacts (default: a temp dir, removed)")
    ap.add_argument("--compile-only", action="store_true", help="compile the pipelines into --work, time nothing")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="reshift_llm_batch_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.model:
        model = args.model
    elif (work / "hf" / "config.json").exists():
        model = str(work / "hf")
    else:
        shapes = dict(TINYLLAMA if args.tinyllama_shapes else TINY)
        if args.layers:
            shapes["num_hidden_layers"] = args.layers
        model = str(write_random_llama(work / "hf", shapes, "float16" if args.tinyllama_shapes else "float32"))
    load_start = os.getloadavg()
    results = []
    for spec in args.pipelines.split(","):
        pipeline, bits, name, _ = parse_pipeline(spec, 3)
        out = str(work / f"art_{name}_b{max(batches)}")
        code = COMPILE.format(
            model=model, pipeline=pipeline, bits=bits, max_seq=args.max_seq_len, out=out, max_batch=max(batches)
        )
        stats = Path(out + ".compile.json")
        cached = json.loads(stats.read_text()) if args.work and stats.exists() else {}
        if cached.get("code") == code:
            c = cached["stats"]
        else:
            c = _child(code, args.threads)
            stats.write_text(json.dumps({"code": code, "stats": c}))
        if args.compile_only:
            continue
        b = _child(
            BENCH.format(out=out, prompt=args.prompt, new=args.new, repeat=args.repeat, batches=batches), args.threads
        )
        for row in b["rows"]:
            results.append({"pipeline": name, **row, "rss_mb": b["rss_mb"], "linear_bytes": c["linear_bytes"]})
    if args.compile_only:
        print(f"compiled into {work}")
        return
    load_end = os.getloadavg()
    config = json.loads((Path(model) / "config.json").read_text())
    shapes = {k: config[k] for k in TINY}
    print(f"model: {model}   shapes: {shapes}")
    print(
        f"CPU: {cpu_name()}   threads: {args.threads}   load average: {load_start[0]:.1f} at start, "
        f"{load_end[0]:.1f} at end   prompt {args.prompt} tokens per sequence, {args.new} decode steps"
    )
    print(
        f"{'pipeline':<9} {'entry':<7} {'batch':>5} {'decode tok/s':>12} {'per seq':>8} {'x b1 decode':>11} "
        f"{'ms/step':>8} {'prefill tok/s':>13}"
    )
    for r in results:
        base = next(x for x in results if x["pipeline"] == r["pipeline"] and x["entry"] == "decode")
        per_seq = r.get("decode_tokens_per_s_per_sequence", r["decode_tokens_per_s"])
        ms = r.get("decode_ms_per_step", r.get("decode_ms_per_token"))
        print(
            f"{r['pipeline']:<9} {r['entry']:<7} {r['batch']:>5} {r['decode_tokens_per_s']:>12.1f} {per_seq:>8.1f} "
            f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:>10.2f}x {ms:>8.2f} "
            f"{r['prefill_tokens_per_s']:>13.1f}"
        )
    summary = {"model": model, "shapes": shapes, "cpu": cpu_name(), "threads": args.threads,
               "load_average": [load_start, load_end], "prompt_tokens": args.prompt, "new_tokens": args.new,
               "results": results}  # fmt: skip
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
