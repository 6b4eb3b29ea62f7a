"""Graph rewrites: rules, the pass manager and the named pipelines.

g2, report = reshift.passes.run(g, pipeline="exact")
print(report)
"""

from __future__ import annotations

import numpy as np

from reshift.errors import PassError
from reshift.ir.graph import Graph
from reshift.passes.attention_reparam import ATTENTION_REPARAM_PASSES
from reshift.passes.bcq import BCQ_PASSES
from reshift.passes.binary_attention import BINARY_ATTENTION_PASSES
from reshift.passes.branches import BRANCH_PASSES
from reshift.passes.branches_linear import LINEAR_BRANCH_PASSES
from reshift.passes.fold import FOLD_PASSES
from reshift.passes.log2 import LOG2_PASSES
from reshift.passes.manager import Pass, PassContext, PassManager, PassRecord, PassReport, check_options, rule_pass
from reshift.passes.moe import MOE_PASSES
from reshift.passes.pattern import Any, Const, Match, Op, Opt
from reshift.passes.quantize import QUANTIZE_PASSES
from reshift.passes.rules import Rule, apply_rules
from reshift.passes.scale_reparam import SCALE_REPARAM_PASSES
from reshift.passes.shift import SHIFT_PASSES

PASSES: dict[str, Pass] = {
    p.name: p
    for p in FOLD_PASSES
    + BRANCH_PASSES
    + LINEAR_BRANCH_PASSES
    + SHIFT_PASSES
    + BCQ_PASSES
    + QUANTIZE_PASSES
    + LOG2_PASSES
    + SCALE_REPARAM_PASSES
    + ATTENTION_REPARAM_PASSES
    + MOE_PASSES
    + BINARY_ATTENTION_PASSES
}

# pipeline name -> pass names, run in order to a fixed point; later work extends these
PIPELINES: dict[str, list[str]] = {
    "none": [],
    "exact": [
        "fold_constants",
        "remove_noops",
        "fold_batch_norm",
        "fold_affine",
        "fuse_branches",
        "fuse_linear_branches",
        "fuse_parallel_branches",
        "dead_code",
    ],
    # lossy weight quantizers (options: skip, shift_bits / shift_levels / bits, bcq_q, group_size; calibration)
    "shift": ["shift_weights"],
    "bcq": ["bcq_weights"],
    "ternary": ["ternary_weights"],
    # activation quantizers alone (options: a_bits, base_kind; calibration for AdaLog / reparam)
    "log2": ["log2_a4"],
    "adalog": ["adalog_a4"],
    "scale_reparam": ["scale_reparam_a8"],
    "attention_reparam": ["attention_reparam"],  # options: qk_alpha, v_alpha; calibration
    # ShiftAddViT: binary-code attention, MLP linears as multiplication/shift expert mixtures (router
    # fitted on calibration; options moe_shift_share or expert_latency, shift_bits), the other linears
    # as shift linears
    "moe": ["moe_mlp"],
    "shiftadd_vit": ["binary_attention", "moe_mlp", "shift_weights"],
    "binary_attention": ["binary_attention"],  # ShiftAddViT; options: hash_bits, binary_init, seed; calibration
}
# post-training quantization of transformers (options: w_bits, a_bits, act_method, weight_method,
# weight_rounding, skip, reparam_stat, base_kind, qk_alpha, v_alpha; calibration required): uniform
# (RepQ-ViT's baseline), + log-sqrt2 softmax, + scale reparameterization (RepQ-ViT's post-LayerNorm
# one and the q/k, V migration), + AdaLog adaptive-base softmax/GELU
for _b in (8, 6, 4):
    PIPELINES[f"w{_b}a{_b}"] = [f"quantize_w{_b}a{_b}"]
    # fuse_log2_matmul: log2 attention @ quantized V -> integer shift-add log2_matmul where it fits int32
    PIPELINES[f"w{_b}a{_b}_log2"] = [f"log2_a{_b}", f"quantize_w{_b}a{_b}", "fuse_log2_matmul"]
    # scale reparameterization: post-LayerNorm (RepQ-ViT) and inside attention (q/k, V migration)
    PIPELINES[f"w{_b}a{_b}_repq"] = [
        f"scale_reparam_a{_b}",
        "attention_reparam",
        f"log2_a{_b}",
        f"quantize_w{_b}a{_b}",
        "fuse_log2_matmul",
    ]
    PIPELINES[f"w{_b}a{_b}_adalog"] = [
        f"scale_reparam_a{_b}",
        "attention_reparam",
        f"adalog_a{_b}",
        f"quantize_w{_b}a{_b}",
        "fuse_log2_matmul",
    ]


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
    chosen = pipeline_passes(pipeline)
    check_options(pipeline, chosen, options, list(PASSES.values()))
    manager = PassManager(chosen, name=pipeline, verify_each=verify_each)
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
