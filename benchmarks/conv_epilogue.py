"""Residual add + ReLU in the fp32 conv kernels' epilogue vs as separate ops, on ResNet-18.

    .venv/bin/python benchmarks/conv_epilogue.py [--threads 2] [--batches 1 8] [--rounds 10]

Builds ResNet-18 (``examples.models``) twice in one process, with the block-end ``add`` (and its
ReLU) computed by the ocvec / Winograd kernel that produces the conv output, and with
``RESHIFT_CONV_RESIDUAL=0`` (the add a separate op), checks the two outputs are bit-identical and
times them interleaved (``timing.interleaved``). Prints the host CPU, the threads and the ratio,
and writes ``results/conv_epilogue-<stamp>.txt``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before tvm starts its pool

    import numpy as np
    import torch
    from timing import interleaved

    import reshift
    from examples.models import image_inputs, resnet18
    from reshift.codegen.tvm import describe_host_cpu

    torch.set_num_threads(args.threads)
    model = resnet18().eval()
    lines = [
        f"host: {describe_host_cpu()}; threads {args.threads}; median of {args.rounds} interleaved rounds x 3 calls;"
        f" load average at start {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
        "| batch | fused ms | separate add ms | fused / separate | bit-identical |",
        "|---|---|---|---|---|",
    ]
    for batch in args.batches:
        x = image_inputs(batch, 224)[0].numpy()
        fused = reshift.compile(model, (torch.from_numpy(x),))
        os.environ["RESHIFT_CONV_RESIDUAL"] = "0"
        try:
            separate = reshift.compile(model, (torch.from_numpy(x),))
        finally:
            del os.environ["RESHIFT_CONV_RESIDUAL"]
        same = bool(np.array_equal(np.asarray(fused(x)), np.asarray(separate(x))))
        runners = {"fused": functools.partial(fused, x), "separate": functools.partial(separate, x)}
        ms = interleaved(runners, rounds=args.rounds)
        ratio = ms["fused"] / ms["separate"]
        lines.append(f"| {batch} | {ms['fused']:.2f} | {ms['separate']:.2f} | {ratio:.3f} | {same} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out) / f"conv_epilogue-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
