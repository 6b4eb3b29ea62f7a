"""Per-kernel time of one reference model compiled for the CPU (reshift's default schedules).

    .venv/bin/python benchmarks/profile_ops.py resnet18 [--threads 1] [--batch 1] [--pipeline shift] [--group]

Prints the median-free mean latency of the whole call and, from the VM's instrument hook
(``cuda_check.kernel_profile``), each kernel's and VM builtin's mean time per run, slowest first.
The hook costs a Python call per VM instruction, so small entries are inflated (VM builtins most:
their arguments are converted between the timestamps); one thread gives the steadiest figures on a
shared host. ``call_overhead.py --kernels`` times each kernel alone on the VM's arguments instead.
``RESHIFT_CONV=pixel|ocvec`` forces a conv kernel. ``--group`` adds the kernels up by family (the
name without TVM's numeric suffix, ``shift_conv2d_codes3`` -> ``shift_conv2d_codes``) with call counts.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a name from examples.models.MODELS")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--pipeline",
        default="exact",
        help="e.g. exact+w8a8 (as e2e.py compiles it): the lossy kernels' share of the time; w8a8 alone "
        "skips the exact passes (no BN folding or branch fusion)",
    )
    parser.add_argument(
        "--calib",
        type=int,
        default=None,
        help="calibration batches from the example inputs (default 2 for w*a* pipelines)",
    )
    parser.add_argument("--group", action="store_true", help="also sum the kernels by family, with call counts")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when tvm starts its thread pool

    from cuda_check import kernel_profile

    import reshift
    from examples.models import MODELS

    spec = MODELS[args.model]
    inputs = spec.example_inputs(args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        n_calib = args.calib if args.calib is not None else (2 if "a" in args.pipeline.split("_")[0][1:] else 0)
        graph = reshift.frontend.from_torch(spec.build(), inputs)
        names = [v.name for v in graph.inputs]
        calib = [
            dict(zip(names, (t.numpy() for t in spec.example_inputs(args.batch)), strict=True)) for _ in range(n_calib)
        ]
        reshift.compile(graph, target="cpu", pipeline=args.pipeline, calibration=calib or None).save(tmp)
        model = reshift.load(tmp)
        tensors = [model._to_tvm(t.numpy()) for t in inputs]
        for _ in range(5):
            model._main(*tensors)
        start = time.perf_counter()
        for _ in range(20):
            model._main(*tensors)
        total = (time.perf_counter() - start) / 20 * 1e3
        profile = kernel_profile(model, tensors, None, runs=20)
    print(
        f"{args.model} ({args.pipeline}) batch {args.batch}, {args.threads} thread(s): {total:.2f} ms per run "
        f"(sum of instrumented calls {sum(ms for _, ms in profile):.2f} ms)"
    )
    for symbol, ms in profile[: args.top]:
        print(f"  {symbol:50s} {ms:8.3f} ms")
    if args.group:
        families: dict[str, list[float]] = {}
        for symbol, ms in profile:
            families.setdefault(re.sub(r"_?\d+$", "", symbol), []).append(ms)
        print("by family (ms per run, kernels):")
        for family, times in sorted(families.items(), key=lambda kv: -sum(kv[1])):
            print(f"  {family:50s} {sum(times):8.3f} ms  x{len(times)}")


if __name__ == "__main__":
    main()
