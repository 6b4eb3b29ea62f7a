"""The ``reshift`` command line: ``reshift inspect | ops | compile | run | bench | tune | deploy``.

Bad input exits with code 2 and a one-paragraph message (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from reshift.errors import InputError, ModelLoadError, ReshiftError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn

    return register


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """``--input-shape NAME=1,3,48,320`` (repeatable) as ``{name: shape}``; InputError when malformed."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.split(",") if d.strip())
        except ValueError:
            shape = ()
        if not sep or not name or not shape or min(shape) < 1:
            raise InputError(f"--input-shape {spec!r}: expected NAME=D1,D2,... with positive sizes, e.g. x=1,3,48,320")
        shapes[name] = shape
    return shapes


def _at_one(graph) -> str:
    """``batch 1`` or ``batch 1, sequence 1``: the sizes :func:`graph_macs` counts at."""
    symbols = sorted(set().union(*(v.type.symbols for v in graph.inputs)) - {"N"}) if graph.inputs else []
    return ", ".join(["batch 1", *(f"{s} 1" for s in symbols)])


def load_graph(model: str, input_shape: list[str] | None = None):
    """An IR graph from an ONNX file (artifact directories are handled by the runtime).

    ``input_shape`` holds ``--input-shape`` values: they pin the named inputs' symbolic dims.
    """
    from reshift.frontend import from_onnx

    path = Path(model)
    if not path.exists():
        raise ModelLoadError(f"{model}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{model} is a directory; expected an .onnx model file")
    return from_onnx(path, input_shapes=parse_input_shapes(input_shape))


@command("inspect")
def inspect_model(args: argparse.Namespace) -> int:
    """Print the IR summary, op histogram, MACs, parameter bytes and the pass report."""
    from reshift import passes
    from reshift.ir.analysis import graph_macs

    if (Path(args.model) / "llm.json").is_file():  # an LLM artifact: its spec and per-layer report
        from reshift.cli_llm import inspect_llm

        return inspect_llm(args)
    if Path(args.model).is_dir():
        return inspect_artifact(args.model)
    graph = load_graph(args.model, getattr(args, "input_shape", None))
    print(graph.summary())
    print(f"MACs ({_at_one(graph)}): {graph_macs(graph):,}")
    calibration = None
    if getattr(args, "calib", None):
        import numpy as np

        with np.load(args.calib) as data:
            calibration = [{k: data[k] for k in data.files}]
    optimized, report = passes.run(graph, args.pipeline, calibration=calibration, **pass_options(args))
    print()
    print(report)
    print()
    print(f"after {args.pipeline}:")
    print(optimized.summary())
    print(f"MACs ({_at_one(optimized)}): {graph_macs(optimized):,}")
    if calibration is not None:
        from reshift.passes.quantize import quantizer_table

        table = quantizer_table(optimized, report, calibration[0])
        if table:
            print()
            print(table)
    if args.ir:
        print()
        print(optimized)
    return 0


def inspect_artifact(directory: str) -> int:
    """Print an artifact's meta.json: inputs, outputs, target, pipeline, versions, checksums."""
    from reshift.runtime.artifact import SO_NAME, read_meta

    meta = read_meta(directory)
    so = Path(directory) / SO_NAME
    print(f"artifact {directory}: model {meta.get('name', '?')}")
    for key in ("inputs", "outputs"):
        for spec in meta[key]:
            print(f"  {key[:-1]:<6} {spec['name']}: {spec['dtype']}{spec['shape']}")
    target = meta["target"]
    print(f"  target {target.get('name')} ({target.get('device_type')}): {target.get('tvm_target')}")
    print(f"  pipeline {meta.get('pipeline')}; reshift {meta.get('reshift_version')}; tvm {meta.get('tvm_version')}")
    size = f"{so.stat().st_size:,} bytes" if so.is_file() else "MISSING"
    print(f"  {SO_NAME} {size}, sha256 {meta['so_sha256']}")
    print(f"  source graph sha256 {meta.get('graph_sha256')}; created {meta.get('created')}")
    return 0


