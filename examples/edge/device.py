"""An emulated arm64 edge device: Debian bookworm arm64 + the apache-tvm aarch64 wheel under qemu-user.

    python examples/edge/device.py start [--name dev0] [--port 9090] [--tracker HOST:PORT --key KEY]
    python examples/edge/device.py status
    python examples/edge/device.py stop [--name dev0 | --all]

`start` builds the root filesystem once (cached under $RESHIFT_EDGE_CACHE, default
~/.cache/reshift/edge), then runs a TVM RPC server inside it on 127.0.0.1:PORT with
`qemu-aarch64-static -L ROOTFS`, in the background, with a pid file and a log. There is no
binfmt_misc here, so nothing in the root filesystem may exec an arm64 binary: debootstrap's second
stage is replaced by unpacking the downloaded .debs, and the RPC server serves in its own process
(rpc_server_in_process.py). Needs root (debootstrap), debootstrap, qemu-user-static, dpkg-deb and
network access to a Debian mirror and PyPI for the first build only.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUITE = "bookworm"  # its python3 is 3.11, the version the aarch64 wheels are chosen for
PYTHON_VERSION = "3.11"
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
DEVICE_DIR = "/opt/reshift-edge"  # inside the root filesystem
DEVICE_SITE = f"{DEVICE_DIR}/site"
SERVER_SCRIPT = "rpc_server_in_process.py"
READY_LINE = "reshift-edge: listening on"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Only the runtime runs on the device: the 240 MB compiler library and the CUDA runtime go.
DROPPED_LIBS = ("libtvm_compiler.so", "libtvm_runtime_cuda.so")
FORBIDDEN_PACKAGES = ("torch", "onnx", "onnxruntime")
# Never read by a sysroot: debootstrap's own scripts, apt lists, documentation, translations.
TRIMMED_PATHS = ("debootstrap", "var/lib/apt/lists", "usr/share/doc", "usr/share/man")
TRIMMED_PATHS += ("usr/share/locale", "usr/share/info")


class EdgeError(RuntimeError):
    """A step of building or running the emulated device failed; the message says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("RESHIFT_EDGE_CACHE", Path.home() / ".cache/reshift/edge"))


def host_tvm_version() -> str:
    """The device gets exactly the host's apache-tvm version, so host-built modules load there."""
    return importlib.metadata.version("apache-tvm")


def rootfs_dir(tvm_version: str | None = None) -> Path:
    version = tvm_version or host_tvm_version()
    return cache_dir() / f"rootfs-{SUITE}-arm64-tvm{version}"


def _run(cmd: list[str], log: Path, what: str) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise EdgeError(f"{what} failed (exit {done.returncode}); log {log}:\n{tail}")


def _require_tools() -> None:
    missing = [t for t in ("debootstrap", "qemu-aarch64-static", "dpkg-deb") if not shutil.which(t)]
    if missing:
        raise EdgeError(f"missing {', '.join(missing)}: apt-get install debootstrap qemu-user-static dpkg")
    if os.geteuid() != 0:
        raise EdgeError("building the arm64 root filesystem needs root (debootstrap); run as root")


