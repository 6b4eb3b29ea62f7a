"""ONNX frontend: ``from_onnx(path_or_proto) -> reshift.ir.Graph``.

Loading validates the file (present, parseable, ``onnx.checker`` clean, default-domain opset
up to 21; older than 13 is upgraded by :mod:`reshift.frontend.onnx_upgrade`), then every node's
op type is looked up in :data:`ONNX_CONVERTERS`; all unsupported op types are reported at once.
Conversion walks the nodes in order with a partial evaluator: initializers, ``Constant`` nodes
and shapes (which may hold symbolic sizes such as ``N`` or ``N*S``) are *known* values, any node whose inputs are
all known is folded with the op registry's numpy reference, and only the rest becomes IR nodes,
so ``Reshape``/``Expand``/``Slice`` get static attributes.
Nodes of the ``ai.reshift`` domain (written by :mod:`reshift.codegen.onnx`) map back to the
registry op of the same name.
A malformed file never escapes as a bare exception: initializers are read by
:mod:`reshift.frontend.onnx_tensors`, a graph input, fold or node whose declared size is over
``RESHIFT_MAX_TENSOR_BYTES`` (:mod:`reshift.ir.limits`) is refused before anything is allocated,
and every error is a ``reshift.errors`` class naming the node, tensor or input
(``benchmarks/fuzz_onnx.py`` checks this on mutated models).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from reshift.errors import (
    IRTypeError,
    ModelLoadError,
    NodeTypeError,
    ReshiftError,
    ResourceLimitError,
    SymbolicShapeError,
    UnsupportedOpError,
)
from reshift.frontend import onnx_resize, onnx_rnn  # noqa: F401 -- register Resize, LSTM/GRU
from reshift.frontend.onnx_ops import ONNX_CONVERTERS, NotConvertible, onnx_attrs
from reshift.frontend.onnx_tensors import tensor_to_array, type_name
from reshift.frontend.onnx_upgrade import OLDEST_OPSET, default_opset, upgrade_opset
from reshift.frontend.shape_eval import (
    SYM_OPS,
    SYM_PASSTHROUGH,
    SYMBOL,
    ShapeEvalError,
    Sym,
    SymbolNames,
    has_sym,
    known_to_dim,
    normalize,
)
from reshift.ir import Graph, GraphBuilder, Value, create_node, get_op, sanitize_name
from reshift.ir.limits import check_array_size, check_type_size
from reshift.ir.ops import REQUIRED, infer_types
from reshift.ir.types import TensorType

MIN_OPSET, MAX_OPSET = 13, 21
PROBE_BATCHES = (2, 3)  # concrete batch sizes for telling batch-invariant shape values apart
CUSTOM_DOMAIN = "ai.reshift"
DEFAULT_DOMAINS = ("", "ai.onnx")

# ONNX TensorProto element type -> IR dtype name
ONNX_DTYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.DOUBLE: "float64",  # computed in float64 (interpreter and TVM), never cast
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.BOOL: "bool",
}

Operand = Value | np.ndarray


def from_onnx(
    model: str | os.PathLike | onnx.ModelProto,
    input_shapes: dict[str, tuple] | None = None,
    input_values: dict[str, Any] | None = None,
) -> Graph:
    """Convert an ONNX model (a path or a ``ModelProto``) to a verified reshift IR graph.

    ``input_shapes`` overrides the declared shapes of graph inputs (e.g. to fix a symbolic
    sequence length); a symbolic first dimension always becomes the batch symbol ``N``, any other
    its own symbol named from its ``dim_param`` (:class:`~reshift.frontend.shape_eval.SymbolNames`).
    An op that cannot keep a symbolic dim raises :class:`~reshift.errors.SymbolicShapeError`.
    ``input_values`` freezes graph inputs to constants (e.g. a sample rate that selects an ``If``
    branch); they are no longer inputs of the graph.
    """
    proto, source = load_model(model)
    opset = check_model(proto, source, None if isinstance(model, onnx.ModelProto) else source)
    proto, upgrade_note = upgrade_opset(proto, source)
    opset = default_opset(proto)
    unsupported: dict[str, list[str]] = defaultdict(list)
    for index, node in enumerate(proto.graph.node):
        key = _op_key(node)
        if key not in ONNX_CONVERTERS and not (node.domain == CUSTOM_DOMAIN and node.op_type in _registry_ops()):
            unsupported[key].append(node.name or f"#{index}")
    if unsupported:
        raise UnsupportedOpError(source, dict(unsupported))
    graph = _Conversion(proto, source, opset, input_shapes or {}, input_values=input_values).run()
    graph.notes.extend([upgrade_note] if upgrade_note else [])
    return graph


def _registry_ops() -> set[str]:
    from reshift.ir import OPS

    return set(OPS)


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"


def load_model(model: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """Read a model file (or take a proto); :class:`ModelLoadError` if missing or malformed."""
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "<onnx.ModelProto>"
    if not isinstance(model, (str, os.PathLike)):
        raise ModelLoadError(f"from_onnx expects a path or an onnx.ModelProto, got {type(model).__name__}")
    path = Path(model)
    source = str(path)
    if not path.is_file():
        raise ModelLoadError(f"{source}: no such file" + (" (it is a directory)" if path.is_dir() else ""))
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{source}: the file is empty (0 bytes); re-export the model")
    try:
        proto = onnx.load(source)
    except Exception as exc:  # protobuf DecodeError, external-data OSError, ...
        raise ModelLoadError(
            f"{source}: not a readable ONNX model ({size:,} bytes; {type(exc).__name__}: {exc}). "
            "The file may be truncated or not an ONNX protobuf; re-export or re-download it."
        ) from None
    return proto, source


def check_model(proto: onnx.ModelProto, source: str, path: str | None = None) -> int:
    """Run the ONNX checker and return the default-domain opset (up to 21; below 13 is upgraded on import).

    With ``path`` the checker reads the file, which also works past protobuf's 2 GiB limit.
    """
    if not proto.graph.node and not proto.graph.output:
        raise ModelLoadError(f"{source}: the model has an empty graph (truncated or not an ONNX model)")
    opset = default_opset(proto)
    if opset is None:
        raise ModelLoadError(f"{source}: the model imports no default-domain opset; re-export it with opset 13..21")
    if not OLDEST_OPSET <= opset <= MAX_OPSET:
        raise ModelLoadError(
            f"{source}: opset {opset} is not supported; reshift reads opsets {OLDEST_OPSET}..{MAX_OPSET} "
            f"(below {MIN_OPSET} through onnx.version_converter). Re-export with e.g. "
            f"torch.onnx.export(..., opset_version=17)."
        )
    _check_text(proto, source)
    try:
        onnx.checker.check_model(path if path is not None and proto.ByteSize() > 2**31 - 1 else proto)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = " ".join(str(exc).split())[:500] or type(exc).__name__  # multi-line: the node is on line 2
        raise ModelLoadError(f"{source}: invalid ONNX model (onnx.checker: {first}){_untyped(proto)}") from None
    return opset


def _untyped(proto: onnx.ModelProto) -> str:
    """The graph inputs/outputs without a type or shape, which the checker's message does not name."""
    graph = proto.graph
    missing = [
        f"graph {kind} {v.name!r} has no {'type' if not v.HasField('type') else 'shape'}"
        for kind, values in (("input", graph.input), ("output", graph.output))
        for v in values
        if not v.HasField("type") or (v.type.HasField("tensor_type") and not v.type.tensor_type.HasField("shape"))
    ]
    return f"; {', '.join(missing)}" if missing else ""


