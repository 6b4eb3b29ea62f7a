"""End-to-end latency of reshift's CPU pipelines against onnxruntime (fp32, int8 QDQ) and torch.

    python benchmarks/e2e.py --quick
    python benchmarks/e2e.py --pipelines exact,shift,w8a8,w4a4_adalog
    python benchmarks/e2e.py resnet18 vit_s16 --batches 8 --pipelines exact --baselines ort_fp32,torch_compile

Per model and batch, one row per runner: every reshift pipeline asked for (``exact`` is reshift
fp32; a lossy pipeline runs after the exact passes and is calibrated on a few batches of the
model's example inputs), onnxruntime fp32, onnxruntime int8 (``quantize_static``: QDQ format,
per-channel int8 weights, uint8 activations (U8S8, its fast path on x86), MinMax calibration on
the same batches, after ``quant_pre_process``), torch eager and ``torch.compile`` (inductor, with
``freezing``, under ``torch.no_grad()``). A pipeline that does not compile on a model is a row
saying why. Each row also gives the largest output difference to torch eager, relative to the
output's largest magnitude (lossy rows are lossy).

Every runner is pinned to the same thread count (TVM_NUM_THREADS is set before tvm is imported,
torch.set_num_threads, onnxruntime intra_op) and timed in one process, interleaved round by round
(``benchmarks/timing.py``), so the noise of a shared host hits all of them alike; the load average
is printed before and after. Prints the table, the issue #17 targets met or missed, and for rows
that miss by much the kernels that dominate (each call_tir of the built module timed on its own);
writes JSON, the table as text, and a PNG of every runner's ratio to onnxruntime fp32 under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# ResNet-18, RepVGG-A0 (training form), MobileOne-S0, ViT-S/16, DeiT-S, MiniLM-L6 at 32 tokens
ALL_MODELS = ["resnet18", "repvgg_a0_train", "mobileone_s0", "vit_s16", "deit_s", "minilm_32"]
QUICK_MODELS = ["resnet18", "vit_s16"]
ALL_PIPELINES = ["exact", "shift", "w8a8", "w4a4_adalog"]
ALL_BASELINES = ["ort_fp32", "ort_int8", "torch_eager", "torch_compile"]
FP32 = "reshift_fp32"
ORT_FP32 = "ort_fp32"


def _list(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help=f"default: {' '.join(ALL_MODELS)} (quick: {' '.join(QUICK_MODELS)})")
    parser.add_argument("--quick", action="store_true", help="two models, batch 1, exact only, fewer rounds")
    parser.add_argument(
        "--pipelines", type=_list, default=None, help=f"default {','.join(ALL_PIPELINES)} (quick: exact)"
    )
    parser.add_argument("--baselines", type=_list, default=None, help=f"default {','.join(ALL_BASELINES)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="*", default=None, help="default 1 8 (quick: 1)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per runner (default 10, quick 5)")
    parser.add_argument("--calib-batches", type=int, default=4, help="calibration batches of the lossy pipelines")
    parser.add_argument("--profile", action="store_true", help="kernel profile of every reshift row missing a target")
    parser.add_argument("--tune-trials", type=int, default=0, help="also build a tuned reshift fp32")
    parser.add_argument("--tune-db", default=os.path.join(os.path.expanduser("~"), ".cache", "reshift", "tune_db"))
    parser.add_argument("--generic", action="store_true", help="also time the generic schedules (slow: seconds/run)")
    parser.add_argument("--tag", default="", help="appended to the result file names")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    args.pipelines = args.pipelines or (["exact"] if args.quick else ALL_PIPELINES)
    args.baselines = args.baselines or ALL_BASELINES
    unknown = sorted(set(args.baselines) - set(ALL_BASELINES))
    if unknown:
        parser.error(f"unknown baseline(s) {', '.join(unknown)}; known: {', '.join(ALL_BASELINES)}")
    return args


ARGS = _args()
os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)  # read when TVM's thread pool starts
os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from timing import interleaved  # noqa: E402

import reshift  # noqa: E402
from examples.models import MODELS, ModelSpec, minilm_example_inputs  # noqa: E402
from reshift.codegen.tvm import describe_host_cpu, resolve_target  # noqa: E402

torch.set_num_threads(ARGS.threads)

# the names for two registry models (kept out of MODELS, which every test file sweeps)
MODELS = {
    **MODELS,
    "deit_s": MODELS["deit_s_distilled_train"],  # DeiT-S as released: distilled, two heads averaged
    "minilm_32": ModelSpec(
        "minilm_32", MODELS["minilm"].build, lambda b: minilm_example_inputs(b, 32), MODELS["minilm"].input_names
    ),
}


def runner_name(pipeline: str) -> str:
    return FP32 if pipeline == "exact" else f"reshift_{pipeline}"


def _first(out):
    """The first output of any runner, as numpy."""
    if isinstance(out, (list, tuple)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return out.detach().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)


def _why(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


# -- runners ----------------------------------------------------------------------------------------
def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = ARGS.threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feed(session: ort.InferenceSession, inputs: tuple) -> dict:
    return {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)}


def export_onnx(module: torch.nn.Module, inputs: tuple, names: tuple[str, ...], path: Path) -> Path:
    torch.onnx.export(module, inputs, str(path), input_names=list(names), opset_version=17, dynamo=False)
    return path


def ort_fp32_runner(path: Path, inputs: tuple):
    session = _session(path)
    feed = _feed(session, inputs)
    return lambda: session.run(None, feed)


def ort_int8_runner(path: Path, inputs: tuple, calibration: list[tuple], op_types: list[str] | None = None):
    """onnxruntime's static QDQ quantization of the fp32 export, at its fast x86 settings.

    ``op_types``: the ops to quantize (default: every op it can). Text models get MatMul and Gemm
    only, as onnxruntime's BERT examples do: quantizing the additive attention mask (float32 min)
    with the rest wrecks the output.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    names = [i.name for i in _session(path).get_inputs()]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([dict(zip(names, [x.numpy() for x in b], strict=True)) for b in calibration])

        def get_next(self):
            return next(self.batches, None)

    pre, out = path.with_name("pre.onnx"), path.with_name("int8.onnx")
    quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        op_types_to_quantize=op_types,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return ort_fp32_runner(out, inputs)


