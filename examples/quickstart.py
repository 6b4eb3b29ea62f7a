"""reshift quickstart: convert a RepVGG-A0 (training form) from PyTorch, fuse it, compile it, run it.

Run with `make demo`. Prints the graph before and after the `exact` pipeline, the pass report,
how closely the reference interpreter and the compiled TVM artifact agree with torch eager, and
the artifact's latency next to torch eager's (2 threads each, batch 1).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("TVM_NUM_THREADS", "2")
torch.set_num_threads(2)

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
        expected = model(x).numpy()
    (got,) = reshift.ir.interpret(fused, {fused.inputs[0].name: x.numpy()}).values()
    print()
    print(f"reference interpreter vs torch eager: max relative error {max_relative_error(got, expected):.2e}")

    start = time.perf_counter()
    compiled = reshift.compile(graph, target="cpu", pipeline="exact")
    print(f"compiled for {compiled.target} in {time.perf_counter() - start:.1f} s")
    y = compiled(x)  # torch in, torch out
    print(f"compiled artifact vs torch eager:     max relative error {max_relative_error(y.numpy(), expected):.2e}")
    print(
        "top-5 classes, torch:",
        np.argsort(-expected[0])[:5].tolist(),
        " reshift:",
        np.argsort(-y.numpy()[0])[:5].tolist(),
    )

    torch_ms = median_ms(lambda: model(x))
    reshift_ms = median_ms(lambda: compiled(x))
    print(
        f"latency, batch 1, 2 threads: torch eager {torch_ms:.1f} ms, reshift {reshift_ms:.1f} ms "
        f"({torch_ms / reshift_ms:.2f}x)"
    )


def median_ms(fn, repeat: int = 20) -> float:
    with torch.no_grad():
        fn()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


if __name__ == "__main__":
    main()
