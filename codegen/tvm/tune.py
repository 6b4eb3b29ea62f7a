"""MetaSchedule tuning of a graph's fused kernels into a persistent database directory.

``tune(graph, "cpu", trials, db_dir)`` tunes once; ``build(graph, "cpu", tuning_db=db_dir)`` then
applies the best schedules found (``relax.transform.MetaScheduleApplyDatabase``), and every
kernel without a record keeps the generic schedule. Tuning measures on this machine, so only the
``cpu`` target is tunable here (arm64/CUDA would need a TVM RPC runner on the device), and only
graphs with static shapes (MetaSchedule fails on the symbolic batch).

Known breakage (NOTES_tvm.md §7): with apache-tvm-ffi 0.1.15.x every ``save_json`` of a TIR node
segfaults in ``tvm::ffi::ToJSONGraph``, and MetaSchedule serializes every workload; apache-tvm-ffi
0.1.14.post1 works. :func:`tuning_available` checks before starting, so nothing crashes.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import tvm
from tvm import relax

from reshift.codegen.tvm.lower import lower
from reshift.codegen.tvm.targets import TargetSpec, resolve_target
from reshift.errors import CodegenError
from reshift.ir.graph import Graph

Progress = Callable[[int, int], None]  # (trials measured so far, trials requested)

_PROBE = "import tvm; from tvm import tirx; tvm.ir.save_json(tirx.IntImm('int32', 1))"


def tuning_available() -> str | None:
    """None if MetaSchedule can run here, else the reason (checked in a subprocess: it segfaults)."""
    missing = [name for name in ("xgboost", "psutil") if importlib.util.find_spec(name) is None]
    if missing:
        return f"MetaSchedule needs the Python packages {', '.join(missing)} (pip install {' '.join(missing)})"
    probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=False)
    if probe.returncode != 0:
        import tvm_ffi

        return (
            f"MetaSchedule tuning crashes in apache-tvm {tvm.__version__} with apache-tvm-ffi {tvm_ffi.__version__}: "
            f"tvm.ir.save_json of any TIR node segfaults in tvm::ffi::ToJSONGraph (exit code {probe.returncode}); "
            "install apache-tvm-ffi==0.1.14.post1, with which tuning works"
        )
    return None


def tune(
    graph: Graph,
    target: str | dict | TargetSpec = "cpu",
    trials: int = 64,
    db_dir: str | os.PathLike = "reshift_tuning",
    progress: Progress | None = None,
) -> Path:
    """Tune the fused kernels of ``graph`` with MetaSchedule; records accumulate in ``db_dir``."""
    spec = resolve_target(target)
    if spec.is_gpu or spec.cross_compiler:
        raise CodegenError(
            f"tuning for {spec.name} needs the device to measure on; only the 'cpu' target is tunable locally"
        )
    symbolic = [v.name for v in graph.inputs if not v.type.is_static]
    if symbolic:
        raise CodegenError(
            f"MetaSchedule cannot tune kernels with a symbolic batch (inputs {', '.join(symbolic)} of {graph.name!r}): "
            "it fails with 'parallel_for_dynamic error ... old_rv != nullptr'; "
            "export the model with a fixed batch to tune it"
        )
    reason = tuning_available()
    if reason:
        raise CodegenError(reason)
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import meta_schedule as ms

    tvm_target = spec.target()
    db_dir = Path(db_dir)
    db_dir.mkdir(parents=True, exist_ok=True)
    with tvm_target:
        fused = tvm.transform.Sequential(cpu.legalize_passes(tvm_target))(lower(graph))
    if _all_tuned(fused, tvm_target, db_dir):
        if progress is not None:
            progress(trials, trials)
        return db_dir
    callbacks = ms.measure_callback.MeasureCallback.create("default")
    if progress is not None:
        callbacks = [*callbacks, _progress_callback(progress, trials)]
    try:
        ms.relax_integration.tune_relax(
            mod=fused,
            params={},
            target=tvm_target,
            work_dir=str(db_dir),
            max_trials_global=trials,
            num_trials_per_iter=min(trials, 16),
            builder=ms.builder.LocalBuilder(timeout_sec=300),  # workers import tvm (and torch): slow to start
            runner=ms.runner.LocalRunner(timeout_sec=120),
            measure_callbacks=callbacks,
            seed=0,
        )
    except Exception as exc:  # noqa: BLE001 -- TVM errors become one readable message
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        raise CodegenError(
            f"tuning {graph.name!r} for {spec.name} failed: {lines[-1] if lines else type(exc).__name__}"
        ) from None
    return db_dir


def _all_tuned(fused: tvm.IRModule, tvm_target: tvm.target.Target, db_dir: Path) -> bool:
    """True when every kernel of ``fused`` was already tuned into ``db_dir`` (its workload is there).

    A kernel the trial budget never reached has its workload but no record; it keeps the
    generic schedule rather than being re-tuned on every compile (tune with a new db to retry).
    """
    from tvm.s_tir import meta_schedule as ms

    workloads, records = db_dir / "database_workload.json", db_dir / "database_tuning_record.json"
    if not (workloads.exists() and records.exists()):
        return False
    database = ms.database.JSONDatabase(str(workloads), str(records), allow_missing=False)
    tasks = ms.relax_integration.extract_tasks(fused, tvm_target)
    return all(database.has_workload(task.dispatched[0]) for task in tasks if task.dispatched)


def apply_database_pass(db_dir: str | os.PathLike) -> tvm.transform.Pass:
    """The pass that swaps in tuned kernels from ``db_dir`` (run after FuseTIR, under the target)."""
    if not (Path(db_dir) / "database_workload.json").exists():
        raise CodegenError(f"{db_dir} is not a tuning database (no database_workload.json); run tune() first")
    return relax.transform.MetaScheduleApplyDatabase(str(db_dir))


def _progress_callback(progress: Progress, total: int):
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class _Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self) -> None:
            super().__init__()
            self.done = 0

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            self.done += len(runner_results)
            progress(min(self.done, total), total)

    return _Progress()
