"""int8 kernels alone against the fp32 kernels they replace: one layer per graph, same process, interleaved.

    .venv/bin/python benchmarks/int8_kernels.py [--threads 2] [--rounds 10] [--batches 1 8]

Each row builds two one-node graphs with random weights, ``linear`` / ``conv2d`` (reshift fp32,
``pipeline="none"``) and ``int8_linear`` / ``int8_conv2d`` (per-row or per-tensor activations,
per-channel int8 weights), and times both through the compiled module (``benchmarks/timing.py``,
interleaved rounds), so each ratio includes the int8 path's quantize prologue and rescale. Layer
shapes are ViT-S/16 and MiniLM linears and ResNet-18 convs. Prints the CPU, the load average, the
table; writes JSON + txt under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

LINEARS = {  # name: (rows per batch element, K, O)
    "vit_qkv": (197, 384, 1152),
    "vit_fc1": (197, 384, 1536),
    "vit_fc2": (197, 1536, 384),
    "minilm_fc1": (32, 384, 1536),
    "minilm_fc2": (32, 1536, 384),
}
CONVS = {  # name: (C, O, H, kernel, stride)
    "r18_l1_3x3": (64, 64, 56, 3, 1),
    "r18_l2_3x3s2": (64, 128, 56, 3, 2),
    "r18_l2_3x3": (128, 128, 28, 3, 1),
    "r18_l3_3x3": (256, 256, 14, 3, 1),
    "r18_l4_3x3": (512, 512, 7, 3, 1),
    "r18_l3_1x1s2": (128, 256, 28, 1, 2),
}


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def linear_pair(rng, k: int, out: int, granularity: str):
    from reshift.ir.builder import GraphBuilder

    w = (rng.standard_normal((out, k)) * 0.05).astype(np.float32)
    bias = rng.standard_normal(out).astype(np.float32)
    b = GraphBuilder("fp32")
    b_x = b.input("x", f"f32[N,{k}]")
    fp32 = b.build(b.linear(b_x, b.constant(w), b.constant(bias)))
    b = GraphBuilder("int8")
    b_x = b.input("x", f"f32[N,{k}]")
    codes = rng.integers(-127, 128, (out, k)).astype(np.int8)
    y = b.int8_linear(
        b_x,
        b.constant(codes),
        b.constant(np.full(out, 1e-3, np.float32)),
        b.constant(bias),
        x_scale=0.02,
        x_zero_point=128,
        x_granularity=granularity,
    )
    return fp32, b.build(y)


def conv_pair(rng, c: int, out: int, h: int, kernel: int, stride: int):
    from reshift.ir.builder import GraphBuilder

    pad = (kernel // 2,) * 4
    w = (rng.standard_normal((out, c, kernel, kernel)) * 0.05).astype(np.float32)
    bias = rng.standard_normal(out).astype(np.float32)
    b = GraphBuilder("fp32")
    b_x = b.input("x", f"f32[N,{c},{h},{h}]")
    fp32 = b.build(b.conv2d(b_x, b.constant(w), b.constant(bias), stride=(stride, stride), padding=pad))
    b = GraphBuilder("int8")
    b_x = b.input("x", f"f32[N,{c},{h},{h}]")
    codes = rng.integers(-127, 128, w.shape).astype(np.int8)
    y = b.int8_conv2d(
        b_x,
        b.constant(codes),
        b.constant(np.full(out, 1e-3, np.float32)),
        b.constant(bias),
        stride=(stride, stride),
        padding=pad,
        x_scale=0.02,
        x_zero_point=128,
    )
    return fp32, b.build(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    from timing import interleaved

    import reshift
    from reshift.codegen.tvm import describe_host_cpu

    rng = np.random.default_rng(0)
    print(f"host: {describe_host_cpu()}; {args.threads} threads; load {_load()}", flush=True)
    rows = []
    layers = [("linear", n, s) for n, s in LINEARS.items()] + [("conv", n, s) for n, s in CONVS.items()]
    for kind, name, shape in layers:
        for granularity in ("row", "tensor") if kind == "linear" else ("tensor",):
            if kind == "linear":
                fp32, int8 = linear_pair(rng, shape[1], shape[2], granularity)
            else:
                fp32, int8 = conv_pair(rng, *shape)
            built = {label: reshift.compile(g, pipeline="none") for label, g in (("fp32", fp32), ("int8", int8))}
            for batch in args.batches:
                if kind == "linear":
                    x = rng.standard_normal((batch * shape[0], shape[1])).astype(np.float32)
                else:
                    x = rng.standard_normal((batch, shape[0], shape[2], shape[2])).astype(np.float32)
                ms = interleaved({k: (lambda m=m, x=x: m(x)) for k, m in built.items()}, args.rounds, settle_ms=50.0)
                row = {
                    "layer": name,
                    "kind": kind,
                    "shape": list(shape),
                    "activations": granularity,
                    "batch": batch,
                    "fp32_ms": ms["fp32"],
                    "int8_ms": ms["int8"],
                    "speedup": ms["fp32"] / ms["int8"],
                }
                rows.append(row)
                print(
                    f"{name:14s} A/{granularity:6s} batch {batch}: fp32 {ms['fp32']:8.3f} ms  int8 {ms['int8']:8.3f} ms"
                    f"  int8 {row['speedup']:.2f}x faster",
                    flush=True,
                )
    print(f"end load {_load()}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {"host": describe_host_cpu(), "threads": args.threads, "load_end": _load(), "rows": rows}
    (out / f"int8_kernels-{stamp}.json").write_text(json.dumps(meta, indent=1))
    lines = [f"{r['layer']} A/{r['activations']} b{r['batch']}: {r['speedup']:.2f}x" for r in rows]
    (out / f"int8_kernels-{stamp}.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
