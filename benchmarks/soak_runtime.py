"""Soak test of the runtime: one loaded artifact called 10,000 times; RSS must stay flat past warm-up.

    .venv/bin/python benchmarks/soak_runtime.py                    # a small MLP compiled here
    .venv/bin/python benchmarks/soak_runtime.py --artifact OUT_DIR --calls 10000 --threads 4

Each mode (numpy in/out, torch in/out through DLPack, ``run_dict``; and the same numpy calls spread
over ``--threads`` threads) warms up, then makes ``--calls`` calls, printing the resident set size
every tenth of the way. A leak (tensors or DLPack capsules kept alive per call) shows as steady
growth; the script exits 1 when any mode grows more than ``--max-growth-mb`` past warm-up.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def build_small_mlp(directory: Path) -> Path:
    """A 64 -> 256 -> 64 MLP with a symbolic batch, compiled for the host CPU, saved to ``directory``."""
    import reshift
    from reshift import ir

    rng = np.random.default_rng(0)
    b = ir.GraphBuilder("soak_mlp")
    x = b.input("x", "f32[N,64]")
    w1, b1 = (b.constant(rng.standard_normal(s).astype(np.float32)) for s in ((256, 64), (256,)))
    w2, b2 = (b.constant(rng.standard_normal(s).astype(np.float32)) for s in ((64, 256), (64,)))
    graph = b.build(b.linear(b.relu(b.linear(x, w1, b1)), w2, b2))
    return reshift.compile(graph, pipeline="none").save(directory)


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def soak(name: str, call: Callable[[], object], calls: int, warmup: int, threads: int = 1) -> float:
    """Run ``call`` ``calls`` times (split over ``threads``) after ``warmup`` calls; print RSS; the growth in MB.

    The warm-up runs on threads too: a thread's first calls allocate its malloc arena and TVM's
    per-thread state once, which is not a per-call leak.
    """
    run_threads(call, warmup, threads)
    start_mb, t0 = rss_mb(), time.perf_counter()
    print(f"{name}: after {warmup} warm-up calls RSS {start_mb:.1f} MB")
    step = max(1, calls // 10)
    done = 0
    while done < calls:
        chunk = min(step, calls - done)
        run_threads(call, chunk, threads)
        done += chunk
        print(f"  {done:>6} calls  RSS {rss_mb():8.1f} MB  ({rss_mb() - start_mb:+.2f})")
    growth = rss_mb() - start_mb
    per_call_us = (time.perf_counter() - t0) / calls * 1e6
    print(f"{name}: {calls} calls, {per_call_us:.1f} us/call, RSS growth {growth:+.2f} MB past warm-up")
    return growth


def run_threads(call: Callable[[], object], calls: int, threads: int) -> None:
    """``calls`` calls of ``call``, spread over ``threads`` threads (the caller's thread when 1)."""
    if threads <= 1:
        for _ in range(calls):
            call()
        return
    shares = [calls // threads + (k < calls % threads) for k in range(threads)]
    workers = [threading.Thread(target=lambda n=n: [call() for _ in range(n)]) for n in shares]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def modes(model, batch: int) -> dict[str, Callable[[], object]]:
    """The ways a user calls a LoadedModel: numpy, torch (DLPack, when torch is installed), run_dict."""
    from reshift.runtime.remote import random_inputs

    inputs = random_inputs(model.meta["inputs"], batch)
    found: dict[str, Callable[[], object]] = {"numpy": lambda: model(**inputs)}
    try:
        import torch

        tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
        found["torch"] = lambda: model(**tensors)
    except ImportError:
        pass
    found["run_dict"] = lambda: model.run_dict(inputs)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", help="artifact directory (default: a small MLP compiled here)")
    parser.add_argument("--calls", type=int, default=10_000, help="calls per mode after warm-up (default: 10000)")
    parser.add_argument("--warmup", type=int, default=500, help="untimed calls first (default: 500)")
    parser.add_argument("--batch", type=int, default=8, help="batch for a symbolic batch dim (default: 8)")
    parser.add_argument("--threads", type=int, default=4, help="threads of the threaded numpy mode (default: 4)")
    parser.add_argument("--max-growth-mb", type=float, default=8.0, help="fail above this growth (default: 8)")
    args = parser.parse_args()

    import reshift

    with tempfile.TemporaryDirectory(prefix="reshift-soak-") as tmp:
        directory = Path(args.artifact) if args.artifact else build_small_mlp(Path(tmp) / "soak_mlp")
        model = reshift.load(directory)
        print(f"{model!r}; process RSS after load {rss_mb():.1f} MB")
        growth = {name: soak(name, call, args.calls, args.warmup) for name, call in modes(model, args.batch).items()}
        numpy_call = modes(model, args.batch)["numpy"]
        threaded = f"numpy x{args.threads} threads"
        growth[threaded] = soak(threaded, numpy_call, args.calls, args.warmup, args.threads)
    print()
    for name, mb in growth.items():
        print(f"{name:<20} {mb:+8.2f} MB over {args.calls} calls")
    worst = max(growth.values())
    if worst > args.max_growth_mb:
        print(f"FAIL: RSS grew {worst:.2f} MB past warm-up (limit {args.max_growth_mb} MB)")
        return 1
    print(f"OK: RSS growth at most {worst:+.2f} MB past warm-up (limit {args.max_growth_mb} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
