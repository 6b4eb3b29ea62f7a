"""FX frontend: a TorchDynamo ``GraphModule`` (what ``torch.compile`` hands a backend) to reshift IR.

Dynamo lifts a module's parameters and buffers to graph inputs and, once it sees a second input
shape, adds ``SymInt`` size inputs. :func:`from_fx` sorts the placeholders into

* **state** (parameters, buffers): frozen into the graph as constants, as inductor's freezing does;
  reshift compiles for inference, so later weight updates are not seen (dynamo recompiles only
  when the tensor objects change);
* **sizes** (``SymInt``): recomputed from the user tensor they were read from;
* **user inputs**: the IR graph's inputs, named after the Python argument (``x``).

It wraps the GraphModule in a module with the state as buffers and exports it through
:func:`reshift.frontend.torch.from_torch`, so the aten converters and decompositions are shared.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from reshift.errors import UnsupportedOpError
from reshift.frontend.torch import from_torch
from reshift.ir import Graph, sanitize_name


@dataclass
class FxGraph:
    """An IR graph made from an FX GraphModule, with how to pick its inputs from the gm's arguments."""

    graph: Graph
    user_positions: list[int]  # gm argument positions of the IR inputs, in IR input order
    dynamic_batch: bool  # the graph's dim 0 is the symbolic batch N


def _source_chain(node: torch.fx.Node) -> list[Any]:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    chain = []
    while source is not None:
        chain.append(source)
        source = getattr(source, "base", None)
    return chain


def _is_state(node: torch.fx.Node, example: Any) -> bool:
    """A parameter or buffer of an nn.Module, lifted to a graph input by dynamo."""
    if isinstance(example, torch.nn.Parameter):
        return True
    return any("ParamBuffer" in type(s).__name__ or "NNModule" in type(s).__name__ for s in _source_chain(node))


def _state_name(placeholder: str) -> str:
    """``L_self_modules_fc_parameters_weight_`` -> ``fc_weight``."""
    name = re.sub(r"^[lL]_self_", "", placeholder).strip("_")
    name = re.sub(r"(^|_)(modules|parameters|buffers)_", r"\1", name)
    return sanitize_name(name or "state")


def _user_name(node: torch.fx.Node) -> str:
    chain = _source_chain(node)
    local = getattr(chain[-1], "local_name", None) if chain else None
    if local and len(chain) == 1:
        return local
    return re.sub(r"^[lL]_", "", node.name).strip("_") or node.name


class _Frozen(torch.nn.Module):
    """``gm`` with its state as buffers, taking only the user tensors."""

    def __init__(self, gm: torch.fx.GraphModule, plan: list[tuple], state: dict[str, torch.Tensor]):
        super().__init__()
        self.gm = gm
        self.plan = plan
        for name, tensor in state.items():
            self.register_buffer(name, tensor.detach(), persistent=True)

    def call(self, *users: torch.Tensor):
        args = []
        for kind, *where in self.plan:
            if kind == "user":
                args.append(users[where[0]])
            elif kind == "state":
                args.append(getattr(self, where[0]))
            elif kind == "size":
                args.append(users[where[0]].shape[where[1]])
            else:
                args.append(where[0])
        return self.gm(*args)


def _with_arity(module: _Frozen, arity: int) -> _Frozen:
    """Give ``module`` a ``forward(x0, ..., xk)``: torch.export pairs dynamic shapes with named parameters."""
    params = ", ".join(f"x{i}" for i in range(arity))
    namespace: dict[str, Any] = {}
    exec(f"def forward(self, {params}):\n    return self.call({params})\n", namespace)  # noqa: S102
    module.forward = namespace["forward"].__get__(module)
    return module


def from_fx(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, dynamic_batch: bool | None = None) -> FxGraph:
    """Convert a dynamo GraphModule (with the example inputs dynamo passed) to a verified IR graph.

    ``dynamic_batch`` defaults to whether dynamo marked a size dynamic (a ``SymInt`` input).
    Raises :class:`UnsupportedOpError` for ops, inputs or size inputs reshift cannot express.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise UnsupportedOpError("FX graph", {"placeholder": [f"{len(placeholders)} vs {len(example_inputs)} inputs"]})
    plan: list[tuple] = []
    state: dict[str, torch.Tensor] = {}
    user_positions: list[int] = []
    user_examples: list[torch.Tensor] = []
    user_names: list[str] = []
    sources: dict[Any, int] = {}  # source of a user tensor -> its index among user inputs
    unsupported: dict[str, list[str]] = {}
    pending_sizes: list[tuple[int, torch.fx.Node]] = []
    for position, (node, example) in enumerate(zip(placeholders, example_inputs, strict=False)):
        if isinstance(example, torch.Tensor):
            if _is_state(node, example):
                name = _state_name(node.name)
                while name in state:
                    name += "_"
                state[name] = example
                plan.append(("state", name))
            else:
                chain = _source_chain(node)
                if chain:
                    sources[chain[0]] = len(user_examples)
                plan.append(("user", len(user_examples)))
                user_positions.append(position)
                user_examples.append(example)
                user_names.append(_user_name(node))
        elif isinstance(example, (torch.SymInt, int)) and not isinstance(example, bool):
            plan.append(None)  # filled in once every user tensor is known
            pending_sizes.append((position, node))
        else:
            unsupported.setdefault("input", []).append(f"{node.name} ({type(example).__name__})")
    for position, node in pending_sizes:
        chain = _source_chain(node)
        source = chain[0] if chain else None
        base, index = getattr(source, "base", None), getattr(source, "idx", None)
        if base in sources and isinstance(index, int) and "SIZE" in str(getattr(source, "prop", "")):
            plan[position] = ("size", sources[base], index)
        else:
            unsupported.setdefault("sym_size", []).append(f"{node.name} (a size reshift cannot trace to an input)")
    if unsupported:
        raise UnsupportedOpError("FX graph", unsupported)
    if dynamic_batch is None:
        dynamic_batch = bool(pending_sizes)
    wrapper = _with_arity(_Frozen(gm, plan, state), len(user_examples)).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch-internal noise
        graph = from_torch(wrapper, tuple(user_examples), dynamic_batch=dynamic_batch, input_names=user_names)
    return FxGraph(graph, user_positions, dynamic_batch)
