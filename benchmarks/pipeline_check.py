"""Pass pipelines on imported graphs, interpreter only (issue #15: "the exact, shift, bcq and w8a8
pipelines run on every model that imports; refusals with reasons are fine, crashes are not").

For one imported graph and its feeds, each pipeline runs ``reshift.passes.run(graph, pipeline,
calibration=[feeds])`` (the model's own feeds are the calibration batch) and then
``reshift.ir.interpret`` on the result. A record per pipeline says:

* ``ok``: with ``rel_err``, max over outputs of max|passed - unpassed| / max|unpassed| against the
  un-passed interpreter output (``None`` when that reference is missing), and ``rewrites``, the
  pass report's match count (0: the pipeline left the graph as it was, e.g. the lossy pipelines keep
  the first and last weight layers in float by default, so a one-layer model is untouched);
* ``refused``: a :class:`reshift.errors.ReshiftError` (class + first line); ``bug`` is set when the
  message itself calls it a reshift bug (the pass manager's malformed-graph check);
* ``crash``: any other exception (class, first line, short traceback);
* ``timeout``: over the per-pipeline limit (SIGALRM, main thread only).

Used by ``onnx_conformance.py --pipelines`` and ``hf_coverage.py --pipelines``; no TVM build. Their
``--no-skip`` passes ``skip=()`` to every pipeline, so the lossy ones also rewrite the first and last
weight layers (and embeddings / LM heads): on one-layer models the default changes nothing.
"""

from __future__ import annotations

import signal
import time
import traceback
from collections import Counter

import numpy as np

import reshift
from reshift.errors import ReshiftError

DEFAULT_PIPELINES = ("exact", "shift", "bcq", "w8a8")
STATUSES = ("ok", "refused", "crash", "timeout")


class PipelineTimeout(Exception):
    """The pipeline (passes + interpreter) ran over the per-pipeline limit."""


def _alarm(signum, frame):  # noqa: ARG001
    raise PipelineTimeout("over the time limit")


def relative_error(actual: list, reference: list) -> float:
    """max over outputs of max|a - b| / max|b| (float64); inf on a count or shape mismatch."""
    if len(actual) != len(reference):
        return float("inf")
    worst = 0.0
    for a, b in zip(actual, reference, strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            return float("inf")
        if not b.size:
            continue
        scale = max(float(np.nanmax(np.abs(b), initial=0.0)), 1e-30)
        diff = np.abs(a - b)
        if np.isnan(diff).any() and not np.array_equal(np.isnan(a), np.isnan(b)):
            return float("nan")
        worst = max(worst, float(np.nanmax(diff, initial=0.0)) / scale)
    return worst


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def run_one(graph, feeds: dict, pipeline: str, reference: list | None, limit_s: float, options=None) -> dict:
    """One pipeline on one graph: passes, then the interpreter, then the error vs ``reference``."""
    start = time.perf_counter()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
        passed, report = reshift.passes.run(graph, pipeline, calibration=[feeds], **(options or {}))
        outputs = reshift.ir.interpret(passed, feeds)
        signal.setitimer(signal.ITIMER_REAL, 0)
        actual = list(outputs.values())
        error = None if reference is None else relative_error(actual, reference)
        row = {
            "status": "ok",
            "rel_err": None if error is None else float(f"{error:.3g}"),
            "rewrites": sum(sum(r.matches.values()) for r in report.records),
        }
    except PipelineTimeout:
        row = {"status": "timeout", "why": f"over {limit_s:g} s"}
    except ReshiftError as exc:
        signal.setitimer(signal.ITIMER_REAL, 0)
        row = {"status": "refused", "why": first_line(exc)}
        if "a reshift bug" in str(exc):
            row["bug"] = True
    except Exception as exc:  # noqa: BLE001 -- a raw exception is a reshift bug: counted, printed
        signal.setitimer(signal.ITIMER_REAL, 0)
        row = {"status": "crash", "why": first_line(exc), "traceback": traceback.format_exc(limit=-4)}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def run_all(graph, feeds: dict, pipelines, reference: list | None = None, limit_s: float = 60.0, options=None) -> dict:
    """``{pipeline: record}``; ``reference`` defaults to the un-passed graph's interpreter output."""
    if reference is None:
        try:
            outputs = reshift.ir.interpret(graph, feeds)
            reference = list(outputs.values())
        except Exception:  # noqa: BLE001 -- no reference: the errors stay None
            reference = None
    return {p: run_one(graph, feeds, p, reference, limit_s, options) for p in pipelines}


def cell(row: dict) -> str:
    if row["status"] == "ok":
        text = "ok" if row.get("rel_err") is None else f"ok {row['rel_err']:.1e}"
        return text + ("" if row.get("rewrites") else " (=)")
    if row["status"] == "timeout":
        return "TIMEOUT"
    kind = row["why"].split(":", 1)[0]
    return ("BUG " if row.get("bug") else "") + ("CRASH " if row["status"] == "crash" else "") + kind


def short_line(rows: dict, pipelines) -> str:
    return "    pipelines: " + " | ".join(f"{p} {cell(rows[p])}" for p in pipelines)


def table(results: dict[str, dict[str, dict]], pipelines) -> str:
    """Models x pipelines, per-pipeline totals, then every crash, timeout and bug-refusal in full."""
    pipelines = tuple(pipelines)
    width = max([len("model")] + [len(n) for n in results]) + 1
    lines = [
        "(=): ok, no rewrite (the pipeline left the graph as it was)",
        f"{'model':{width}}" + "".join(f" | {p:22}" for p in pipelines),
    ]
    lines.append("-" * len(lines[1]))
    for name, rows in results.items():
        lines.append(f"{name:{width}}" + "".join(f" | {cell(rows[p]):22}" for p in pipelines))
    lines.append("")
    lines.append(f"totals over {len(results)} imported models:")
    for p in pipelines:
        counts = Counter(r[p]["status"] for r in results.values())
        bugs = sum(bool(r[p].get("bug")) for r in results.values())
        errors = [
            r[p]["rel_err"] for r in results.values() if r[p]["status"] == "ok" and r[p].get("rel_err") is not None
        ]
        finite = [e for e in errors if np.isfinite(e)]
        worst = f", worst rel err {max(finite):.1e}" if finite else ""
        nonfinite = len(errors) - len(finite)
        unchanged = sum(r[p]["status"] == "ok" and not r[p].get("rewrites") for r in results.values())
        extra = (f", {bugs} refusals say 'a reshift bug'" if bugs else "") + (
            f", {nonfinite} ok with inf/nan error" if nonfinite else ""
        )
        counted = ", ".join(f"{s} {counts.get(s, 0)}" for s in STATUSES)
        lines.append(f"  {p:8} {counted} (ok without a rewrite: {unchanged}){worst}{extra}")
    reasons = {p: Counter(r[p]["why"][:90] for r in results.values() if r[p]["status"] == "refused") for p in pipelines}
    lines.append("\nrefusal reasons:")
    for p in pipelines:
        for why, n in reasons[p].most_common(6):
            lines.append(f"  {p}: x{n} {why}")
    lines.append("\ncrashes, timeouts and bug-refusals:")
    for name, rows in results.items():
        for p in pipelines:
            row = rows[p]
            if row["status"] in ("crash", "timeout") or row.get("bug"):
                lines.append(f"  {name} / {p}: {row['status']}: {row['why']}"[:300])
    return "\n".join(lines)
