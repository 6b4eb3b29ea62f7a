"""Emulated arm64 edge device (examples/edge): deploy a cross-compiled module over TVM RPC.

Marked `edge`, outside the default run: `make test-edge` (pytest -m edge tests/test_edge.py).
The first run builds the arm64 root filesystem (about a minute, needs root and network); later
runs reuse it from $RESHIFT_EDGE_CACHE (default ~/.cache/reshift/edge).
"""

from __future__ import annotations

import socket
import time
import uuid

import numpy as np
import pytest

from examples.edge import deploy, device

pytestmark = pytest.mark.edge
KEY = "reshift-edge-test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def rootfs():
    try:
        return device.build_rootfs()
    except device.EdgeError as err:
        pytest.skip(f"cannot build the arm64 root filesystem (no root, tools or network?): {err}")


def _start(name: str, **kwargs) -> dict:
    try:
        return device.start(name, port=_free_port(), **kwargs)
    except device.EdgeError as err:
        if "taken" in str(err):  # the free port was grabbed in between: one retry
            return device.start(name, port=_free_port(), **kwargs)
        raise


@pytest.fixture(scope="module")
def edge_device(rootfs):
    name = f"test-{uuid.uuid4().hex[:6]}"
    state = _start(name)
    yield state
    device.stop(name)


@pytest.fixture(scope="module")
def arm64_lib(tmp_path_factory):
    return deploy.build_arm64_library(tmp_path_factory.mktemp("edge") / "conv_relu_arm64.so")


def _check_on(remote, lib) -> dict:
    x = np.random.default_rng(3).standard_normal(deploy.IN_SHAPE).astype("float32")
    out = deploy.run_remote(remote, lib, x, repeat=2)
    reference = deploy.conv_relu_reference(x, *deploy.conv_relu_weights())
    np.testing.assert_allclose(out["y"], reference, rtol=0, atol=1e-4)
    return out["timings"]


def test_library_is_arm64(arm64_lib):
    header = arm64_lib.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    assert int.from_bytes(header[18:20], "little") == 183  # e_machine EM_AARCH64


def test_conv_relu_runs_on_emulated_device(edge_device, arm64_lib):
    remote = deploy.connect(f"{edge_device['host']}:{edge_device['port']}")
    timings = _check_on(remote, arm64_lib)
    assert timings["device_mean_s"] > 0
    assert timings["rpc_round_trip_s"] < 1.0


def test_status_and_cached_restart(edge_device):
    states = {s["name"]: s for s in device.running()}
    assert states[edge_device["name"]]["alive"]
    name = f"test-{uuid.uuid4().hex[:6]}"
    t0 = time.monotonic()
    state = _start(name)
    try:
        assert state["build_seconds"] < 5, "the root filesystem was rebuilt instead of reused"
        assert time.monotonic() - t0 < 90
    finally:
        assert device.stop(name)
    assert name not in {s["name"] for s in device.running()}


def test_two_devices_under_one_tracker_key(rootfs, arm64_lib):
    pytest.importorskip("tornado", reason="the TVM RPC tracker needs tornado")
    pytest.importorskip("psutil", reason="stopping the TVM RPC tracker needs psutil")
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    tracker = Tracker(host="127.0.0.1", port=_free_port(), port_end=65000, silent=True)
    addr = f"127.0.0.1:{tracker.port}"
    names = [f"test-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    try:
        for name in names:
            _start(name, tracker=addr, key=KEY)
        client = rpc.connect_tracker("127.0.0.1", tracker.port)
        deadline = time.monotonic() + 30
        while client.summary()["queue_info"].get(KEY, {}).get("free", 0) < 2:
            assert time.monotonic() < deadline, f"tracker never saw 2 devices: {client.summary()}"
            time.sleep(0.5)
        # Two sessions held at once must be served by the two different devices.
        sessions = [client.request(KEY, session_timeout=120) for _ in names]
        assert client.summary()["queue_info"][KEY]["free"] == 0
        for remote in sessions:
            _check_on(remote, arm64_lib)
    finally:
        for name in names:
            device.stop(name)
        tracker.terminate()
