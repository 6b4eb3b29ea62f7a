"""Op coverage and agreement of the reference interpreter with torch eager and onnxruntime.

For every reference model in examples/models: convert it from torch (torch.export) and from
ONNX (torch.onnx.export), run the reference interpreter at batch 1 and 4, and print the max
relative error (max|diff| / max|reference|) against torch eager and onnxruntime.

    .venv/bin/python benchmarks/agreement.py [model ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reshift  # noqa: E402
from examples.models import MODELS  # noqa: E402


def rel_err(actual: np.ndarray, reference: np.ndarray) -> float:
    reference = np.asarray(reference, np.float64)
    return float(np.abs(np.asarray(actual, np.float64) - reference).max() / max(np.abs(reference).max(), 1e-30))


def export_onnx(model, inputs, names, path: Path) -> None:
    dynamic = {name: {0: "N"} for name in names}
    torch.onnx.export(
        model, inputs, str(path), input_names=list(names), dynamic_axes=dynamic, opset_version=17, dynamo=False
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    header = (
        f"{'model':<22} {'ops':>4} {'nodes':>6} {'batch':>5} "
        f"{'torch-fe vs eager':>18} {'onnx-fe vs ORT':>15} {'convert s':>9}"
    )
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            spec = MODELS[name]
            model = spec.build().eval()
            start = time.perf_counter()
            from_torch = reshift.frontend.from_torch(model, spec.example_inputs(1))
            onnx_path = Path(tmp) / f"{name}.onnx"
            export_onnx(model, spec.example_inputs(1), spec.input_names, onnx_path)
            from_onnx = reshift.frontend.from_onnx(onnx_path)
            seconds = time.perf_counter() - start
            session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
            for batch in (1, 4):
                inputs = spec.example_inputs(batch)
                with torch.no_grad():
                    expected = model(*inputs)
                expected = expected[0] if isinstance(expected, tuple) else expected
                feeds = {n: t.numpy() for n, t in zip(spec.input_names, inputs, strict=True)}
                got_torch = next(
                    iter(
                        reshift.ir.interpret(
                            from_torch, dict(zip([v.name for v in from_torch.inputs], feeds.values(), strict=True))
                        ).values()
                    )
                )
                got_onnx = next(iter(reshift.ir.interpret(from_onnx, feeds).values()))
                ort_out = session.run(None, feeds)[0]
                print(
                    f"{name:<22} {len(from_torch.op_histogram()):>4} {len(from_torch.nodes):>6} {batch:>5} "
                    f"{rel_err(got_torch, expected.numpy()):>18.1e} {rel_err(got_onnx, ort_out):>15.1e} {seconds:>9.1f}"
                )
    print("\nerrors are max|reshift - reference| / max|reference|; tolerance 1e-4 (1e-3 for gpt2 logits)")


if __name__ == "__main__":
    main()
