"""Timing several runtimes in one process on a small shared host, fairly.

Each runtime keeps its own, strongest, threading settings, and several of them leave threads
spinning after a call (onnxruntime's intra-op pool, torch's OpenMP, TVM's pool): the next runner's
first calls then lose cores to them. Rounds therefore visit every runner in turn, and each runner
first runs untimed until its calls have taken ``settle_ms`` (at least one call), so the others'
spinners have gone to sleep; then ``block`` calls are timed. 200 ms, because less was seen to be
too little: MiniLM (2.5 ms a call) measured 10-12 ms in onnxruntime right after torch.compile's
runner with 20 ms of settling, 2.6 ms with 200 ms, 2.5 ms in a process of its own. Noise from the rest of the machine
hits every runner alike; the median per runner is reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def interleaved(
    runners: dict[str, Callable[[], object]], rounds: int, block: int = 3, warmup: int = 2, settle_ms: float = 200.0
) -> dict[str, float]:
    """Median milliseconds per call of each runner (see the module docstring)."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            while (time.perf_counter() - start) * 1e3 < settle_ms:
                fn()
            for _ in range(block):
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: float(np.median(t)) for name, t in times.items()}
