"""MetaSchedule tuning of a graph's fused kernels into a persistent database directory.

reshift's own kernels (``codegen/tvm/kernels``), which MetaSchedule skips, get a knob search per
shape into the same directory first (``tune_knobs.py``, ``knobs.py``).

``tune(graph, "cpu", trials, db_dir)`` tunes once; ``build(graph, "cpu", tuning_db=db_dir)`` then
applies the best schedules found (``relax.transform.MetaScheduleApplyDatabase``), and every
kernel without a record keeps the generic schedule. Only graphs with static shapes are tunable
(MetaSchedule fails on the symbolic batch).

Records live in a per-target subdirectory, ``db_dir/<kind>-<triple>-<sha256(str(target))[:12]>``,
so arm64 and x86 records never mix; ``apply_database_pass(db_dir)`` picks the current target's.
A cross target (arm64) measures on the device: inside ``with remote_runner(tracker=..., key=...)``
(or ``rpc=HOST:PORT``, one device directly) kernels are cross-linked to .so files on the host and
timed over TVM RPC by MetaSchedule's RPCRunner. CUDA is not tunable here.

Known breakage (NOTES_tvm.md §7): with apache-tvm-ffi 0.1.15.x every ``save_json`` of a TIR node
segfaults in ``tvm::ffi::ToJSONGraph``, and MetaSchedule serializes every workload; apache-tvm-ffi
0.1.14.post1 works. :func:`tuning_available` checks before starting, so nothing crashes.

Start-up: MetaSchedule's builder and schedule rules ``import tvm.s_tir.tensor_intrin``, whose CUDA
module parses its tensor-core intrinsics for 45-90 s on these CPUs (ROCm and Hexagon 6 s more),
once in this process and once per build batch in every fresh builder worker. CPU tuning never uses
them: :func:`load_cpu_tensor_intrinsics` registers only x86, arm and riscv ones, in both places.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import tvm
from tvm import relax

from reshift.codegen.tvm.lower import lower
from reshift.codegen.tvm.targets import TargetSpec, resolve_target
from reshift.errors import CodegenError
from reshift.ir.graph import Graph

Progress = Callable[[int, int], None]  # (trials measured so far, trials requested)

_PROBE = "import tvm; from tvm import tirx; tvm.ir.save_json(tirx.IntImm('int32', 1))"
_NON_CPU_INTRINSICS = ("cuda", "rocm", "hexagon")  # tvm.s_tir.tensor_intrin modules CPU tuning never uses
_REMOTE: dict[str, Any] = {}  # set by remote_runner(): where cross-target kernels are measured


@contextlib.contextmanager
def remote_runner(rpc: str | None = None, tracker: str | None = None, key: str | None = None) -> Iterator[None]:
    """Within it, ``tune`` measures on a device over TVM RPC: ``tracker`` + ``key``, or one ``rpc`` HOST:PORT."""
    if not (rpc or tracker):
        yield
        return
    if tracker and not key:
        raise CodegenError("remote tuning with --tracker needs --key: the tracker hands devices out by key")
    saved = dict(_REMOTE)
    _REMOTE.clear()
    _REMOTE.update(rpc=rpc, tracker=tracker, key=key)
    try:
        yield
    finally:
        _REMOTE.clear()
        _REMOTE.update(saved)


def target_db_dir(db_dir: str | os.PathLike, tvm_target: tvm.target.Target) -> Path:
    """The subdirectory of ``db_dir`` holding ``tvm_target``'s records (named by kind, triple and hash)."""
    text = str(tvm_target)
    triple = str(tvm_target.attrs.get("mtriple", "")) if "mtriple" in tvm_target.attrs else "host"
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    return Path(db_dir) / f"{tvm_target.kind.name}-{triple or 'host'}-{digest}"


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


