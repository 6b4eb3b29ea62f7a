"""Run an artifact on a remote device over TVM RPC: upload model.so, load it there, run and time it.

    remote = connect(rpc="127.0.0.1:9090")            # or connect(tracker="127.0.0.1:9190", key="reshift-edge")
    model = deploy("out_dir", remote)                # checks target, architecture, checksum; uploads
    outputs = model.run_dict(inputs)                 # numpy in, numpy out (tensors cross the RPC link)
    stats = model.time(inputs, repeat=10)            # TVM time_evaluator on the device: median/p90 ms

Every remote call is bounded in time (runtime/rpc_session.py): a device that dies mid-run gives a
:class:`DeviceError` at once, one that hangs gives it after ``timeout`` seconds (plus the call's
expected duration), never a hang. A tracker that hands out a hung device is asked again, so a
tracker with one of two devices gone still serves the other.

The host's reference for checking a deployment is the IR interpreter, which the runtime cannot run
(the artifact holds no graph). It is either recomputed from the source model (``reshift deploy
--model``) or stored next to the artifact as ``reference.npz`` (:func:`save_reference`: inputs and
the interpreter's outputs, keys ``input:<name>`` / ``output:<name>``). Like the rest of the runtime,
this module imports neither torch nor onnx; tvm is imported on first use.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from reshift.errors import ArtifactError, InputError
from reshift.runtime.artifact import normalize_arch, read_meta, split_dim, target_arch, verify_so
from reshift.runtime.module import LoadedModel, _flatten, latency_stats
from reshift.runtime.rpc_session import (
    DEFAULT_TIMEOUT,
    RESTART_HINT,
    BoundedSession,
    DeviceError,
    DeviceLost,
    DeviceTimeout,
    last_line,
    open_bounded,
)

REFERENCE_NAME = "reference.npz"
START_HINT = "start it with `make edge-device` (python examples/edge/device.py start --port {port})"
# ELF e_machine -> architecture (the .so's own header is the ground truth for what it runs on)
_ELF_MACHINES = {62: "x86_64", 183: "aarch64", 243: "riscv64", 40: "arm"}
# the remote function an emulated device registers (examples/edge/rpc_server_in_process.py)
MACHINE_FUNC = "reshift.edge.machine"
TRACKER_ATTEMPTS = 3  # sessions asked of a tracker before giving up (each bounded by the timeout)
SECONDS_PER_MB = 1.0  # added to the bound of an upload or a load, per MB of model.so

__all__ = ["DeviceError", "RemoteModel", "connect", "deploy"]


def parse_address(address: str, what: str = "--rpc") -> tuple[str, int]:
    """``"HOST:PORT"`` -> ``(host, port)``; InputError otherwise."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InputError(f"{what} {address!r}: expected HOST:PORT, e.g. 127.0.0.1:9090")
    return host, int(port)


def _probe(host: str, port: int, what: str) -> None:
    """Fail fast, with the reason, when nothing listens at host:port (TVM would retry, then say less)."""
    try:
        with socket.create_connection((host, port), timeout=30):  # an emulated device can be slow
            return
    except ConnectionRefusedError:
        reason = "connection refused"
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
    hint = START_HINT.format(port=port) if what == "device" else "start one with `python -m tvm.exec.rpc_tracker`"
    raise DeviceError(f"cannot reach the {what} at {host}:{port}: {reason}; {hint}")


def connect(
    rpc: str | None = None,
    tracker: str | None = None,
    key: str | None = None,
    session_timeout: float = 300,
    timeout: float = DEFAULT_TIMEOUT,
) -> BoundedSession:
    """A TVM RPC session: directly to ``rpc`` HOST:PORT, or a device of ``key`` from ``tracker``.

    ``timeout`` bounds opening the session and each later call (seconds); ``session_timeout`` is
    how long the server keeps a session before it ends it (so an abandoned one frees the device).
    """
    if tracker:
        return _request(tracker, key, session_timeout, timeout)
    if not rpc:
        raise InputError("give the device as --rpc HOST:PORT (or --tracker HOST:PORT --key NAME)")
    from tvm import rpc as tvm_rpc

    host, port = parse_address(rpc)
    _probe(host, port, "device")
    where = f"the device at {rpc}"
    try:
        session, sockets = open_bounded(
            lambda: tvm_rpc.connect(host, port, session_timeout=session_timeout),
            timeout,
            peer=(socket.gethostbyname(host), port),
        )
    except DeviceTimeout:
        raise DeviceError(
            f"{where} accepted the connection but opened no session within {timeout:.0f} s: its RPC server is "
            f"hung, or busy with another session (a TVM RPC server serves one at a time). {RESTART_HINT}"
        ) from None
    except Exception as exc:  # noqa: BLE001
        reason = last_line(exc)
        if "matches key" in reason:
            reason += " (that server is registered with a tracker: use --tracker HOST:PORT --key NAME)"
        raise DeviceError(f"cannot open an RPC session with the device at {rpc}: {reason}") from None
    return BoundedSession(session, where, sockets, timeout)