def inductor_runner(module: torch.nn.Module, inputs: tuple):
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    torch._dynamo.reset()
    compiled = torch.compile(module)
    with torch.no_grad():
        compiled(*inputs)  # compile now, not inside the timed rounds

    def run():
        with torch.no_grad():
            return compiled(*inputs)

    return run


def eager_runner(module: torch.nn.Module, inputs: tuple):
    def run():
        with torch.no_grad():
            return module(*inputs)

    return run


def reshift_runner(compiled, inputs: tuple):
    arrays = [x.numpy() for x in inputs]
    return lambda: compiled(*arrays)


# -- per-kernel profile of slow rows -----------------------------------------------------------------
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


# -- one model ---------------------------------------------------------------------------------------
def build_reshift(module, spec) -> tuple[dict, dict, dict]:
    """Every asked-for pipeline compiled once (symbolic batch): (name -> model, name -> build s, name -> why not)."""
    from reshift.frontend import from_torch

    graph = from_torch(module, spec.example_inputs(1))
    names = [v.name for v in graph.inputs]
    rows = spec.example_inputs(ARGS.calib_batches)
    calibration = [
        {n: x[i : i + 1].numpy() for n, x in zip(names, rows, strict=True)} for i in range(ARGS.calib_batches)
    ]
    built, seconds, failed = {}, {}, {}
    for pipeline in ARGS.pipelines:
        name = runner_name(pipeline)
        start = time.perf_counter()
        try:
            if pipeline == "exact":
                built[name] = reshift.compile(graph, pipeline="exact")
            else:
                built[name] = reshift.compile(graph, pipeline=f"exact+{pipeline}", calibration=calibration)
        except Exception as exc:  # noqa: BLE001 -- a pipeline that fails on a model is a row saying why
            failed[name] = f"does not compile: {_why(exc)}"
            if os.environ.get("RESHIFT_E2E_TRACEBACK"):
                traceback.print_exc()
        seconds[name] = round(time.perf_counter() - start, 1)
        print(f"  built {name} in {seconds[name]} s" + (f" ({failed[name]})" if name in failed else ""), flush=True)
    if ARGS.tune_trials and "exact" in ARGS.pipelines:
        name = f"reshift_tuned{ARGS.tune_trials}"
        try:
            built[name] = reshift.compile(graph, tune=True, trials=ARGS.tune_trials, tune_db=ARGS.tune_db)
        except Exception as exc:  # noqa: BLE001
            failed[name] = f"tuning failed: {_why(exc)}"
    return built, seconds, failed


