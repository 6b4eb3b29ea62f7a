"""Binary-code attention (ShiftAddViT) vs reshift's fp32 softmax attention, ViT-S/16 heads (6 x 64).

At 197, 785 and 3137 tokens (224, 448 and 896 px), batch 1 and 8, two threads: the graph
``softmax(q k^T / 8) v`` compiled by reshift, and the same graph after the ``binary_attention``
pass (hash projections fitted on one calibration batch, 16 bits), which is what the pipeline
builds: two float hash projections (``matmul``), the key offset (``add``) and the
``binary_attention`` kernel. Both take q, k, v ``[N, 6, T, 64]``; one build per length serves both
batches. Prints the CPU, the load, per row the median ms of each and the speed-up, the fraction of
multiplications removed and the output error against softmax attention on the calibration batch.

    flock /tmp/reshift_big.lock .venv/bin/python benchmarks/binary_attention.py [--tokens 197,785,3137] [--batches 1,8]

``section(tokens, batches)`` returns the rows, for ``benchmarks/shiftadd_vit.py`` to include.
Targets (issue #18): faster than fp32 attention at every length, >= 3x at 3137 tokens.
"""

from __future__ import annotations

import os

os.environ["TVM_NUM_THREADS"] = "2"
os.environ.setdefault("OMP_NUM_THREADS", "2")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import interleaved  # noqa: E402

import reshift  # noqa: E402
from reshift import passes  # noqa: E402
from reshift.codegen.tvm import describe_host_cpu  # noqa: E402
from reshift.ir.builder import GraphBuilder  # noqa: E402

HEADS, DIM, BITS = 6, 64, 16
RESULTS = Path(__file__).resolve().parent / "results"
TARGET_LONG = 3.0


def softmax_attention(tokens: int):
    b = GraphBuilder(f"attention_{tokens}")
    q, k, v = (b.input(n, f"f32[N,{HEADS},{tokens},{DIM}]") for n in "qkv")
    scores = b.mul(b.matmul(q, b.transpose(k, perm=[0, 1, 3, 2])), b.constant(np.float32(DIM**-0.5)))
    return b.build(b.matmul(b.softmax(scores, axis=-1), v))


def _inputs(rng, batch: int, tokens: int) -> list[np.ndarray]:
    return [rng.standard_normal((batch, HEADS, tokens, DIM)).astype(np.float32) for _ in range(3)]


def section(tokens_list=(197, 785, 3137), batches=(1, 8), rounds: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for tokens in tokens_list:
        g = softmax_attention(tokens)
        calib = [dict(zip("qkv", _inputs(rng, 1, tokens), strict=True))]
        g2, report = passes.run(g, "binary_attention", calibration=calib, hash_bits=BITS)
        (detail,) = report.details.values()
        fp32, binary = reshift.compile(g, pipeline="none"), reshift.compile(g2, pipeline="none")
        for batch in batches:
            q, k, v = _inputs(rng, batch, tokens)
            slow = tokens * tokens * batch > 20_000_000
            ms = interleaved(
                {"fp32": lambda f=fp32, x=(q, k, v): f(*x), "binary": lambda f=binary, x=(q, k, v): f(*x)},
                rounds=1 if slow else rounds,
                block=2 if slow else 3,
                warmup=1,
                settle_ms=0 if slow else 200,
            )
            rows.append(
                {
                    "tokens": tokens,
                    "batch": batch,
                    "fp32_ms": ms["fp32"],
                    "binary_ms": ms["binary"],
                    "speedup": ms["fp32"] / ms["binary"],
                    "mults_removed": detail["mults_removed"],
                    "output_error": detail["output_error"],
                    "init": detail["init"],
                    "load": os.getloadavg()[0],
                }
            )
            print(_line(rows[-1]), flush=True)
    return rows


HEADER = (
    f"{'tokens':>6} {'batch':>5} {'fp32 ms':>10} {'binary ms':>10} {'speed-up':>9} {'mults removed':>14} "
    f"{'out err':>8} {'load':>5}"
)


def _line(r: dict) -> str:
    verdict = "" if r["speedup"] > 1 else "  SLOWER than fp32"
    return (
        f"{r['tokens']:>6} {r['batch']:>5} {r['fp32_ms']:>10.3f} {r['binary_ms']:>10.3f} {r['speedup']:>8.2f}x "
        f"{r['mults_removed']:>13.1%} {r['output_error']:>8.2f} {r['load']:>5.1f}{verdict}"
    )


def verdicts(rows: list[dict]) -> list[str]:
    lines = []
    every = all(r["speedup"] > 1 for r in rows)
    lines.append(f"target: faster than fp32 attention at every length and batch: {'met' if every else 'MISSED'}")
    for r in (r for r in rows if r["tokens"] == 3137):
        met = "met" if r["speedup"] >= TARGET_LONG else "MISSED"
        lines.append(f"target: >= {TARGET_LONG:.0f}x at 3137 tokens, batch {r['batch']}: {r['speedup']:.1f}x {met}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="197,785,3137")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    head = [
        f"cpu: {describe_host_cpu()}",
        f"threads: 2 (TVM_NUM_THREADS); load before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"ViT-S/16 attention: {HEADS} heads x {DIM} dims, q k v inputs; binary: {BITS}-bit codes",
        "out err: relative error of the post-training code form against softmax attention on the calibration batch",
        "(random q/k/v: peaked softmax, so large; recovery fine-tuning is what closes it)",
        HEADER,
    ]
    print("\n".join(head), flush=True)
    rows = section(
        [int(t) for t in args.tokens.split(",")], [int(b) for b in args.batches.split(",")], rounds=args.rounds
    )
    tail = verdicts(rows) + [
        f"load after: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (timings under load are noisy)"
    ]
    print("\n".join(tail))
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    text = "\n".join(head + [_line(r) for r in rows] + tail) + "\n"
    (RESULTS / f"binary_attention-{stamp}.txt").write_text(text)
    meta = {"cpu": describe_host_cpu(), "heads": HEADS, "dim": DIM, "bits": BITS, "threads": 2}
    (RESULTS / f"binary_attention-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {RESULTS}/binary_attention-{stamp}.txt and .json")


if __name__ == "__main__":
    main()
