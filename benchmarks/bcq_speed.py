"""How fast ``passes.bcq.fit_bcq`` quantizes one layer, and how good the fit is (issue #16, item 4).

Times :func:`reshift.passes.bcq.fit_bcq` on a random float32 weight ``[O, K]`` (rows ~ N(0, 1/K))
for q = 2, 3, 4, weight-only and calibrated on ``M`` rows of LLM-like activations (correlated
channels with a few 20x outlier channels, as after a LayerNorm in an LLM). Threads are pinned
(2 by default: OMP/OpenBLAS/MKL env before numpy is imported, and threadpoolctl when installed).
For each fit it prints the seconds, the output objective ``||X (W - W_hat)^T||_F / ||X W^T||_F``
(what the calibrated fit minimizes) and the weight error ``||W - W_hat||_F / ||W||_F``; at the end
the peak RSS of the process. ``cpu s`` is the process CPU time (all threads): on a machine other
jobs share, ``cpu s / threads`` is closer to the unloaded wall time than ``seconds``.

``--reference FILE`` times another implementation of ``fit_bcq`` (a file with the same API), e.g.
the one before the vectorized fit::

    git show dd67a5ff:passes/bcq.py > /tmp/bcq_ref.py
    .venv/bin/python benchmarks/bcq_speed.py --reference /tmp/bcq_ref.py --shapes 1024x1024

    .venv/bin/python benchmarks/bcq_speed.py                     # 4096x4096, q=2,3,4, M=0,64,512
    .venv/bin/python benchmarks/bcq_speed.py --shapes 2048x2048,4096x11008 --q 3 --rows 0,512
"""

from __future__ import annotations

import argparse
import os
import sys

THREADS = "2"
for _arg, _next in zip(sys.argv, sys.argv[1:], strict=False):
    if _arg == "--threads":
        THREADS = _next
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = THREADS

import importlib.util  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def activations(rng: np.random.Generator, rows: int, k: int, outliers: int = 8) -> np.ndarray:
    """LLM-like calibration rows ``[rows, K]``: channels mixed through a random low-rank-ish map
    with log-normal channel scales, plus ``outliers`` channels 20x larger than the rest."""
    rank = min(k, 256)
    mix = rng.standard_normal((rank, k)).astype(np.float32) / np.sqrt(rank)
    x = rng.standard_normal((rows, rank)).astype(np.float32) @ mix + 0.3 * rng.standard_normal((rows, k))
    x *= np.exp(0.5 * rng.standard_normal(k)).astype(np.float32)
    x[:, rng.choice(k, size=min(outliers, k), replace=False)] *= 20.0
    return x.astype(np.float32)


def load_fit(reference: str | None):
    if reference is None:
        from reshift.passes.bcq import fit_bcq

        return fit_bcq
    spec = importlib.util.spec_from_file_location("bcq_reference", reference)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.fit_bcq


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="4096x4096", help="comma-separated OxK weight shapes")
    parser.add_argument("--q", default="2,3,4", help="comma-separated bit planes")
    parser.add_argument("--rows", default="0,64,512", help="calibration rows per fit (0: weight-only)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--threads", default=THREADS, help="BLAS/OpenMP threads (default 2)")
    parser.add_argument("--reference", help="a file defining fit_bcq to time instead of reshift's")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(int(args.threads))
    except ImportError:
        pass
    fit_bcq = load_fit(args.reference)
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    qs = [int(q) for q in args.q.split(",")]
    row_counts = [int(r) for r in args.rows.split(",")]
    impl = args.reference or "reshift.passes.bcq"
    print(f"fit_bcq from {impl}, {args.threads} threads, group size {args.group_size}")
    print(f"{'shape':>11} {'q':>2} {'rows':>5} {'seconds':>8} {'cpu s':>8} {'output err':>11} {'weight err':>11}")
    results = []
    for out, k in shapes:
        rng = np.random.default_rng(0)
        w = (rng.standard_normal((out, k)) / np.sqrt(k)).astype(np.float32)
        # always 512+ rows drawn, so a run's first M rows do not depend on the other --rows asked for
        x_all = activations(rng, max(512, *row_counts), k)
        w64 = w.astype(np.float64)
        for rows in row_counts:
            x = x_all[:rows] if rows else None
            # the objective is measured on the calibration rows (or, weight-only, on 512 such rows)
            x_eval = (x if rows else activations(np.random.default_rng(1), 512, k)).astype(np.float64)
            ref = np.linalg.norm(x_eval @ w64.T)
            for q in qs:
                start, cpu_start = time.perf_counter(), time.process_time()
                fit = fit_bcq(w, q, args.group_size, x=x)
                seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
                diff = w64 - fit.weight(args.group_size)
                row = {
                    "shape": f"{out}x{k}",
                    "q": q,
                    "rows": rows,
                    "seconds": round(seconds, 3),
                    "cpu_seconds": round(cpu, 3),
                    "output_error": float(np.linalg.norm(x_eval @ diff.T) / ref),
                    "weight_error": float(np.linalg.norm(diff) / np.linalg.norm(w64)),
                }
                results.append(row)
                print(
                    f"{row['shape']:>11} {q:>2} {rows:>5} {seconds:>8.2f} {cpu:>8.2f} {row['output_error']:>11.5f}"
                    f" {row['weight_error']:>11.5f}",
                    flush=True,
                )
    print(f"peak RSS {peak_rss_mib():.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"impl": impl, "threads": args.threads, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
