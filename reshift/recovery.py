"""Recovery fine-tuning of a lossy rewrite: ``graph, report = reshift.recover(model, pipeline, data, steps)``.

The rewritten graph becomes a torch module generated from the IR (:mod:`reshift.codegen.torch`, straight-
through estimators for every quantizer), distilled against the float model (``teacher="fp32"``: the
frontend's graph before the pipeline) on ``data``: loss = relative MSE of each output,
``mean((y - t)^2) / mean(t^2)``, plus ``feature_weight`` times the same on ``features`` (intermediate
values present in both graphs by name; ``"auto"``: every ``layer_norm`` output the teacher also has;
``"attention"``: the values computed right after each ``binary_attention`` (its readers' outputs, which
keep their names through the rewrite), i.e. each block's attention result, as ShiftAddViT distils the
attention it replaces; ``"auto+attention"``: both; ``"softmax"``: every softmax output, the attention
probabilities, as TinyBERT and TernaryBERT distil them; ``"auto+softmax"``: with the layer-norm outputs),
plus ``cosine_weight`` times ``mean(1 - cos(y, t))`` along each output's last axis (for embedding models
the metric itself: the pooled sentence vector's direction). ``optimizer``: ``"adam"`` or
``"adamw"``, ``weight_decay`` on the float weights only (decoupled for ``"adamw"``, Loshchilov & Hutter
2019; L2 for ``"adam"``). Learning rate: linear warm-up over ``warmup`` steps, then cosine decay to 0
(SGDR, Loshchilov & Hutter 2017, Eq. 5, one cycle). The DeepShift-PS latent exponents and signs move in level units
and get ``lr * lr_scales["shift"]``, quantizer scales ``lr * lr_scales["scale"]``. The learned state is
written back re-coded (``GraphModule.to_graph``), so the result is a graph of the same op kinds,
verified, that compiles as before. Deterministic for a seed (the batch order of epoch ``e`` is a permutation drawn from
``(seed, e)``); ``checkpoint=PATH`` saves every ``checkpoint_every`` steps and resumes from it.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reshift.errors import InputError
from reshift.ir.graph import Graph
from reshift.ir.interpret import bind_inputs
from reshift.passes.binary_attention import attention_result

DEFAULT_LR_SCALES = {"weight": 1.0, "shift": 10.0, "scale": 1.0}
OPTIMIZERS = ("adam", "adamw")
SHIFT_LATENTS = ("P", "S")


@dataclass
class RecoveryReport:
    """What recovery did: the pipeline's pass report, losses before/after on the training batches, the
    per-step loss, wall time and how much was trained."""

    pipeline: str
    steps: int
    seconds: float
    loss_before: float
    loss_after: float
    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0
    trainable_parameters: int = 0
    trained_ops: dict[str, int] = field(default_factory=dict)
    pass_report: Any = None

    def __str__(self) -> str:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(self.trained_ops.items()))
        resumed = f", resumed at step {self.resumed_from}" if self.resumed_from else ""
        return (
            f"recovery ({self.pipeline}): {self.steps} steps in {self.seconds:.1f} s{resumed}; "
            f"distillation loss {self.loss_before:.4g} -> {self.loss_after:.4g} on the training data; "
            f"{self.trainable_parameters:,} trainable parameters; quantizers trained: {ops or 'none'}"
        )


def read_batches(data: Any, graph: Graph, batch_size: int | None = None, what: str = "train data") -> list[dict]:
    """``data`` as a list of input batches checked against ``graph``: a ``.npz`` path (one array per input,
    split into ``batch_size`` rows), a dict of arrays (split the same way) or a list of such dicts."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise InputError(f"{what} {path} does not exist")
        try:
            with np.load(path) as npz:
                data = {k: npz[k] for k in npz.files}
        except Exception as exc:  # noqa: BLE001  (any failure to read is the user's file)
            raise InputError(f"{what} {path} is not a readable .npz ({type(exc).__name__}: {exc})") from None
    if isinstance(data, dict):
        arrays = {k: np.asarray(v) for k, v in data.items()}
        if not arrays:
            raise InputError(f"{what} holds no arrays")
        rows = {len(a) if a.ndim else 0 for a in arrays.values()}
        if len(rows) != 1 or 0 in rows:
            raise InputError(f"{what}: every array needs the same leading (batch) size, got {sorted(rows)}")
        n = rows.pop()
        size = batch_size or n
        data = [{k: a[i : i + size] for k, a in arrays.items()} for i in range(0, n, size)]
    batches = list(data) if data is not None else []
    if not batches:
        raise InputError(f"{what} is empty: pass a .npz, a dict of arrays or a list of input dicts")
    for index, batch in enumerate(batches):
        if not isinstance(batch, dict):
            raise InputError(f"{what} batch {index} is a {type(batch).__name__}, not a dict of input arrays")
        try:
            bind_inputs(graph, {k: np.asarray(v) for k, v in batch.items()})
        except InputError as exc:
            raise InputError(f"{what} batch {index}: {exc}") from None
    return batches