def bench_model(name: str, module, built: dict, build_s: dict, failed: dict, batch: int, rounds: int) -> dict:
    spec = MODELS[name]
    inputs = spec.example_inputs(batch)
    result: dict = {"model": name, "batch": batch, "ms": {}, "err": {}, "failed": dict(failed), "notes": {}}
    result["build_s"] = build_s
    runners: dict = {}
    for key, compiled in built.items():
        runners[key] = reshift_runner(compiled, inputs)
    if ARGS.generic and FP32 in built:
        os.environ["RESHIFT_GENERIC_KERNELS"] = "1"
        try:
            runners["reshift_generic"] = reshift_runner(reshift.compile(module, inputs), inputs)
        finally:
            del os.environ["RESHIFT_GENERIC_KERNELS"]
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = None
        if {"ort_fp32", "ort_int8"} & set(ARGS.baselines):
            try:
                onnx_path = export_onnx(module, inputs, spec.input_names, Path(tmp) / "model.onnx")
            except Exception as exc:  # noqa: BLE001
                for key in ("ort_fp32", "ort_int8"):
                    result["failed"][key] = f"torch.onnx.export failed: {_why(exc)}"
        text = any(not x.is_floating_point() for x in inputs)
        int8_ops = ["MatMul", "Gemm"] if text else None
        if text and "ort_int8" in ARGS.baselines:
            result["notes"]["ort_int8"] = "MatMul/Gemm quantized"
        makers = {
            "ort_fp32": lambda: ort_fp32_runner(onnx_path, inputs),
            "ort_int8": lambda: ort_int8_runner(onnx_path, inputs, _calib_batches(spec, batch), int8_ops),
            "torch_eager": lambda: eager_runner(module, inputs),
            "torch_compile": lambda: inductor_runner(module, inputs),
        }
        for key in ARGS.baselines:
            if key in result["failed"]:
                continue
            try:
                runners[key] = makers[key]()
            except Exception as exc:  # noqa: BLE001 -- a baseline that fails here is a row saying why
                result["failed"][key] = _why(exc)
        reference = _first(eager_runner(module, inputs)())
        scale = float(np.abs(reference).max()) or 1.0
        for key, fn in list(runners.items()):
            try:
                result["err"][key] = float(np.abs(_first(fn()).astype(np.float64) - reference).max() / scale)
            except Exception as exc:  # noqa: BLE001 -- built but cannot run at this batch: a row saying why
                result["failed"][key] = f"does not run: {_why(exc)}"
                del runners[key]
        slow = {k: v for k, v in runners.items() if k == "reshift_generic"}
        fast = {k: v for k, v in runners.items() if k not in slow}
        result["ms"] = interleaved(fast, rounds)
        if slow:
            result["ms"].update(interleaved(slow, 2, warmup=1, settle_ms=0))
    result["targets"] = targets(result)
    profile = {}
    for key, compiled in built.items():
        missed = any(not t["met"] for t in result["targets"] if t["runner"] == key)
        ort_ms, mine = result["ms"].get(ORT_FP32), result["ms"].get(key)
        if (key == FP32 and ort_ms and mine and mine > 1.25 * ort_ms) or (ARGS.profile and missed):
            try:
                profile[key] = kernel_profile(compiled.graph, batch)
            except Exception as exc:  # noqa: BLE001
                result["failed"][f"profile {key}"] = _why(exc)
    result["top_kernels"] = profile
    return result


