"""Specialization per input shape, for ONNX models whose symbolic sizes cannot stay symbolic.

A CNN with a symbolic image height/width (PaddleOCR's recognizer takes ``x: [N, 3, 48, W]``)
has conv and pool outputs whose sizes are floor expressions of ``W``, not monomials, so the
frontend raises :class:`~reshift.errors.SymbolicShapeError`. ``reshift.compile`` without
``input_shapes`` then returns a :class:`SpecializingModel`: each call with a new shape imports
the model with every non-batch symbolic axis pinned to the call's sizes (the batch ``N`` stays
symbolic), runs the same pipeline and target, compiles, and keeps the build in a bounded LRU
cache (:data:`DEFAULT_MAX_SHAPES`), logging one line per compilation to stderr. A static
artifact (``reshift compile`` on the command line, ``save``) needs the sizes pinned up front.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from reshift.errors import InputError, SymbolicShapeError

DEFAULT_MAX_SHAPES = 8
BATCH = "N"  # the frontend's batch symbol: axis 0, and its dim_param wherever else it appears


class SpecializingModel:
    """Callable like :class:`~reshift.api.CompiledModel`; compiles once per distinct input shape.

    ``cache`` maps a shape key (the pinned sizes, batch excluded) to its ``CompiledModel``;
    ``compiles`` counts builds, ``error`` is the frontend's refusal that made specialization necessary.
    """

    def __init__(
        self,
        model: Any,
        error: SymbolicShapeError,
        compile_options: dict[str, Any],
        max_shapes: int = DEFAULT_MAX_SHAPES,
    ):
        from reshift.frontend.onnx import ONNX_DTYPES, load_model

        if max_shapes < 1:
            raise InputError(f"max_shapes must be at least 1, got {max_shapes}")
        proto, self.source = load_model(model)
        self.label = Path(self.source).name if isinstance(model, (str, os.PathLike)) else self.source
        self.model, self.error, self.max_shapes = model, error, int(max_shapes)
        self.compile_options = dict(compile_options)
        frozen = set(self.compile_options.get("input_values") or {})
        initializers = {t.name for t in proto.graph.initializer}
        # name, declared dims (an int; BATCH: the batch N, kept symbolic; None: pinned per call), dtype
        self.inputs: list[tuple[str, list[int | str | None], str]] = []
        infos = [i for i in proto.graph.input if i.name not in initializers and i.name not in frozen]
        batch_params = {_dims(i)[0].dim_param for i in infos if _dims(i) and not _static(_dims(i)[0])} - {""}
        for info in infos:
            dims = [
                d.dim_value if _static(d) else BATCH if axis == 0 or d.dim_param in batch_params else None
                for axis, d in enumerate(_dims(info))
            ]
            self.inputs.append((info.name, dims, ONNX_DTYPES.get(info.type.tensor_type.elem_type, "?")))
        self.input_names = [name for name, _, _ in self.inputs]
        self.cache: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0

    # -- the CompiledModel interface -------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.for_inputs(self._named(args, kwargs))(*args, **kwargs)

    def run_dict(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        return self.for_inputs(inputs).run_dict(inputs)

    def benchmark(self, *args: Any, repeat: int = 50, warmup: int = 5, **kwargs: Any) -> dict[str, float]:
        """Latency statistics (ms) of the build for these inputs' shape, compiled first if new."""
        return self.for_inputs(self._named(args, kwargs)).benchmark(*args, repeat=repeat, warmup=warmup, **kwargs)

    def save(self, directory: Any) -> None:
        raise InputError(
            f"{self.source} specializes per input shape ({self.error.symbols and ', '.join(self.error.symbols)} "
            "symbolic), so there is no single artifact to save: compile with input_shapes={...} "
            "(CLI: --input-shape NAME=D1,D2,...), or save one shape's build: model.for_inputs(inputs).save(dir)"
        )

    @property
    def target(self) -> str:
        return str(self.compile_options.get("target", "cpu"))

    # -- specialization --------------------------------------------------------------------
    def for_inputs(self, inputs: dict[str, Any]):
        """The ``CompiledModel`` for these inputs' shape: from the cache, or compiled now (LRU eviction)."""
        pins = self._pins(inputs)
        key = tuple(
            (name, tuple(n for n, d in zip(shape, dims, strict=True) if d is None)) for name, shape, dims in pins
        )
        with self._lock:  # one build per shape even when threads race to it
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
            compiled = self._compile(pins)
            if len(self.cache) >= self.max_shapes:
                self.cache.popitem(last=False)
            self.cache[key] = compiled
            return compiled

    def _compile(self, pins: list[tuple[str, tuple[int, ...], list[int | str | None]]]):
        """Import with these inputs' non-batch axes pinned, then the same pipeline and target."""
        from reshift.api import compile as reshift_compile

        shown = " ".join(f"{name}={','.join(str(int(d)) for d in shape)}" for name, shape, _ in pins)
        position = min(len(self.cache) + 1, self.max_shapes)
        print(
            f"reshift: compiling {self.label} for {shown} (shape {position} of at most {self.max_shapes})",
            file=sys.stderr,
        )
        input_shapes = {
            name: tuple(BATCH if d == BATCH else size for size, d in zip(shape, dims, strict=True))
            for name, shape, dims in pins
        }
        options = dict(self.compile_options)
        options["input_shapes"] = {**(options.get("input_shapes") or {}), **input_shapes}
        compiled = reshift_compile(self.model, **options)
        self.compiles += 1
        return compiled

    def _named(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        if len(args) > len(self.input_names):
            raise InputError(f"{self.source} takes {len(self.input_names)} inputs {self.input_names}, got {len(args)}")
        named = dict(zip(self.input_names, args, strict=False))
        named.update(kwargs)
        return named

    def _pins(self, inputs: dict[str, Any]) -> list[tuple[str, tuple[int, ...], list[int | None]]]:
        """``(name, call shape, declared dims)`` of every input with a symbolic axis past the batch."""
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise InputError(f"{self.source} takes inputs {self.input_names}; missing {missing}")
        pins = []
        for name, dims, _ in self.inputs:
            if None not in dims:
                continue
            shape = tuple(int(d) for d in inputs[name].shape)
            if len(shape) != len(dims):
                raise InputError(f"input {name!r}: expected rank {len(dims)}, got shape {list(shape)}")
            if min((n for n, d in zip(shape, dims, strict=True) if d is None), default=1) < 1:
                raise InputError(f"input {name!r}: shape {list(shape)} has an empty axis")
            pins.append((name, shape, dims))
        return pins

    def __repr__(self) -> str:
        return (
            f"<SpecializingModel {self.source}: {len(self.cache)} of at most {self.max_shapes} shapes compiled "
            f"for {self.target}>"
        )


def _static(dim) -> bool:
    return dim.HasField("dim_value") and dim.dim_value >= 0


def _dims(info) -> list:
    tensor_type = info.type.tensor_type
    return list(tensor_type.shape.dim) if tensor_type.HasField("shape") else []
