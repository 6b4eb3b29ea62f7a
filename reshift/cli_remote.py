"""``reshift deploy`` and ``reshift bench --rpc/--tracker``: artifacts on a device over TVM RPC.

Split from :mod:`reshift.cli`, which registers these commands and options; errors are
:class:`~reshift.errors.ReshiftError`, which ``reshift.cli.main`` turns into exit 2.
"""

from __future__ import annotations

import argparse
from typing import Any

from reshift.cli import _console, _is_artifact, _load_npz, command, load_graph, stage
from reshift.errors import InputError


def remote_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"rpc": args.rpc, "tracker": args.tracker, "key": args.key}


def _where(args: argparse.Namespace) -> str:
    return f"the device at {args.rpc}" if args.rpc else f"a {args.key!r} device from the tracker at {args.tracker}"


def _host_reference(args: argparse.Namespace, meta: dict[str, Any], inputs: dict[str, Any] | None):
    """(inputs, reference outputs or None, where they came from): --model, else the artifact's reference.npz."""
    from reshift.runtime import remote

    if args.model_source:
        from reshift.ir.interpret import interpret
        from reshift.ir.text import print_graph
        from reshift.runtime.artifact import sha256_text

        graph = load_graph(args.model_source, getattr(args, "input_shape", None))
        expected = meta.get("graph_sha256")
        if expected and sha256_text(print_graph(graph, weights="full")) != expected:
            raise InputError(
                f"{args.model_source} is not the model {args.model} was compiled from (its graph hash differs); "
                "pass the source model or recompile the artifact"
            )
        inputs = inputs if inputs is not None else remote.random_inputs(meta["inputs"], args.batch)
        return inputs, interpret(graph, inputs), f"the IR interpreter on {args.model_source}"
    stored = remote.load_reference(args.model)
    if stored is not None and inputs is None:
        return stored[0], stored[1], f"{args.model}/{remote.REFERENCE_NAME}"
    inputs = inputs if inputs is not None else remote.random_inputs(meta["inputs"], args.batch)
    return inputs, None, None


@command("deploy")
def deploy_model(args: argparse.Namespace) -> int:
    """Upload an artifact to a device over TVM RPC, run it, check it against the host reference, time it."""
    import numpy as np

    from reshift.runtime import remote
    from reshift.runtime.artifact import read_meta

    meta = read_meta(args.model)
    inputs = None
    if args.input:
        inputs = _load_npz(args.input)
        names = [s["name"] for s in meta["inputs"]]
        if set(inputs) != set(names) and len(inputs) == len(names):  # np.savez(f, x) names it arr_0
            inputs = dict(zip(names, inputs.values(), strict=False))
    inputs, reference, source = _host_reference(args, meta, inputs)
    console = _console()
    with stage(console, f"connect to {_where(args)}"):
        session = remote.connect(**remote_args(args), timeout=args.timeout)
    with stage(console, "upload model.so and load it on the device"):
        model = remote.deploy(args.model, session)
    with stage(console, "run on the device"):
        outputs = model.run_dict(inputs)
    ok = True
    if reference is None:
        print("outputs not checked: no host reference (pass --model MODEL.onnx, or save reference.npz in the artifact)")
    else:
        for name, err in remote.compare(outputs, reference).items():
            good = err["max_abs"] <= args.atol or err["max_rel"] <= args.atol
            ok &= good
            print(
                f"output {name}: max |device - host| = {err['max_abs']:.3g} (relative {err['max_rel']:.3g}) "
                f"vs {source}: {'OK' if good else 'MISMATCH'} (tolerance {args.atol:g})"
            )
    if args.output:
        np.savez(args.output, **outputs)
        print(f"wrote the device outputs to {args.output}")
    with stage(console, f"time_evaluator, {args.repeat} runs"):
        stats = model.time(inputs, repeat=args.repeat)
    print(f"device latency: median {stats['median_ms']:.3f} ms, p90 {stats['p90_ms']:.3f} ms ({args.repeat} runs)")
    return 0 if ok else 1


def bench_remote(args: argparse.Namespace) -> int:
    """``bench OUT_DIR --rpc``: time an artifact on a remote device with TVM's time_evaluator."""
    from reshift.runtime import remote

    if not _is_artifact(args.model):
        raise InputError(f"bench --rpc/--tracker times a compiled artifact directory, not {args.model}")
    console = _console()
    with stage(console, f"connect to {_where(args)}"):
        session = remote.connect(**remote_args(args), timeout=args.timeout)
    with stage(console, "upload model.so and load it on the device"):
        model = remote.deploy(args.model, session)
    inputs = remote.random_inputs(model.meta["inputs"], args.batch)
    model.run_dict(inputs)  # warm-up
    with stage(console, f"time_evaluator, {args.repeat} runs"):
        stats = model.time(inputs, repeat=args.repeat)
    print(f"model {model.meta.get('name', '?')} batch {args.batch} on {_where(args)}, {args.repeat} runs")
    print(f"{'runtime':<16} {'median ms':>10} {'p90 ms':>10} {'items/s':>12}")
    throughput = args.batch / (stats["median_ms"] / 1e3) if stats["median_ms"] > 0 else float("inf")
    print(f"{'reshift (rpc)':<16} {stats['median_ms']:>10.3f} {stats['p90_ms']:>10.3f} {throughput:>12.1f}")
    return 0


def add_remote_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rpc", metavar="HOST:PORT", help="TVM RPC server of the device (e.g. 127.0.0.1:9090)")
    p.add_argument("--tracker", metavar="HOST:PORT", help="TVM RPC tracker that hands out devices by --key")
    p.add_argument("--key", help="device key under the tracker (e.g. reshift-edge)")


def add_timeout_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds the device may take to answer a call beyond its measured run time; then exit 2 (default: 60)",
    )
