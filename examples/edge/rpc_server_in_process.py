"""TVM RPC server that runs inside the emulated arm64 root filesystem (copied there by device.py).

`python -m tvm.exec.rpc_server` starts its server in a `PopenWorker`, which execs `sys.executable`.
Under qemu-user without binfmt_misc the host kernel cannot exec an arm64 binary, so this script
binds and serves in its own process instead; each RPC session is still a forked child, and fork
needs no exec. Runs with TVM_USE_RUNTIME_LIB=1: only libtvm_runtime.so is on the device.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys

import tvm
from tvm.rpc import server

# Lets a host check the device's CPU architecture before loading a library (reshift.runtime.remote).
# Registered before the server forks its session children, so every session sees it.
tvm.register_global_func("reshift.edge.machine", lambda: platform.machine(), override=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--tracker", default=None, help="HOST:PORT of a TVM RPC tracker")
    parser.add_argument("--key", default="", help="device key to register under the tracker")
    parser.add_argument("--custom-addr", default=None, help="address reported to the tracker")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(message)s")

    tracker_addr = None
    if args.tracker:
        tracker_host, tracker_port = args.tracker.rsplit(":", 1)
        tracker_addr = (tracker_host, int(tracker_port))
        if not args.key:
            raise SystemExit("--tracker needs --key: the tracker hands devices out by key")

    # port_end = port + 1: bind exactly the requested port or fail, never drift to another one.
    port = server._popen_start_rpc_server(
        args.host,
        args.port,
        args.port + 1,
        tracker_addr=tracker_addr,
        key=args.key,
        custom_addr=args.custom_addr,
    )
    print(f"reshift-edge: listening on {args.host}:{port} key={args.key or '-'}", flush=True)
    server.PopenRPCServerState.current.thread.join()


if __name__ == "__main__":
    main()