def _outputs_of(op: str, student: Graph, teacher: Graph) -> list[str]:
    """The outputs of every single-output ``op`` node of ``student`` that the teacher computes by name too."""
    names = {n.output.name for n in teacher.nodes if n.op == op and len(n.outputs) == 1}
    return [n.output.name for n in student.nodes if n.op == op and len(n.outputs) == 1 and n.output.name in names]


def _default_features(student: Graph, teacher: Graph) -> list[str]:
    return _outputs_of("layer_norm", student, teacher)


def _softmax_features(student: Graph, teacher: Graph) -> list[str]:
    """Every attention probability matrix (softmax output) both graphs compute: TinyBERT's attention
    distillation (Jiao et al. 2020, Eq. 7), which TernaryBERT (Zhang et al. 2020, Sec. 3.3) keeps for
    ternary weights."""
    return _outputs_of("softmax", student, teacher)


def lr_factor(step: int, steps: int, warmup: int = 0) -> float:
    """The learning-rate multiplier at ``step``: ``(step + 1) / warmup`` during the warm-up, then
    ``0.5 (1 + cos(pi t))`` with ``t`` the fraction of the remaining steps done (SGDR Eq. 5, one cycle)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def _attention_features(student: Graph, teacher: Graph) -> list[str]:
    """The values right after each binary-code attention (after its local token mix, where it has one)."""
    names = {v.name for n in teacher.nodes for v in n.outputs}
    users, producers = student.users(), student.producers()
    found: list[str] = []
    for node in student.nodes:
        if node.op != "binary_attention":
            continue
        for reader in users.get(attention_result(node, users, producers), []):
            found += [v.name for v in reader.outputs if v.name in names and v.name not in found]
    return found


FEATURE_MODES = {
    "auto": (_default_features,),
    "attention": (_attention_features,),
    "auto+attention": (_default_features, _attention_features),
    "softmax": (_softmax_features,),
    "auto+softmax": (_default_features, _softmax_features),
}


def _param_groups(module, lr: float, lr_scales: dict[str, float], weight_decay: float = 0.0) -> list[dict]:
    groups: dict[str, list] = {"weight": [], "shift": [], "scale": []}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        kind = "shift" if leaf in SHIFT_LATENTS else "scale" if "scale" in leaf or leaf == "alpha" else "weight"
        groups[kind].append(p)
    return [
        {
            "params": ps,
            "lr": lr * lr_scales[k],
            "base_lr": lr * lr_scales[k],
            "weight_decay": weight_decay if k == "weight" else 0.0,
        }
        for k, ps in groups.items()
        if ps
    ]


def _progress(enabled: bool | None, steps: int):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("recover"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(), console=Console(stderr=True),
    )  # fmt: skip


def recover(
    model: Any,
    pipeline: str = "shift",
    data: Any = None,
    steps: int = 200,
    lr: float = 1e-4,
    teacher: Any = "fp32",
    *,
    example_inputs: Any = None,
    calibration: Any = None,
    batch_size: int | None = None,
    seed: int = 0,
    features: list[str] | str | None = None,
    feature_weight: float = 0.0,
    cosine_weight: float = 0.0,
    warmup: int = 0,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    train: str = "all",
    lr_scales: dict[str, float] | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    progress: bool | None = None,
    rewritten: Graph | None = None,
    **options: Any,
) -> tuple[Graph, RecoveryReport]:
    """Rewrite ``model`` with ``pipeline``, then fine-tune the rewrite for ``steps`` on ``data`` (see module
    docstring). ``calibration`` (default: the first 4 batches of ``data``) goes to the pipeline's passes with
    ``options``; ``teacher``: ``"fp32"``, a Graph or anything ``reshift.compile`` reads. ``rewritten``: the
    pipeline's output when the caller has it already (the pipeline is then not run again)."""
    import torch

    from reshift import passes
    from reshift.api import to_graph
    from reshift.codegen.torch import to_torch

    if steps < 0:
        raise InputError(f"recover: steps must be >= 0, got {steps}")
    if not 0 <= warmup <= steps:
        raise InputError(f"recover: warmup must be in [0, steps={steps}], got {warmup}")
    if optimizer not in OPTIMIZERS:
        raise InputError(f"recover: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if min(feature_weight, cosine_weight, weight_decay) < 0:
        raise InputError(
            f"recover: feature_weight, cosine_weight and weight_decay must be >= 0, got "
            f"{feature_weight}, {cosine_weight}, {weight_decay}"
        )
    frontend_keys = ("dynamic_batch", "input_names", "dynamic_dims", "input_shapes", "input_values")
    frontend = {k: options.pop(k) for k in frontend_keys if k in options}
    source, _ = to_graph(model, example_inputs, frontend)
    batches = read_batches(data, source, batch_size)
    calib = read_batches(calibration, source, None, "calibration") if calibration is not None else batches[:4]
    if rewritten is None:
        student_graph, pass_report = passes.run(source, pipeline, calibration=calib, **options)
    else:
        student_graph, pass_report = rewritten, None
    teacher_graph = source if isinstance(teacher, str) and teacher == "fp32" else to_graph(teacher, example_inputs)[0]

    torch.manual_seed(seed)
    student = to_torch(student_graph, train)
    teacher_module = to_torch(teacher_graph, "none").eval()
    if isinstance(features, str):
        if features not in FEATURE_MODES:
            raise InputError(f"recover: features={features!r}: choose {sorted(FEATURE_MODES)} or a list of value names")
        features = [name for find in FEATURE_MODES[features] for name in find(student_graph, teacher_graph)]
    features = list(features or []) if feature_weight else []
    scales = {**DEFAULT_LR_SCALES, **(lr_scales or {})}
    groups = _param_groups(student, lr, scales, weight_decay)
    make = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    opt = make(groups) if groups else None

    targets: dict[int, dict[str, torch.Tensor]] = {}

    def target(index: int) -> dict[str, torch.Tensor]:
        if index not in targets:
            with torch.no_grad():
                targets[index] = teacher_module(_tensors(batches[index]), values=features)
        return targets[index]

    def loss_of(index: int) -> torch.Tensor:
        want = target(index)
        got = student(_tensors(batches[index]), values=features)
        outputs = [k for k in want if k not in features]
        loss = sum(_relative_mse(got[k], want[k]) for k in outputs) / len(outputs)
        if cosine_weight:
            loss = loss + cosine_weight * sum(_cosine_distance(got[k], want[k]) for k in outputs) / len(outputs)
        if features:
            loss = loss + feature_weight * sum(_relative_mse(got[k], want[k]) for k in features) / len(features)
        extra = student.extra_loss()
        return loss + extra if extra is not None else loss

    def mean_loss() -> float:
        with torch.no_grad():
            return float(np.mean([float(loss_of(i)) for i in range(min(len(batches), 8))]))

    started = time.perf_counter()
    loss_before = mean_loss()
    losses: list[float] = []
    start_step = 0
    signature = {"pipeline": pipeline, "steps": steps, "lr": lr, "seed": seed, "batches": len(batches)}
    if warmup or optimizer != "adam" or weight_decay:
        signature.update(warmup=warmup, optimizer=optimizer, weight_decay=weight_decay)
    if checkpoint is not None and Path(checkpoint).is_file():
        state = torch.load(checkpoint, weights_only=False)
        if state.get("signature") != signature:
            raise InputError(
                f"checkpoint {checkpoint} was written by another run ({state.get('signature')}); "
                f"this run is {signature}: remove it or pass another path"
            )
        student.load_state_dict(state["model"])
        if opt is not None:
            opt.load_state_dict(state["optimizer"])
        start_step, losses = int(state["step"]), list(state["losses"])

    def save(step: int) -> None:
        state = {"signature": signature, "step": step, "losses": losses, "model": student.state_dict()}
        state["optimizer"] = opt.state_dict() if opt is not None else None
        tmp = Path(f"{checkpoint}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, checkpoint)

    bar = _progress(progress, steps)
    task = bar.add_task("recover", total=steps, completed=start_step, loss="-") if bar is not None else None
    order: list[int] = []
    try:
        if bar is not None:
            bar.start()
        for step in range(start_step, steps):
            if opt is None:
                break
            epoch, position = divmod(step, len(batches))
            order = list(np.random.default_rng([seed, epoch]).permutation(len(batches)))
            factor = lr_factor(step, steps, warmup)
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor
            opt.zero_grad(set_to_none=True)
            loss = loss_of(int(order[position]))
            loss.backward()
            opt.step()
            student.project()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(task, advance=1, loss=f"{losses[-1]:.4g}")
            if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                save(step + 1)
    finally:
        if bar is not None:
            bar.stop()
    loss_after = mean_loss()
    graph = student.to_graph()
    trained_ops: dict[str, int] = {}
    for key in student.node_modules:
        op = student_graph.nodes[int(key[1:])].op
        trained_ops[op] = trained_ops.get(op, 0) + 1
    report = RecoveryReport(
        pipeline=pipeline,
        steps=steps,
        seconds=time.perf_counter() - started,
        loss_before=loss_before,
        loss_after=loss_after,
        losses=losses,
        resumed_from=start_step,
        trainable_parameters=sum(p.numel() for p in student.parameters() if p.requires_grad),
        trained_ops=trained_ops,
        pass_report=pass_report,
    )
    return graph, report


def _tensors(batch: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def _relative_mse(y, t):
    return ((y - t) ** 2).mean() / (t**2).mean().clamp_min(1e-12)


def _cosine_distance(y, t):
    """``mean(1 - cos(y, t))`` over the last axis (a sentence embedding's direction)."""
    import torch

    return (1 - torch.nn.functional.cosine_similarity(y, t, dim=-1, eps=1e-12)).mean()


__all__ = ["DEFAULT_LR_SCALES", "OPTIMIZERS", "RecoveryReport", "lr_factor", "read_batches", "recover"]
