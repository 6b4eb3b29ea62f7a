"""Graph rewrites: rules, the pass manager and the named pipelines.

g2, report = reshift.passes.run(g, pipeline="exact")
print(report)
"""

from __future__ import annotations

import numpy as np

from reshift.errors import PassError
from reshift.ir.graph import Graph
from reshift.passes.bcq import BCQ_PASSES
from reshift.passes.branches import BRANCH_PASSES
from reshift.passes.fold import FOLD_PASSES
from reshift.passes.manager import Pass, PassContext, PassManager, PassRecord, PassReport, rule_pass
from reshift.passes.pattern import Any, Const, Match, Op, Opt
from reshift.passes.rules import Rule, apply_rules
from reshift.passes.shift import SHIFT_PASSES

PASSES: dict[str, Pass] = {p.name: p for p in FOLD_PASSES + BRANCH_PASSES + SHIFT_PASSES + BCQ_PASSES}

# pipeline name -> pass names, run in order to a fixed point; later work extends these
PIPELINES: dict[str, list[str]] = {
    "none": [],
    "exact": ["fold_constants", "remove_noops", "fold_batch_norm", "fold_affine", "fuse_branches", "dead_code"],
    # lossy weight quantizers (options: skip, shift_bits / bits, bcq_q, group_size; calibration)
    "shift": ["shift_weights"],
    "bcq": ["bcq_weights"],
    "ternary": ["ternary_weights"],
}


def register_pass(p: Pass) -> Pass:
    if p.name in PASSES:
        raise ValueError(f"pass {p.name!r} registered twice")
    PASSES[p.name] = p
    return p


def pipeline_passes(pipeline: str) -> list[Pass]:
    """Passes of a pipeline; ``"a+b"`` composes pipelines in order."""
    names: list[str] = []
    for part in pipeline.split("+"):
        if part not in PIPELINES:
            raise PassError(f"unknown pipeline {part!r}; known: {', '.join(sorted(PIPELINES))}")
        names += [n for n in PIPELINES[part] if n not in names]
    return [PASSES[n] for n in names]


def run(
    graph: Graph,
    pipeline: str = "exact",
    calibration: list[dict[str, np.ndarray]] | None = None,
    inputs: dict[str, np.ndarray] | None = None,
    verify_each: bool = True,
    **options,
) -> tuple[Graph, PassReport]:
    """Run a named pipeline on a copy of ``graph``; returns the new graph and the report.

    ``inputs`` (one batch of graph inputs) adds the max relative error against the original
    graph to every report row that changed something.
    """
    manager = PassManager(pipeline_passes(pipeline), name=pipeline, verify_each=verify_each)
    return manager.run(graph, PassContext(calibration, options), inputs)


__all__ = [
    "PASSES",
    "PIPELINES",
    "Any",
    "Const",
    "Match",
    "Op",
    "Opt",
    "Pass",
    "PassContext",
    "PassManager",
    "PassRecord",
    "PassReport",
    "Rule",
    "apply_rules",
    "pipeline_passes",
    "register_pass",
    "rule_pass",
    "run",
]
