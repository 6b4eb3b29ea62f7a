"""Fixed per-call cost of a compiled model against onnxruntime: a one-Add model and the tiny wheel models.

    .venv/bin/python benchmarks/call_overhead.py [--wheels] [--kernels] [--rounds 7] [--threads 2]

For each model, interleaved in one process (``benchmarks.timing.interleaved``, ``--threads`` for both
runtimes), the median microseconds of: ``run_dict`` and ``__call__`` of the loaded artifact (input
checks, staging, VM call, output copies), the bare VM function on tensors made once (``vm``), and
``InferenceSession.run``. The Add model's rows are the floor: what a call costs when the kernel does
nothing. ``--kernels`` adds, per model, each kernel timed alone on the arguments the VM passed it
(captured once with the VM's instrument hook), and what the VM spends around them: the hook's own
timestamps inflate small entries (``profile_ops.py``), this does not.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def add_model(path: Path) -> Path:
    """``y = x + 1`` on ``f32[1, 512]`` as an ONNX file."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 512])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 512])
    one = helper.make_tensor("one", TensorProto.FLOAT, [1, 512], np.ones(512, np.float32))
    graph = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"])], "add", [x], [y], [one])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def cases(work: Path, wheels: bool) -> list[tuple[str, Path, dict, dict]]:
    """``(name, onnx path, reshift feeds, onnxruntime feeds)``; wheel inputs with fixed values are frozen."""
    found = [("add", add_model(work / "add.onnx"), *([{"x": np.random.rand(1, 512).astype(np.float32)}] * 2))]
    if wheels:
        from benchmarks import wheel_models

        for model in wheel_models.MODELS:
            if model.name.endswith(("_op15", "_openvino_16k", "_cls_infer")):
                feeds = wheel_models.feeds_for(model)
                mine = {k: v for k, v in feeds.items() if k not in model.constants}
                found.append((model.name, wheel_models.fetch(model), mine, feeds))
    return found


def kernel_times(loaded, feeds: dict, calls: int = 300) -> tuple[float, list[tuple[float, str]]]:
    """(VM call us, [(us, kernel)] slowest first): each kernel alone on the arguments the VM gave it."""
    tensors = [loaded._stage(i, x) for i, x in enumerate(loaded.bind((), feeds))]
    captured = []

    def instrument(func, symbol, before_run, _ret, *args):
        if before_run and not symbol.startswith("vm."):
            captured.append((symbol, func, list(args)))
        return 0

    loaded._vm.set_instrument(instrument)
    try:
        loaded._main(*tensors)
    finally:
        loaded._vm.set_instrument(None)

    def per_call(fn) -> float:
        """Median us of one call: on a shared host the mean is mostly the calls that lost their core."""
        settle = time.perf_counter()
        while time.perf_counter() - settle < 0.2:  # onnxruntime's pool threads spin on after its calls
            fn()
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return float(np.median(times)) * 1e6

    total = per_call(lambda: loaded._main(*tensors))
    rows = [(per_call(lambda f=func, a=args: f(*a)), symbol) for symbol, func, args in captured]
    return total, sorted(rows, reverse=True)


def measure(name: str, path: Path, feeds: dict, ort_feeds: dict, out: Path, args) -> None:
    """Compile ``path`` into ``out``, then print its interleaved timings (and kernels with ``--kernels``)."""
    import onnxruntime as ort

    import reshift
    from benchmarks import wheel_models
    from benchmarks.timing import interleaved

    frontend = {}
    if name != "add":
        model = next(m for m in wheel_models.MODELS if m.name == name)
        frontend = {"input_shapes": model.input_shapes, "input_values": model.constants or None}
    reshift.compile(str(path), target="cpu", **{k: v for k, v in frontend.items() if v}).save(out)
    loaded = reshift.load(out)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    positional = [feeds[n] for n in loaded.input_names]
    tensors = [loaded._stage(i, x) for i, x in enumerate(positional)]
    runners = {
        "run_dict": lambda: loaded.run_dict(feeds),
        "call": lambda: loaded(*positional),
        "vm": lambda: loaded._main(*tensors),
        "onnxruntime": lambda: session.run(None, ort_feeds),
    }
    us = {k: v * 1e3 for k, v in interleaved(runners, rounds=args.rounds, block=20).items()}
    cells = "  ".join(f"{k} {v:8.1f}" for k, v in us.items())
    print(f"{name:48s} us: {cells}  run_dict/onnxruntime {us['run_dict'] / us['onnxruntime']:.2f}", flush=True)
    if args.kernels:
        total, rows = kernel_times(loaded, feeds)
        spent = sum(t for t, _ in rows)
        print(f"  VM call {total:.1f} us: {len(rows)} kernels {spent:.1f} us, around them {total - spent:.1f} us")
        for t, symbol in rows[:8]:
            print(f"    {t:8.2f} us  {symbol}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheels", action="store_true", help="also silero VAD (2 kinds) and PP-OCR cls")
    parser.add_argument("--kernels", action="store_true", help="per-kernel times and the VM's share")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.threads} threads each")
    with tempfile.TemporaryDirectory() as tmp:
        for name, path, feeds, ort_feeds in cases(Path(tmp), args.wheels):
            measure(name, path, feeds, ort_feeds, Path(tmp) / name.replace("/", "__"), args)


if __name__ == "__main__":
    main()
