"""End-to-end latency of reshift's CPU builds against torch eager, torch.compile and onnxruntime.

Every runner is pinned to the same thread count (TVM_NUM_THREADS is set before tvm is imported,
torch.set_num_threads, onnxruntime intra_op) and timed in one process, interleaved round by round,
so the noise of a shared host hits all of them alike. Each round runs every runner as a short
block whose first call is not timed: the previous runner's thread pool may still be spin-waiting
(each side keeps its own, strongest, threading settings) and would otherwise steal its cores.
Reports the median per runner, the ratio of reshift to each baseline, and for models where reshift
is slower than onnxruntime the kernels that dominate (each call_tir of the built module timed on
its own). Writes JSON (and a PNG when matplotlib is installed) under benchmarks/results/.

    python benchmarks/e2e.py --quick
    python benchmarks/e2e.py --tune-trials 64 resnet18
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

ALL_MODELS = ["resnet18", "repvgg_a0_deploy", "repvgg_a0_train", "vit_s16", "minilm"]
QUICK_MODELS = ["resnet18", "repvgg_a0_deploy", "vit_s16"]


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help=f"default: {' '.join(ALL_MODELS)} ({' '.join(QUICK_MODELS)} quick)")
    parser.add_argument("--quick", action="store_true", help="fewer models, batch 1 only, fewer rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="*", default=None, help="default 1 8 (quick: 1)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per runner (default 20, quick 8)")
    parser.add_argument("--tune-trials", type=int, default=0, help="also build a MetaSchedule-tuned reshift")
    parser.add_argument("--tune-db", default=os.path.join(os.path.expanduser("~"), ".cache", "reshift", "tune_db"))
    parser.add_argument("--generic", action="store_true", help="also time the generic schedules (slow: seconds/run)")
    parser.add_argument("--no-inductor", action="store_true", help="skip torch.compile")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    return parser.parse_args()


ARGS = _args()
os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)  # read when TVM's thread pool starts
os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from timing import interleaved  # noqa: E402

import reshift  # noqa: E402
from examples.models import MODELS  # noqa: E402
from reshift.codegen.tvm import describe_host_cpu, resolve_target  # noqa: E402

torch.set_num_threads(ARGS.threads)


def ort_runner(module: torch.nn.Module, inputs: tuple, names: tuple[str, ...], workdir: Path):
    path = workdir / "model.onnx"
    torch.onnx.export(module, inputs, str(path), input_names=list(names), opset_version=17, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = ARGS.threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)}
    return lambda: session.run(None, feed)


def inductor_runner(module: torch.nn.Module, inputs: tuple):
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    compiled = torch.compile(module)
    with torch.no_grad():
        compiled(*inputs)  # compile now, not inside the timed rounds

    def run():
        with torch.no_grad():
            return compiled(*inputs)

    return run


def reshift_runner(compiled, inputs: tuple):
    arrays = [x.numpy() for x in inputs]
    return lambda: compiled(*arrays)


def kernel_profile(graph, batch: int, top: int = 6) -> list[tuple[str, int, float]]:
    """(kernel, calls, total ms) of the heaviest call_tir kernels, each timed standalone at ``batch``."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from reshift.codegen.tvm.lower import lower
    from reshift.codegen.tvm.schedule_cpu import schedule_passes
    from reshift.ir.specialize import specialize_batch

    target = resolve_target("cpu").target()
    static = specialize_batch(graph, batch) if any(not v.type.is_static for v in graph.inputs) else graph
    mod = lower(static)  # outside ``with target``, as build() does
    with target:
        passes = [*cpu.library_dispatch_passes(target), *cpu.legalize_passes(target), *schedule_passes()]
        mod = tvm.transform.Sequential(passes)(mod)
    calls: dict[tuple, list] = {}
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(expr) -> None:
        if isinstance(expr, relax.Call) and expr.op.same_as(call_tir):
            gv, args = expr.args[0], expr.args[1].fields
            outs = expr.ty.fields if isinstance(expr.ty, relax.TupleType) else [expr.ty]
            shapes = [([int(d) for d in a.ty.shape], str(a.ty.dtype)) for a in args]
            shapes += [([int(d) for d in o.shape], str(o.dtype)) for o in outs]
            calls.setdefault((gv.name_hint, str(shapes)), [gv, shapes, 0])[2] += 1

    relax.analysis.post_order_visit(mod["main"], visit)
    rows = []
    for (name, _), (gv, shapes, count) in calls.items():
        try:
            lib = tvm.compile(tvm.IRModule({"main": mod[gv].with_attr("global_symbol", "main")}), target)
            arrays = [
                tvm.runtime.tensor(np.random.rand(*s).astype(d) if d.startswith("float") else np.zeros(s, d))
                for s, d in shapes
            ]
            seconds = lib.mod.time_evaluator("main", tvm.cpu(), number=3, repeat=3)(*arrays).median
        except Exception:  # noqa: BLE001,S112 -- a kernel that cannot run alone is left out of the profile
            continue
        rows.append((name, count, seconds * 1e3 * count))
    rows.sort(key=lambda r: -r[2])
    return rows[:top]


