"""PyTorch frontend: ``torch.export`` a module, then convert its aten graph to reshift IR.

The exported graph is decomposed with torch's default table minus every op that has a converter
in :data:`reshift.frontend.aten_ops.ATEN_CONVERTERS`, so ops the IR has (linear, conv2d,
layer_norm, gelu, softmax, ...) arrive whole. Each FX node then becomes one of:

* a batch **dimension** (``sym_size`` and arithmetic on sizes): an IR dim, ``"N"`` or ``"K*N"``;
* a **lazy constant** when it does not read the user's inputs (weights, ``arange`` masks,
  ``t(weight)``): torch evaluates it on demand and it enters the IR as a constant, expanded
  along the batch when its shape has one (a causal mask ``[N, 1, T, T]`` becomes ``[1, 1, T, T]``);
* IR nodes built by its converter, looked up in the table by overload then by op name.

Unsupported ops are collected over the whole graph and reported in one
:class:`~reshift.errors.UnsupportedOpError`.
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.export.graph_signature import InputKind, OutputKind

from reshift.errors import ExportError, IRTypeError, ReshiftError, UnsupportedOpError
from reshift.frontend.aten_ops import ATEN_CONVERTERS, SHAPE_ONLY_OPS, SIDE_EFFECT_OPS, Unsupported
from reshift.ir import Graph, TensorType, Value, create_node, get_op, sanitize_name, verify
from reshift.ir.types import Dim, dim_terms, monomial, split_dim

MAX_BATCH = 4096
BATCH = "N"
# Batch sizes at which data-independent values are evaluated to check they are batch-invariant.
SAMPLE_BATCHES = (2, 3)

TORCH_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float64: "float64",  # computed in float64, never silently narrowed
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.int16: "int32",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.bool: "bool",
}


def from_torch(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    dynamic_batch: bool = True,
    input_names: Sequence[str] | None = None,
    dynamic_dims: dict[int, dict[int, str]] | None = None,
) -> Graph:
    """Export ``module`` with ``torch.export`` and convert it to a verified reshift IR graph.

    With ``dynamic_batch`` dim 0 of every input is the IR's batch symbol ``N`` (falls back to
    static shapes, with a warning, when the model pins its batch size). ``dynamic_dims`` makes
    more axes symbolic, per input index: ``{0: {1: "S"}}`` (a ``torch.export.Dim`` each; one
    name may appear on several inputs). A value computed from such a size alone (a causal mask
    over ``S``) is refused with the reason; pin the size (export it static) for those models.
    """
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    dynamic_dims = {int(k): {int(a): str(n) for a, n in v.items()} for k, v in (dynamic_dims or {}).items()}
    with _without_cache(module) as notes:
        program = _export(module.eval(), inputs, dynamic_batch, dynamic_dims)
    program = program.run_decompositions(decomposition_table())
    graph = _Converter(program, type(module).__name__, input_names, dynamic_dims).run()
    graph.notes.extend(notes)
    verify(graph)
    return graph


@contextlib.contextmanager
def _without_cache(module: torch.nn.Module):
    """Export a Hugging Face model with ``config.use_cache = False`` (restored afterwards).

    A causal LM's ``forward`` returns a ``DynamicCache`` (``past_key_values``) when the cache is on,
    which torch.export cannot return; reshift compiles one full forward, so the cache outputs are
    dropped. Yields the notes saying so (they become ``graph.notes``); encoders, whose
    ``use_cache`` only matters in decoder mode, get none.
    """
    config = getattr(module, "config", None)
    if getattr(config, "use_cache", False) is not True:
        yield []
        return
    generates = getattr(module, "can_generate", lambda: False)() or getattr(config, "is_decoder", False)
    config.use_cache = False
    try:
        yield (
            [
                f"{type(module).__name__} exported with use_cache=False: the KV-cache outputs "
                "(past_key_values) are dropped; the graph computes one full forward pass"
            ]
            if generates
            else []
        )
    finally:
        config.use_cache = True


def decomposition_table():
    """torch's default decompositions minus the ops reshift converts whole."""
    table = torch.export.default_decompositions()
    for op in list(table.keys()):
        if converter_for(op) is not None:
            table.pop(op)
    return table


