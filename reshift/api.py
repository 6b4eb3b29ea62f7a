"""``reshift.compile``: model in, runnable :class:`CompiledModel` out (frontend -> passes -> TVM build).

cm = reshift.compile(model, (x,))          # a torch.nn.Module needs example inputs
cm = reshift.compile("model.onnx", target="arm64", pipeline="exact")
y = cm(x)                                  # numpy in -> numpy out, torch in -> torch out
cm.save("out_dir"); m = reshift.load("out_dir")
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from reshift.errors import ArtifactError, InputError, ModelLoadError, SymbolicShapeError
from reshift.ir.graph import Graph
from reshift.ir.specialize import specialize_batch
from reshift.runtime.artifact import SO_NAME, make_meta, symbol_bounds, target_dict, value_spec, write_meta

# options of compile(**options) that belong to a frontend rather than to the pass pipeline
FRONTEND_OPTIONS = {"torch": ("dynamic_batch", "input_names", "dynamic_dims"), "onnx": ("input_shapes", "input_values")}


def _is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _is_onnx_proto(obj: Any) -> bool:
    return type(obj).__name__ == "ModelProto" and type(obj).__module__.startswith("onnx")


def to_graph(
    model_or_path: Any, example_inputs: Any = None, options: dict[str, Any] | None = None
) -> tuple[Graph, dict[str, np.ndarray] | None]:
    """The IR graph of a torch module, ONNX path/proto or Graph, plus example inputs as numpy if any."""
    options = dict(options or {})
    if isinstance(model_or_path, Graph):
        return model_or_path, None
    if _is_torch_module(model_or_path):
        if example_inputs is None:
            raise InputError(
                f"compiling the torch module {type(model_or_path).__name__} needs example_inputs "
                "(a tensor or a tuple of tensors) to trace it: reshift.compile(model, (x,))"
            )
        from reshift.frontend import from_torch

        kwargs = {k: options.pop(k) for k in FRONTEND_OPTIONS["torch"] if k in options}
        graph = from_torch(model_or_path, example_inputs, **kwargs)
        examples = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        arrays = [x.detach().cpu().numpy() for x in examples if type(x).__module__.startswith("torch")]
        if len(arrays) != len(graph.inputs):
            return graph, None
        return graph, dict(zip([v.name for v in graph.inputs], arrays, strict=True))
    if isinstance(model_or_path, (str, os.PathLike)) or _is_onnx_proto(model_or_path):
        if isinstance(model_or_path, (str, os.PathLike)) and not Path(model_or_path).exists():
            raise ModelLoadError(f"{model_or_path}: no such file")
        from reshift.frontend import from_onnx

        kwargs = {k: options.pop(k) for k in FRONTEND_OPTIONS["onnx"] if k in options}
        return from_onnx(model_or_path, **kwargs), None
    raise InputError(
        f"cannot compile a {type(model_or_path).__name__}: pass a torch.nn.Module with example_inputs, "
        "an ONNX file path or onnx.ModelProto, or a reshift.ir.Graph"
    )


class CompiledModel:
    """A graph compiled for one target: callable here (when the target is this machine), savable anywhere.

    ``graph`` is the optimized IR, ``source_graph`` the frontend's, ``report`` the pass report,
    ``build`` the codegen BuildResult and ``meta`` what ``save`` writes to meta.json.
    """

    def __init__(self, graph: Graph, source_graph: Graph, report: Any, build: Any, pipeline: str):
        self.graph = graph
        self.source_graph = source_graph
        self.report = report
        self.build = build
        self.pipeline = pipeline
        self._loaded = None
        self.meta = {
            "format": 1,
            "name": graph.name,
            "inputs": [value_spec(graph, v) for v in graph.inputs],
            "outputs": [value_spec(graph, v) for v in graph.outputs],
            "target": target_dict(build.target),
            "pipeline": pipeline,
            **symbol_bounds(graph),
        }
        self.meta.update(tuned_meta(build))

    @property
    def target(self) -> str:
        return self.build.target.name

    def _module(self):
        """The in-process runtime module (ArtifactError for a target this machine cannot run)."""
        if self._loaded is None:
            from reshift.runtime.artifact import check_target
            from reshift.runtime.module import LoadedModel

            device = self.meta["target"].get("device_type", "cpu")
            check_target(self.meta, device)
            self._loaded = LoadedModel(self.build.executable, self.meta, device)
        return self._loaded

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._module()(*args, **kwargs)

    def run_dict(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        return self._module().run_dict(inputs)

    def benchmark(self, *args: Any, repeat: int = 50, warmup: int = 5, **kwargs: Any) -> dict[str, float]:
        """Latency statistics in ms (median, p90, mean, min) of ``repeat`` calls."""
        return self._module().benchmark(*args, repeat=repeat, warmup=warmup, **kwargs)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the artifact (``model.so``, ``meta.json``, CUDA: ``kernels.fatbin``) to ``directory``."""
        from reshift.codegen.tvm import compile_cuda_kernels, export_library
        from reshift.ir.text import print_graph
        from reshift.runtime.cuda_kernels import KERNELS_NAME, kernels_meta

        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise ArtifactError(f"{directory} exists and is not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        so = directory / SO_NAME
        export_library(self.build, str(so))
        source_text = print_graph(self.source_graph, weights="full")  # hashed into meta.json
        self.meta = make_meta(self.graph, self.build.target, self.pipeline, so, source_text)
        self.meta.update(tuned_meta(self.build))
        kernels = compile_cuda_kernels(self.build)  # CUDA: ship the kernels compiled, not as source
        if kernels is not None:
            fatbin, cuda_source = kernels
            (directory / KERNELS_NAME).write_bytes(fatbin)
            self.meta["cuda_kernels"] = kernels_meta(fatbin, cuda_source)
        write_meta(directory, self.meta)
        return directory

    def __repr__(self) -> str:
        return f"<CompiledModel {self.graph.name} for {self.target} ({self.pipeline}): {len(self.graph.nodes)} nodes>"


def compile(
    model_or_path: Any,
    example_inputs: Any = None,
    target: str | dict[str, Any] = "cpu",
    pipeline: str = "exact",
    calibration: Any = None,
    tune: bool = False,
    **options: Any,
) -> CompiledModel:
    """Compile a torch module (with ``example_inputs``), ONNX path/proto or IR graph for ``target``.

    An ONNX model whose symbolic sizes cannot stay symbolic (a conv over a symbolic width raises
    :class:`~reshift.errors.SymbolicShapeError`) and is given no ``input_shapes`` comes back as a
    :class:`reshift.specializing.SpecializingModel`: same call interface, one build per input
    shape, at most ``max_shapes`` (default 8) kept.

    ``tune=True`` (or ``trials=N``, ``tune_db=DIR``) tunes first: a knob search over reshift's own
    kernels (``knob_progress``), then MetaSchedule (``trials=0`` skips it; ``progress``); what the
    build took from the database is ``compiled.build.tuned``. A symbolic batch is then fixed to
    ``tune_batch`` (default: the example inputs' batch, else 1);
    other ``options`` go to the frontend (``dynamic_batch``, ``input_names``, ``input_shapes``)
    or to the pass pipeline.
    """
    from reshift import passes
    from reshift.codegen import tvm as tvm_codegen

    max_shapes = int(options.pop("max_shapes", 8))
    given = {"target": target, "pipeline": pipeline, "calibration": calibration, "tune": tune, **options}
    trials = int(options.pop("trials", 64))
    tune_db = options.pop("tune_db", None)
    progress = options.pop("progress", None)
    knob_progress = options.pop("knob_progress", None)
    tune_batch = options.pop("tune_batch", None)
    try:
        source, examples = to_graph(model_or_path, example_inputs, options)
    except SymbolicShapeError as exc:
        if "input_shapes" in given or not (
            isinstance(model_or_path, (str, os.PathLike)) or _is_onnx_proto(model_or_path)
        ):
            raise
        from reshift.specializing import SpecializingModel

        return SpecializingModel(model_or_path, exc, given, max_shapes=max_shapes)
    for key in FRONTEND_OPTIONS["torch"] + FRONTEND_OPTIONS["onnx"]:
        options.pop(key, None)
    calibration = _calibration(calibration)
    graph, report = passes.run(source, pipeline, calibration=calibration, inputs=examples, **options)
    spec = tvm_codegen.resolve_target(target)
    if tune:
        batch = tune_batch or (len(next(iter(examples.values()))) if examples else None)
        graph, build = tune_and_build(graph, spec, trials, tune_db, progress, batch, knob_progress)
    else:
        build = tvm_codegen.build(graph, spec)
    return CompiledModel(graph, source, report, build, pipeline)


def tuned_meta(build: Any) -> dict[str, Any]:
    """``{"tuned_kernels": [...]}`` for a build whose kernel knobs came from a tuning database, else ``{}``."""
    tuned = getattr(build, "tuned", None) or []
    return {"tuned_kernels": [vars(choice) for choice in tuned]} if tuned else {}


def tuned_lines(build: Any) -> list[str]:
    """One line per hand-written kernel instance a tuned build took from the database."""
    return [choice.line() for choice in getattr(build, "tuned", None) or []]


def default_tune_db() -> str:
    """Where tuning records live unless told otherwise: the user's cache directory."""
    return os.path.join(os.path.expanduser("~"), ".cache", "reshift", "tune_db")


def tune_and_build(
    graph: Graph,
    spec: Any,
    trials: int,
    db_dir: str | None,
    progress: Any = None,
    batch: int | None = None,
    knob_progress: Any = None,
) -> tuple[Graph, Any]:
    """Tune (``codegen.tvm.tune``: knobs of reshift's kernels, then MetaSchedule with ``trials``
    trials), then build with the tuned kernels; ``build.tuned`` lists the kernels whose knobs changed.

    Tuning needs static extents, so a symbolic batch is fixed to ``batch`` (default 1):
    a tuned artifact serves that one batch size. Returns the (specialized) graph and the build.
    """
    if any(not v.type.is_static for v in graph.inputs):
        graph = specialize_batch(graph, int(batch or 1))
    others = sorted(set().union(*(v.type.symbols for v in graph.inputs)))
    if others:
        raise InputError(
            f"tuning needs static sizes, but {', '.join(others)} stay symbolic after fixing the batch: "
            "pin them with input_shapes={...} (CLI: --input-shape NAME=D1,D2,...)"
        )
    db_dir = db_dir or default_tune_db()
    from reshift.codegen import tvm as tvm_codegen
    from reshift.errors import CodegenError

    tune = getattr(tvm_codegen, "tune", None)
    if tune is None:
        raise CodegenError("tuning is not available in this reshift build (codegen.tvm.tune is missing)")
    db = tune(graph, spec, trials=trials, db_dir=db_dir, progress=progress, knob_progress=knob_progress)
    return graph, tvm_codegen.build(graph, spec, tuning_db=db)


def _calibration(calibration: Any) -> list[dict[str, np.ndarray]] | None:
    """Calibration batches from a list of dicts, one dict, or an .npz path (one batch)."""
    if calibration is None:
        return None
    if isinstance(calibration, (str, os.PathLike)):
        path = Path(calibration)
        if not path.is_file():
            raise InputError(f"calibration file {path} does not exist")
        try:
            with np.load(path) as data:
                return [{k: data[k] for k in data.files}]
        except Exception as exc:
            raise InputError(f"calibration file {path} is not a readable .npz ({exc})") from None
    if isinstance(calibration, dict):
        return [calibration]
    return list(calibration)