@command("export")
def export_model(args: argparse.Namespace) -> int:
    """Run a pass pipeline on an ONNX model and write the result as standard ONNX (the fused deploy form)."""
    from reshift import passes
    from reshift.codegen.onnx import to_onnx

    graph = load_graph(args.model, getattr(args, "input_shape", None))
    optimized, report = passes.run(graph, args.pipeline, **pass_options(args))
    to_onnx(optimized, args.output, opset=args.opset)
    print(report)
    contractions = ("conv2d", "linear", "matmul")
    before, after = graph.op_histogram(), optimized.op_histogram()
    counts = ", ".join(f"{op} {before.get(op, 0)}->{after.get(op, 0)}" for op in contractions if before.get(op))
    print(f"wrote {args.output}: {len(graph.nodes)} -> {len(optimized.nodes)} nodes ({counts})")
    return 0


@command("ops")
def list_ops(args: argparse.Namespace) -> int:
    """Print the supported-op table (markdown with --markdown)."""
    from reshift.ir.op_table import op_table_markdown

    print(op_table_markdown())
    return 0


# -- progress ----------------------------------------------------------------------------------
def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


@contextlib.contextmanager
def stage(console, name: str) -> Iterator[None]:
    """A spinner while a stage runs, then one line with its duration."""
    start = time.perf_counter()
    with console.status(f"{name}...", spinner="dots"):
        yield
    console.print(f"[green]done[/] {name} ({time.perf_counter() - start:.1f} s)")


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silence TVM's C++ log lines (``Warning: Scope Saving``) written straight to fd 2."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _is_artifact(path: str) -> bool:
    return Path(path).is_dir()


def _set_threads(threads: int | None) -> None:
    """TVM reads TVM_NUM_THREADS when its thread pool starts, so set it before the first run."""
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def compile_onnx(args: argparse.Namespace, console, target: str, tune: bool = False):
    """ONNX file -> CompiledModel, one spinner per stage (load, passes, build)."""
    from reshift import passes
    from reshift.api import CompiledModel, _calibration, tune_and_build
    from reshift.codegen import tvm as tvm_codegen

    spec = tvm_codegen.resolve_target(target)  # a bad --target fails before any work
    with stage(console, f"load {args.model}"):
        graph = load_graph(args.model, getattr(args, "input_shape", None))
    with stage(console, f"passes ({args.pipeline})"):
        calibration = _calibration(getattr(args, "calib", None))
        bits = getattr(args, "bits", None)  # `compile --bits`: average code bits -> the bcq budget with scales
        options = {} if bits is None else {"bits": passes.bcq.bits_per_weight(bits, passes.bcq.DEFAULT_GROUP_SIZE)}
        options.update(pass_options(args))
        steps = getattr(args, "recover_steps", None)
        if steps is None and getattr(args, "train_data", None):
            from reshift.errors import InputError

            raise InputError("--train-data is read by recovery only: add --recover-steps N")
        if steps is None:
            optimized, report = passes.run(graph, args.pipeline, calibration=calibration, **options)
    if steps is not None:
        optimized, report = recover_graph(args, graph, calibration, options, console)
    if tune:
        with tune_progress(console, args.trials) as (progress, knob_progress):
            optimized, built = tune_and_build(
                optimized, spec, args.trials, args.db, progress, getattr(args, "batch", None), knob_progress
            )
        print_tuned(built)
    else:
        with stage(console, f"build for {spec.name}"):
            built = tvm_codegen.build(optimized, spec)
    return CompiledModel(optimized, graph, report, built, args.pipeline)


def recover_graph(args: argparse.Namespace, graph, calibration, options: dict, console):
    """``--recover-steps N --train-data FILE``: the pipeline, then recovery fine-tuning (``reshift.recover``);
    returns the recovered graph and the pipeline's pass report, and prints the recovery summary."""
    from reshift.errors import InputError
    from reshift.recovery import recover

    if not args.train_data:
        raise InputError("--recover-steps needs --train-data FILE.npz (one array per model input, batch first)")
    if args.recover_steps < 0:
        raise InputError(f"--recover-steps must be >= 0, got {args.recover_steps}")
    recovered, report = recover(
        graph,
        args.pipeline,
        data=args.train_data,
        steps=args.recover_steps,
        lr=args.recover_lr,
        calibration=calibration,
        batch_size=args.recover_batch,
        progress=console.is_terminal,
        **options,
    )
    print(report)
    return recovered, report.pass_report


