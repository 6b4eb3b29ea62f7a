"""How fast, and in how much memory, ``reshift llm compile`` quantizes a model of real size (issue #16, item 4).

Writes a Llama-architecture HF directory with TinyLlama-1.1B's shapes (dim 2048, FFN 5632, 32 / 4
heads, vocab 32000; ``--layers`` of its 22 blocks) and random float16 weights
(``benchmarks/llm.py`` ``write_random_llama``), then runs ``reshift llm compile`` on it in one
subprocess per setting: BCQ 3-bit weight-only, and BCQ 3-bit calibrated on ``--calib`` token ids
(``SEQSxTOKENS``, default 8x128; random ids, passed with ``--calib-ids``). For each it prints the fit
seconds of every block (from the artifact's report), the fit / TVM build / total seconds, and the
child's peak RSS (``VmHWM``, read at its exit) against twice the float16 checkpoint's bytes (the
issue's bound: the model streamed, not held in float32). Last, the single-layer target: calibrated
BCQ of one 4096x4096 layer (``benchmarks/bcq_speed.py``, 512 rows, q = 3).

Every child runs with 2 BLAS / TVM threads. A timing job: run it under the shared lock::

    flock /tmp/reshift_big.lock .venv/bin/python benchmarks/llm_quantize.py                 # 22 layers
    flock /tmp/reshift_big.lock .venv/bin/python benchmarks/llm_quantize.py --layers 2 --settings calibrated
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from llm import TINYLLAMA, cpu_name, write_random_llama  # noqa: E402

print = functools.partial(print, flush=True)  # noqa: A001 -- progress shows in a log while the job runs
THREADS = "2"
CHILD = """
import sys
from reshift.cli import main
rc = main(sys.argv[2:])
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        open(sys.argv[1], "w").write(line.split()[1])
sys.exit(rc)
"""


def compile_child(model: Path, out: Path, extra: list[str]) -> dict:
    """``reshift llm compile MODEL -o OUT EXTRA`` in a fresh process: wall seconds, peak RSS, report."""
    env = {**os.environ, "TVM_NUM_THREADS": THREADS, "OMP_NUM_THREADS": THREADS, "OPENBLAS_NUM_THREADS": THREADS}
    hwm = out.with_suffix(".hwm")
    argv = ["llm", "compile", str(model), "-o", str(out), "--max-seq-len", "256", "-q", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(hwm), *argv], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"reshift llm compile failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    meta = json.loads((out / "llm.json").read_text())
    return {"wall_s": wall, "peak_rss_bytes": int(hwm.read_text()) * 1024, "report": meta["report"]}


def per_block_seconds(report: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for row in report["layers"]:
        block = ".".join(row["name"].split(".")[:2]) if row["name"].startswith("layers.") else row["name"]
        out[block] = out.get(block, 0.0) + row.get("seconds", 0.0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=TINYLLAMA["num_hidden_layers"], help="blocks (default 22)")
    parser.add_argument("--settings", default="weight-only,calibrated", help="comma-separated: weight-only,calibrated")
    parser.add_argument("--calib", default="8x128", help="calibration SEQSxTOKENS (default 8x128)")
    parser.add_argument("--bits", default="3")
    parser.add_argument("--no-single-layer", action="store_true", help="skip the 4096x4096 single-layer fit")
    parser.add_argument("--json", help="results file (default benchmarks/results/llm_quantize-DATE.json)")
    parser.add_argument("--workdir", help="where the model and artifacts go (default a temp dir, removed)")
    args = parser.parse_args()

    load = os.getloadavg()
    print(f"# {cpu_name()}, {THREADS} threads, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="reshift_llmq_"))
    shapes = {**TINYLLAMA, "num_hidden_layers": args.layers}
    t0 = time.perf_counter()
    model = write_random_llama(work / "model", shapes, dtype="float16")
    ckpt = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    print(f"TinyLlama shapes, {args.layers} layers, fp16 checkpoint {ckpt / 2**20:.0f} MiB "
          f"(written in {time.perf_counter() - t0:.0f} s); bound 2x = {2 * ckpt / 2**20:.0f} MiB")  # fmt: skip
    seqs, tokens = (int(v) for v in args.calib.lower().split("x"))
    np.save(work / "calib.npy", np.random.default_rng(0).integers(0, TINYLLAMA["vocab_size"], (seqs, tokens)))

    results = {"cpu": cpu_name(), "machine": platform.machine(), "threads": int(THREADS), "load_start": load,
               "layers": args.layers, "checkpoint_bytes": ckpt, "bits": args.bits, "calib": args.calib,
               "runs": {}}  # fmt: skip
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(args.json or Path(__file__).parent / "results" / f"llm_quantize-{stamp}-{args.layers}layers.json")
    for setting in args.settings.split(","):
        extra = ["--pipeline", "bcq", "--bits", args.bits]
        if setting == "calibrated":
            extra += ["--calib-ids", str(work / "calib.npy")]
        elif setting != "weight-only":
            raise SystemExit(f"unknown setting {setting!r}")
        out = work / f"art-{setting}"
        run = compile_child(model, out, extra)
        shutil.rmtree(out, ignore_errors=True)
        blocks = per_block_seconds(run["report"])
        rep = run["report"]
        ratio = run["peak_rss_bytes"] / (2 * ckpt)
        print(f"\n## bcq{args.bits} {setting}{f' ({args.calib} tokens)' if setting == 'calibrated' else ''}")
        for name, sec in blocks.items():
            print(f"  {name:<12} fit {sec:7.2f} s")
        print(f"  fit {rep['fit_seconds']:.1f} s, TVM build + write {rep['build_seconds']:.1f} s, "
              f"process total {run['wall_s']:.1f} s; peak RSS {run['peak_rss_bytes'] / 2**20:.0f} MiB = "
              f"{ratio:.2f} x (2 x fp16 checkpoint) -> {'within' if ratio < 1 else 'OVER'} the bound")  # fmt: skip
        results["runs"][setting] = {
            "wall_s": round(run["wall_s"], 2),
            "fit_s": rep["fit_seconds"],
            "build_s": rep["build_seconds"],
            "peak_rss_bytes": run["peak_rss_bytes"],
            "rss_over_2x_fp16": round(ratio, 3),
            "block_fit_s": {k: round(v, 2) for k, v in blocks.items()},
            "linear_bytes": rep["linear_bytes"],
            "weight_bytes": rep["weight_bytes"],
            "load_end": os.getloadavg(),
        }
        path.write_text(json.dumps(results, indent=1))  # after each run: a long job stopped early keeps its rows

    if not args.no_single_layer:
        single = work / "single.json"
        env = {**os.environ, "OMP_NUM_THREADS": THREADS}
        cmd = [sys.executable, str(Path(__file__).parent / "bcq_speed.py"), "--shapes", "4096x4096", "--q", "3",
               "--rows", "512", "--threads", THREADS, "--json", str(single)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        print("\n## one 4096x4096 layer, calibrated (512 rows), q=3: benchmarks/bcq_speed.py")
        print(proc.stdout.strip() or proc.stderr[-2000:])
        if single.is_file():
            results["single_layer_4096"] = json.loads(single.read_text())

    results["load_end"] = os.getloadavg()
    path.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {path}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