def _calib_batches(spec, batch: int) -> list[tuple]:
    """``calib_batches`` input batches of ``batch`` rows (onnxruntime's export has a static batch)."""
    rows = spec.example_inputs(batch * ARGS.calib_batches)
    return [tuple(x[i * batch : (i + 1) * batch] for x in rows) for i in range(ARGS.calib_batches)]


# -- targets (issue #17) -----------------------------------------------------------------------------
def targets(r: dict) -> list[dict]:
    """Each issue #17 target that this row set can decide: what, the measured ratio, met or not."""
    ms, out = r["ms"], []

    def check(runner: str, what: str, ratio: float, limit: float) -> None:
        out.append({"runner": runner, "what": what, "ratio": round(ratio, 3), "limit": limit, "met": ratio <= limit})

    fp32 = ms.get(FP32)
    if fp32:
        if ORT_FP32 in ms:
            check(FP32, "reshift fp32 / onnxruntime fp32 <= 1.0", fp32 / ms[ORT_FP32], 1.0)
        if "torch_compile" in ms:
            check(FP32, "reshift fp32 / torch.compile <= 1.0", fp32 / ms["torch_compile"], 1.0)
    if "reshift_w8a8" in ms:
        if fp32:
            check("reshift_w8a8", "w8a8 / reshift fp32 <= 1/1.5", ms["reshift_w8a8"] / fp32, round(1 / 1.5, 3))
        if "ort_int8" in ms:
            check("reshift_w8a8", "w8a8 / onnxruntime int8 <= 1.0", ms["reshift_w8a8"] / ms["ort_int8"], 1.0)
    if "reshift_shift" in ms and fp32:
        check("reshift_shift", "shift / reshift fp32 <= 1/1.3", ms["reshift_shift"] / fp32, round(1 / 1.3, 3))
    return out


# -- output ------------------------------------------------------------------------------------------
def table(results: list[dict]) -> str:
    head = f"{'model':<16}{'batch':>6}  {'runner':<22}{'ms':>10}{'/ort fp32':>11}{'/reshift fp32':>15}{'max err':>10}"
    lines = [head + "  note"]
    for r in results:
        ort_ms, fp32 = r["ms"].get(ORT_FP32), r["ms"].get(FP32)
        keys = [k for k in r["ms"]] + [k for k in r["failed"] if k not in r["ms"] and not k.startswith("profile")]
        for key in keys:
            if key in r["ms"]:
                ms = r["ms"][key]
                vs_ort = f"{ms / ort_ms:>10.2f}x" if ort_ms else f"{'-':>11}"
                vs_fp32 = f"{ms / fp32:>14.2f}x" if fp32 else f"{'-':>15}"
                err = r["err"].get(key)
                lines.append(
                    f"{r['model']:<16}{r['batch']:>6}  {key:<22}{ms:>10.2f}{vs_ort}{vs_fp32}"
                    f"{err:>10.1e}  " + r["notes"].get(key, "")
                )
            else:
                lines.append(f"{r['model']:<16}{r['batch']:>6}  {key:<22}{'-':>10}{'':>36}  {r['failed'][key]}")
    lines.append("(ms: median per call; ratios < 1: faster than that baseline;")
    lines.append(" max err: max |output - torch eager output| / max |torch eager output|)")
    return "\n".join(lines)