def build_rootfs(force: bool = False) -> Path:
    """Build (once) the arm64 root filesystem with python3 and the apache-tvm aarch64 wheel."""
    target = rootfs_dir()
    stamp = target / DEVICE_DIR.lstrip("/") / "build.json"
    if stamp.exists() and not force:
        return target
    cache_dir().mkdir(parents=True, exist_ok=True)
    with (cache_dir() / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second `start` waits for the first build
        if stamp.exists() and not force:
            return target
        _require_tools()
        started = time.monotonic()
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        log = cache_dir() / "build.log"
        log.write_text("")
        mirror = os.environ.get("RESHIFT_EDGE_MIRROR", DEFAULT_MIRROR)
        _run(
            [
                "debootstrap",
                "--foreign",
                "--arch=arm64",
                "--variant=minbase",
                "--include=python3",
                SUITE,
                str(partial),
                mirror,
            ],
            log,
            f"debootstrap {SUITE} arm64 from {mirror} (no network? set RESHIFT_EDGE_MIRROR)",
        )
        # Second stage, without binfmt: unpack every downloaded package (no maintainer scripts;
        # the tree is used as qemu's sysroot, not booted).
        archives = partial / "var/cache/apt/archives"
        for deb in sorted(archives.glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(partial)], log, f"unpacking {deb.name}")
            deb.unlink()
        for junk in TRIMMED_PATHS:
            shutil.rmtree(partial / junk, ignore_errors=True)
        if not (partial / "usr/bin/python3").exists():
            raise EdgeError(f"no usr/bin/python3 in {partial} after unpacking; see {log}")
        _install_tvm(partial, log)
        device_dir = partial / DEVICE_DIR.lstrip("/")
        shutil.copy2(HERE / SERVER_SCRIPT, device_dir / SERVER_SCRIPT)
        (device_dir / "build.json").write_text(
            json.dumps(
                {
                    "suite": SUITE,
                    "apache-tvm": host_tvm_version(),
                    "mirror": mirror,
                    "build_seconds": round(time.monotonic() - started, 1),
                },
                indent=1,
            )
        )
        partial.rename(target)
        return target


def _install_tvm(root: Path, log: Path) -> None:
    site = root / DEVICE_SITE.lstrip("/")
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    pip += ["--platform", WHEEL_PLATFORM, "--python-version", PYTHON_VERSION]
    pip += ["--implementation", "cp", "--only-binary=:all:", "--target", str(site)]
    _run([*pip, f"apache-tvm=={host_tvm_version()}"], log, "pip install of the aarch64 apache-tvm")
    for name in FORBIDDEN_PACKAGES:
        if (site / name).exists():
            raise EdgeError(f"{name} was installed into the device ({site}); it must not be")
    for lib in DROPPED_LIBS:
        (site / "tvm/lib" / lib).unlink(missing_ok=True)
    shutil.rmtree(site / "bin", ignore_errors=True)


def _refresh_server_script(root: Path) -> None:
    """Copy rpc_server_in_process.py into a cached root filesystem when the host's copy changed."""
    installed = root / DEVICE_DIR.lstrip("/") / SERVER_SCRIPT
    source = HERE / SERVER_SCRIPT
    if not installed.exists() or installed.read_bytes() != source.read_bytes():
        shutil.copy2(source, installed)


@dataclass
class Device:
    """One running emulated device: its pid, RPC port and log, recorded under the cache."""

    name: str

    @property
    def state_file(self) -> Path:
        return cache_dir() / "run" / f"{self.name}.json"

    @property
    def pid_file(self) -> Path:
        return cache_dir() / "run" / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return cache_dir() / "run" / f"{self.name}.log"

    def state(self) -> dict | None:
        if not self.state_file.exists():
            return None
        return json.loads(self.state_file.read_text())

    def pid(self) -> int | None:
        """The server's pid, only if that process is still our qemu (a pid can be reused)."""
        try:
            pid = int(self.pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if b"qemu-aarch64" in cmdline and SERVER_SCRIPT.encode() in cmdline else None


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _reachable(addr: str) -> bool:
    host, port = addr.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def start(
    name: str = "dev0",
    port: int = 9090,
    host: str = "127.0.0.1",
    tracker: str | None = None,
    key: str | None = None,
    timeout: float = 180.0,
) -> dict:
    """Start the device's RPC server (building the root filesystem first if needed)."""
    device = Device(name)
    if device.pid() is not None:
        state = device.state()
        raise EdgeError(f"device {name} already runs (pid {device.pid()}, port {state['port']})")
    if tracker and not key:
        raise EdgeError("--tracker needs --key: the tracker hands devices out by key")
    if tracker and not _reachable(tracker):
        raise EdgeError(
            f"no tracker answers at {tracker}: start one with"
            f" `python -m tvm.exec.rpc_tracker --host {tracker.rsplit(':', 1)[0]}"
            f" --port {tracker.rsplit(':', 1)[1]}` (needs tornado)"
        )
    if not _port_free(host, port):
        raise EdgeError(f"port {host}:{port} is taken; pick another with --port")
    t0 = time.monotonic()
    root = build_rootfs()
    built = time.monotonic() - t0
    _refresh_server_script(root)
    device.log_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["qemu-aarch64-static", "-L", str(root), str(root / "usr/bin/python3")]
    cmd += [f"{DEVICE_DIR}/{SERVER_SCRIPT}", "--host", host, "--port", str(port)]
    if tracker:
        cmd += ["--tracker", tracker, "--key", key]
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/root",
        "PYTHONPATH": DEVICE_SITE,
        "PYTHONDONTWRITEBYTECODE": "1",
        "TVM_USE_RUNTIME_LIB": "1",
        "TVM_NUM_THREADS": os.environ.get("RESHIFT_EDGE_THREADS", "1"),
    }
    with device.log_file.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    device.pid_file.write_text(str(proc.pid))
    state = {"name": name, "pid": proc.pid, "host": host, "port": port, "key": key}
    state |= {"tracker": tracker, "rootfs": str(root), "log": str(device.log_file)}
    device.state_file.write_text(json.dumps(state, indent=1))
    while READY_LINE not in device.log_file.read_text():
        if proc.poll() is not None or time.monotonic() - t0 > timeout + built:
            tail = "\n".join(device.log_file.read_text().splitlines()[-15:])
            stop(name)
            raise EdgeError(f"device {name} did not come up; log {device.log_file}:\n{tail}")
        time.sleep(0.2)
    state["build_seconds"] = round(built, 1)
    state["start_seconds"] = round(time.monotonic() - t0 - built, 1)
    return state