def _check_text(proto: onnx.ModelProto, source: str) -> None:
    """Refuse names that are not valid UTF-8 (protobuf hands them over as ``bytes``) or hold control characters."""
    graph = proto.graph
    named = [("the graph", graph.name)] + [("graph input", v.name) for v in graph.input]
    named += [("graph output", v.name) for v in graph.output]
    named += [("value_info", v.name) for v in graph.value_info] + [("initializer", t.name) for t in graph.initializer]
    for index, node in enumerate(graph.node):
        fields = [node.name, node.op_type, node.domain, *node.input, *node.output, *(a.name for a in node.attribute)]
        named += [(f"node #{index}", text) for text in fields]
    for what, text in named:
        if isinstance(text, bytes):
            raise ModelLoadError(f"{source}: {what} has a name that is not valid UTF-8 ({text!r}); corrupted file")
        if any(ord(c) < 32 for c in text):
            raise ModelLoadError(f"{source}: {what} has a name with control characters ({text!r}); corrupted file")


class _Conversion:
    """State of one conversion: the graph being built and what every ONNX name stands for."""

    def __init__(
        self,
        proto: onnx.ModelProto,
        source: str,
        opset: int,
        input_shapes: dict[str, tuple],
        probe: bool = False,
        input_values: dict[str, Any] | None = None,
    ):
        self.proto = proto
        self.input_values = dict(input_values or {})
        self.probe = probe
        self.shape_only: set[int] = set()  # ids of IR values computed from shapes alone
        self._probe_envs: list[dict[str, Operand]] | None = None
        self.source = source
        self.opset = opset
        self.input_shapes = input_shapes
        self.builder = GraphBuilder(sanitize_name(proto.graph.name or "main"))
        self.graph = self.builder.graph
        self.env: dict[str, Operand] = {}
        self.missing: dict[str, str] = {}  # ONNX name -> why it has no value
        self.node: onnx.NodeProto | None = None
        self._hint = "v"
        self._materialized: dict[int, tuple[np.ndarray, Value]] = {}
        self._names: dict[int, str] = {}
        self._sizes: dict[tuple, Value] = {}  # a symbolic size as a run-time [1] tensor (_symbolic_tensor)
        self.dim_symbols = SymbolNames(proto.graph, initializers={t.name for t in proto.graph.initializer})

    # -- the API converters use ---------------------------------------------------------------
    def op(self, op: str, *inputs: Operand | None, **attrs: Any) -> Operand | list[Operand]:
        """Apply registry op ``op``: folded if every input is known, else a new IR node."""
        opdef = get_op(op)
        if all(x is None or isinstance(x, np.ndarray) for x in inputs) and not _symbolic_attrs(opdef, attrs):
            return self._fold(op, opdef, inputs, attrs)
        values = [None if x is None else self.value(x) for x in inputs]
        while values and values[-1] is None and len(values) > opdef.arity()[0]:
            values.pop()
        name = self._hint if not self.graph.name_taken(self._hint) else self.graph.fresh_name(self._hint)
        node = create_node(self.graph, op, values, attrs, name=name)
        for output in node.outputs:
            check_type_size(output.type, f"{op} output {output.name!r}")
        self.graph.nodes.append(node)
        return node.outputs if len(node.outputs) != 1 else node.outputs[0]

    def _fold(self, op, opdef, inputs, attrs):
        if any(x is not None and has_sym(x) for x in inputs):
            if op in SYM_OPS:
                result = SYM_OPS[op](*inputs, **attrs)
            elif op in SYM_PASSTHROUGH:
                result = _fold_reference(opdef, inputs, opdef.normalize_attrs(attrs))
            else:
                raise ShapeEvalError(f"{op} on a batch-dependent shape cannot be evaluated at conversion time")
        else:
            result = _fold_reference(opdef, inputs, opdef.normalize_attrs(attrs))
        if isinstance(result, (tuple, list)):
            return [normalize(np.asarray(r)) for r in result]
        return normalize(np.asarray(result))

    def value(self, x: Operand) -> Value:
        """An IR value for an operand; a known array becomes a graph constant (once)."""
        if isinstance(x, Value):
            return x
        cached = self._materialized.get(id(x))
        if cached is None and has_sym(x):
            value = self._symbolic_tensor(x)
            self._materialized[id(x)] = (x, value)
            return value
        if cached is not None:
            return cached[1]
        hint = sanitize_name(self._names.get(id(x), f"{self._hint}_const"))
        try:
            constant = self.graph.add_constant(np.asarray(x, order="C"), hint)
        except IRTypeError as exc:
            raise NotConvertible(f"constant {hint!r}: {exc}") from None
        self._materialized[id(x)] = (x, constant)
        return constant

    def _symbolic_tensor(self, x: np.ndarray) -> Value:
        """A known int64 array holding symbolic sizes (``[N*S, 1]``, from ``Shape``) as a run-time tensor.

        Each size ``k*N*S`` is read off ``arange(k*N*S)``: its last element plus one. That costs a
        vector of that length per size, which is small for the sizes masks multiply by; it keeps
        to ops every backend has (the ONNX export too).
        """
        parts: list[Operand] = []
        for element in x.reshape(-1).tolist():
            if not isinstance(element, Sym):
                parts.append(np.asarray([int(element)], np.int64))
                continue
            key = ("size", element.coefficient, element.symbols)
            if key not in self._sizes:
                count = self.op("arange", shape=[known_to_dim(element)], dtype="int64")
                last = self.op("gather", count, np.asarray([-1], np.int64), axis=0)
                self._sizes[key] = self.op("add", last, np.asarray([1], np.int64))
            parts.append(self._sizes[key])
        vector = parts[0] if len(parts) == 1 else self.op("concat", *parts, axis=0)
        return self.value(self.op("reshape", vector, shape=list(x.shape)))

    def shape(self, x: Operand) -> tuple:
        return tuple(x.shape)

    def dtype(self, x: Operand) -> str:
        return x.dtype if isinstance(x, Value) else np.asarray(x).dtype.name

    # -- driver -------------------------------------------------------------------------------
    def run(self) -> Graph:
        graph = self.proto.graph
        initializers = {t.name for t in graph.initializer}
        for tensor in graph.initializer:
            self._bind_known(tensor.name, tensor_to_array(tensor, f"{self.source}: initializer {tensor.name!r}"))
        self._freeze_inputs(graph, initializers)
        for value_info in graph.input:
            if value_info.name not in initializers and value_info.name not in self.input_values:
                value = self.builder.input(sanitize_name(value_info.name), self._input_type(value_info))
                self.env[value_info.name] = value
                if value.name != value_info.name:
                    self.graph.source_names[value.name] = value_info.name
        for node in graph.node:
            self._convert_node(node)
        for value_info in graph.output:
            self._add_output(value_info.name)
        self.graph.remove_unused()
        from reshift.ir.verify import verify

        verify(self.graph)
        return self.graph

    def _freeze_inputs(self, graph: onnx.GraphProto, initializers: set[str]) -> None:
        """Bind ``input_values`` as known arrays of the inputs' declared dtypes."""
        declared = {v.name: v for v in graph.input if v.name not in initializers}
        unknown = sorted(set(self.input_values) - set(declared))
        if unknown:
            raise ModelLoadError(
                f"{self.source}: input_values names {unknown}; the graph inputs are {sorted(declared)}"
            )
        for name, value in self.input_values.items():
            expected = self._input_dtype(declared[name])
            array = np.asarray(value)
            if array.dtype != np.dtype(expected) and not np.can_cast(array, np.dtype(expected), casting="same_kind"):
                raise ModelLoadError(f"{self.source}: input_values[{name!r}] is {array.dtype}; the input is {expected}")
            self._bind_known(name, array.astype(expected))

    def inline_subgraph(self, subgraph: onnx.GraphProto, where: str) -> list[Operand]:
        """Convert a control-flow branch in place (it reads outer names directly); its outputs."""
        unsupported = sorted({_op_key(n) for n in subgraph.node if _op_key(n) not in ONNX_CONVERTERS})
        if unsupported:
            raise UnsupportedOpError(f"{self.source}: {where}", {op: [where] for op in unsupported})
        for tensor in subgraph.initializer:
            where_tensor = f"{self.source}: {where} initializer {tensor.name!r}"
            self._bind_known(tensor.name, tensor_to_array(tensor, where_tensor))
        for inner in subgraph.node:
            self._convert_node(inner)
        return [self._lookup(output.name) for output in subgraph.output]

    def _bind_known(self, name: str, array: np.ndarray) -> None:
        self.env[name] = array
        self._names[id(array)] = name

    def _input_dtype(self, value_info: onnx.ValueInfoProto) -> str:
        """A graph input's IR dtype; ModelLoadError for a non-tensor or an unsupported element type."""
        tensor_type = value_info.type.tensor_type
        if not value_info.type.HasField("tensor_type") or tensor_type.elem_type not in ONNX_DTYPES:
            elem = type_name(tensor_type.elem_type) if tensor_type.elem_type else "non-tensor"
            raise ModelLoadError(
                f"{self.source}: graph input {value_info.name!r} has type {elem}; "
                f"supported: {', '.join(ONNX_DTYPES.values())}"
            )
        return ONNX_DTYPES[tensor_type.elem_type]

    def _input_type(self, value_info: onnx.ValueInfoProto) -> TensorType:
        where = f"{self.source}: graph input {value_info.name!r}"
        tensor_type = value_info.type.tensor_type
        dtype = self._input_dtype(value_info)
        if value_info.name in self.input_shapes:
            return TensorType(tuple(self.input_shapes[value_info.name]), dtype)
        if not tensor_type.HasField("shape"):
            raise ModelLoadError(f"{where} has no declared shape; pass input_shapes={{{value_info.name!r}: (...)}}")
        dims: list = []
        for axis, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value < -1:
                raise ModelLoadError(f"{where}: axis {axis} has negative size {dim.dim_value}")
            if dim.HasField("dim_value") and dim.dim_value >= 0:  # -1 (Paddle's exports): unknown, as dim_param
                dims.append(int(dim.dim_value))
            else:  # axis 0 is the batch N; other axes get their own symbol (from dim_param)
                dims.append(self.dim_symbols.symbol(value_info.name, axis, dim.dim_param))
        check_array_size([1 if isinstance(d, str) else d for d in dims], dtype, where)
        return TensorType(tuple(dims), dtype)

    def _lookup(self, name: str) -> Operand | None:
        if not name:
            return None
        if name in self.env:
            return self.env[name]
        raise NotConvertible(self.missing.get(name, f"input {name!r} is not defined before use"))

    def _convert_node(self, node: onnx.NodeProto) -> None:
        self.node = node
        label = node.name or (node.output[0] if node.output else node.op_type)
        self._hint = sanitize_name(label)
        where = f"{self.source}: node {label!r} ({node.op_type})"
        try:
            inputs = [self._lookup(name) for name in node.input]
            shape_only = all(x is None or isinstance(x, np.ndarray) or id(x) in self.shape_only for x in inputs)
            results = self._from_probes(node) if shape_only and len(self.shape_only) else None
            if results is None:
                results = self._convert(node, inputs, shape_only)
            if shape_only:
                for result in results if isinstance(results, list) else [results]:
                    if isinstance(result, Value):
                        self.shape_only.add(id(result))
        except SymbolicShapeError as exc:
            raise self._symbolic_error(where, node, exc) from None
        except (NotConvertible, ShapeEvalError, IRTypeError) as exc:
            if self._non_batch_symbols(inputs):
                raise self._symbolic_error(where, node, exc) from None
            reason = exc.reason if isinstance(exc, NodeTypeError) else exc  # the ONNX node is named already
            raise ModelLoadError(f"{where}: {reason}") from None
        except ResourceLimitError as exc:
            raise ResourceLimitError(f"{where}: {exc}") from None
        except ReshiftError:
            raise
        except Exception as exc:  # a numpy failure while folding: report the node, keep the cause
            raise ModelLoadError(f"{where}: conversion failed ({type(exc).__name__}: {exc})") from exc
        results = results if isinstance(results, list) else [results]
        for index, name in enumerate(node.output):
            if not name:
                continue
            if index < len(results):
                result = results[index]
                if isinstance(result, np.ndarray):
                    self._names.setdefault(id(result), name)
                self.env[name] = result
            else:
                self.missing[name] = f"output {index} of node {label!r} ({node.op_type}) is not supported"

    def _non_batch_symbols(self, inputs: list) -> set[str]:
        """The symbols other than the batch that a node's inputs mention (types or shape vectors)."""
        found: set[str] = set()
        for x in inputs:
            if isinstance(x, Value):
                found |= x.type.symbols
            elif isinstance(x, np.ndarray) and has_sym(x):
                found |= {s for e in x.flat if isinstance(e, Sym) for s in e.symbols}
        return found - {SYMBOL}

    def _symbolic_error(self, where: str, node: onnx.NodeProto, exc: Exception) -> SymbolicShapeError:
        """A node that cannot keep a symbolic dim: name the inputs/axes it comes from and the way out."""
        inputs = [self.env.get(name) for name in node.input if name]
        symbols = self._non_batch_symbols(inputs) or set(getattr(exc, "symbols", {}))
        origins = {s: self.dim_symbols.origins.get(s, []) for s in sorted(symbols)}
        named = "; ".join(
            f"{s} is " + ", ".join(f"axis {axis} of input {name!r}" for name, axis in axes)
            for s, axes in origins.items()
        )
        pins = " ".join(
            f"--input-shape {name}=D1,D2,..." for name in sorted({n for a in origins.values() for n, _ in a})
        )
        return SymbolicShapeError(
            f"{where}: {node.op_type} cannot keep the symbolic dimension(s) {', '.join(sorted(symbols))} "
            f"({named or 'from the graph inputs'}): {exc}. Pin them for a static build "
            f"(input_shapes={{...}}, CLI: {pins or '--input-shape NAME=D1,D2,...'}), or call reshift.compile "
            "without pins to specialize per input shape at run time.",
            origins,
        )

    def _convert(self, node: onnx.NodeProto, inputs: list, shape_only: bool):
        attrs = onnx_attrs(node)
        try:
            if node.domain == CUSTOM_DOMAIN:
                results = _convert_custom(self, node, inputs, attrs)
            else:
                results = ONNX_CONVERTERS[_op_key(node)](self, node, inputs, attrs)
        except (NotConvertible, ShapeEvalError):
            results = self._from_probes(node) if shape_only else None
            if results is None:
                raise
        return results

    # -- batch-invariant shape computations ---------------------------------------------------
    def _from_probes(self, node: onnx.NodeProto) -> list[Operand] | None:
        """Outputs of a node that depends on the batch size only, if they do not vary with it.

        The model is converted at two concrete batch sizes, where every such value is a known
        array (masks built with ``arange(batch)``, ``CumSum``, ``GatherND``...). A value equal at
        both sizes is a constant; one that repeats a block along one axis becomes an ``expand``.
        """
        if self.probe:
            return None
        if self._probe_envs is None:
            self._probe_envs = [self._probe_env(batch) for batch in PROBE_BATCHES]
        results: list[Operand] = []
        for name in node.output:
            found = [env.get(name) for env in self._probe_envs]
            if not name or not all(isinstance(a, np.ndarray) and a.dtype != object for a in found):
                return None
            result = self._batch_invariant(*found)
            if result is None:
                return None
            results.append(result)
        return results

    def _probe_env(self, batch: int) -> dict[str, Operand]:
        """The environment of a conversion at concrete sizes: N = ``batch``, others by :meth:`SymbolNames.probe`."""
        shapes = dict(self.input_shapes)
        probe_index = PROBE_BATCHES.index(batch)
        for value_info in self.proto.graph.input:
            dims = value_info.type.tensor_type.shape.dim
            if value_info.name in shapes or all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims):
                continue
            concrete = []
            for axis, d in enumerate(dims):
                if d.HasField("dim_value") and d.dim_value >= 0:
                    concrete.append(int(d.dim_value))
                else:
                    symbol = self.dim_symbols.symbol(value_info.name, axis, d.dim_param)
                    concrete.append(batch if symbol == SYMBOL else self.dim_symbols.probe(symbol, probe_index))
            shapes[value_info.name] = tuple(concrete)
        probe = _Conversion(self.proto, self.source, self.opset, shapes, probe=True, input_values=self.input_values)
        try:
            probe.run()
        except Exception:  # noqa: BLE001  (a partial environment is still useful)
            pass
        return probe.env

    def _batch_invariant(self, small: np.ndarray, large: np.ndarray) -> Operand | None:
        if small.shape == large.shape:
            return small if np.array_equal(small, large) else None
        if set(self.dim_symbols.origins) - {SYMBOL}:
            return None  # other symbols vary between the probes too: a changed axis is not the batch's alone
        axes = [i for i, (a, b) in enumerate(zip(small.shape, large.shape, strict=False)) if a != b]
        if small.ndim != large.ndim or len(axes) != 1:
            return None
        axis = axes[0]
        block, (lo, hi) = large.shape[axis] - small.shape[axis], PROBE_BATCHES
        if block * (hi - lo) != large.shape[axis] - small.shape[axis] or small.shape[axis] != block * lo:
            return None
        chunk = np.take(small, np.arange(block), axis=axis)
        reps = [1] * small.ndim
        for array, count in ((small, lo), (large, hi)):
            reps[axis] = count
            if not np.array_equal(np.tile(chunk, reps), array):
                return None
        dims = list(small.shape)
        if block == 1:
            dims[axis] = SYMBOL
            return self.op("expand", chunk, shape=dims)
        grouped = self.op("expand", np.expand_dims(chunk, axis), shape=dims[:axis] + [SYMBOL] + dims[axis:])
        dims[axis] = f"{block}*{SYMBOL}"
        return self.op("reshape", grouped, shape=dims)

    def _add_output(self, name: str) -> None:
        try:
            value = self.value(self._lookup(name))
        except (NotConvertible, ShapeEvalError) as exc:
            raise ModelLoadError(f"{self.source}: graph output {name!r}: {exc}") from None
        clean = sanitize_name(name)
        renamed = {v.name for v in self.graph.outputs}
        if value in self.graph.outputs or value in self.graph.inputs or value.is_constant:
            self._hint = clean if clean not in renamed else f"{clean}_out"
            value = self.op("identity", value)
        if clean != value.name and not self.graph.name_taken(clean) and clean not in renamed:
            value.name = clean  # the ONNX output name, so results line up with onnxruntime's
        self.graph.outputs.append(value)
        self.graph.output_names.append(name)