def targets_text(results: list[dict]) -> str:
    lines = ["issue #17 targets:"]
    for r in results:
        for t in r["targets"]:
            mark = "met   " if t["met"] else "MISSED"
            lines.append(f"  {mark} {r['model']:<16} batch {r['batch']}: {t['what']:<42} {t['ratio']:.2f}")
        for key, why in r["failed"].items():
            if key.startswith("reshift"):
                lines.append(f"  MISSED {r['model']:<16} batch {r['batch']}: {key} has no time ({why})")
    lines.append(
        "  (w4a4_adalog: the issue's target is its attention kernel against fp32 attention: "
        "benchmarks/ptq_vit.py --attention times that; here it is a whole-model row)"
    )
    met = sum(t["met"] for r in results for t in r["targets"])
    total = sum(len(r["targets"]) for r in results)
    lines.append(f"  {met} of {total} decided targets met")
    for r in results:
        for key, rows in r.get("top_kernels", {}).items():
            lines.append(f"\n{r['model']} batch {r['batch']} {key}: top kernels (each timed alone)")
            for kernel, calls, ms in rows:
                lines.append(f"  {ms:8.2f} ms  x{calls:<3} {kernel}")
    return "\n".join(lines)


def save(results: list[dict], header: str, text: str) -> None:
    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + (f"-{ARGS.tag}" if ARGS.tag else "")
    path = out / f"e2e-{stamp}.json"
    meta = {"header": header, "threads": ARGS.threads, "pipelines": ARGS.pipelines, "baselines": ARGS.baselines}
    path.write_text(json.dumps({**meta, "results": results}, indent=1))
    path.with_suffix(".txt").write_text(header + "\n\n" + text + "\n")
    print(f"\nwrote {path} and {path.with_suffix('.txt').name}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no chart (pip install -e '.[bench]')")
        return
    rows = [r for r in results if r["ms"].get(ORT_FP32)]
    runners = []
    for r in rows:
        runners += [k for k in r["ms"] if k not in runners and k != ORT_FP32]
    if not rows or not runners:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(rows)), 4.5))
    width = 0.8 / len(runners)
    for i, runner in enumerate(runners):
        values = [r["ms"][runner] / r["ms"][ORT_FP32] if runner in r["ms"] else 0 for r in rows]
        ax.bar([j + i * width for j in range(len(rows))], values, width, label=runner)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [f"{r['model']}\nb{r['batch']}" for r in rows])
    ax.set_ylabel("latency / onnxruntime fp32 (log; < 1 is faster)")
    ax.set_title(header.splitlines()[0][:120], fontsize=7)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    print(f"wrote {path.with_suffix('.png').name}")


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    names = ARGS.models or (QUICK_MODELS if ARGS.quick else ALL_MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        sys.exit(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(sorted(MODELS))}")
    batches = ARGS.batches or ([1] if ARGS.quick else [1, 8])
    rounds = ARGS.rounds or (5 if ARGS.quick else 10)
    header = (
        f"host: {describe_host_cpu()}\nthreads {ARGS.threads} everywhere; median of {rounds} interleaved rounds x 3 "
        f"calls; pipelines {','.join(ARGS.pipelines)}; calibration {ARGS.calib_batches} batches; start {_load()}"
    )
    print(header, flush=True)
    results = []
    for name in names:
        module = MODELS[name].build().eval()
        print(f"{name}:", flush=True)
        built, build_s, failed = build_reshift(module, MODELS[name])
        for batch in batches:
            r = bench_model(name, module, built, build_s, failed, batch, rounds)
            print(f"{name} batch {batch}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in r["ms"].items()), flush=True)
            results.append(r)
        del built
    text = table(results) + "\n\n" + targets_text(results) + f"\n\nend {_load()}"
    print("\n" + text)
    save(results, header, text)


if __name__ == "__main__":
    main()