def _request(tracker: str, key: str | None, session_timeout: float, timeout: float) -> BoundedSession:
    """A session with a device of ``key`` from the tracker; a device that does not answer is skipped."""
    if not key:
        raise InputError("--tracker needs --key: the tracker hands devices out by key")
    host, port = parse_address(tracker, "--tracker")
    _probe(host, port, "tracker")
    tracker_address = (socket.gethostbyname(host), port)
    reason = f"no answer within {timeout:.0f} s"
    for _ in range(TRACKER_ATTEMPTS):
        try:
            session, sockets = open_bounded(
                lambda: _tracker_session(host, port, tracker, key, session_timeout), timeout, {tracker_address}
            )
        except DeviceTimeout:
            continue  # a hung device (or none free): the tracker no longer offers the one it handed out
        except DeviceError:
            raise
        except Exception as exc:  # noqa: BLE001 -- a device that died before the tracker noticed: ask again
            reason = last_line(exc)
            continue
        server = next((f"{c[2][0]}:{c[2][1]}" for c in sockets or ()), "?")
        return BoundedSession(session, f"the {key!r} device at {server} (tracker {tracker})", sockets, timeout)
    raise DeviceError(
        f"no {key!r} device from the tracker at {tracker} opened a session in {TRACKER_ATTEMPTS} attempts "
        f"({reason}): the devices under that key are down, hung or all busy. {RESTART_HINT}"
    )


def _tracker_session(host: str, port: int, tracker: str, key: str, session_timeout: float):
    """Ask the tracker for a device of ``key`` (DeviceError when it has none under that key)."""
    from tvm import rpc as tvm_rpc

    client = tvm_rpc.connect_tracker(host, port)
    queue = client.summary().get("queue_info", {})
    if key not in queue:
        known = ", ".join(sorted(queue)) or "none"
        raise DeviceError(
            f"the tracker at {tracker} has no device under key {key!r} (keys: {known}); start one with "
            f"`python examples/edge/device.py start --tracker {tracker} --key {key}`"
        )
    # One try: a retry inside TVM would outlive a cut-off attempt and take the next device for nobody.
    return client.request(key, session_timeout=session_timeout, max_retry=1)


def bounded(remote: Any, where: str = "the device") -> BoundedSession:
    """``remote`` as a BoundedSession (a plain TVM session is wrapped: errors readable, calls unbounded)."""
    if isinstance(remote, BoundedSession):
        return remote
    return BoundedSession(remote, where, None, DEFAULT_TIMEOUT)


def elf_arch(path: str | Path) -> str | None:
    """CPU architecture from a shared library's ELF header, None if it is not ELF."""
    header = Path(path).read_bytes()[:20]
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    machine = int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")
    return _ELF_MACHINES.get(machine, f"elf-machine-{machine}")


def remote_arch(remote) -> str | None:
    """The device's CPU architecture if its server says (our emulated device does), else None."""
    session = bounded(remote)
    try:
        return normalize_arch(str(session.call("asking its CPU architecture", _machine, session.session)))
    except (DeviceLost, DeviceTimeout):
        raise
    except Exception:  # noqa: BLE001 -- a stock rpc_server has no such function
        return None


def _machine(session: Any) -> str:
    return session.get_function(MACHINE_FUNC)()


