"""Building an IR graph into a Relax VM executable for a target, and exporting it as a shared library.

CPU and arm64 use Relax's fused CPU pipeline (legalize, fold constants, fuse, FuseTIR); CUDA uses
TVM's CUDA pipeline, which schedules every kernel with dlight. A CUDA build is checked to really
hold device code (without dlight TVM silently emits host loops, NOTES_tvm.md §2b).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tvm import relax

from reshift.codegen.tvm import knobs as knob_db
from reshift.codegen.tvm.lower import lower
from reshift.codegen.tvm.schedule_cpu import schedule_passes
from reshift.codegen.tvm.serial_small import serial_small_parallel
from reshift.codegen.tvm.targets import TargetSpec, resolve_target
from reshift.errors import CodegenError
from reshift.ir.graph import Graph


@dataclass
class BuildResult:
    """A built model: the Relax VM executable, its target, the lowered module and the build time;
    ``tuned``: the hand-written kernel instances whose knobs came from the tuning database."""

    executable: relax.VMExecutable
    target: TargetSpec
    module: tvm.IRModule
    seconds: float
    tuned: list[knob_db.Choice] = field(default_factory=list)


def build(
    graph: Graph,
    target: str | dict | TargetSpec = "cpu",
    *,
    module: tvm.IRModule | None = None,
    schedule: bool = True,
    tuning_db: str | os.PathLike | None = None,
) -> BuildResult:
    """Lower ``graph`` (unless ``module`` is given) and compile it for ``target``.

    ``schedule=False`` keeps the naive CPU loops (for comparisons); CUDA always gets dlight schedules.
    ``tuning_db``: a directory written by ``tune()``; its kernels replace the generic CPU schedules.
    """
    spec = resolve_target(target)
    start = time.perf_counter()
    tvm_target = spec.target()
    entries = knob_db.load(knob_db.db_file(tuning_db, tvm_target)) if tuning_db is not None else {}
    tuned: list[knob_db.Choice] = []
    if module is None:
        # kernel choices (AVX-512, VNNI, generic) follow the target, not the host; knobs the database's
        with tvm_target, knob_db.using(entries) as session:
            module = lower(graph)
        tuned = list(session.used.values())
    mod = module
    with _tvm_errors(f"building graph {graph.name!r} for target {spec.name}"), _cuda_toolchain(spec):
        if spec.is_gpu:  # TVM's default CUDA pipeline (dlight schedules), checked between its halves
            from tvm.relax.backend.cuda import pipeline as cuda

            with tvm_target:
                mod = tvm.transform.Sequential(
                    [*cuda.library_dispatch_passes(tvm_target), *cuda.legalize_passes(tvm_target)]
                )(mod)
            _check_no_host_kernels(mod, spec)
            rest = tvm.transform.Sequential(
                [*cuda.dataflow_lower_passes(tvm_target), *cuda.finalize_passes(tvm_target)]
            )
            executable = tvm.compile(mod, tvm_target, relax_pipeline=rest)
        else:
            pipeline = cpu_pipeline(tvm_target, schedule, tuning_db)
            executable = tvm.compile(mod, tvm_target, relax_pipeline=pipeline)
    if spec.is_gpu:
        device_modules = [m.kind for m in _walk(executable.mod) if m.kind in ("cuda", "ptx", "nvptx")]
        if not device_modules:
            raise CodegenError(
                f"the build of {graph.name!r} for {spec.name} produced no CUDA kernels (only host code): "
                "the dlight schedules did not apply; report this with the graph"
            )
    return BuildResult(executable, spec, mod, time.perf_counter() - start, tuned)


def _check_no_host_kernels(mod: tvm.IRModule, spec: TargetSpec) -> None:
    """Every block of every kernel of a GPU build must sit under a thread binding.

    A block outside one compiles to host code that reads device pointers on the CPU: a segfault at
    run time (seen twice on an H200: a CPU-scheduled kernel, and side computations that dlight left
    unbound in a fused function). Refuse the build instead, naming the kernel.
    """
    from tvm import tirx

    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc) and _host_block(func.script(show_meta=False)):
            raise CodegenError(
                f"kernel {gv.name_hint} has loops outside any GPU thread binding for {spec.name} "
                "(they would run on the host over device memory); report this with the graph"
            )


def _host_block(script: str) -> str | None:
    """The first block (or bare store) of a TVMScript PrimFunc not nested in a ``T.thread_binding`` loop.

    A block that launches its threads itself (``T.launch_thread``: TVM's hand-written GPU kernels,
    e.g. the topk/sort of ``topi.cuda``) is bound too.
    """
    loops: list[tuple[int, bool]] = []  # (indent, is thread binding) of the enclosing for-loops
    body = False
    lines = script.splitlines()
    for number, line in enumerate(lines):
        text = line.strip()
        if not body:
            body = text.startswith("def ")
            continue
        if not text or text.startswith(("#", "T.func_attr", "T.reads", "T.writes", '"""')):
            continue
        indent = len(line) - len(line.lstrip())
        while loops and loops[-1][0] >= indent:
            loops.pop()
        if text.startswith("for "):
            loops.append((indent, "T.thread_binding(" in text))
            continue
        bound = any(thread for _, thread in loops)
        if text.startswith("with T.sblock(") and '"root"' not in text and not bound:
            if not _launches_threads(lines[number + 1 :], indent):
                return text
    return None


def _launches_threads(rest: list[str], indent: int) -> bool:
    """Whether the block body starting at ``rest`` (lines indented past ``indent``) calls ``T.launch_thread``."""
    for line in rest:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            return False
        if "T.launch_thread(" in line:
            return True
    return False


