"""The exceptions reshift raises for bad input: each names what is wrong, where, and what to do.

The CLI turns every :class:`ReshiftError` into a one-paragraph message and exit code 2.
"""

from __future__ import annotations


class ReshiftError(Exception):
    """Base of every error caused by the user's input rather than a bug in reshift."""


class IRTypeError(ReshiftError):
    """A malformed type, shape or dtype."""


class NodeTypeError(IRTypeError):
    """An IRTypeError raised while building one node: ``reason`` without the ``node NAME:`` prefix,
    for callers (the ONNX frontend) that name the node in their own terms."""

    def __init__(self, node: str, reason: str):
        super().__init__(f"node {node}: {reason}")
        self.node, self.reason = node, reason


class VerificationError(ReshiftError):
    """A graph breaks an IR invariant (SSA, types, topological order, dangling values)."""


class ParseError(ReshiftError):
    """The IR text form could not be read; the message names the line."""


class UnknownOpError(ReshiftError):
    """An op name that is not in the registry."""


class UnsupportedOpError(ReshiftError):
    """A frontend met ops it cannot convert; lists every one with node names and counts."""

    def __init__(self, source: str, unsupported: dict[str, list[str]]):
        self.unsupported = unsupported
        lines = [
            f"  {op} x{len(nodes)}: {', '.join(nodes[:5])}{', ...' if len(nodes) > 5 else ''}"
            for op, nodes in sorted(unsupported.items())
        ]
        total = sum(len(nodes) for nodes in unsupported.values())
        super().__init__(
            f"{source} has {total} node(s) with {len(unsupported)} unsupported op type(s):\n"
            + "\n".join(lines)
            + "\nRewrite these ops in the model, or add them to reshift's op registry (ir/ops.py)."
        )


class ModelLoadError(ReshiftError):
    """A model file is missing, truncated or malformed."""


class InputError(ReshiftError):
    """Inputs given to a graph or compiled model have the wrong names, shapes or dtypes."""


class PassError(ReshiftError):
    """A pass or pipeline was misconfigured (unknown pipeline, bad calibration data)."""


class CodegenError(ReshiftError):
    """A graph could not be lowered or built for the requested target."""


class ArtifactError(ReshiftError):
    """A compiled artifact is missing files, corrupted or built for another target."""


class ResourceLimitError(ReshiftError):
    """A tensor's declared size is over the per-tensor memory limit (``RESHIFT_MAX_TENSOR_BYTES``)."""


class ExecutionError(ReshiftError):
    """An op's numpy reference failed on the values it was given (e.g. an index out of range)."""


class ExportError(ReshiftError):
    """``torch.export`` could not trace a torch model; the message gives torch's reason and what to do."""


class SymbolicShapeError(ModelLoadError, IRTypeError):
    """An op cannot keep a symbolic dimension (a conv or pool over a symbolic height/width, whose
    size would be an affine floor expression rather than a monomial such as ``4*N``).

    ``symbols`` maps each symbol involved to the graph inputs and axes it comes from (filled in
    by the frontend), so a caller can pin exactly those: :func:`reshift.compile` does so per call
    shape (:mod:`reshift.specializing`), the CLI asks for ``--input-shape``.
    """

    def __init__(self, message: str, symbols: dict[str, list[tuple[str, int]]] | None = None):
        super().__init__(message)
        self.symbols = dict(symbols or {})
