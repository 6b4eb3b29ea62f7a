"""The ``reshift`` command line: ``reshift inspect | ops | compile | run | bench | tune | deploy``.

Bad input exits with code 2 and a one-paragraph message (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from reshift.errors import ModelLoadError, ReshiftError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn

    return register


def load_graph(model: str):
    """An IR graph from an ONNX file (artifact directories are handled by the runtime)."""
    from reshift.frontend import from_onnx

    path = Path(model)
    if not path.exists():
        raise ModelLoadError(f"{model}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{model} is a directory; expected an .onnx model file")
    return from_onnx(path)


@command("inspect")
def inspect_model(args: argparse.Namespace) -> int:
    """Print the IR summary, op histogram, MACs, parameter bytes and the pass report."""
    from reshift import passes
    from reshift.ir.analysis import graph_macs

    graph = load_graph(args.model)
    print(graph.summary())
    print(f"MACs (batch 1): {graph_macs(graph):,}")
    optimized, report = passes.run(graph, args.pipeline)
    print()
    print(report)
    print()
    print(f"after {args.pipeline}:")
    print(optimized.summary())
    print(f"MACs (batch 1): {graph_macs(optimized):,}")
    if args.ir:
        print()
        print(optimized)
    return 0


@command("ops")
def list_ops(args: argparse.Namespace) -> int:
    """Print the supported-op table (markdown with --markdown)."""
    from reshift.ir.op_table import op_table_markdown

    print(op_table_markdown())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reshift", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show a model's IR, op histogram, MACs and pass report")
    p.add_argument("model", help="MODEL.onnx")
    p.add_argument("--pipeline", default="exact", help="pass pipeline (default: exact)")
    p.add_argument("--ir", action="store_true", help="also print the optimized IR (weights elided)")
    sub.add_parser("ops", help="list the supported ops (markdown table)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ReshiftError as exc:
        if args.debug:
            raise
        print(f"reshift {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
