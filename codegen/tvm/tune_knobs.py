"""Knob search over reshift's hand-written CPU kernels, per shape, into the persistent tuning database.

MetaSchedule skips the kernels of ``codegen/tvm/kernels`` (they are already scheduled, and its
rules fail on their vector code), so on its own ``--tune`` leaves the GEMMs and convs that
dominate ViT and ResNet as they were. Here every distinct (kernel, shape) the graph lowers to is
compiled alone with each candidate of its :class:`~reshift.codegen.tvm.knobs.KnobSpace`, run on
the same random inputs, checked to give exactly the default's output (a candidate that differs in
any bit is dropped), and timed on this host with ``time_evaluator`` (median of ``repeat`` runs
of at least 20 ms, in this process's TVM thread pool: ``TVM_NUM_THREADS``). A candidate replaces
the default only when at least ``MIN_GAIN`` faster, so timing noise does not flip choices.
Results go to ``reshift_knobs.json`` beside MetaSchedule's records; shapes already there are not
searched again. Host targets only: a cross target (arm64) would need the device to time on.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tvm

from reshift.codegen.tvm import knobs as knob_db
from reshift.codegen.tvm.lower import lower
from reshift.codegen.tvm.targets import TargetSpec, resolve_target
from reshift.ir.graph import Graph

MIN_GAIN = 0.03  # a candidate must be 3% faster than the default to be kept
Progress = Callable[[int, int], None]  # (candidates measured, candidates to measure)


def requests(graph: Graph, tvm_target: tvm.target.Target) -> dict[str, tuple[str, knob_db.Shape]]:
    """Every tunable kernel instance of ``graph`` (static shapes only): key -> (kernel, shape)."""
    with tvm_target, knob_db.recording() as seen:
        lower(graph)
    return seen


def tune_knobs(
    graph: Graph,
    target: str | dict | TargetSpec,
    db_dir: str | Path,
    progress: Progress | None = None,
    repeat: int = 5,
) -> list[knob_db.Choice]:
    """Search the knobs of every hand-written kernel instance of ``graph``; returns the choices (all
    instances of the graph, those found in the database before included)."""
    from reshift.codegen.tvm.tune import target_db_dir

    spec = resolve_target(target)
    if spec.is_gpu or spec.cross_compiler:
        return []
    tvm_target = spec.target()
    path = target_db_dir(db_dir, tvm_target) / knob_db.DB_NAME
    entries = knob_db.load(path)
    wanted = requests(graph, tvm_target)
    todo = {name: request for name, request in wanted.items() if name not in entries}
    spaces = {name: knob_db.SPACES[kernel] for name, (kernel, _) in todo.items()}
    total = sum(len(spaces[name].candidates(shape)) for name, (_, shape) in todo.items())
    done = 0
    if progress is not None:
        progress(0, total)
    for name, (_, shape) in todo.items():

        def step() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        entries[name] = search(spaces[name], shape, tvm_target, repeat, step)
        knob_db.save(path, entries)  # an interrupted search keeps what it measured
    return [_choice(kernel, shape, entries[name]) for name, (kernel, shape) in wanted.items()]


def search(
    space: knob_db.KnobSpace,
    shape: knob_db.Shape,
    tvm_target: tvm.target.Target,
    repeat: int = 5,
    step: Callable[[], None] | None = None,
) -> dict:
    """The database entry for one kernel instance: the fastest candidate bit-identical to the default."""
    default = space.default(shape)
    reference: list[np.ndarray] | None = None
    timed: list[tuple[float, dict]] = []
    rejected: list[str] = []
    for knobs in [default, *[c for c in space.candidates(shape) if c != default]]:
        outputs, ms = measure(space.instance(shape, knobs, np.random.default_rng(0)), tvm_target, repeat)
        if step is not None:
            step()
        if reference is None:
            reference = outputs
        elif not all(np.array_equal(a, b) for a, b in zip(outputs, reference, strict=True)):
            rejected.append(f"{knobs}: output differs from the default's")
            continue
        timed.append((ms, knobs))
    for why in rejected:
        warnings.warn(f"{knob_db.key(space.kernel, shape)}: dropped candidate {why}", stacklevel=2)
    default_ms = timed[0][0]
    best_ms, best = min(timed, key=lambda t: t[0])
    if best_ms > default_ms * (1.0 - MIN_GAIN):
        best_ms, best = default_ms, default
    return {
        "kernel": space.kernel,
        "shape": dict(shape),
        "knobs": best,
        "default": default,
        "default_ms": _ms(default_ms),
        "tuned_ms": _ms(best_ms),
        "candidates": {_text(k): _ms(ms) for ms, k in timed},
        "rejected": rejected,
    }


def measure(instance: knob_db.Instance, tvm_target: tvm.target.Target, repeat: int) -> tuple[list[np.ndarray], float]:
    """``(outputs, median ms)`` of one kernel compiled alone and run on ``instance.inputs``."""
    lib = tvm.compile(tvm.IRModule({"main": instance.func.with_attr("global_symbol", "main")}), tvm_target)
    device = tvm.cpu()
    args = [tvm.runtime.tensor(a, device) for a in instance.inputs]
    outs = [tvm.runtime.tensor(np.zeros(s, d), device) for s, d in instance.outputs]
    lib["main"](*args, *outs)
    results = [o.numpy() for o in outs]
    timer = lib.mod.time_evaluator("main", device, number=1, repeat=repeat, min_repeat_ms=20)
    return results, float(np.median(timer(*args, *outs).results)) * 1e3


def _ms(ms: float) -> float:
    return float(f"{ms:.5g}")


def _text(knobs: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in knobs.items())


def _choice(kernel: str, shape: knob_db.Shape, entry: dict) -> knob_db.Choice:
    return knob_db.Choice(
        kernel,
        dict(shape),
        dict(entry["knobs"]),
        dict(entry.get("default", entry["knobs"])),
        float(entry.get("default_ms", 0.0)),
        float(entry.get("tuned_ms", 0.0)),
    )
