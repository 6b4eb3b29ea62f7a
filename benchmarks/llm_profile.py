"""Where one decode step of an LLM artifact goes: milliseconds per kernel, per call kind, per step.

    .venv/bin/python benchmarks/llm_profile.py ARTIFACT_DIR              # an artifact from reshift.llm.compile
    .venv/bin/python benchmarks/llm_profile.py --model HF_DIR --pipeline bcq --bits 3 --lm-head --out DIR

The artifact is loaded with the runtime (``reshift.llm.load``), a ``--prompt``-token prompt is
prefilled, then ``--steps`` decode steps are timed twice: plain (the step time the benchmark sees)
and with the Relax VM's instrument hook (``VirtualMachine.set_instrument``), which times every call
the VM makes (each kernel, each builtin) between its before and after callbacks. Kernels are grouped
by name with the layer index dropped (``attention_l3`` -> ``attention``), BCQ GEMVs by their output
width (which names the fused linear: qkv, o, gate_up, down, lm_head). The rest of the plain step
(its time minus the summed kernel times) is the VM's own per-call overhead. Weights are as cold as
in generation: each layer's are read once per step (the model should exceed the last-level cache).
Threads: ``--threads`` (TVM_NUM_THREADS, default 2); the CPU and load average are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def group_name(symbol: str, args: tuple) -> str:
    """A kernel's group: its symbol without a layer index; a GEMV or GEMM with its output width."""
    name = re.sub(r"_l\d+$", "", symbol)
    name = re.sub(r"\d+$", "", name) if not name.startswith("vm.") else name
    if "gemv" in name or "dense" in name or "gemm" in name:
        shapes = [tuple(a.shape) for a in args if hasattr(a, "shape")]
        if shapes:
            name += f" [{shapes[-1][-1]}]"
    return name


def profile(path: str, prompt: int, steps: int) -> dict:
    import numpy as np

    import reshift.llm

    llm = reshift.llm.load(path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, llm.vocab_size, prompt).astype(np.int32)

    def run_steps(n: int) -> list[float]:
        llm.prefill(ids)
        times = []
        token = 1
        for _ in range(n):
            t0 = time.perf_counter()
            logits = llm.decode(token)
            times.append(time.perf_counter() - t0)
            token = int(np.argmax(logits))
        return times

    run_steps(2)  # warm up code and allocator
    plain = run_steps(steps)
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    started: list[float] = []

    def instrument(func, symbol, before, ret, *args):
        if before:
            started.append(time.perf_counter())
        else:
            t = time.perf_counter() - started.pop()
            key = group_name(str(symbol), args)
            totals[key] += t
            calls[key] += 1
        return 0

    import tvm

    llm._vm.set_instrument(tvm.runtime.convert(instrument))
    llm.prefill(ids)
    totals.clear()
    calls.clear()
    token = 1
    t0 = time.perf_counter()
    for _ in range(steps):
        token = int(np.argmax(llm.decode(token)))
    instrumented = (time.perf_counter() - t0) / steps
    llm._vm.set_instrument(None)
    step = float(np.median(plain))
    kernels = {k: (totals[k] / steps * 1e3, calls[k] / steps) for k in totals}
    return {"step_ms": step * 1e3, "instrumented_step_ms": instrumented * 1e3, "kernels": kernels}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", nargs="?", help="an LLM artifact directory")
    ap.add_argument("--model", help="compile this HF directory first (into --out)")
    ap.add_argument("--out", help="where --model is compiled to")
    ap.add_argument("--pipeline", default="bcq")
    ap.add_argument("--bits", type=float, default=3)
    ap.add_argument("--lm-head", action="store_true")
    ap.add_argument("--decode-lut", choices=["float32", "int8"], help="the decode GEMV's tables (default: compiler's)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", default="2")
    ap.add_argument("--json", help="write the breakdown here")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = args.threads
    path = args.artifact
    if args.model:
        import reshift.llm

        bits = int(args.bits) if args.bits == int(args.bits) else args.bits
        t0 = time.perf_counter()
        reshift.llm.compile(args.model, pipeline=args.pipeline, bits=bits, max_seq_len=512, out_dir=args.out,
                            quantize_lm_head=args.lm_head, decode_lut=args.decode_lut)  # fmt: skip
        print(f"compiled {args.model} -> {args.out} in {time.perf_counter() - t0:.0f} s")
        path = args.out
    from reshift.codegen.tvm import describe_host_cpu

    load0 = os.getloadavg()[0]
    r = profile(path, args.prompt, args.steps)
    meta = json.loads((Path(path) / "llm.json").read_text())
    print(f"CPU: {describe_host_cpu()}  threads {args.threads}  load {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"artifact {path}: {meta['spec']['num_layers']} layers, pipeline {meta['pipeline']}, bits {meta['bits']}")
    step, traced = r["step_ms"], r["instrumented_step_ms"]
    print(f"decode step {step:.2f} ms ({1e3 / step:.1f} tok/s); traced {traced:.2f} ms; LUT {meta.get('decode_lut')}")
    print(f"{'kernel':<34} {'calls/step':>10} {'ms/step':>8} {'% step':>7} {'us/call':>8}")
    total = 0.0
    for k, (ms, n) in sorted(r["kernels"].items(), key=lambda kv: -kv[1][0]):
        total += ms
        print(f"{k:<34} {n:>10.0f} {ms:>8.3f} {100 * ms / r['step_ms']:>6.1f}% {1e3 * ms / n:>8.1f}")
    print(f"{'sum of calls':<34} {'':>10} {total:>8.3f} {100 * total / r['step_ms']:>6.1f}%")
    print(f"{'step - sum (VM overhead)':<34} {'':>10} {r['step_ms'] - total:>8.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({**r, "artifact": path, "load": load0}, indent=1))


if __name__ == "__main__":
    main()
