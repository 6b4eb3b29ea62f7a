"""The pass manager: named pipelines run to a fixed point, verified after every pass, reported.

``run(graph, pipeline="exact")`` copies the graph, runs the pipeline's passes in order until a
full round changes nothing, checks the IR after each pass (LLVM's ``-verify-each``) and
returns the new graph with a :class:`PassReport` row per pass: matches, refusals with their
reasons, node/MAC/parameter-byte counts before and after, and the numeric error against the
reference interpreter when inputs are given.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reshift.errors import PassError
from reshift.ir.analysis import graph_macs
from reshift.ir.graph import Graph
from reshift.ir.interpret import interpret
from reshift.ir.verify import verify
from reshift.passes.rules import Refusal, Rule, RuleStats, apply_rules


@dataclass
class PassContext:
    """What a pass may read besides the graph: calibration batches and options."""

    calibration: list[dict[str, np.ndarray]] | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pass:
    """A named in-place transformation returning what it matched and refused."""

    name: str
    run: Callable[[Graph, PassContext], RuleStats]
    exact: bool = True
    doc: str = ""
    options: frozenset[str] = frozenset()  # the PassContext.options keys it reads (check_options)


def check_options(pipeline: str, passes: list[Pass], options: dict[str, Any], registered: list[Pass]) -> None:
    """Refuse an option no registered pass reads; warn about one only other pipelines' passes read.

    A misspelt option (``shif_bits=4``) would be silently ignored: it is a PassError naming the
    likely intended name among every ``registered`` pass's options. An option of another pipeline
    (``bcq_q`` given to ``shift``, as when one option set serves several pipelines) is a warning
    naming the passes that read it, as compilers warn about flags unused by the chosen mode.
    """
    import difflib
    import warnings

    read = set().union(*(p.options for p in passes))
    accepted = ", ".join(sorted(read)) or "none"
    for name in sorted(set(options) - read):
        readers = [p.name for p in registered if name in p.options]
        if readers:
            message = f"option {name!r} is ignored: pipeline {pipeline!r} does not read it, only {', '.join(readers)}"
            warnings.warn(f"{message} (it reads: {accepted})", stacklevel=3)
            continue
        known = sorted(set().union(*(p.options for p in registered)))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise PassError(f"unknown pass option {name!r}{hint} (pipeline {pipeline!r} reads: {accepted})")


def rule_pass(name: str, rules: list[Rule], doc: str = "", exact: bool = True) -> Pass:
    """A pass that sweeps ``rules`` over the graph until none applies."""

    def run(graph: Graph, ctx: PassContext) -> RuleStats:
        total = RuleStats()
        for _ in range(100):
            stats = apply_rules(graph, rules)
            for rule, count in stats.matches.items():
                total.matches[rule] = total.matches.get(rule, 0) + count
            total.refusals = stats.refusals  # the refusals of the last sweep are the standing ones
            if not stats.changed:
                break
        return total

    return Pass(name, run, exact, doc)


@dataclass
class PassRecord:
    """One row of the report."""

    name: str
    round: int
    matches: dict[str, int]
    refusals: list[Refusal]
    nodes: tuple[int, int]
    macs: tuple[int, int]
    parameter_bytes: tuple[int, int]
    max_error: float | None
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.matches) or self.nodes[0] != self.nodes[1]


@dataclass
class PassReport:
    pipeline: str
    records: list[PassRecord] = field(default_factory=list)

    @property
    def matches(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for record in self.records:
            for rule, count in record.matches.items():
                total[rule] = total.get(rule, 0) + count
        return total

    @property
    def refusals(self) -> list[Refusal]:
        """Standing refusals: from each pass's last run, de-duplicated."""
        last: dict[str, list[Refusal]] = {r.name: r.refusals for r in self.records}
        seen, result = set(), []
        for refusals in last.values():
            for refusal in refusals:
                key = (refusal.rule, refusal.node, refusal.reason)
                if key not in seen:
                    seen.add(key)
                    result.append(refusal)
        return result

    @property
    def details(self) -> dict[str, Any]:
        """Per-layer facts passes reported (e.g. ``{"addmm_1": {"bits": 3, "output_error": ...}}``), merged."""
        merged: dict[str, Any] = {}
        for record in self.records:
            merged.update(record.details)
        return merged

    @property
    def max_error(self) -> float | None:
        errors = [r.max_error for r in self.records if r.max_error is not None]
        return max(errors) if errors else None

    def __str__(self) -> str:
        header = (
            f"{'pass':<24} {'round':>5} {'matches':>8} {'nodes':>13} {'MACs':>25} {'param bytes':>25} {'max err':>9}"
        )
        lines = [f"pipeline {self.pipeline}", header, "-" * len(header)]
        for r in self.records:
            err = "-" if r.max_error is None else f"{r.max_error:.1e}"
            lines.append(
                f"{r.name:<24} {r.round:>5} {sum(r.matches.values()):>8} "
                f"{r.nodes[0]:>6}->{r.nodes[1]:<6} {r.macs[0]:>12,}->{r.macs[1]:<12,} "
                f"{r.parameter_bytes[0]:>12,}->{r.parameter_bytes[1]:<12,} {err:>9}"
            )
        for rule, count in self.matches.items():
            lines.append(f"  applied {rule} x{count}")
        for refusal in self.refusals:
            lines.append(f"  refused {refusal.rule} at {refusal.node}: {refusal.reason}")
        for r in self.records:
            for key, value in r.details.items():
                lines.append(f"  {r.name} {key}: {value}")
        return "\n".join(lines)


