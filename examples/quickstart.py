"""reshift quickstart: convert a RepVGG-A0 (training form) from PyTorch, fuse it, run it.

Run with `make demo`. Prints the op histogram before and after the `exact` pipeline, the pass
report, and how closely the reference interpreter agrees with torch eager.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reshift  # noqa: E402
from examples.models.repvgg import repvgg_a0  # noqa: E402


def max_relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    return float(np.abs(actual - reference).max() / np.abs(reference).max())


def main() -> None:
    torch.manual_seed(0)
    model = repvgg_a0()
    x = torch.randn(1, 3, 224, 224)

    start = time.perf_counter()
    graph = reshift.frontend.from_torch(model, (x,))
    print(f"converted {type(model).__name__} in {time.perf_counter() - start:.1f} s")
    print(graph.summary())

    fused, report = reshift.passes.run(graph, pipeline="exact")
    print()
    print(report)
    print()
    print("after the exact pipeline:")
    print(fused.summary())

    with torch.no_grad():
        start = time.perf_counter()
        expected = model(x).numpy()
        torch_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    (got,) = reshift.ir.interpret(fused, {fused.inputs[0].name: x.numpy()}).values()
    interp_ms = (time.perf_counter() - start) * 1e3
    print()
    print(f"max relative error vs torch eager: {max_relative_error(got, expected):.2e}")
    print(f"torch eager {torch_ms:.1f} ms, numpy reference interpreter {interp_ms:.1f} ms (batch 1)")
    print("top-5 classes, torch:", np.argsort(-expected[0])[:5].tolist(), " reshift:", np.argsort(-got[0])[:5].tolist())


if __name__ == "__main__":
    main()