class RemoteModel:
    """An artifact loaded on a remote device: same input checks as :class:`LoadedModel`, run over RPC.

    Calls go through the session's bounds (:class:`BoundedSession`) and the VM's stateful
    interface (``set_input``/``invoke_stateful``/``get_outputs``), which returns tuples over RPC.
    """

    bind = LoadedModel.bind
    _check = LoadedModel._check
    _dev_kind = LoadedModel._dev_kind
    input_names = LoadedModel.input_names
    output_names = LoadedModel.output_names

    def __init__(self, remote, rexec, meta: dict[str, Any], where: str | None = None):
        from tvm.runtime.vm import VirtualMachine  # not tvm.relax: that needs the compiler library

        self.session = bounded(remote, where or "the device")
        self.remote = self.session.session
        self.meta = meta
        self.device = "cpu"
        self.where = where or self.session.where
        self._dev = self.remote.cpu()
        self._vm = self.session.call("creating the VM", VirtualMachine, rexec, self._dev)
        self._run_s = 0.0  # the last run's wall time: part of the bounds of later calls

    def __repr__(self) -> str:
        return f"<RemoteModel {self.meta.get('name', '')} on {self.where}>"

    def close(self) -> None:
        """End the RPC session (the device is free for the next client); later calls raise DeviceError."""
        self.session.close()

    def _set_inputs(self, inputs: dict[str, Any]) -> None:
        import tvm

        tensors = [tvm.runtime.tensor(np.ascontiguousarray(x), device=self._dev) for x in self.bind((), inputs)]
        self._vm.set_input("main", *tensors)

    def _run(self, inputs: dict[str, Any]) -> list[np.ndarray]:
        self._set_inputs(inputs)
        self._vm.invoke_stateful("main")
        return [o.numpy() for o in _flatten(self._vm.get_outputs("main"))]

    def run_dict(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """``{input name: array} -> {output name: numpy array}``, computed on the device."""
        start = time.monotonic()
        outputs = self.session.call("running the model", self._run, inputs, bound=self._bound(1))
        self._run_s = time.monotonic() - start
        if len(outputs) != len(self.meta["outputs"]):
            raise ArtifactError(
                f"model returned {len(outputs)} output(s), meta.json lists {len(self.meta['outputs'])}; "
                "the artifact is inconsistent (recompile it)"
            )
        return dict(zip(self.output_names, outputs, strict=True))

    def time(self, inputs: dict[str, Any], repeat: int = 10, number: int = 1) -> dict[str, float]:
        """Device latency in ms from TVM's ``time_evaluator`` (``repeat`` samples of ``number`` runs each)."""
        if not self._run_s:
            self.run_dict(inputs)  # a warm-up that also measures how long the timed runs may take
        what = f"timing {repeat} x {number} runs"
        results = self.session.call(what, self._time, inputs, repeat, number, bound=self._bound(1 + repeat * number))
        return latency_stats([t * 1e3 for t in results])

    def _time(self, inputs: dict[str, Any], repeat: int, number: int) -> list[float]:
        self._set_inputs(inputs)
        evaluator = self._vm.time_evaluator("invoke_stateful", self._dev, number=number, repeat=repeat)
        return list(evaluator("main").results)

    def _bound(self, runs: int) -> float:
        """Seconds a call of ``runs`` model runs may take: the timeout plus twice the expected time."""
        return self.session.timeout + 2 * runs * self._run_s


def _upload_name(meta: dict[str, Any]) -> str:
    return f"reshift-{str(meta['so_sha256'])[:16]}.so"  # distinct per artifact in the session's dir


def deploy(directory: str | Path, remote, where: str | None = None) -> RemoteModel:
    """Check an artifact against the device, upload its model.so and load it there.

    DeviceError when the artifact's CPU architecture is not the device's or the device fails or
    stops answering, ArtifactError when the artifact is not a CPU artifact (a CUDA build) or is
    corrupted. ``where`` names the device in messages (default: the session's own name).
    """
    session = bounded(remote, where or "the device")
    where = where or session.where
    meta = read_meta(directory)
    so = verify_so(directory, meta)
    rexec = load_library(session, directory, so, meta["target"], _upload_name(meta), where)
    return RemoteModel(session, rexec, meta, where)


def load_library(
    session: BoundedSession, directory: str | Path, so: Path, target: dict[str, Any], upload_name: str, where: str
):
    """Check ``so`` (built for ``target``, a meta ``target`` entry) against the device, upload it as
    ``upload_name`` and load it there; the remote module. Shared by graph and LLM artifacts."""
    name = target.get("name", "?")
    if target.get("device_type", "cpu") != "cpu":
        raise ArtifactError(
            f"{directory} was built for target {name!r} ({target.get('device_type')}); deploy runs CPU "
            "artifacts on the device's CPU: recompile with --target arm64 (or the board's CPU target)"
        )
    built_for = elf_arch(so)
    declared = target_arch(target)
    if declared is not None and built_for is not None and declared != built_for:
        raise ArtifactError(
            f"{so} is an {built_for} library but meta.json says target {name!r} ({declared}); recompile the model"
        )
    arch = built_for or declared
    device_arch = remote_arch(session)
    if arch and device_arch and arch != device_arch:
        raise DeviceError(_mismatch(directory, name, arch, f"{where} is {device_arch}"))
    bound = session.timeout + SECONDS_PER_MB * so.stat().st_size / 1e6
    try:
        session.call(f"uploading {so}", session.session.upload, str(so), upload_name, bound=bound)
        return session.call(f"loading {so}", session.session.load_module, upload_name, bound=bound)
    except (DeviceLost, DeviceTimeout):
        raise
    except DeviceError as exc:
        reason = exc.reason or str(exc)
        if any(word in reason for word in ("ELF", "wrong", "cannot open shared object", "invalid")):
            raise DeviceError(_mismatch(directory, name, arch or "?", f"{where} cannot load it ({reason})")) from None
        raise DeviceError(f"{where} failed to load {so}: {reason}") from None


def _mismatch(directory: str | Path, name: str, arch: str, device: str) -> str:
    return (
        f"architecture mismatch: {directory} was built for target {name!r} ({arch}) but {device}; "
        "recompile it for the device, e.g. `reshift compile MODEL.onnx --target arm64 -o OUT_DIR`"
    )


def random_inputs(specs: list[dict[str, Any]], batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for meta specs, a symbolic batch bound to ``batch``: floats normal, ``*mask*`` ones, ints in [0, 100)."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in specs:
        shape = [c * (batch if symbol else 1) for c, symbol in map(split_dim, spec["shape"])]
        dtype, name = spec["dtype"], spec["name"]
        if dtype == "bool" or (dtype != "float32" and "mask" in name.lower()):
            inputs[name] = np.ones(shape, dtype=dtype)
        elif dtype.startswith(("float", "bfloat")):
            inputs[name] = rng.standard_normal(shape).astype(np.float32).astype(_numpy_dtype(dtype))
        else:
            inputs[name] = rng.integers(0, 100, size=shape).astype(dtype)
    return inputs


def _numpy_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def save_reference(directory: str | Path, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> Path:
    """Store host inputs and reference outputs next to an artifact (``reference.npz``) for deploy checks."""
    path = Path(directory) / REFERENCE_NAME
    arrays = {f"input:{k}": np.asarray(v) for k, v in inputs.items()}
    arrays |= {f"output:{k}": np.asarray(v) for k, v in outputs.items()}
    np.savez(path, **arrays)
    return path


def load_reference(directory: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
    """``(inputs, outputs)`` from an artifact's ``reference.npz``, None when it has none."""
    path = Path(directory) / REFERENCE_NAME
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        inputs = {k.removeprefix("input:"): data[k] for k in data.files if k.startswith("input:")}
        outputs = {k.removeprefix("output:"): data[k] for k in data.files if k.startswith("output:")}
    return inputs, outputs


def compare(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per output: max absolute error and max error relative to the reference's largest magnitude."""
    report = {}
    for name, expected in reference.items():
        if name not in outputs:
            raise ArtifactError(f"the reference has output {name!r}, the device returned {sorted(outputs)}")
        got = outputs[name].astype(np.float64)
        expected = expected.astype(np.float64)
        if got.shape != expected.shape:
            raise ArtifactError(f"output {name!r}: device shape {list(got.shape)}, reference {list(expected.shape)}")
        err = float(np.max(np.abs(got - expected))) if got.size else 0.0
        scale = float(np.max(np.abs(expected))) if expected.size else 0.0
        report[name] = {"max_abs": err, "max_rel": err / scale if scale else err}
    return report
