"""Hugging Face ``transformers`` coverage: which architectures import, compile and torch.compile.

For every tiny, randomly initialized architecture in ``examples/models/hf_tiny.py`` (offline) three
stages run, each compared with torch eager on the same inputs (max|a - b| / max|b| <= 1e-4):

* ``import``: ``reshift.frontend.from_torch`` + ``reshift.ir.interpret``;
* ``compile``: ``reshift.compile(graph, target="cpu")`` at the traced batch 2 and at batches 1 and 4;
* ``dynamo``: ``torch.compile(model, backend="reshift")`` at batches 2, 1, 4; any ``ReshiftFallbackWarning`` (a
  subgraph run eagerly) is a failure.

Prints a table (ok, or the error class and first line) and totals; ``--save`` writes it to
``benchmarks/results/hf_coverage-<stamp>.{json,txt}``. Usage::

    python benchmarks/hf_coverage.py [--only bert,gpt2] [--stages import,compile] [--save]
    python benchmarks/hf_coverage.py --table benchmarks/results/hf_coverage-<stamp>.json

``--pipelines exact,shift,bcq,w8a8`` (with the import stage) also runs those pass pipelines on every
architecture that imports, interpreter only (:mod:`benchmarks.pipeline_check`), against the un-passed
interpreter output; the table, per-pipeline totals and (``--save``) the records go with the run's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import reshift  # noqa: E402
from benchmarks import pipeline_check  # noqa: E402
from examples.models.hf_tiny import ARCHITECTURES, build  # noqa: E402
from reshift.dynamo import ReshiftFallbackWarning  # noqa: E402

STAGES = ("import", "compile", "dynamo")
TOLERANCE = 1e-4
BATCH = 2  # traced batch (torch.export specializes a batch of 1)
CHECKED_BATCHES = (BATCH, 1, 4)  # compile and dynamo are checked at each (the batch is symbolic)


def relative_error(actual, reference) -> float:
    """max|a - b| / max|b| in float64 (the repository's usual measure)."""
    a, b = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)) if b.size else 0.0


def tensors_of(output) -> list[np.ndarray]:
    """The tensors of a model output (ModelOutput, tuple, tensor), in field order, as numpy."""
    if isinstance(output, torch.Tensor):
        return [output.detach().numpy()]
    if isinstance(output, np.ndarray):
        return [output]
    values = output.values() if isinstance(output, dict) else output
    return [
        t.detach().numpy() if isinstance(t, torch.Tensor) else t
        for t in values
        if isinstance(t, (torch.Tensor, np.ndarray))
    ]


def compare(actual: list[np.ndarray], reference: list[np.ndarray], state: dict) -> str | None:
    """``None`` when every output pair agrees within TOLERANCE, else what differs; the worst error goes to ``state``."""
    if not actual:
        return "no outputs"
    count = min(len(actual), len(reference))
    for index in range(count):
        error = relative_error(actual[index], reference[index])
        state["worst"] = max(state.get("worst", 0.0), error)
        if not error <= TOLERANCE:
            shapes = f"{np.shape(actual[index])} vs {np.shape(reference[index])}"
            return f"output {index}: relative error {error:.2e} ({shapes})"
    return None


def eager(model, inputs) -> list[np.ndarray]:
    with torch.no_grad():
        return tensors_of(model(*inputs))


def stage_import(name: str, state: dict) -> str | None:
    model, make = build(name)
    inputs = make(BATCH)
    graph = reshift.frontend.from_torch(model, inputs)
    state["graph"] = graph
    feeds = {v.name: x.numpy() for v, x in zip(graph.inputs, inputs, strict=True)}
    state["feeds"] = feeds
    outputs = reshift.ir.interpret(graph, feeds)
    return compare([outputs[v.name] for v in graph.outputs], eager(model, inputs), state)


def stage_compile(name: str, state: dict) -> str | None:
    if "graph" not in state:
        return "blocked: import failed"
    model, make = build(name)
    compiled = reshift.compile(state["graph"], target="cpu")
    for batch in CHECKED_BATCHES:
        inputs = make(batch, seed=batch)
        result = compiled(*[x.numpy() for x in inputs])
        result = list(result) if isinstance(result, (tuple, list)) else [result]
        problem = compare(result, eager(model, inputs), state)
        if problem:
            return f"batch {batch}: {problem}"
    return None


def stage_dynamo(name: str, state: dict) -> str | None:
    model, make = build(name)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="reshift")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ReshiftFallbackWarning)
        for batch in CHECKED_BATCHES:
            inputs = make(batch, seed=batch)
            with torch.no_grad():
                result = tensors_of(compiled(*inputs))
            problem = compare(result, eager(model, inputs), state)
            if problem:
                return f"batch {batch}: {problem}"
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, ReshiftFallbackWarning)]
    if fallbacks:
        raise FallbackToEager(f"{len(fallbacks)} subgraph(s): {fallbacks[0].removeprefix('reshift: ')}")
    return None


class FallbackToEager(Exception):
    """torch.compile ran a subgraph eagerly (a ReshiftFallbackWarning)."""


RUNNERS = {"import": stage_import, "compile": stage_compile, "dynamo": stage_dynamo}