def op_name(target: Any) -> str:
    """``aten.add.Tensor``, ``aten.relu`` (``.default`` dropped) or a Python function's name."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target.overloadpacket) if target._overloadname == "default" else str(target)
    return getattr(target, "__name__", str(target))


def converter_for(target: Any):
    """The converter for an aten overload: keyed by ``aten.op.overload`` first, then ``aten.op``."""
    if not isinstance(target, torch._ops.OpOverload):
        return None
    return ATEN_CONVERTERS.get(str(target)) or ATEN_CONVERTERS.get(str(target.overloadpacket))


def _export(module: torch.nn.Module, inputs: tuple, dynamic_batch: bool, dynamic_dims: dict | None = None):
    """torch.export with dim 0 dynamic, else static (with a warning); failing both is an ExportError."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0]
    dynamic_failure = None
    if dynamic_batch and tensors:
        # A batch of 1 makes torch specialize the dimension; trace with 2 (values do not matter).
        if all(x.shape[0] == 1 for x in tensors):
            inputs_for_export = tuple(
                x.repeat(2, *([1] * (x.dim() - 1))) if isinstance(x, torch.Tensor) and x.dim() > 0 else x
                for x in inputs
            )
        else:
            inputs_for_export = inputs
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        named = {
            n: torch.export.Dim(n, min=1, max=MAX_BATCH)
            for axes in (dynamic_dims or {}).values()
            for n in axes.values()
        }
        shapes = tuple(
            {0: batch, **{a: named[n] for a, n in (dynamic_dims or {}).get(i, {}).items()}}
            if isinstance(x, torch.Tensor) and x.dim() > 0
            else None
            for i, x in enumerate(inputs)
        )
        try:
            with torch.no_grad():
                return torch.export.export(module, inputs_for_export, dynamic_shapes=shapes)
        except Exception as exc:  # torch raises many kinds here; any of them means "not dynamic"
            dynamic_failure = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    try:
        with torch.no_grad():
            program = torch.export.export(module, inputs)
    except Exception as exc:  # torch.export raises many kinds; the user gets one reshift error
        raise ExportError(_export_failure(module, exc)) from exc
    if dynamic_failure is not None:
        warnings.warn(
            f"torch.export with a dynamic batch failed for {type(module).__name__} ({dynamic_failure}); "
            "exporting with static shapes, so the graph only accepts the example batch size",
            stacklevel=3,
        )
    return program


def _export_failure(module: torch.nn.Module, exc: Exception) -> str:
    """The message of a failed ``torch.export``: torch's first line, then what to change."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "Cache" in first and "not a known type" in first:
        advice = "call the model with use_cache=False (or set model.config.use_cache = False): reshift has no KV cache"
    elif "in output, which is not a known type" in first:
        advice = "wrap the model in a module whose forward returns tensors (or tuples/dicts of tensors)"
    else:
        advice = (
            "make forward traceable by torch.export (no data-dependent Python control flow), "
            'or use torch.compile(model, backend="reshift"), which runs untraceable parts eagerly'
        )
    return f"torch.export failed for {type(module).__name__}: {type(exc).__name__}: {first}\nTo fix: {advice}."


class _Lazy:
    """An FX node that does not read the user's inputs: torch evaluates it when IR needs it."""

    __slots__ = ("node",)

    def __init__(self, node: torch.fx.Node):
        self.node = node


_POISON = object()  # the value of a node downstream of an unsupported op


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy copy of a tensor in its IR dtype (int16 -> int32, bfloat16 via ml_dtypes)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype not in TORCH_DTYPES:
        raise IRTypeError(f"tensor dtype {tensor.dtype} has no reshift IR equivalent")
    if tensor.dtype == torch.bfloat16:
        from reshift.ir.types import numpy_dtype

        return tensor.float().numpy().astype(numpy_dtype("bfloat16"))
    array = tensor.contiguous().numpy()
    target = TORCH_DTYPES[tensor.dtype]
    return array if array.dtype.name == target else array.astype(target)


