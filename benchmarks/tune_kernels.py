"""Knob search over reshift's own kernels: per-kernel and whole-model default vs tuned latency.

    flock /tmp/reshift_big.lock python benchmarks/tune_kernels.py            # ViT-S/16 batch 8, ResNet-18 batch 1
    python benchmarks/tune_kernels.py resnet18:1 --db ~/.cache/reshift/tune_db
    python benchmarks/tune_kernels.py vit_s16:8 --pipeline w8a8                # the fused int8 GEMM's knobs

For each model (``--pipeline``, default ``exact``: fp32; batch fixed), ``codegen/tvm/tune_knobs.py``
searches the knobs of every distinct hand-written kernel instance (dense GEMM incl. Winograd's,
ocvec conv, the fused int8 VNNI GEMM): each candidate compiled alone, checked bit-identical to the
default, timed (median of 5 runs of >= 20 ms). The table lists every instance: default and chosen
knobs and ms, and the times the model calls it. Then the default build and the tuned build
(``tuning_db``) are checked bit-identical on the same input and timed interleaved
(``benchmarks/timing.py``). 2 threads (TVM_NUM_THREADS set before tvm is imported). A fresh
database per run unless ``--db`` is given.
Writes JSON + txt under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PARSER = argparse.ArgumentParser(description=__doc__.splitlines()[0])
PARSER.add_argument("models", nargs="*", default=["vit_s16:8", "resnet18:1"], help="MODEL:BATCH (default: %(default)s)")
PARSER.add_argument("--pipeline", default="exact", help="exact (fp32) or e.g. w8a8 (after exact; 4 calibration images)")
PARSER.add_argument("--threads", type=int, default=2)
PARSER.add_argument("--rounds", type=int, default=10, help="interleaved rounds of the whole-model timing")
PARSER.add_argument("--db", help="tuning database directory (default: a fresh temporary one)")
PARSER.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
ARGS = PARSER.parse_args()
os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from timing import interleaved  # noqa: E402

from examples.models import MODELS  # noqa: E402
from reshift import passes  # noqa: E402
from reshift.api import CompiledModel  # noqa: E402
from reshift.codegen.tvm import build, describe_host_cpu, knobs, lower, resolve_target  # noqa: E402
from reshift.codegen.tvm.tune_knobs import tune_knobs  # noqa: E402
from reshift.frontend import from_torch  # noqa: E402
from reshift.ir.specialize import specialize_batch  # noqa: E402

torch.set_num_threads(ARGS.threads)


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _counts(graph) -> dict[str, int]:
    """How many kernel calls of the model each instance key accounts for."""
    counts: dict[str, int] = {}
    original = knobs.choose

    def counting(kernel, shape):
        name = knobs.key(kernel, shape)
        counts[name] = counts.get(name, 0) + 1
        return original(kernel, shape)

    knobs.choose = counting
    try:
        with resolve_target("cpu").target():
            lower(graph)
    finally:
        knobs.choose = original
    return counts


def _outs(out) -> list:
    return [np.asarray(o) for o in out] if isinstance(out, (list, tuple)) else [np.asarray(out)]


def bench(name: str, batch: int, db_dir: str) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    spec = MODELS[name]
    module = spec.build().eval()
    inputs = spec.example_inputs(batch)
    graph = from_torch(module, spec.example_inputs(1))
    if ARGS.pipeline == "exact":
        graph, _ = passes.run(graph, "exact")
    else:
        names, rows = [v.name for v in graph.inputs], spec.example_inputs(4)
        calibration = [{n: x[i : i + 1].numpy() for n, x in zip(names, rows, strict=True)} for i in range(4)]
        graph, _ = passes.run(graph, f"exact+{ARGS.pipeline}", calibration=calibration)
    graph = specialize_batch(graph, batch)
    start = time.perf_counter()
    with Progress(TextColumn(f"{name} b{batch} knobs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task("knobs", total=None)
        choices = tune_knobs(graph, "cpu", db_dir, lambda done, total: bar.update(task, completed=done, total=total))
    search_s = time.perf_counter() - start
    counts = _counts(graph)
    plain, tuned = build(graph, "cpu"), build(graph, "cpu", tuning_db=db_dir)
    arrays = [x.numpy() for x in inputs]
    run_plain = CompiledModel(graph, graph, None, plain, "exact")
    run_tuned = CompiledModel(graph, graph, None, tuned, "exact")
    same = all(np.array_equal(a, b) for a, b in zip(_outs(run_plain(*arrays)), _outs(run_tuned(*arrays)), strict=True))
    ms = interleaved({"default": lambda: run_plain(*arrays), "tuned": lambda: run_tuned(*arrays)}, ARGS.rounds)
    kernels = []
    for c in choices:
        key = knobs.key(c.kernel, c.shape)
        calls = counts.get(key, 0)
        kernels.append({**vars(c), "calls": calls, "saved_ms": round((c.default_ms - c.tuned_ms) * calls, 4)})
    return {
        "model": name,
        "pipeline": ARGS.pipeline,
        "batch": batch,
        "search_s": round(search_s, 1),
        "bit_identical": same,
        "ms": ms,
        "kernels": kernels,
        "changed": sum(1 for c in choices if c.knobs != c.default),
    }


def table(r: dict) -> str:
    lines = [
        f"{r['model']} ({r['pipeline']}) batch {r['batch']}: {len(r['kernels'])} kernel instances, "
        f"{r['changed']} changed from the default, search {r['search_s']} s",
        f"  {'kernel':<17} {'shape':<44} {'calls':>5} {'default ms':>10} {'tuned ms':>9} {'x':>5}  chosen knobs",
    ]
    for k in sorted(r["kernels"], key=lambda k: -k["default_ms"] * k["calls"]):
        shape = ",".join(f"{n}={v}" for n, v in k["shape"].items() if not n.startswith(("out_", "s", "d")))
        knobs = "=" if k["knobs"] == k["default"] else ",".join(f"{n}={v}" for n, v in k["knobs"].items())
        ratio = k["default_ms"] / max(k["tuned_ms"], 1e-9)
        lines.append(
            f"  {k['kernel']:<17} {shape[:44]:<44} {k['calls']:>5} {k['default_ms']:>10.3f} {k['tuned_ms']:>9.3f} "
            f"{ratio:>5.2f}  {knobs}"
        )
    d, t = r["ms"]["default"], r["ms"]["tuned"]
    lines.append(
        f"  whole model: default {d:.2f} ms, tuned {t:.2f} ms ({d / t:.3f}x; "
        f"{'bit-identical outputs' if r['bit_identical'] else 'OUTPUTS DIFFER'}); "
        f"kernel-level sum of savings {sum(k['saved_ms'] for k in r['kernels']):.2f} ms"
    )
    return "\n".join(lines)


def main() -> None:
    header = (
        f"host: {describe_host_cpu()}\nthreads {ARGS.threads}; whole-model median of {ARGS.rounds} interleaved "
        f"rounds x 3 calls; start {_load()}"
    )
    print(header, flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="reshift-knobs-") as tmp:
        for item in ARGS.models:
            name, _, batch = item.partition(":")
            r = bench(name, int(batch or 1), ARGS.db or os.path.join(tmp, name))
            print(table(r), flush=True)
            results.append(r)
    text = "\n\n".join(table(r) for r in results) + f"\n\nend {_load()}"
    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "" if ARGS.pipeline == "exact" else f"-{ARGS.pipeline}"
    path = out / f"tune_kernels-{time.strftime('%Y%m%d-%H%M%S')}{tag}.json"
    path.write_text(json.dumps({"header": header, "results": results}, indent=1))
    path.with_suffix(".txt").write_text(header + "\n\n" + text + "\n")
    print(f"\nwrote {path} and {path.with_suffix('.txt').name}")


if __name__ == "__main__":
    main()
