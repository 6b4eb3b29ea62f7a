"""Remote devices that die or hang, on host TVM RPC servers (127.0.0.1): bounded errors, never a hang.

The servers run examples/edge/rpc_server_in_process.py on this host with the runtime-only TVM,
as the emulated arm64 device does, so an artifact built for the host deploys to them. They start
together once per module (importing TVM takes seconds on a busy 2-core host) and each test kills or
stops its own; every process group is killed at teardown, also when a test fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import reshift
from reshift import cli
from reshift.ir import parse
from reshift.runtime import remote
from reshift.runtime.rpc_session import DeviceLost, DeviceTimeout
from tests.helpers import TWO_HEADS

REPO = Path(__file__).resolve().parents[1]
SERVER_SCRIPT = REPO / "examples" / "edge" / "rpc_server_in_process.py"
READY_LINE = "reshift-edge: listening on"
KEY = "reshift-host-test"
GRAPH = TWO_HEADS


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A TVM RPC server process group on 127.0.0.1 (optionally registered with a tracker under KEY)."""

    def __init__(self, log: Path, tracker: str | None = None):
        self.port = _free_port()
        self.log = log
        cmd = [sys.executable, str(SERVER_SCRIPT), "--host", "127.0.0.1", "--port", str(self.port)]
        if tracker:
            cmd += ["--tracker", tracker, "--key", KEY]
        env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1", "PYTHONPATH": str(REPO)}
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120) -> Server:
        deadline = time.monotonic() + timeout
        while READY_LINE not in self.log.read_text():
            if self.proc.poll() is not None:
                pytest.fail(f"RPC server exited with {self.proc.returncode}:\n{self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"RPC server not ready after {timeout} s:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        return self

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the server and its forked session processes."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def _start_tracker():
    """A TVM RPC tracker on 127.0.0.1, or None without tornado and psutil (which it needs)."""
    try:
        import psutil  # noqa: F401 -- Tracker.terminate needs it
        import tornado  # noqa: F401 -- the tracker's event loop
    except ImportError:
        return None
    from tvm.rpc.tracker import Tracker

    return Tracker(host="127.0.0.1", port=_free_port(), port_end=65000, silent=True)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Servers started at once: ``plain`` ones to connect to directly, ``tracked`` ones under ``tracker``."""
    logs = tmp_path_factory.mktemp("rpc-logs")
    tracker = _start_tracker()
    address = f"127.0.0.1:{tracker.port}" if tracker else None
    started: list[Server] = []
    try:
        for i in range(3):
            started.append(Server(logs / f"plain{i}.log"))
        for i in range(3 if tracker else 0):
            started.append(Server(logs / f"tracked{i}.log", address))
        plain, tracked = started[:3], started[3:]
        for server in started:
            server.wait_ready()
        yield {"plain": plain, "tracked": tracked, "tracker": address}
    finally:
        for server in started:
            server.kill()
        if tracker is not None:
            tracker.terminate()


@pytest.fixture
def server(servers):
    """One fresh plain server for this test (the test may kill or stop it)."""
    if not servers["plain"]:
        pytest.fail("the module started too few servers for its tests")
    return servers["plain"].pop()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A host (x86_64) CPU artifact with two outputs, like the one the RPC servers can load."""
    return reshift.compile(parse(GRAPH), pipeline="none").save(tmp_path_factory.mktemp("remote") / "two_heads")


@pytest.fixture
def inputs():
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((5, 4)).astype(np.float32), "bias": rng.standard_normal(3).astype(np.float32)}


def _after(seconds: float, action) -> threading.Thread:
    """Run ``action`` in ``seconds`` from now in a background thread."""
    timer = threading.Timer(seconds, action)
    timer.daemon = True
    timer.start()
    return timer