class _Converter:
    """Walks an exported program once; converters see it as ``cx`` (see :mod:`aten_ops`)."""

    def __init__(self, program, model_name: str, input_names: Sequence[str] | None, dynamic_dims: dict | None = None):
        self.program = program
        self.model_name = model_name
        self.input_names = list(input_names) if input_names is not None else None
        self.graph = Graph(sanitize_name(model_name))
        self.env: dict[torch.fx.Node, Any] = {}
        self.dependent: set[torch.fx.Node] = set()  # nodes that read user inputs
        self.batch_varying: set[torch.fx.Node] = set()  # lazy nodes whose value may depend on N
        self.tensors: dict[torch.fx.Node, torch.Tensor] = {}  # weights behind placeholders
        self.const_names: dict[torch.fx.Node, str] = {}
        self.materialized: dict[torch.fx.Node, Value] = {}
        self.samples: dict[tuple[torch.fx.Node, int | None], Any] = {}
        self.unsupported: dict[str, list[str]] = {}
        self.taken: set[str] = set()
        self.symbol = None  # a sympy symbol torch uses for an input size (set once one is seen)
        self.dynamic_dims = dynamic_dims or {}  # user input index -> {axis: IR symbol}
        self.symbol_names: dict[Any, str] = {}  # sympy symbol -> IR symbol (N, S, ...)
        self.node: torch.fx.Node | None = None  # the node being converted
        self.raw: dict[str, Any] = {}  # its bound FX-level arguments
        self.position = {n: i for i, n in enumerate(program.graph_module.graph.nodes)}

    # -- walking ---------------------------------------------------------------------------
    def run(self) -> Graph:
        specs = {spec.arg.name: spec for spec in self.program.graph_signature.input_specs}
        user_index = 0
        for node in self.program.graph_module.graph.nodes:
            if node.op == "placeholder":
                user_index += self._placeholder(node, specs.get(node.name), user_index)
            elif node.op == "get_attr":
                self.tensors[node] = getattr(self.program.graph_module, node.target)
                self.const_names[node] = sanitize_name(node.target)
                self.env[node] = _Lazy(node)
            elif node.op == "call_function":
                self._call(node)
            elif node.op == "output":
                self._outputs(node)
        if self.unsupported:
            raise UnsupportedOpError(f"torch model {self.model_name}", self.unsupported)
        self.graph.remove_unused()
        return self.graph

    def _placeholder(self, node: torch.fx.Node, spec, user_index: int) -> int:
        if spec is not None and spec.kind == InputKind.TOKEN:  # effect ordering, nothing to compute
            self.env[node] = None
            return 0
        if spec is not None and spec.kind != InputKind.USER_INPUT:
            state = self.program.state_dict if spec.target in self.program.state_dict else self.program.constants
            self.tensors[node] = state[spec.target]
            self.const_names[node] = sanitize_name(spec.target)
            self.env[node] = _Lazy(node)
            return 0
        meta = node.meta.get("val")
        if not isinstance(meta, torch.Tensor):
            self.env[node] = meta  # a specialized Python scalar input
            return 0
        if self.input_names is not None and user_index < len(self.input_names):
            name = sanitize_name(self.input_names[user_index])
        else:
            name = sanitize_name(node.name)
        if meta.dtype not in TORCH_DTYPES:
            raise IRTypeError(f"input {name!r} has dtype {meta.dtype}, which the reshift IR lacks; cast it first")
        for axis, size in enumerate(meta.shape):  # name torch's size symbols after the axes they stand for
            label = self.dynamic_dims.get(user_index, {}).get(axis, BATCH if axis == 0 else None)
            if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol and label is not None:
                self.symbol_names.setdefault(size.node.expr, label)
        value = Value(self._claim(name), self.tensor_type(meta))
        self.graph.inputs.append(value)
        self.env[node] = value
        self.dependent.add(node)
        return 1

    def _call(self, node: torch.fx.Node) -> None:
        name = op_name(node.target)
        meta = node.meta.get("val")
        if name in SIDE_EFFECT_OPS:
            self.env[node] = None
            return
        inputs = node.all_input_nodes
        if isinstance(meta, (torch.SymInt, int)) and not isinstance(meta, bool):
            self.env[node] = self.dim(meta)  # shape arithmetic: evaluated now, never a node
            return
        if name not in SHAPE_ONLY_OPS and any(n in self.dependent for n in inputs):
            self.dependent.add(node)
        else:
            if any(n in self.batch_varying or isinstance(self.env.get(n), str) for n in inputs):
                self.batch_varying.add(node)
            if name in SHAPE_ONLY_OPS and any(n in self.dependent for n in inputs):
                self.batch_varying.add(node)
            self.env[node] = _Lazy(node)
            return
        if any(self.env.get(n) is _POISON for n in inputs):
            self.env[node] = _POISON
            if node.target is not operator.getitem and converter_for(node.target) is None:
                self.unsupported.setdefault(name, []).append(node.name)
            return
        if node.target is operator.getitem:
            self.env[node] = self._getitem(node)
            return
        converter = converter_for(node.target)
        if converter is None:
            self.unsupported.setdefault(name, []).append(node.name)
            self.env[node] = _POISON
            return
        self.node, self.raw = node, _bind(node.target, node.args, node.kwargs)
        args = {key: self.entry(value) for key, value in self.raw.items()}
        before = (len(self.graph.nodes), len(self.graph.constants))
        try:
            result = converter(self, args)
        except (Unsupported, IRTypeError) as exc:
            self.unsupported.setdefault(name, []).append(f"{node.name} ({exc})")
            self.env[node] = _POISON
            return
        self._adopt_name(result, sanitize_name(node.name), before)
        self.env[node] = result

    def _getitem(self, node: torch.fx.Node) -> Any:
        source, index = node.args
        entry = self.env[source]
        if entry is None and op_name(source.target) in SIDE_EFFECT_OPS:
            return None
        item = entry[index] if isinstance(entry, (tuple, list)) else None
        if item is None:
            producer = op_name(source.target) if source.op == "call_function" else source.name
            self.unsupported.setdefault(producer, []).append(f"{source.name} (output {index} is not supported)")
            return _POISON
        return item

    def _outputs(self, node: torch.fx.Node) -> None:
        specs = self.program.graph_signature.output_specs
        for spec, arg in zip(specs, node.args[0], strict=True):
            if spec.kind != OutputKind.USER_OUTPUT:
                continue
            entry = self.env.get(arg) if isinstance(arg, torch.fx.Node) else arg
            if entry is _POISON:
                continue
            if not isinstance(entry, (Value, _Lazy)):
                self.unsupported.setdefault("output", []).append(f"{arg} (not a tensor)")
                continue
            value = self.value(entry)
            if value in self.graph.inputs or value.is_constant or value in self.graph.outputs:
                value = self.emit("identity", [value], name=f"{value.name}_out")
            self.graph.outputs.append(value)

    # -- names -----------------------------------------------------------------------------
    def _claim(self, name: str) -> str:
        """``name`` if unused, else ``name_1``, ``name_2``, ...; reserves the result."""
        candidate, count = name, 0
        while candidate in self.taken:
            count += 1
            candidate = f"{name}_{count}"
        self.taken.add(candidate)
        return candidate

    def _adopt_name(self, result: Any, name: str, before: tuple[int, int]) -> None:
        """Give the value a converter just created the FX node's name (helpers keep theirs)."""
        new_nodes = self.graph.nodes[before[0] :]
        new_constants = list(self.graph.constants.values())[before[1] :]
        values = [v for v in result if isinstance(v, Value)] if isinstance(result, tuple) else [result]
        if len(values) == 1:
            result = values[0]
        if isinstance(result, Value) and name not in self.taken:
            producer = next((n for n in new_nodes if result in n.outputs and len(n.outputs) == 1), None)
            if producer is not None:
                producer.name = result.name = self._claim(name)
            elif any(c is result for c in new_constants):
                del self.graph.constants[result.name]
                result.name = self._claim(name)
                self.graph.constants[result.name] = result
        elif isinstance(result, tuple) and name not in self.taken:
            producer = next((n for n in new_nodes if values and n.outputs == values), None)
            if producer is not None:
                producer.name = self._claim(name)
                for index, value in enumerate(values):
                    value.name = self._claim(f"{name}.{index}")

    # -- entries and values ----------------------------------------------------------------
    def entry(self, arg: Any) -> Any:
        """An FX argument with nodes replaced by what they became (Value, _Lazy, dim, tuple)."""
        return torch.fx.node.map_arg(arg, lambda n: self.env[n])

    def dim(self, size: Any) -> Dim:
        """A torch size (int or SymInt) as an IR dim: ``16`` or ``"16*N"``."""
        if isinstance(size, int):
            return size
        expr = size.node.expr
        if expr.is_Integer:
            return int(expr)
        coefficient, rest = expr.as_coeff_Mul()
        powers = rest.as_powers_dict() if coefficient.is_Integer else {}
        if powers and all(s.is_Symbol and p.is_Integer and p > 0 for s, p in powers.items()):
            if not self.symbol_names and self.symbol is None:  # no input named it: the first one is the batch
                self.symbol_names[next(iter(powers))] = BATCH
            if all(s in self.symbol_names for s in powers):
                self.symbol = next(iter(powers))
                names = [self.symbol_names[s] for s, p in powers.items() for _ in range(int(p))]
                return monomial(int(coefficient), names)
        raise IRTypeError(
            f"dimension {expr} is not a whole multiple of the symbolic sizes {sorted(self.symbol_names.values())}"
        )

    def ir_dtype(self, dtype: torch.dtype) -> str:
        if dtype not in TORCH_DTYPES:
            raise Unsupported(f"dtype {dtype} has no reshift IR equivalent")
        return TORCH_DTYPES[dtype]

    def tensor_type(self, meta: torch.Tensor) -> TensorType:
        return TensorType(tuple(self.dim(d) for d in meta.shape), self.ir_dtype(meta.dtype))

    @property
    def out_type(self) -> TensorType:
        """IR type of the current node's (first) output, from torch's metadata."""
        meta = self.node.meta["val"]
        return self.tensor_type(meta[0] if isinstance(meta, (tuple, list)) else meta)

    def meta(self, key: str) -> Any:
        """torch's metadata (FakeTensor, list of them, or the Python value) of a bound argument."""
        return torch.fx.node.map_arg(self.raw[key], lambda n: n.meta.get("val"))

    def value(self, entry: Any, dtype: str | None = None) -> Value:
        """An IR value for an entry: materializes lazy constants, scalars become 0-d constants."""
        if isinstance(entry, Value):
            return entry
        if isinstance(entry, _Lazy):
            return self._materialize(entry.node)
        if isinstance(entry, (bool, int, float)) and not isinstance(entry, str):
            dtype = dtype or ("bool" if isinstance(entry, bool) else "int64" if isinstance(entry, int) else "float32")
            return self.constant(np.array(entry, dtype=dtype), f"{self.node.name}_scalar")
        raise Unsupported(f"argument {entry!r} is not a tensor reshift can represent")

    def constant(self, array: np.ndarray, name: str) -> Value:
        value = Value(self._claim(sanitize_name(name)), TensorType.of(array), array)
        self.graph.constants[value.name] = value
        return value

    def emit(self, op: str, inputs: list[Value | None], name: str | None = None, **attrs: Any) -> Any:
        """Append one node (or fold it to constants when every input is constant)."""
        hint = name or f"{self.node.name if self.node is not None else 'v'}_{op}"
        node = create_node(self.graph, op, list(inputs), attrs, name=self._claim(sanitize_name(hint)))
        present = [v for v in node.inputs if v is not None]
        if present and all(v.is_constant for v in present) and all(o.type.is_static for o in node.outputs):
            results = get_op(op).reference(*[v.data if v is not None else None for v in node.inputs], **node.attrs)
            results = results if isinstance(results, tuple) else (results,)
            values = [self.constant(np.asarray(r), o.name) for r, o in zip(results, node.outputs, strict=True)]
            return values[0] if len(values) == 1 else tuple(values)
        for out in node.outputs:
            self.taken.add(out.name)
        self.graph.nodes.append(node)
        return node.outputs[0] if len(node.outputs) == 1 else tuple(node.outputs)

    def cast(self, value: Value, dtype: str) -> Value:
        return value if value.dtype == dtype else self.emit("cast", [value], dtype=dtype)

    # -- lazy constants ----------------------------------------------------------------------
    def samples_of(self, entry: Any) -> list[tuple[int | None, Any]]:
        """``(batch, torch value)`` of a lazy entry per sample batch size (batch None: invariant)."""
        if not isinstance(entry, _Lazy):
            raise Unsupported("expected a value that does not depend on the inputs")
        node = entry.node
        batches = SAMPLE_BATCHES if (self.symbol is not None and node in self.batch_varying) else (None,)
        return [(batch, self._evaluate(node, batch)) for batch in batches]

    def _evaluate(self, target: torch.fx.Node, batch: int | None) -> Any:
        if (target, batch) in self.samples:
            return self.samples[(target, batch)]
        order, stack, seen = [], [target], set()
        while stack:  # every not-yet-evaluated ancestor, evaluated below in graph order
            node = stack.pop()
            if node in seen or (node, batch) in self.samples:
                continue
            seen.add(node)
            order.append(node)
            leaf = node in self.tensors or node in self.dependent or isinstance(self.env.get(node), (int, str))
            if not leaf:
                stack.extend(node.all_input_nodes)
        for node in sorted(order, key=self.position.__getitem__):
            self.samples[(node, batch)] = self._evaluate_one(node, batch)
        return self.samples[(target, batch)]

    def _evaluate_one(self, node: torch.fx.Node, batch: int | None) -> Any:
        if node in self.tensors:
            return self.tensors[node]
        entry = self.env.get(node)
        if isinstance(entry, (int, str)):
            coefficient, symbols = dim_terms(entry)
            return coefficient * (batch ** len(symbols) if symbols else 1)
        if node in self.dependent:  # read only for its shape by a SHAPE_ONLY op
            meta = node.meta["val"]
            shape = [d if isinstance(d, int) else self._evaluate_dim(d, batch) for d in meta.shape]
            return torch.zeros(shape, dtype=meta.dtype)
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: self.samples[(n, batch)])
        with torch.no_grad():
            return node.target(*args, **kwargs)

    def _evaluate_dim(self, size: Any, batch: int | None) -> int:
        coefficient, symbols = dim_terms(self.dim(size))
        return coefficient * (batch ** len(symbols) if symbols else 1)

    def _materialize(self, node: torch.fx.Node) -> Value:
        """The IR constant for a lazy node, expanded along the batch if its shape has one."""
        if node in self.materialized:
            return self.materialized[node]
        meta = node.meta.get("val")
        if not isinstance(meta, torch.Tensor):
            raise Unsupported(f"{node.name} is not a tensor")
        shape = self.tensor_type(meta).shape
        name = self.const_names.get(node, sanitize_name(node.name))
        source = node.args[0] if node.target is torch.ops.aten.expand.default else None
        if isinstance(source, torch.fx.Node) and source not in self.batch_varying:
            # expand(weight, [N, ...]): keep the weight as the constant, broadcast it in the IR
            value = self.emit("expand", [self._materialize(source)], name=name, shape=shape)
            self.materialized[node] = value
            return value
        try:
            arrays = [to_numpy(t) for _, t in self.samples_of(_Lazy(node))]
        except ReshiftError:
            raise
        except Exception as exc:
            raise Unsupported(f"evaluating constant {node.name} failed: {type(exc).__name__}: {exc}") from None
        symbolic = [axis for axis, d in enumerate(shape) if isinstance(d, str)]
        others = sorted({s for d in shape for s in dim_terms(d)[1]} - {BATCH})
        if others or any(len(dim_terms(shape[a])[1]) > 1 for a in symbolic):
            # sampled at one size per symbol, the batch's rule (equal slices) cannot be told from S's
            raise Unsupported(f"constant {node.name} has a shape over the symbolic size(s) {others}; pin them")
        if not symbolic:
            if any(not _same(arrays[0], a) for a in arrays[1:]):
                raise Unsupported(f"constant {node.name} changes with the batch size")
            value = self.constant(arrays[0], name)
        elif len(symbolic) == 1:
            value = self._batch_invariant(node, arrays, shape, symbolic[0], name)
        else:
            raise Unsupported(f"constant {node.name} has {len(symbolic)} batch dimensions")
        self.materialized[node] = value
        return value

    def _batch_invariant(self, node, arrays, shape, axis, name) -> Value:
        """A constant whose every batch slice is equal: one slice expanded to ``shape``."""
        coefficient = split_dim(shape[axis])[0]
        periods = []
        for batch, array in zip(SAMPLE_BATCHES, arrays, strict=True):
            split = array.reshape(array.shape[:axis] + (batch, coefficient) + array.shape[axis + 1 :])
            period = split[(slice(None),) * axis + (slice(0, 1),)]
            if not _same(split, np.broadcast_to(period, split.shape)):
                raise Unsupported(f"constant {node.name} differs between batch items; reshift needs it batch-invariant")
            periods.append(period)
        if not _same(periods[0], periods[1]):
            raise Unsupported(f"constant {node.name} changes with the batch size")
        if coefficient == 1:
            period = self.constant(np.ascontiguousarray(periods[0].squeeze(axis + 1)), name)
            return self.emit("expand", [period], name=f"{name}_expand", shape=shape)
        period = self.constant(np.ascontiguousarray(periods[0]), name)
        wide = shape[:axis] + (BATCH, coefficient) + shape[axis + 1 :]
        expanded = self.emit("expand", [period], name=f"{name}_expand", shape=wide)
        return self.emit("reshape", [expanded], name=f"{name}_batch", shape=shape)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    if a.dtype.kind == "f":
        return bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))
    return bool(np.all(a == b))


def _bind(target: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments by schema name, defaults filled in (``self``, ``other``, ``alpha`` ...)."""
    schema = target._schema
    bound: dict[str, Any] = {}
    positional = [a for a in schema.arguments if not a.kwarg_only]
    for index, arg in enumerate(schema.arguments):
        if not arg.kwarg_only and index < len(args) and index < len(positional):
            bound[arg.name] = args[index]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        else:
            bound[arg.name] = arg.default_value if arg.has_default_value() else None
    return bound