def print_tuned(built) -> None:
    """What a tuned build took from the database: one line per hand-written kernel instance."""
    from reshift.api import tuned_lines

    lines = tuned_lines(built)
    changed = sum(1 for choice in built.tuned if choice.knobs != choice.default)
    print(f"kernel knobs: {len(lines)} instances from the tuning database, {changed} changed from the default")
    for line in lines:
        print(f"  {line}")


@contextlib.contextmanager
def tune_progress(console, trials: int) -> Iterator[tuple[Callable[..., None], Callable[..., None]]]:
    """Progress bars over MetaSchedule trials and over kernel knob candidates; yields their two
    callbacks (``progress``, ``knob_progress`` of ``codegen.tvm.tune``)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console) as bar:
        knob_task = bar.add_task("kernel knobs", total=None)
        task = bar.add_task("tune", total=trials) if trials > 0 else None

        def knob_progress(done: int, total: int) -> None:
            bar.update(knob_task, completed=done, total=total)

        def progress(*args: Any, **kwargs: Any) -> None:
            """Accepts ``(done, total)`` positionally or by name; anything else just advances."""
            numbers = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
            done = kwargs.get("done", numbers[0] if numbers else None)
            total = kwargs.get("total", numbers[1] if len(numbers) > 1 else None)
            if task is None:
                return
            if total:
                bar.update(task, total=total)
            if done is None:
                bar.advance(task)
            else:
                bar.update(task, completed=done)

        yield progress, knob_progress


@command("compile")
def compile_model(args: argparse.Namespace) -> int:
    """Compile an ONNX model to an artifact directory (model.so + meta.json)."""
    console = _console()
    lossy = {"bcq", "ternary", "shift"} & set(args.pipeline.split("+"))
    if lossy and not args.calib:
        print(
            f"note: no --calib given: output-aware (activation) fitting is OFF for {', '.join(sorted(lossy))}; "
            "weights are fitted to the weights alone (weight-only). Pass --calib inputs.npz for better accuracy."
        )
    compiled = compile_onnx(args, console, args.target, tune=args.tune)
    if lossy:
        print(compiled.report)  # nodes, MACs (multiplications) and parameter bytes before -> after
    with stage(console, f"save {args.output}"), quiet_native_stderr():
        compiled.save(args.output)
    meta = compiled.meta
    print(f"wrote {args.output}: {compiled.graph.name} for {compiled.target} (pipeline {args.pipeline})")
    for spec in meta["inputs"]:
        print(f"  input  {spec['name']}: {spec['dtype']}{spec['shape']}")
    for spec in meta["outputs"]:
        print(f"  output {spec['name']}: {spec['dtype']}{spec['shape']}")
    return 0


@command("tune")
def tune_model(args: argparse.Namespace) -> int:
    """Tune an ONNX model's kernels with MetaSchedule into a database directory."""
    from reshift import cli_remote
    from reshift.api import default_tune_db
    from reshift.codegen import tvm as tvm_codegen
    from reshift.codegen.tvm.tune import remote_runner

    console = _console()
    with remote_runner(**cli_remote.remote_args(args)):  # --rpc/--tracker: measure on the device
        compiled = compile_onnx(args, console, args.target, tune=True)
    spec = tvm_codegen.resolve_target(args.target)
    print(f"tuned {compiled.graph.name} for {spec.name}: {args.trials} trials, database {args.db or default_tune_db()}")
    return 0


