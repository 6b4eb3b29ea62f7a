"""Cross-compile a small Relax model for arm64, run it on an (emulated) device over TVM RPC, time it.

    python examples/edge/deploy.py --rpc 127.0.0.1:9090
    python examples/edge/deploy.py --tracker 127.0.0.1:9190 --key reshift-edge

The model is conv2d(3->8, 3x3, pad 1) + bias + relu on a 1x3x16x16 input; its numpy reference
is computed here, and the device's output must match it within 1e-4.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import tvm
from tvm import relax, rpc
from tvm.support import cc

ARM64_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
CROSS_CC = "aarch64-linux-gnu-gcc"  # Debian's gcc-aarch64-linux-gnu
IN_SHAPE = (1, 3, 16, 16)


def conv_relu_weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 3, 3, 3)).astype("float32")
    b = rng.standard_normal(8).astype("float32")
    return w, b


def conv_relu_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """numpy conv2d (stride 1, pad 1) + bias + relu, in float64."""
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(xp, w.shape[2:], axis=(2, 3))
    y = np.einsum("nchwij,ocij->nohw", windows, w.astype(np.float64))
    return np.maximum(y + b[None, :, None, None], 0.0)


def build_arm64_library(path: str | Path, seed: int = 0) -> Path:
    """Compile conv2d+relu for aarch64 (NEON) and link it into a shared library for the device."""
    w, b = conv_relu_weights(seed)
    op = relax.op
    x = relax.Var("x", relax.TensorType(IN_SHAPE, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(op.nn.conv2d(x, relax.const(w), strides=1, padding=1))
            y = bb.emit(op.add(y, op.reshape(relax.const(b), (1, 8, 1, 1))))
            y = bb.emit_output(op.nn.relu(y))
        bb.emit_func_output(y)
    ex = tvm.compile(bb.get(), tvm.target.Target(ARM64_TARGET))
    ex.export_library(str(path), fcompile=cc.cross_compiler(CROSS_CC))
    return Path(path)


def connect(rpc_addr: str | None = None, tracker: str | None = None, key: str | None = None):
    """A remote session: directly to HOST:PORT, or one device requested from a tracker by key."""
    if tracker:
        host, port = tracker.rsplit(":", 1)
        return rpc.connect_tracker(host, int(port)).request(key, session_timeout=120)
    host, port = (rpc_addr or "127.0.0.1:9090").rsplit(":", 1)
    return rpc.connect(host, int(port), session_timeout=120)


def run_remote(remote, lib_path: str | Path, x: np.ndarray, repeat: int = 3) -> dict:
    """Upload, load and run the library on the remote device; outputs and timings in seconds."""
    timings = {}
    t0 = time.perf_counter()
    remote.upload(str(lib_path))
    rexec = remote.load_module(Path(lib_path).name)
    timings["upload_load_s"] = time.perf_counter() - t0
    dev = remote.cpu()
    vm = relax.VirtualMachine(rexec, dev)
    x_remote = tvm.runtime.tensor(x, device=dev)
    t0 = time.perf_counter()
    y = vm["main"](x_remote).numpy()
    timings["first_run_s"] = time.perf_counter() - t0
    res = vm.time_evaluator("main", dev, number=10, repeat=repeat)(x_remote)
    timings["device_mean_s"] = res.mean
    timings["device_median_s"] = res.median
    workpath = remote.get_function("tvm.rpc.server.workpath")
    t0 = time.perf_counter()
    for _ in range(20):
        workpath("x")
    timings["rpc_round_trip_s"] = (time.perf_counter() - t0) / 20
    t0 = time.perf_counter()
    for _ in range(20):
        tvm.runtime.tensor(x, device=dev).numpy()
    timings["tensor_round_trip_s"] = (time.perf_counter() - t0) / 20
    return {"y": y, "timings": timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rpc", default="127.0.0.1:9090", help="HOST:PORT of the device")
    parser.add_argument("--tracker", help="HOST:PORT of a tracker (then --key picks a device)")
    parser.add_argument("--key", default="reshift-edge")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        lib = build_arm64_library(Path(tmp) / "conv_relu_arm64.so")
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        remote = connect(args.rpc, args.tracker, args.key)
        connect_s = time.perf_counter() - t0
        x = np.random.default_rng(1).standard_normal(IN_SHAPE).astype("float32")
        out = run_remote(remote, lib, x)
    err = float(np.max(np.abs(out["y"] - conv_relu_reference(x, *conv_relu_weights()))))
    t = out["timings"]
    print(f"cross-compile+link {build_s * 1e3:.0f} ms, connect {connect_s * 1e3:.1f} ms")
    print(f"upload+load_module {t['upload_load_s'] * 1e3:.1f} ms, first run {t['first_run_s'] * 1e3:.1f} ms")
    print(f"time_evaluator mean {t['device_mean_s'] * 1e3:.3f} ms median {t['device_median_s'] * 1e3:.3f} ms")
    print(f"RPC round trip (no-op remote call) {t['rpc_round_trip_s'] * 1e3:.2f} ms")
    print(f"input copy to device and back {t['tensor_round_trip_s'] * 1e3:.2f} ms")
    print(f"max |device - numpy| = {err:.2e} ({'OK' if err < 1e-4 else 'MISMATCH'})")


if __name__ == "__main__":
    main()