def run_stage(stage: str, name: str, state: dict) -> dict:
    """One stage of one architecture: ``{"ok", "error", "detail", "seconds"}``; nothing propagates."""
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=UserWarning, message=".*dynamic batch failed.*")
            problem = RUNNERS[stage](name, state)
        row = {"ok": problem is None, "error": None if problem is None else "wrong", "detail": problem}
    except Exception as exc:  # the point is to record every failure kind
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        row = {"ok": False, "error": type(exc).__name__, "detail": first, "traceback": traceback.format_exc(limit=-6)}
    if row["detail"] and row["detail"].startswith("blocked"):
        row["error"] = "blocked"
    worst = state.pop("worst", None)
    row["max_relative_error"] = None if worst is None else float(f"{worst:.3g}")
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def cell(row: dict) -> str:
    """``ok``, ``-`` (blocked by an earlier stage) or the error class."""
    if row["ok"]:
        return "ok"
    return "-" if row["error"] == "blocked" else row["error"]


def table(results: dict[str, dict[str, dict]], stages: tuple[str, ...]) -> str:
    """The architecture x stage table, per-stage and end-to-end totals, then each failure's first line."""
    lines = [f"{'architecture':16}" + "".join(f" | {s:26}" for s in stages)]
    lines.append("-" * len(lines[0]))
    for name, rows in results.items():
        lines.append(f"{name:16}" + "".join(f" | {cell(rows[s]):26}" for s in stages))
    total = len(results)
    lines.append("")
    for stage in stages:
        lines.append(f"{stage:8} ok: {sum(r[stage]['ok'] for r in results.values())}/{total}")
    end_to_end = sum(all(r[s]["ok"] for s in stages) for r in results.values())
    lines.append(f"end to end ({'+'.join(stages)}): {end_to_end}/{total}")
    worst = {s: [r[s].get("max_relative_error") for r in results.values() if r[s]["ok"]] for s in stages}
    worst = {
        s: max(e for e in errors if e is not None) for s, errors in worst.items() if any(e is not None for e in errors)
    }
    if worst:
        lines.append("worst relative error of a passing stage: " + ", ".join(f"{s} {e:.1e}" for s, e in worst.items()))
    lines.append("\nfailures:")
    for name, rows in results.items():
        for stage in stages:
            if not rows[stage]["ok"] and rows[stage]["error"] != "blocked":
                lines.append(f"  {name}/{stage}: {rows[stage]['error']}: {rows[stage]['detail']}"[:400])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated architectures (default: all)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of import,compile,dynamo")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/hf_coverage-<stamp>.json/.txt")
    parser.add_argument("--tag", default="", help="suffix for the saved file names")
    parser.add_argument("--table", metavar="JSON", help="print the table of a saved run instead of running")
    parser.add_argument(
        "--pipelines", default="", help="comma-separated pass pipelines to run on every imported architecture"
    )
    parser.add_argument("--limit", type=float, default=60.0, help="seconds per architecture and pipeline")
    parser.add_argument("--no-skip", action="store_true", help="pipelines get skip=() (quantize first/last layers too)")
    args = parser.parse_args()
    if args.table:
        loaded = json.loads(Path(args.table).read_text())
        saved = loaded["results"]
        print(table(saved, tuple(s for s in STAGES if s in next(iter(saved.values())))))
        if loaded.get("pipelines"):
            print("\n" + pipeline_check.table(loaded["pipelines"], loaded["pipeline_names"]))
        return
    pipelines = tuple(p for p in args.pipelines.split(",") if p)
    passed: dict[str, dict[str, dict]] = {}
    options = {"skip": ()} if args.no_skip else {}
    names = args.only.split(",") if args.only else list(ARCHITECTURES)
    stages = tuple(s for s in STAGES if s in args.stages.split(","))
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    results: dict[str, dict[str, dict]] = {}
    for name in names:
        state: dict = {}
        results[name] = {stage: run_stage(stage, name, state) for stage in stages}
        seconds = sum(r["seconds"] for r in results[name].values())
        status = " | ".join(cell(results[name][s]) for s in stages)
        print(f"{name:16} {seconds:6.1f}s {status}", flush=True)
        if pipelines and "graph" in state:
            passed[name] = pipeline_check.run_all(
                state["graph"], state["feeds"], pipelines, limit_s=args.limit, options=options
            )
            print(pipeline_check.short_line(passed[name], pipelines), flush=True)
    text = table(results, stages)
    if pipelines:
        text += "\n\n" + pipeline_check.table(passed, pipelines)
    print("\n" + text)
    if args.save:
        out = ROOT / "benchmarks" / "results"
        stamp = time.strftime("%Y%m%d-%H%M%S") + (f"-{args.tag}" if args.tag else "")
        meta = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
        saved = {"versions": meta, "results": results}
        if pipelines:
            saved.update(pipeline_names=pipelines, pipeline_options={k: list(v) for k, v in options.items()})
            saved["pipelines"] = passed
        (out / f"hf_coverage-{stamp}.json").write_text(json.dumps(saved, indent=1))
        (out / f"hf_coverage-{stamp}.txt").write_text(text + "\n")
        print(f"wrote {out}/hf_coverage-{stamp}.json and .txt")


if __name__ == "__main__":
    main()
