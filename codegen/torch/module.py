"""The generated module: one table lookup per IR node, run in the graph's topological order."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from reshift.codegen.torch.registry import NodeModule, check_supported, get_torch_op
from reshift.errors import InputError
from reshift.ir.graph import Graph, Value
from reshift.ir.interpret import bind_inputs
from reshift.ir.ops import get_op, resolve_symbolic_attrs
from reshift.ir.types import FLOAT_DTYPES, numpy_dtype
from reshift.ir.verify import verify

TRAIN_MODES = ("all", "quantizers", "none")


class GraphModule(torch.nn.Module):
    """``graph`` as a torch module: ``forward(inputs)`` -> ``{output name: tensor}`` (as ``ir.interpret``).

    ``train``: ``"all"`` (quantizer state and the float parameters of ``params`` slots), ``"quantizers"``
    (quantizer state only) or ``"none"``. :meth:`to_graph` writes the learned state back, re-coded.
    """

    def __init__(self, graph: Graph, train: str = "all"):
        super().__init__()
        if train not in TRAIN_MODES:
            raise ValueError(f"train={train!r} must be one of {TRAIN_MODES}")
        check_supported(graph)
        self.graph = graph
        self.node_modules = torch.nn.ModuleDict()
        self.params = torch.nn.ParameterDict()
        self._steps: list[tuple] = []  # (node index, fn, module key, input refs, opdef)
        self._const_key: dict[str, str] = {c.name: f"c{i}" for i, c in enumerate(graph.constants.values())}
        trainable: set[str] = set()
        needed: set[str] = set()  # constants some node reads in a slot no module owns
        for index, node in enumerate(graph.nodes):
            opdef, op = get_op(node.op), get_torch_op(node.op)
            module = op.module(node, graph) if op.module is not None else None
            key = None
            if module is not None:
                key = f"n{index}"
                self.node_modules[key] = module
            inputs = list(node.inputs) if opdef.variadic else opdef.pad_inputs(list(node.inputs))
            refs = []
            for slot, v in enumerate(inputs):
                name = opdef.inputs[min(slot, len(opdef.inputs) - 1)].rstrip("?*")
                if v is None or (module is not None and name in module.owned):
                    refs.append(None)
                elif v.is_constant:
                    refs.append(("c", self._const_key[v.name]))
                    needed.add(v.name)
                    if name in op.params and v.dtype in FLOAT_DTYPES:
                        trainable.add(v.name)
                else:
                    refs.append(("v", v))
            self._steps.append((index, op.fn, key, refs, opdef))
        for value in graph.outputs:
            if value.is_constant:
                needed.add(value.name)
        for c in graph.constants.values():
            if c.name not in needed:
                continue
            key = self._const_key[c.name]
            tensor = torch.from_numpy(np.array(c.data, copy=True))
            if c.name in trainable and train == "all":
                self.params[key] = torch.nn.Parameter(tensor)
            else:
                self.register_buffer(key, tensor, persistent=True)
        for module in self.node_modules.values():
            for p in module.parameters():
                p.requires_grad_(train != "none")

    def _constant(self, key: str) -> torch.Tensor:
        return self.params[key] if key in self.params else getattr(self, key)

    def bind(self, inputs: dict[str, Any]) -> tuple[dict[Value, torch.Tensor], dict[str, int]]:
        """Name, dtype and shape checks of ``ir.interpret`` (on zero-cost views), then the tensors."""
        graph = self.graph
        tensors = {
            name: x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x)) for name, x in inputs.items()
        }
        views = {}
        for name, t in tensors.items():
            dtype = str(t.dtype).removeprefix("torch.")
            views[name] = np.broadcast_to(np.zeros((), dtype=np.dtype(dtype)), tuple(t.shape))
        env_views, bindings = bind_inputs(graph, views)
        by_name = {}
        for name, t in tensors.items():
            by_name[name] = t
        env: dict[Value, torch.Tensor] = {}
        expected = {graph.user_name(v): v for v in graph.inputs}
        ir_names = {v.name: graph.user_name(v) for v in graph.inputs}
        for name, t in by_name.items():
            value = expected.get(name) or expected.get(ir_names.get(name, ""))
            env[value] = t
        return env, bindings

    def forward(self, inputs: dict[str, Any], values: list[str] | tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """Outputs by the model's names; ``values``: also return these intermediate values (by IR name)."""
        env, bindings = self.bind(inputs)
        wanted = set(values)
        extra: dict[str, torch.Tensor] = {}
        nodes = self.graph.nodes
        for index, fn, key, refs, opdef in self._steps:
            node = nodes[index]
            args = []
            for ref in refs:
                if ref is None:
                    args.append(None)
                elif ref[0] == "c":
                    args.append(self._constant(ref[1]))
                else:
                    args.append(env[ref[1]])
            attrs = resolve_symbolic_attrs(opdef, node.attrs, bindings)
            if key is not None:
                result = self.node_modules[key](*args, **attrs)
            else:
                result = fn(*args, **attrs)
            results = result if isinstance(result, tuple) else (result,)
            for out, tensor in zip(node.outputs, results, strict=True):
                env[out] = tensor
                if out.name in wanted:
                    extra[out.name] = tensor
        outputs = {
            self.graph.user_name(v): env[v] if v in env else self._constant(self._const_key[v.name])
            for v in self.graph.outputs
        }
        missing = wanted - set(extra) - {v.name for v in self.graph.inputs}
        if missing:
            raise InputError(f"values {sorted(missing)} are not computed by graph {self.graph.name}")
        return {**outputs, **extra}

    def project(self) -> None:
        """Keep every module's latent state in range (after an optimizer step)."""
        with torch.no_grad():
            for module in self.node_modules.values():
                module.project()

    def extra_loss(self) -> torch.Tensor | None:
        terms = [t for m in self.node_modules.values() if (t := m.extra_loss()) is not None]
        return sum(terms) if terms else None

    def to_graph(self) -> Graph:
        """A copy of the graph with the learned state written back, re-coded, verified."""
        graph = self.graph.copy()
        with torch.no_grad():
            for index, _, key, _, _ in self._steps:
                if key is not None:
                    module: NodeModule = self.node_modules[key]
                    module.write_back(graph.nodes[index], graph)
            for name, key in self._const_key.items():
                if key in self.params:
                    value = graph.constants[name]
                    value.data = self.params[key].detach().cpu().numpy().astype(numpy_dtype(value.dtype)).copy()
        graph.remove_unused()
        verify(graph)
        return graph


def to_torch(graph: Graph, train: str = "all") -> GraphModule:
    """The trainable torch module generated from ``graph`` (see the package docstring)."""
    return GraphModule(graph, train)


__all__ = ["TRAIN_MODES", "GraphModule", "to_torch"]