def stop(name: str) -> bool:
    """Stop one device: SIGTERM to its process group (the server and its session children)."""
    device = Device(name)
    pid = device.pid()
    if pid is not None:
        os.killpg(pid, signal.SIGTERM)
        for _ in range(50):
            if device.pid() is None or not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.1)
        else:
            os.killpg(pid, signal.SIGKILL)
        try:
            os.waitpid(pid, 0)  # reap it when this process started it
        except ChildProcessError:
            pass
    device.pid_file.unlink(missing_ok=True)
    device.state_file.unlink(missing_ok=True)
    return pid is not None


def running() -> list[dict]:
    """State of every device that has a pid file, with `alive` saying whether it still runs."""
    states = []
    for state_file in sorted((cache_dir() / "run").glob("*.json")):
        device = Device(state_file.stem)
        state = device.state() or {"name": device.name}
        states.append(state | {"alive": device.pid() is not None})
    return states


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start", help="build (once) and start an emulated device")
    p_start.add_argument("--name", default="dev0")
    p_start.add_argument("--host", default="127.0.0.1")
    p_start.add_argument("--port", type=int, default=9090)
    p_start.add_argument("--tracker", help="HOST:PORT of a TVM RPC tracker to register with")
    p_start.add_argument("--key", help="device key under the tracker, e.g. reshift-edge")
    sub.add_parser("build", help="only build the root filesystem").add_argument("--force", action="store_true")
    p_stop = sub.add_parser("stop", help="stop a device")
    p_stop.add_argument("--name", default="dev0")
    p_stop.add_argument("--all", action="store_true")
    sub.add_parser("status", help="list devices")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            t0 = time.monotonic()
            print(f"{build_rootfs(force=args.force)} ({time.monotonic() - t0:.1f} s)")
        elif args.command == "start":
            state = start(args.name, args.port, args.host, args.tracker, args.key)
            print(
                f"{state['name']}: arm64 TVM RPC server on {state['host']}:{state['port']}"
                f" pid {state['pid']} (rootfs {state['build_seconds']} s,"
                f" start {state['start_seconds']} s) log {state['log']}"
            )
        elif args.command == "stop":
            names = [s["name"] for s in running()] if args.all else [args.name]
            for name in names:
                print(f"{name}: {'stopped' if stop(name) else 'was not running'}")
        else:
            states = running()
            for s in states:
                where = f"{s.get('host')}:{s.get('port')}"
                extra = f" tracker {s['tracker']} key {s['key']}" if s.get("tracker") else ""
                print(f"{s['name']}: {'running' if s['alive'] else 'dead'} {where}{extra}")
            if not states:
                print(f"no devices (cache {cache_dir()})")
    except EdgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