def cpu_pipeline(target: tvm.target.Target, schedule: bool = True, tuning_db=None) -> tvm.transform.Pass:
    """Relax's fused CPU pipeline, plus tuned kernels (if any) and the generic schedule of schedule_cpu.py."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    passes = [*cpu.library_dispatch_passes(target), *cpu.legalize_passes(target)]
    knob_only = tuning_db is not None and knob_db.db_file(tuning_db, target).exists()
    if tuning_db is not None and (_has_schedules(tuning_db, target) or not knob_only):  # neither: a clear error
        from reshift.codegen.tvm.tune import apply_database_pass

        with target:  # the pass reads Target.current() when it is created
            passes.append(apply_database_pass(tuning_db))
    if schedule:
        passes += [*schedule_passes(), serial_small_parallel()]
    passes += [*cpu.dataflow_lower_passes(target), *cpu.finalize_passes(target)]
    sequence = tvm.transform.Sequential(passes)

    @tvm.transform.module_pass(opt_level=0, name="ReshiftCPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return sequence(mod)

    return _pipeline


def _has_schedules(tuning_db, target: tvm.target.Target) -> bool:
    """Whether ``tuning_db`` holds MetaSchedule records for ``target`` (a knob-only database does not)."""
    from reshift.codegen.tvm.tune import target_db_dir

    name = "database_workload.json"
    return (Path(tuning_db) / name).exists() or (target_db_dir(tuning_db, target) / name).exists()


def export_library(result: BuildResult, path: str | os.PathLike) -> Path:
    """Write the executable as one shared library (weights, VM bytecode and kernels inside)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = result.target
    kwargs = {}
    if spec.cross_compiler:
        if shutil.which(spec.cross_compiler) is None:
            raise CodegenError(
                f"exporting for {spec.name} needs the cross compiler {spec.cross_compiler!r}, which is not on PATH; "
                "install it (Debian/Ubuntu: apt-get install gcc-aarch64-linux-gnu)"
            )
        kwargs["cc"] = spec.cross_compiler
    with _tvm_errors(f"exporting the {spec.name} build to {path}"), _cuda_toolchain(spec):
        result.executable.export_library(str(path), **kwargs)
    return path


def compile_cuda_kernels(result: BuildResult) -> tuple[bytes, str] | None:
    """``(fatbin, source)`` of a CUDA build's kernels, compiled here with nvcc; None for other targets.

    TVM keeps the kernels of a build made without a GPU as CUDA source in the executable and
    compiles them when the .so is loaded, which needs a compiler on the GPU machine. Compiling them
    now lets the artifact carry the binary (``runtime/cuda_kernels.py`` serves it at load).
    """
    spec = result.target
    if not spec.is_gpu:
        return None
    modules = [m for m in _walk(result.executable.mod) if m.kind == "cuda"]
    if not modules:
        return None
    source = modules[0].inspect_source()
    arch = spec.tvm_target.get("arch", "sm_90") if isinstance(spec.tvm_target, dict) else None
    with _tvm_errors(f"compiling the CUDA kernels for {spec.name} with nvcc"), _cuda_toolchain(spec):
        from tvm.support import nvcc

        if _find_cuda_path() is None and shutil.which("nvcc") is None:
            raise CodegenError(
                f"saving a {spec.name} artifact compiles its kernels with nvcc, which was not found "
                "(install the CUDA toolkit or set CUDA_PATH)"
            )
        with tvm.target.Target(spec.tvm_target):
            fatbin = nvcc.compile_cuda(source, target_format="fatbin", arch=arch, compiler="nvcc")
    return bytes(fatbin), source


def _walk(module) -> Iterator:
    yield module
    for child in module.imports:
        yield from _walk(child)


@contextlib.contextmanager
def _tvm_errors(what: str) -> Iterator[None]:
    """Turn a TVM exception into a CodegenError with context and a hint (no bare TVM traceback)."""
    try:
        yield
    except CodegenError:
        raise
    except Exception as exc:  # noqa: BLE001 -- TVM raises TVMError, ValueError, InternalError, ...
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        message = next(
            (line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines else ""
        )
        kernel = next((line.strip() for line in lines if "PrimFunc" in line or "def " in line), "")
        hint = "rerun with target='cpu' to check the graph itself, or report the graph (print(graph)) with this message"
        raise CodegenError(
            f"{what} failed: {type(exc).__name__}: {message.strip()[:500]}"
            f"{' in ' + kernel[:120] if kernel else ''}; {hint}"
        ) from None


@contextlib.contextmanager
def _cuda_toolchain(spec: TargetSpec) -> Iterator[None]:
    """For CUDA builds, compile device code with nvcc from a real CUDA_PATH (NOTES_tvm.md §2b), only here."""
    if not spec.is_gpu:
        yield
        return
    updates = {}
    if "TVM_CUDA_COMPILE_MODE" not in os.environ and not _have_nvrtc():
        updates["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    if "CUDA_PATH" not in os.environ:
        cuda_path = _find_cuda_path()
        if cuda_path:
            updates["CUDA_PATH"] = cuda_path
    saved = {key: os.environ.get(key) for key in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _have_nvrtc() -> bool:
    try:
        import cuda.bindings.nvrtc  # noqa: F401

        return True
    except ImportError:
        return False


def _find_cuda_path() -> str | None:
    for candidate in ("/usr/local/cuda", "/usr/cuda", "/opt/cuda"):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    return None
