"""Structural reparameterization end to end: training form vs reshift-fused vs hand-written deploy form.

For each model (RepVGG-A0, a RePaViT block stack, DeiT-S distilled) prints parameters, MACs and batch-1
median latency in torch eager, onnxruntime (ORT_ENABLE_ALL) and the reshift TVM artifact
(``reshift.compile(graph, target="cpu")``), every runtime pinned to the same thread count:

- train:  the training form (torch module / its ONNX export / reshift compiled from it: passes fuse it)
- fused:  reshift's ``exact`` pipeline output, exported with ``codegen.onnx.to_onnx`` for onnxruntime
- deploy: the hand-merged form (torch module / its ONNX export / reshift compiled from it)

    .venv/bin/python benchmarks/reparam.py [--quick] [--threads 2] [--repeat 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs/depths, fewer runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("models", nargs="*", default=["repvgg_a0", "repavit", "deit_s"])
    return parser.parse_args()


ARGS = _args()
os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)  # read when TVM's pool starts
os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from timing import interleaved  # noqa: E402

import reshift  # noqa: E402
from examples.models.deit import deit_s_distilled  # noqa: E402
from examples.models.repavit import repavit_block  # noqa: E402
from examples.models.repvgg import repvgg_a0  # noqa: E402
from reshift import frontend, passes  # noqa: E402
from reshift.codegen.onnx import to_onnx  # noqa: E402
from reshift.codegen.tvm import describe_host_cpu  # noqa: E402
from reshift.ir.analysis import graph_macs  # noqa: E402


def models(quick: bool) -> dict:
    """name -> (train factory, deploy factory, example input)."""
    size = 112 if quick else 224
    depth = 2 if quick else 12
    gen = torch.Generator().manual_seed(0)
    return {
        "repvgg_a0": (repvgg_a0, lambda: repvgg_a0(deploy=True), torch.randn(1, 3, size, size, generator=gen)),
        "repavit": (
            lambda: repavit_block(depth=depth),
            lambda: repavit_block(depth=depth, deploy=True),
            torch.randn(1, 197, 384, generator=gen),
        ),
        "deit_s": (
            lambda: deit_s_distilled(depth=depth),
            lambda: deit_s_distilled(depth=depth, deploy=True),
            torch.randn(1, 3, 224, 224, generator=gen),
        ),
    }


def torch_call(module, x):
    with torch.no_grad():
        return module(x)


def ort_runner(path: Path, x: np.ndarray, threads: int):
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    return lambda: session.run(None, feed)


def row(name, graph, torch_ms, ort_ms, tvm_ms) -> str:
    params = sum(int(c.data.size) for c in graph.constants.values() if c.data.dtype.kind == "f")
    cell = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    convs = sum(graph.op_histogram().get(op, 0) for op in ("conv2d", "linear"))
    return (
        f"  {name:<7} {params / 1e6:>8.2f}M {graph_macs(graph) / 1e9:>8.3f}G {convs:>6} "
        f"{cell(torch_ms):>10} {cell(ort_ms):>10} {cell(tvm_ms):>10}"
    )


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    repeat = ARGS.repeat or (10 if ARGS.quick else 50)
    print(f"host: {describe_host_cpu()}")
    print(
        f"threads {ARGS.threads} (torch, onnxruntime, TVM), batch 1, median of {repeat} runs (timing.interleaved), ms"
    )
    tmp = Path(tempfile.mkdtemp(prefix="reshift_reparam_"))
    for name, (train_fn, deploy_fn, x) in models(ARGS.quick).items():
        if name not in ARGS.models:
            continue
        train, deploy = train_fn(), deploy_fn()
        xn = x.numpy()
        g_train = frontend.from_torch(train, (x,))
        g_deploy = frontend.from_torch(deploy, (x,))
        g_fused, _ = passes.run(g_train, "exact")
        paths = {k: tmp / f"{name}_{k}.onnx" for k in ("train", "fused", "deploy")}
        for key, module in (("train", train), ("deploy", deploy)):
            torch.onnx.export(module, (x,), str(paths[key]), input_names=["input"], opset_version=17, dynamo=False)
        to_onnx(g_fused, paths["fused"])
        runners, errors = {}, {}
        for key, module in (("train", train), ("deploy", deploy)):
            runners[f"torch {key}"] = lambda m=module, x=x: torch_call(m, x)
        for key in ("train", "fused", "deploy"):
            runners[f"ORT {key}"] = ort_runner(paths[key], xn, ARGS.threads)
        with torch.no_grad():
            ref = train(x).numpy()
        for key, graph in (("train", g_train), ("deploy", g_deploy)):  # reshift's passes fuse the training form
            compiled = reshift.compile(graph, target="cpu", pipeline="exact")
            out = compiled(xn)
            out = out[0] if isinstance(out, (list, tuple)) else out
            errors[key] = float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())
            runners[f"reshift {key}"] = lambda c=compiled, xn=xn: c(xn)
        ms = interleaved(runners, rounds=max(1, repeat // 5), block=5)
        graphs = {"train": g_train, "fused": g_fused, "deploy": g_deploy}
        results = {k: (graphs[k], ms.get(f"torch {k}"), ms[f"ORT {k}"], ms.get(f"reshift {k}")) for k in graphs}
        print(f"\n{name} (input {list(x.shape)})")
        print(f"  {'form':<7} {'params':>9} {'MACs':>9} {'#conv/linear':>6} {'torch':>10} {'ORT':>10} {'reshift':>10}")
        for key in ("train", "fused", "deploy"):
            print(row(key, *results[key]))
        print(
            f"  reshift artifact vs training-form torch output: max rel err {errors['train']:.1e} (from train),"
            f" {errors['deploy']:.1e} (from deploy)"
        )
        ratio = ms["reshift train"] / ms["ORT deploy"]
        verdict = "faster than" if ratio < 0.98 else "on par with (within 2% of)" if ratio <= 1.02 else "SLOWER than"
        print(
            f"  reshift from the training form / onnxruntime on the hand-written deploy form: {ratio:.2f}x "
            f"({verdict} it); / onnxruntime on the training form: {ms['reshift train'] / ms['ORT train']:.2f}x"
        )


if __name__ == "__main__":
    main()