def test_deploy_runs_two_outputs_like_local_then_cli_bench_exits_2_when_it_dies(
    server, artifact, inputs, capsys, monkeypatch
):
    model = remote.deploy(artifact, remote.connect(rpc=server.address, timeout=30))
    assert model.where == f"the device at {server.address}"
    got, local = model.run_dict(inputs), reshift.load(artifact).run_dict(inputs)
    for name in ("r", "s"):  # two outputs: a tuple on the device, fetched through get_outputs
        np.testing.assert_array_equal(got[name], local[name])
    assert model.time(inputs, repeat=3)["median_ms"] > 0
    del model

    timed = remote.RemoteModel.time

    def time_then_die(self, inputs, repeat=10, number=1):
        _after(0.5, server.kill)
        return timed(self, inputs, repeat=10**6, number=10)  # hours of runs, unless the device goes away

    monkeypatch.setattr(remote.RemoteModel, "time", time_then_die)
    start = time.monotonic()
    assert cli.main(["bench", str(artifact), "--rpc", server.address, "--repeat", "3"]) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert f"reshift bench: error: lost the connection to the device at {server.address} while timing" in err
    assert "restart it" in err and "Traceback" not in err


def test_server_killed_mid_timing_raises_within_seconds(server, artifact, inputs):
    model = remote.deploy(artifact, remote.connect(rpc=server.address, timeout=30))
    model.run_dict(inputs)
    _after(0.5, server.kill)
    start = time.monotonic()
    with pytest.raises(DeviceLost, match=f"lost the connection to the device at {server.address} while timing"):
        model.time(inputs, repeat=10**6, number=10)
    assert time.monotonic() - start < 10
    with pytest.raises(remote.DeviceError, match="no longer usable"):
        model.run_dict(inputs)


def test_hung_device_times_out_then_cli_deploy_exits_2(server, artifact, inputs, capsys):
    """A stopped server keeps its socket open: the call is cut off after the timeout, no thread stays stuck."""
    model = remote.deploy(artifact, remote.connect(rpc=server.address, timeout=2))
    model.run_dict(inputs)
    server.signal(signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(DeviceTimeout, match=f"the device at {server.address} did not answer within 2 s while running"):
        model.run_dict(inputs)
    assert time.monotonic() - start < 10
    worker_threads = [t for t in threading.enumerate() if t.name == "reshift-rpc-call"]
    assert not worker_threads, "the cut-off call's worker thread is still blocked in TVM"
    del model

    start = time.monotonic()  # a new session: the kernel still accepts the connection, the server never answers
    assert cli.main(["deploy", str(artifact), "--rpc", server.address, "--timeout", "2"]) == 2
    assert time.monotonic() - start < 15
    err = capsys.readouterr().err
    assert "accepted the connection but opened no session within 2 s" in err and "busy with another session" in err


def _wait_free(client, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while client.summary()["queue_info"].get(KEY, {}).get("free", 0) < count:
        assert time.monotonic() < deadline, f"the tracker never had {count} free devices: {client.summary()}"
        time.sleep(0.2)


def test_tracker_serves_the_live_device_when_the_others_are_gone(servers, artifact, inputs):
    """Three devices under one key: one killed, one hung; every request still reaches the third in bounded time."""
    from tvm import rpc

    tracker = servers["tracker"]
    if tracker is None:
        pytest.skip("the TVM RPC tracker needs tornado and psutil (pip install -e '.[dev]')")
    client = rpc.connect_tracker(*remote.parse_address(tracker))
    killed, hung, live = servers["tracked"]
    _wait_free(client, 3)
    killed.signal(signal.SIGKILL)
    hung.signal(signal.SIGSTOP)
    for _ in range(3):
        start = time.monotonic()
        session = remote.connect(tracker=tracker, key=KEY, timeout=3)
        assert session.where.startswith(f"the {KEY!r} device at {live.address}"), session.where
        with session:
            assert remote.deploy(artifact, session).run_dict(inputs)["r"].shape == (5, 3)
        assert time.monotonic() - start < 3 * 3 + 10  # at worst a cut-off attempt at the hung device