def _fold_reference(opdef, inputs, attrs: dict[str, Any]):
    """The op's numpy reference on known arrays, checked against the tensor limit first."""
    refusal = _check_fold(opdef, inputs, attrs)
    try:
        with np.errstate(all="ignore"):
            return opdef.reference(*inputs, **attrs)
    except Exception as exc:
        if refusal is None:
            raise
        raise refusal from exc  # the registry's reason reads better than numpy's


def _check_fold(opdef, inputs, attrs: dict[str, Any]) -> IRTypeError | None:
    """Refuse folding an op whose result would be over the tensor limit, before numpy allocates it.

    Returns type inference's objection, if any, without raising it: inference is stricter than
    numpy (dtype promotion, float64 shape math), so the reference decides and the objection is
    the message only if the reference fails too.
    """
    try:
        types = [None if x is None else _known_type(x) for x in inputs]
        outputs = infer_types(opdef, types, attrs)
    except IRTypeError as exc:
        return exc
    for output in outputs:
        check_type_size(output, f"folding {opdef.name}")
    return None


def _known_type(x: np.ndarray) -> TensorType:
    """A known array's type; a shape vector holding the batch symbol (dtype object) is int64."""
    return TensorType(x.shape, "int64") if x.dtype == object else TensorType.of(x)


def _symbolic_attrs(opdef, attrs: dict[str, Any]) -> bool:
    """True if a shape attribute names the batch symbol (then the op cannot be folded)."""
    return any(
        opdef.attrs[k].kind == "shape" and any(isinstance(d, str) for d in v)
        for k, v in attrs.items()
        if k in opdef.attrs and v is not None and v is not REQUIRED
    )


def _convert_custom(ctx: _Conversion, node, inputs, attrs):
    """An ``ai.reshift`` node: the registry op of the same name with the node's attributes."""
    opdef = get_op(node.op_type)
    attrs = {k: v for k, v in attrs.items() if k in opdef.attrs}
    return ctx.op(node.op_type, *inputs, **attrs)
