"""The table of torch implementations: one :class:`TorchOp` per IR op (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from reshift.errors import CodegenError
from reshift.ir.graph import Graph, Node


class NodeModule(torch.nn.Module):
    """The trainable state of one node. ``owned``: input names whose constants this module replaces
    (it reads them in ``__init__`` and writes them back re-coded in :meth:`write_back`)."""

    owned: tuple[str, ...] = ()

    def write_back(self, node: Node, graph: Graph) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no write_back")

    def project(self) -> None:
        """Called after every optimizer step: keep latent state in its valid range (no-op by default)."""

    def extra_loss(self) -> torch.Tensor | None:
        """A term added to the training loss (e.g. a load-balancing loss); none by default."""
        return None

    @staticmethod
    def set_input(node: Node, graph: Graph, slot: int, array: np.ndarray, hint: str) -> None:
        """Point input ``slot`` of ``node`` at a new constant holding ``array`` (the old one is dropped
        by ``remove_unused`` when nothing else reads it)."""
        node.inputs[slot] = graph.add_constant(np.ascontiguousarray(array), f"{node.name}_{hint}")


@dataclass(frozen=True)
class TorchOp:
    """How one IR op runs in torch: ``fn(*inputs, **attrs)``, and/or a ``module`` builder; ``params``:
    input names whose float constants train as plain parameters."""

    name: str
    fn: Callable[..., Any] | None = None
    module: Callable[[Node, Graph], NodeModule | None] | None = None
    params: tuple[str, ...] = ()


TORCH_OPS: dict[str, TorchOp] = {}


def register_torch_op(
    name: str,
    fn: Callable[..., Any] | None = None,
    module: Callable[[Node, Graph], NodeModule | None] | None = None,
    params: tuple[str, ...] = (),
) -> TorchOp:
    if name in TORCH_OPS:
        raise ValueError(f"torch implementation of {name!r} registered twice")
    if fn is None and module is None:
        raise ValueError(f"torch op {name!r} needs fn or module")
    TORCH_OPS[name] = TorchOp(name, fn, module, tuple(params))
    return TORCH_OPS[name]


def get_torch_op(name: str) -> TorchOp:
    if name not in TORCH_OPS:
        raise CodegenError(f"op {name!r} has no torch implementation (reshift/codegen/torch); known: {len(TORCH_OPS)}")
    return TORCH_OPS[name]


def check_supported(graph: Graph) -> None:
    """Refuse a graph with ops that have no torch implementation, naming each op and its nodes."""
    missing: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.op not in TORCH_OPS:
            missing.setdefault(node.op, []).append(node.name)
    if missing:
        lines = [
            f"  {op} x{len(nodes)}: {', '.join(nodes[:5])}{', ...' if len(nodes) > 5 else ''}"
            for op, nodes in sorted(missing.items())
        ]
        raise CodegenError(
            f"graph {graph.name} cannot be trained: {len(missing)} op type(s) have no torch implementation:\n"
            + "\n".join(lines)
            + "\nRegister one with reshift.codegen.torch.register_torch_op (see its module docstring), "
            "or use a pipeline that does not produce these ops."
        )


__all__ = ["TORCH_OPS", "NodeModule", "TorchOp", "check_supported", "get_torch_op", "register_torch_op"]