def relative_error(reference: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> float:
    """Max over outputs of max|actual - reference| / max|reference|."""
    worst = 0.0
    for name, ref in reference.items():
        ref64 = ref.astype(np.float64)
        scale = max(float(np.max(np.abs(ref64))) if ref.size else 0.0, 1e-30)
        worst = max(worst, float(np.max(np.abs(actual[name].astype(np.float64) - ref64))) / scale if ref.size else 0.0)
    return worst


class PassManager:
    """Runs a list of passes to a fixed point."""

    def __init__(self, passes: list[Pass], name: str = "custom", max_rounds: int = 10, verify_each: bool = True):
        self.passes = passes
        self.name = name
        self.max_rounds = max_rounds
        self.verify_each = verify_each

    def run(
        self,
        graph: Graph,
        ctx: PassContext | None = None,
        inputs: dict[str, np.ndarray] | None = None,
    ) -> tuple[Graph, PassReport]:
        ctx = ctx or PassContext()
        graph = graph.copy()
        report = PassReport(self.name)
        reference = interpret(graph, inputs) if inputs is not None else None
        for round_index in range(1, self.max_rounds + 1):
            changed = False
            for p in self.passes:
                before = (len(graph.nodes), graph_macs(graph), graph.parameter_bytes())
                start = time.perf_counter()
                stats = p.run(graph, ctx)
                seconds = time.perf_counter() - start
                if self.verify_each:
                    try:
                        verify(graph)
                    except Exception as exc:
                        raise PassError(f"pass {p.name} produced a malformed graph (a reshift bug): {exc}") from exc
                after = (len(graph.nodes), graph_macs(graph), graph.parameter_bytes())
                record_changed = stats.changed or before != after
                error = None
                if reference is not None and record_changed:
                    error = relative_error(reference, interpret(graph, inputs))
                if round_index == 1 or record_changed:
                    report.records.append(
                        PassRecord(
                            p.name,
                            round_index,
                            dict(stats.matches),
                            stats.refusals,
                            (before[0], after[0]),
                            (before[1], after[1]),
                            (before[2], after[2]),
                            error,
                            seconds,
                            dict(stats.details),
                        )
                    )
                changed |= record_changed
            if not changed:
                break
        return graph, report