def load_cpu_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` without its GPU/DSP modules (see the module docstring).

    Those modules are stood in for during the package import, then forgotten, so a later explicit
    import of one (a CUDA build in the same process) loads the real module.
    """
    package_name = "tvm.s_tir.tensor_intrin"
    if package_name in sys.modules:
        return
    skipped = [f"{package_name}.{name}" for name in _NON_CPU_INTRINSICS]
    for name in skipped:
        sys.modules[name] = types.ModuleType(name, "stand-in: not needed for CPU tuning")
    try:
        package = importlib.import_module(package_name)
    finally:
        for name in skipped:
            del sys.modules[name]
    for name in _NON_CPU_INTRINSICS:
        with contextlib.suppress(AttributeError):
            delattr(package, name)


def tune(
    graph: Graph,
    target: str | dict | TargetSpec = "cpu",
    trials: int = 64,
    db_dir: str | os.PathLike = "reshift_tuning",
    progress: Progress | None = None,
    knobs: bool = True,
    knob_progress: Progress | None = None,
) -> Path:
    """Tune ``graph``'s kernels; records accumulate in ``db_dir``.

    ``knobs``: first search the knobs of reshift's own kernels (``tune_knobs.py``, host targets;
    ``knob_progress`` gets (candidates measured, total)); then MetaSchedule tunes the generic fused
    kernels with ``trials`` trials (``trials=0``: knobs only).
    """
    spec = resolve_target(target)
    if spec.is_gpu:
        raise CodegenError(f"tuning for {spec.name} is not supported; only CPU targets (cpu, arm64 over RPC) are")
    if spec.cross_compiler and not _REMOTE and not target_db_dir(db_dir, spec.target()).exists():
        raise CodegenError(_needs_device(spec))
    symbolic = [v.name for v in graph.inputs if not v.type.is_static]
    if symbolic:
        raise CodegenError(
            f"MetaSchedule cannot tune kernels with a symbolic batch (inputs {', '.join(symbolic)} of {graph.name!r}): "
            "it fails with 'parallel_for_dynamic error ... old_rv != nullptr'; "
            "export the model with a fixed batch to tune it"
        )
    if knobs and not spec.cross_compiler:
        from reshift.codegen.tvm.tune_knobs import tune_knobs

        tune_knobs(graph, spec, db_dir, knob_progress)
    if trials <= 0:
        return target_db_dir(db_dir, spec.target())
    reason = tuning_available()
    if reason:
        raise CodegenError(reason)
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import meta_schedule as ms

    load_cpu_tensor_intrinsics()
    tvm_target = spec.target()
    db_dir = target_db_dir(db_dir, tvm_target)
    db_dir.mkdir(parents=True, exist_ok=True)
    with tvm_target:
        fused = tvm.transform.Sequential(cpu.legalize_passes(tvm_target))(lower(graph))
    if _all_tuned(fused, tvm_target, db_dir):
        if progress is not None:
            progress(trials, trials)
        return db_dir
    if spec.cross_compiler and not _REMOTE:
        raise CodegenError(_needs_device(spec))
    callbacks = ms.measure_callback.MeasureCallback.create("default")
    if progress is not None:
        callbacks = [*callbacks, _progress_callback(progress, trials)]
    try:
        tasks = [t for t in ms.relax_integration.extract_tasks(fused, tvm_target) if not _hand_scheduled(t)]
        if not tasks:
            return db_dir
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            extracted_tasks=tasks,
            work_dir=str(db_dir),
            # ARM's default rules (from the target) fail in this TVM build ("Do not have a default for
            # prim.Broadcast" while tensorizing); the generic LLVM rules vectorize for NEON all the same.
            space=ms.space_generator.PostOrderApply(sch_rules="llvm", postprocs="llvm", mutator_probs="llvm")
            if spec.cross_compiler
            else "post-order-apply",
            strategy="evolutionary",
            seed=0,
        )
        ms.tune.tune_tasks(
            tasks=contexts,
            task_weights=weights,
            work_dir=str(db_dir),
            max_trials_global=trials,
            num_trials_per_iter=min(trials, 16),
            builder=_builder(spec),
            runner=_runner() if _REMOTE and spec.cross_compiler else ms.runner.LocalRunner(timeout_sec=120),
            measure_callbacks=callbacks,
        )
    except Exception as exc:  # noqa: BLE001 -- TVM errors become one readable message
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        raise CodegenError(
            f"tuning {graph.name!r} for {spec.name} failed: {lines[-1] if lines else type(exc).__name__}"
        ) from None
    return db_dir


def _hand_scheduled(task) -> bool:
    """reshift's own kernels (codegen/tvm/kernels) carry ``tirx.is_scheduled``: nothing to tune.

    MetaSchedule only skips tasks whose *module* has the attribute, and its default rules fail on
    hand-written vector code ("Do not have a default for prim.Broadcast").
    """
    func = task.dispatched[0]["main"] if task.dispatched else None
    return func is not None and func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))


def _builder(spec: TargetSpec):
    """LocalBuilder; for a cross target it links each candidate into a .so with the cross compiler."""
    from tvm.s_tir import meta_schedule as ms

    f_export = functools.partial(_export_cross, spec.cross_compiler) if spec.cross_compiler else None
    # A fresh worker per build batch; it imports tvm (slow to start) and, with the initializer, only
    # the CPU tensor intrinsics before MetaSchedule's default_build imports them all.
    return ms.builder.LocalBuilder(timeout_sec=300, f_export=f_export, initializer=load_cpu_tensor_intrinsics)


def _export_cross(cross_compiler: str, mod: Any) -> str:
    """A candidate kernel as a shared library the device can dlopen (the default tar needs a device compiler)."""
    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(prefix="reshift-tune-"), "kernel.so")
    mod.export_library(path, fcompile=cc.cross_compiler(cross_compiler))
    return path


def _direct_session(host: str, port: int, timeout: int, _config: Any):
    """An RPC session with one device at host:port (RPCRunner's default asks a tracker)."""
    from tvm import rpc

    return rpc.connect(host, port, session_timeout=timeout)


def _alloc_from_host(session: Any, device: Any, args_info: Any, alloc_repeat: int) -> list:
    """Kernel arguments filled with host random data: the device runtime lacks random_fill_for_measure."""
    import numpy as np
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

    rng = np.random.default_rng(0)

    def fill(tensor: Any) -> None:
        shape = tuple(int(d) for d in tensor.shape)
        tensor.copyfrom(rng.uniform(-1.0, 1.0, size=shape).astype(str(tensor.dtype)))

    return alloc_argument_common(fill, device, args_info, alloc_repeat)


def _runner():
    """MetaSchedule's RPCRunner against the tracker (or the one device) of ``remote_runner``."""
    from tvm import rpc
    from tvm.s_tir import meta_schedule as ms

    from reshift.runtime.remote import connect, parse_address

    timeout = 300  # emulated devices are slow; a real board needs far less
    evaluator = ms.runner.EvaluatorConfig(number=1, repeat=1, min_repeat_ms=0, enable_cpu_cache_flush=False)
    if _REMOTE.get("tracker"):
        host, port = parse_address(_REMOTE["tracker"], "--tracker")
        connect(**_REMOTE)  # fails fast, readably, when the tracker or the key's devices are missing
        free = rpc.connect_tracker(host, port).summary()["queue_info"].get(_REMOTE["key"], {}).get("free", 1)
        config = ms.runner.RPCConfig(host, port, _REMOTE["key"], session_timeout_sec=timeout)
        workers = max(1, int(free))
        return ms.runner.RPCRunner(config, evaluator, f_alloc_argument=_alloc_from_host, max_workers=workers)
    host, port = parse_address(_REMOTE["rpc"])
    connect(rpc=_REMOTE["rpc"])
    config = ms.runner.RPCConfig(host, port, "direct", session_timeout_sec=timeout)
    create = functools.partial(_direct_session, host, port, timeout)
    return ms.runner.RPCRunner(
        config, evaluator, f_create_session=create, f_alloc_argument=_alloc_from_host, max_workers=1
    )


def _needs_device(spec: TargetSpec) -> str:
    return (
        f"tuning for {spec.name} needs the device to measure on: pass --rpc HOST:PORT or --tracker HOST:PORT "
        "--key NAME (TVM RPC); only the 'cpu' target is tunable locally"
    )


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
    return all(
        database.has_workload(task.dispatched[0]) for task in tasks if task.dispatched and not _hand_scheduled(task)
    )


def apply_database_pass(db_dir: str | os.PathLike) -> tvm.transform.Pass:
    """The pass that swaps in tuned kernels from ``db_dir`` (run after FuseTIR, under the target).

    ``db_dir`` is a target's subdirectory, or the root given to ``tune``: then the current target's.
    """
    current = tvm.target.Target.current(allow_none=True)
    if not (Path(db_dir) / "database_workload.json").exists() and current is not None:
        db_dir = target_db_dir(db_dir, current)
    if not (Path(db_dir) / "database_workload.json").exists():
        raise CodegenError(
            f"{db_dir} is not a tuning database for this target (no database_workload.json); run tune() first"
        )
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
