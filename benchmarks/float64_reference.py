"""A float64 reference for the ONNX conformance runner: the model's graph evaluated in float64.

Relative errors against onnxruntime mix both sides' float32 rounding. Against the same graph run
by the numpy interpreter with every float32 value, weight and dtype attribute widened to float64,
each side's own error shows. Seen on PP-OCRv4 det with random input (every probability under
8e-4): onnxruntime's Sigmoid has ~1.3e-7 absolute error near 0, 1.7e-4 of that maximum, while
reshift's output is 2.5e-5 from float64.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import reshift


def float64_outputs(model_path, feeds: dict, input_shapes=None, input_values=None) -> list[np.ndarray] | None:
    """The model's outputs computed in float64 by the interpreter, or None when it cannot run so."""
    try:
        graph = reshift.frontend.from_onnx(str(model_path), input_shapes=input_shapes, input_values=input_values)
        for value in graph.values():
            if value.dtype == "float32":
                value.type = dataclasses.replace(value.type, dtype="float64")
                if value.data is not None:
                    value.data = value.data.astype(np.float64)
        for node in graph.nodes:
            for key, attr in node.attrs.items():
                if attr == "float32":  # cast targets and the like
                    node.attrs[key] = "float64"
        wide = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in feeds.items()}
        return list(reshift.ir.interpret(graph, wide).values())
    except Exception:  # noqa: BLE001 -- an op without a float64 reference: no float64 column for this model
        return None