def _load_npz(path: str) -> dict[str, Any]:
    import numpy as np

    if not Path(path).is_file():
        raise InputError(f"{path}: no such input file (expected an .npz with one array per model input)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:  # numpy raises ValueError/OSError/BadZipFile for non-npz files
        raise InputError(f"{path} is not a readable .npz file ({type(exc).__name__}: {exc})") from None


@command("run")
def run_model(args: argparse.Namespace) -> int:
    """Run an artifact on inputs from an .npz; save the outputs or print a preview."""
    import numpy as np

    from reshift.runtime import load

    arrays = _load_npz(args.input)
    with quiet_native_stderr():
        model = load(args.model, device=args.device)
    names = model.input_names
    if set(arrays) != set(names) and len(arrays) == len(names):  # np.savez(f, x) names it arr_0
        arrays = dict(zip(names, arrays.values(), strict=False))
    start = time.perf_counter()
    outputs = model.run_dict(arrays)
    elapsed = (time.perf_counter() - start) * 1e3
    if args.output:
        np.savez(args.output, **outputs)
        print(f"wrote {len(outputs)} output(s) to {args.output} ({elapsed:.2f} ms)")
        return 0
    print(f"{len(outputs)} output(s) in {elapsed:.2f} ms")
    for name, array in outputs.items():
        flat = array.reshape(-1)[:6]
        preview = ", ".join(f"{v:.6g}" if array.dtype.kind == "f" else str(v) for v in flat.tolist())
        more = ", ..." if array.size > 6 else ""
        print(f"  {name}: {array.dtype}{list(array.shape)} [{preview}{more}]")
    return 0


BENCH_SIZE = 128  # what a non-batch symbol (a sequence length) is bound to when benchmarking


def symbol_sizes(meta: dict[str, Any], batch: int) -> dict[str, int]:
    """Sizes for an artifact's symbols when benchmarking: ``batch`` for N, else 128 (or the model's bound)."""
    from reshift.runtime.artifact import split_dim

    symbols = {s for spec in meta["inputs"] for d in spec["shape"] for s in (split_dim(d)[1] or "").split("*") if s}
    bounds = meta.get("symbol_bounds", {})
    return {s: batch if s == "N" else min(BENCH_SIZE, bounds.get(s, BENCH_SIZE)) for s in sorted(symbols)}


def random_inputs(
    specs: list[dict[str, Any]], batch: int, seed: int = 0, sizes: dict[str, int] | None = None
) -> dict[str, Any]:
    """Inputs matching meta specs, symbols bound to ``sizes`` (default: all to ``batch``); floats normal, ints zero."""
    import math

    import numpy as np

    from reshift.runtime.artifact import split_dim

    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in specs:
        shape = []
        for dim in spec["shape"]:
            coefficient, symbol = split_dim(dim)
            factors = [batch if sizes is None else sizes[s] for s in symbol.split("*")] if symbol else []
            shape.append(coefficient * math.prod(factors))
        dtype = spec["dtype"]
        if dtype in ("float32", "float64", "float16", "bfloat16"):
            inputs[spec["name"]] = rng.standard_normal(shape).astype(np.float32).astype(_np_dtype(dtype))
        elif dtype == "bool":
            inputs[spec["name"]] = np.ones(shape, dtype=bool)
        else:
            inputs[spec["name"]] = np.zeros(shape, dtype=dtype)
    return inputs


def _np_dtype(dtype: str):
    import numpy as np

    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def _time_ort(model_path: str, inputs: list[Any], threads: int | None, repeat: int, warmup: int) -> dict[str, float]:
    import onnxruntime as ort

    from reshift.runtime.module import latency_stats

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    feed = {i.name: x for i, x in zip(session.get_inputs(), inputs, strict=False)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return latency_stats(times)


@command("bench")
def bench_model(args: argparse.Namespace) -> int:
    """Latency (median, p90) and throughput of an artifact, or of an ONNX model against onnxruntime."""
    if (Path(args.model) / "llm.json").is_file():  # an LLM artifact: prefill/decode tokens/s (here or --rpc)
        from reshift.cli_llm import bench_llm

        _set_threads(args.threads)
        return bench_llm(args)
    if args.rpc or args.tracker:
        from reshift import cli_remote

        return cli_remote.bench_remote(args)
    _set_threads(args.threads)
    from reshift.codegen.tvm import describe_host_cpu

    console = _console()
    onnx_model = not _is_artifact(args.model)
    if onnx_model:
        compiled = compile_onnx(args, console, "cpu")
        model = compiled._module()
    else:
        from reshift.runtime import load

        with quiet_native_stderr():
            model = load(args.model)
    sizes = symbol_sizes(model.meta, args.batch)
    inputs = random_inputs(model.meta["inputs"], args.batch, sizes=sizes)
    threads = args.threads or os.environ.get("TVM_NUM_THREADS") or "default"
    print(f"host: {describe_host_cpu()}")
    others = ", ".join(f"{s}={n}" for s, n in sizes.items() if s != "N")
    shown = f" ({others}; pin with --input-shape)" if others else ""
    print(f"model {model.meta.get('name', '?')} batch {args.batch}{shown}, {args.repeat} runs, threads {threads}")
    with stage(console, "time reshift"):
        ours = model.benchmark(repeat=args.repeat, warmup=args.warmup, **inputs)
    rows = [("reshift (tvm)", ours)]
    if onnx_model:
        with stage(console, "time onnxruntime"):
            ort = _time_ort(args.model, list(inputs.values()), args.threads, args.repeat, args.warmup)
        rows.append(("onnxruntime", ort))
    print(f"{'runtime':<16} {'median ms':>10} {'p90 ms':>10} {'items/s':>12}")
    for name, stats in rows:
        throughput = args.batch / (stats["median_ms"] / 1e3) if stats["median_ms"] > 0 else float("inf")
        print(f"{name:<16} {stats['median_ms']:>10.3f} {stats['p90_ms']:>10.3f} {throughput:>12.1f}")
    if onnx_model:
        ratio = rows[1][1]["median_ms"] / ours["median_ms"] if ours["median_ms"] > 0 else float("inf")
        print(f"speedup over onnxruntime (median): {ratio:.2f}x")
    return 0


def pass_options(args: argparse.Namespace) -> dict:
    """``--option KEY=VALUE`` flags as a dict; a value is a Python literal where it parses as one, else text."""
    import ast

    options = {}
    for item in getattr(args, "option", None) or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise InputError(f"--option {item!r}: expected KEY=VALUE with KEY a pass option name, e.g. shift_bits=4")
        try:
            options[key.strip()] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key.strip()] = text
    return options


def _add_model_flags(p: argparse.ArgumentParser, pass_options: bool = True) -> None:
    """``--input-shape`` (repeatable) and, for commands that run passes, ``--option`` (repeatable)."""
    flags = [("--input-shape", "NAME=D1,D2,...", "pin a model input's shape (its symbolic dims), e.g. x=1,3,48,320")]
    if pass_options:
        flags.append(("--option", "KEY=VALUE", "a pass option, e.g. shift_bits=4, shift_depthwise=True, skip=[]"))
    for flag, metavar, text in flags:
        p.add_argument(flag, action="append", metavar=metavar, help=f"{text}; repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reshift", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    from reshift import cli_remote  # registers `deploy`; its options are added below

    p = sub.add_parser("inspect", help="show a model's IR, op histogram, MACs and pass report (or an artifact's meta)")
    _add_model_flags(p)
    p.add_argument("model", help="MODEL.onnx or an artifact directory")
    p.add_argument("--pipeline", default="exact", help="pass pipeline (default: exact)")
    p.add_argument("--ir", action="store_true", help="also print the optimized IR (weights elided)")
    p.add_argument("--calib", help="calibration batch (.npz, one array per graph input) for quantizing pipelines")
    sub.add_parser("ops", help="list the supported ops (markdown table)")

    p = sub.add_parser("export", help="run a pass pipeline on an ONNX model and write the result as standard ONNX")
    _add_model_flags(p)
    p.add_argument("model", help="MODEL.onnx")
    p.add_argument("-o", "--output", required=True, help="ONNX file to write")
    p.add_argument("--pipeline", default="exact", help="pass pipeline (default: exact)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")

    p = sub.add_parser("compile", help="compile an ONNX model to an artifact directory (model.so + meta.json)")
    _add_model_flags(p)
    p.add_argument("model", help="MODEL.onnx")
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.add_argument("--target", default="cpu", help="cpu, arm64, cuda, cuda-sm80, cuda-sm87, cuda-sm90 (default: cpu)")
    p.add_argument("--pipeline", default="exact", help="pass pipeline (default: exact)")
    p.add_argument("--calib", help="calibration inputs (.npz, one array per model input)")
    p.add_argument(
        "--bits",
        type=float,
        help="bcq: average code bits per weight (fp16 scales on top); q in {2,3,4} chosen per layer by sensitivity",
    )
    p.add_argument("--tune", action="store_true", help="tune kernels with MetaSchedule first")
    p.add_argument(
        "--trials",
        type=int,
        default=64,
        help="MetaSchedule trials (default: 64; 0: only the knob search over reshift's own kernels)",
    )
    p.add_argument("--db", help="tuning database directory (default: ~/.cache/reshift/tune_db)")
    p.add_argument("--batch", type=int, default=1, help="batch size a tuned build is fixed to (default: 1)")
    p.add_argument(
        "--recover-steps", type=int, help="fine-tune the lossy rewrite for N steps against the fp32 model (torch)"
    )
    p.add_argument("--train-data", help="recovery inputs (.npz, one array per model input, batch first)")
    p.add_argument("--recover-lr", type=float, default=1e-4, help="recovery learning rate (default: 1e-4)")
    p.add_argument("--recover-batch", type=int, default=16, help="recovery batch size (default: 16)")

    p = sub.add_parser("run", help="run an artifact on inputs from an .npz file")
    p.add_argument("model", help="artifact directory")
    p.add_argument("--input", "-i", required=True, help="inputs (.npz, one array per model input)")
    p.add_argument("-o", "--output", help="write the outputs to this .npz instead of printing them")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:index] (default: cpu)")

    p = sub.add_parser("bench", help="time an artifact, or an ONNX model against onnxruntime")
    _add_model_flags(p)
    p.add_argument("model", help="artifact directory or MODEL.onnx")
    p.add_argument("--batch", type=int, default=1, help="batch size for a symbolic batch (default: 1)")
    p.add_argument("--repeat", type=int, default=50, help="timed runs (default: 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default: 5)")
    p.add_argument("--threads", type=int, help="CPU threads for both runtimes (default: all)")
    p.add_argument("--pipeline", default="exact", help="pass pipeline when compiling an ONNX model")
    cli_remote.add_remote_options(p)
    cli_remote.add_timeout_option(p)

    p = sub.add_parser(
        "tune", help="tune an ONNX model's kernels (knob search over reshift's own, MetaSchedule for the rest)"
    )
    _add_model_flags(p)
    p.add_argument("model", help="MODEL.onnx")
    p.add_argument(
        "--trials",
        type=int,
        default=64,
        help="MetaSchedule trials (default: 64; 0: only the knob search over reshift's own kernels)",
    )
    p.add_argument("--db", help="tuning database directory, reused by later builds (default: ~/.cache/reshift/tune_db)")
    p.add_argument("--batch", type=int, default=1, help="batch size the tuned kernels are for (default: 1)")
    p.add_argument("--target", default="cpu", help="target preset (default: cpu)")
    p.add_argument("--pipeline", default="exact", help="pass pipeline (default: exact)")
    cli_remote.add_remote_options(p)

    p = sub.add_parser("deploy", help="run an artifact on a device over TVM RPC: check it against the host, time it")
    _add_model_flags(p, pass_options=False)
    p.add_argument("model", help="artifact directory (compiled for the device, e.g. --target arm64)")
    cli_remote.add_remote_options(p)
    p.add_argument("--input", "-i", help="inputs (.npz); default: reference.npz's, else random (symbolic batch 1)")
    p.add_argument("--model", dest="model_source", metavar="MODEL.onnx", help="source model: host reference")
    p.add_argument("-o", "--output", help="write the device outputs to this .npz")
    p.add_argument("--batch", type=int, default=1, help="batch size for random inputs (default: 1)")
    p.add_argument("--repeat", type=int, default=10, help="timed runs on the device (default: 10)")
    p.add_argument("--atol", type=float, default=1e-4, help="max error vs the host, absolute or relative (1e-4)")
    cli_remote.add_timeout_option(p)

    from reshift import cli_llm

    cli_llm.add_parsers(sub)  # `reshift llm compile`, `reshift generate`
    COMMANDS.setdefault("llm", lambda a: cli_llm.llm_compile(a))
    COMMANDS.setdefault("generate", cli_llm.generate)
    return parser


def _show_warning(command: str, message, category, filename, lineno, file=None, line=None) -> None:
    print(f"reshift {command}: warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            if not args.debug:  # "reshift CMD: warning: ...", not a source path and line of reshift's code
                warnings.showwarning = functools.partial(_show_warning, args.command)
            return COMMANDS[args.command](args)
    except ReshiftError as exc:
        if args.debug:
            raise
        print(f"reshift {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in reshift, not bad input: say so without a wall of traceback
        if args.debug:
            raise
        print(
            f"reshift {args.command}: internal error: {type(exc).__name__}: {exc}\n"
            "This is a bug in reshift; rerun with --debug for the traceback and report it.",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