def bench_model(name: str, batch: int, rounds: int) -> dict:
    spec = MODELS[name]
    module = spec.build().eval()
    inputs = spec.example_inputs(batch)
    result: dict = {"model": name, "batch": batch, "ms": {}, "notes": []}
    runners = {}
    start = time.perf_counter()
    compiled = reshift.compile(module, inputs)
    result["build_s"] = round(time.perf_counter() - start, 1)
    runners["reshift"] = reshift_runner(compiled, inputs)
    if ARGS.generic:
        os.environ["RESHIFT_GENERIC_KERNELS"] = "1"
        try:
            runners["reshift_generic"] = reshift_runner(reshift.compile(module, inputs), inputs)
        finally:
            del os.environ["RESHIFT_GENERIC_KERNELS"]
    if ARGS.tune_trials:
        try:
            tuned = reshift.compile(module, inputs, tune=True, trials=ARGS.tune_trials, tune_db=ARGS.tune_db)
            runners[f"reshift_tuned{ARGS.tune_trials}"] = reshift_runner(tuned, inputs)
        except Exception as exc:  # noqa: BLE001 -- report, keep benchmarking the rest
            result["notes"].append(f"tuning failed: {str(exc).splitlines()[0][:200]}")
    runners["torch_eager"] = lambda: _eager(module, inputs)
    if not ARGS.no_inductor:
        try:
            runners["torch_compile"] = inductor_runner(module, inputs)
        except Exception as exc:  # noqa: BLE001 -- inductor fails on some hosts/models: skip it
            result["notes"].append(f"torch.compile skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            runners["onnxruntime"] = ort_runner(module, inputs, spec.input_names, Path(tmp))
        except Exception as exc:  # noqa: BLE001
            result["notes"].append(f"onnxruntime skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        slow = {k: v for k, v in runners.items() if k == "reshift_generic"}
        fast = {k: v for k, v in runners.items() if k not in slow}
        result["ms"] = interleaved(fast, rounds)
        if slow:
            result["ms"].update(interleaved(slow, 2, warmup=1, settle_ms=0))
    ort_ms = result["ms"].get("onnxruntime")
    if ort_ms and result["ms"]["reshift"] > 1.25 * ort_ms:
        result["top_kernels"] = kernel_profile(compiled.graph, batch)
    return result


def _eager(module, inputs):
    with torch.no_grad():
        return module(*inputs)


def print_table(results: list[dict]) -> None:
    runners = []
    for r in results:
        runners += [k for k in r["ms"] if k not in runners]
    print(f"\n{'model':<18}{'batch':>6}" + "".join(f"{k:>17}" for k in runners) + f"{'vs ort':>9}{'vs eager':>9}")
    for r in results:
        cells = "".join(f"{r['ms'][k]:>14.2f} ms" if k in r["ms"] else f"{'-':>17}" for k in runners)
        ort_ms, eager = r["ms"].get("onnxruntime"), r["ms"].get("torch_eager")
        mine = r["ms"]["reshift"]
        vs_ort = f"{mine / ort_ms:>8.2f}x" if ort_ms else f"{'-':>9}"
        print(f"{r['model']:<18}{r['batch']:>6}{cells}{vs_ort}{mine / eager:>8.2f}x")
    print("(ratios: reshift default-schedule latency / baseline; < 1 means reshift is faster)")
    for r in results:
        ort_ms = r["ms"].get("onnxruntime")
        if ort_ms and r["ms"]["reshift"] > 1.25 * ort_ms:
            ratio = r["ms"]["reshift"] / ort_ms
            print(f"\n{r['model']} batch {r['batch']}: reshift {ratio:.2f}x onnxruntime; top kernels:")
            for kernel, calls, ms in r.get("top_kernels", []):
                print(f"  {ms:8.2f} ms  x{calls:<3} {kernel}")
        for note in r["notes"]:
            print(f"{r['model']} batch {r['batch']}: {note}")


def save(results: list[dict], host: str) -> None:
    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out / f"e2e-{stamp}.json"
    path.write_text(json.dumps({"host": host, "threads": ARGS.threads, "results": results}, indent=1))
    print(f"\nwrote {path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no bar chart (pip install matplotlib for one)")
        return
    labels = [f"{r['model']}\nb{r['batch']}" for r in results]
    runners = []
    for r in results:
        runners += [k for k in r["ms"] if k not in runners]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(results)), 4))
    width = 0.8 / len(runners)
    for i, runner in enumerate(runners):
        values = [r["ms"].get(runner, 0) for r in results]
        ax.bar([j + i * width for j in range(len(results))], values, width, label=runner)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(results))], labels)
    ax.set_ylabel("median latency (ms)")
    ax.set_title(host, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    print(f"wrote {path.with_suffix('.png')}")


def main() -> None:
    names = ARGS.models or (QUICK_MODELS if ARGS.quick else ALL_MODELS)
    batches = ARGS.batches or ([1] if ARGS.quick else [1, 8])
    rounds = ARGS.rounds or (8 if ARGS.quick else 20)
    host = describe_host_cpu()
    print(f"host: {host}")
    print(f"threads {ARGS.threads} everywhere; median of {rounds} interleaved rounds")
    results = []
    for name in names:
        for batch in batches:
            r = bench_model(name, batch, rounds)
            print(f"{name} batch {batch}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in r["ms"].items()), flush=True)
            results.append(r)
    print_table(results)
    save(results, host)


if __name__ == "__main__":
    main()
