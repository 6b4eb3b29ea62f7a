"""ONNX backend: ``to_onnx(graph, path=None, opset=17) -> onnx.ModelProto``.

Every registry op lowers through the table :data:`ONNX_LOWERINGS` (``linear`` -> ``Gemm`` for
2-D inputs, else ``MatMul`` with a transposed weight initializer + ``Add``; ``layer_norm`` ->
``LayerNormalization`` from opset 17, a ``ReduceMean`` decomposition before; ``gelu`` -> ``Gelu``
at opset 20, an ``Erf``/``Tanh`` decomposition before; ...). Weights become initializers. The
symbolic batch dimension becomes ``dim_param "N"``; shapes that mention it (``reshape``,
``expand``, ``arange``) copy the dimension (``0`` in a ``Reshape`` target) where positions line
up, else compute it at run time from ``Shape`` of the graph input that carries it.

reshift's own ops (registry ops tagged ``"custom"``: ``shift_linear``, ``bcq_linear``,
``ternary_linear``, ``log2_quant``, ...) have two encodings:

* ``custom_ops="decompose"`` (default): the op's entry in :data:`CUSTOM_DECOMPOSITIONS`
  emits standard ONNX nodes computing the same function as the registry's numpy reference,
  so onnxruntime runs the model as is. ``bcq_linear``/``ternary_linear`` dequantize their
  (constant) packed weights at export into ``MatMul`` + ``Add``; ``shift_linear`` keeps its
  per-row int8 activation quantization (``ReduceMax``/``Round``/``Clip``) and integer-valued
  shift weights, so the decomposition matches the reference within float32 rounding;
  ``shift_conv2d`` does the same on im2col rows (a depthwise one-hot ``Conv``), its
  contraction a grouped 1x1 ``Conv``.
* ``custom_ops="domain"``: one node of op type ``<op name>`` in the domain ``ai.reshift``
  (version 1), with the IR attributes as ONNX attributes (shapes as strings, so the batch
  symbol survives). :func:`reshift.frontend.from_onnx` reads such nodes back into the same
  registry op; onnxruntime needs a custom-op library to run them.

A new custom op adds its reference decomposition with::

    @register_decomposition("shift_linear")
    def _shift_linear(em: OnnxEmitter, node: Node, inputs: list[str]) -> list[str]:
        ...  # em.node("Mul", [...]), em.const(array), ...
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from reshift.errors import CodegenError
from reshift.ir import Graph, Node, Value, get_op
from reshift.ir.types import Dim, numpy_dtype, split_dim

CUSTOM_DOMAIN = "ai.reshift"
CUSTOM_VERSION = 1
MIN_OPSET, MAX_OPSET = 13, 21
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**24  # protobuf's 2 GiB limit, with room for the graph itself

IR_TO_ONNX_DTYPE: dict[str, int] = {
    "float32": TensorProto.FLOAT,
    "float64": TensorProto.DOUBLE,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
    "int8": TensorProto.INT8,
    "uint8": TensorProto.UINT8,
    "int32": TensorProto.INT32,
    "int64": TensorProto.INT64,
    "bool": TensorProto.BOOL,
}

Lowering = Callable[["OnnxEmitter", Node, list[str]], list[str]]
ONNX_LOWERINGS: dict[str, Lowering] = {}
CUSTOM_DECOMPOSITIONS: dict[str, Lowering] = {}


def lowering(*ops: str):
    def register(fn: Lowering) -> Lowering:
        for op in ops:
            ONNX_LOWERINGS[op] = fn
        return fn

    return register


def register_decomposition(op: str):
    """Declare the standard-ONNX reference decomposition of a reshift custom op."""

    def register(fn: Lowering) -> Lowering:
        CUSTOM_DECOMPOSITIONS[op] = fn
        return fn

    return register


class OnnxEmitter:
    """Collects ONNX nodes and initializers for one graph; names never collide with IR names."""

    def __init__(self, graph: Graph, opset: int):
        self.graph = graph
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.taken: set[str] = set(graph.value_names()) | {n.name for n in graph.nodes}
        self._counter = 0
        self._cache: dict[tuple, str] = {}
        self.prefix = ""

    def fresh(self, hint: str) -> str:
        while True:
            self._counter += 1
            name = f"{hint}__{self._counter}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def node(
        self, op_type: str, inputs: list[str], outputs: list[str] | int = 1, domain: str = "", **attrs
    ) -> list[str]:
        """Append a node; ``outputs`` is a list of names or a count of fresh ones."""
        if isinstance(outputs, int):
            outputs = [self.fresh(f"{self.prefix or op_type}") for _ in range(outputs)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(
            helper.make_node(op_type, inputs, outputs, name=self.fresh(self.prefix or op_type), domain=domain, **attrs)
        )
        return outputs

    def one(self, op_type: str, inputs: list[str], **attrs) -> str:
        return self.node(op_type, inputs, 1, **attrs)[0]

    def final(self, ir_node: Node, op_type: str, inputs: list[str], **attrs) -> list[str]:
        """The last ONNX node of a lowering: its outputs carry the IR node's value names."""
        return self.node(op_type, inputs, [v.name for v in ir_node.outputs], **attrs)

    def const(self, array, hint: str = "const", dtype=None) -> str:
        """An initializer holding ``array`` (small ones are shared by value)."""
        array = np.asarray(array, dtype=dtype)
        key = None
        if array.size <= 16:
            key = (array.dtype.str, array.shape, array.tobytes())
            if key in self._cache:
                return self._cache[key]
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(array, name))
        if key is not None:
            self._cache[key] = name
        return name

    def scalar(self, value, like: Value) -> str:
        return self.const(np.asarray(value, dtype=numpy_dtype(like.dtype)), "scalar")

    def reduce(self, op_type: str, x: str, axes, keepdims: bool, outputs: list[str] | int = 1) -> str:
        """A ``Reduce*`` node with axes as attribute or input, whichever the opset wants."""
        axes = list(axes)
        if op_type == "ReduceSum" or self.opset >= 18:
            inputs = [x, self.const(np.asarray(axes, np.int64), "axes")] if axes else [x]
            return self.node(op_type, inputs, outputs, keepdims=int(keepdims))[0]
        return self.node(op_type, [x], outputs, axes=axes or None, keepdims=int(keepdims))[0]

    # -- the batch symbol at run time -------------------------------------------------------------
    def symbolic_dim(self, dim: Dim) -> str:
        """A 1-element int64 tensor holding ``dim`` (``"197*N"``, ``"12*N*S"``) for the inputs' sizes."""
        coefficient, symbol = split_dim(dim)
        if symbol is None:
            return self.const(np.asarray([coefficient], np.int64), "dim")
        key = ("symbolic", coefficient, symbol)
        if "*" in symbol and key not in self._cache:  # a product N*S: the product of each symbol's size
            factors = [self.symbolic_dim(s) for s in symbol.split("*")]
            value = factors[0]
            for factor in factors[1:]:
                value = self.one("Mul", [value, factor])
            if coefficient != 1:
                value = self.one("Mul", [value, self.const(np.asarray([coefficient], np.int64), "dim")])
            self._cache[key] = value
        if key not in self._cache:
            source = next(
                (
                    (v.name, axis, split_dim(d)[0])
                    for v in self.graph.inputs
                    for axis, d in enumerate(v.shape)
                    if split_dim(d)[1] == symbol
                ),
                None,
            )
            if source is None:
                raise CodegenError(f"the symbolic dimension {symbol!r} is not the size of any graph input axis")
            name, axis, base = source
            shape = self.one("Shape", [name])
            index = self.const(np.asarray([axis], np.int64), "axis")
            value = self.one("Gather", [shape, index], axis=0)
            if base != 1:
                value = self.one("Div", [value, self.const(np.asarray([base], np.int64), "dim")])
            if coefficient != 1:
                value = self.one("Mul", [value, self.const(np.asarray([coefficient], np.int64), "dim")])
            self._cache[key] = value
        return self._cache[key]

    def shape_tensor(self, dims) -> str:
        """A 1-D int64 shape tensor for ``dims``, computed at run time where they are symbolic."""
        dims = list(dims)
        if all(split_dim(d)[1] is None for d in dims):
            return self.const(np.asarray([split_dim(d)[0] for d in dims], np.int64), "shape")
        pieces, run = [], []
        for d in dims:
            if split_dim(d)[1] is None:
                run.append(split_dim(d)[0])
                continue
            if run:
                pieces.append(self.const(np.asarray(run, np.int64), "shape"))
                run = []
            pieces.append(self.symbolic_dim(d))
        if run:
            pieces.append(self.const(np.asarray(run, np.int64), "shape"))
        return pieces[0] if len(pieces) == 1 else self.one("Concat", pieces, axis=0)


def to_onnx(
    graph: Graph,
    path: str | os.PathLike | None = None,
    opset: int = 17,
    custom_ops: str = "decompose",
) -> onnx.ModelProto:
    """Write ``graph`` as an ONNX model (saved to ``path`` if given) and return it.

    ``custom_ops`` is ``"decompose"`` (standard ONNX, runs in onnxruntime) or ``"domain"``
    (``ai.reshift`` nodes); see the module docstring.
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise CodegenError(f"opset {opset} is not supported; choose {MIN_OPSET}..{MAX_OPSET}")
    if custom_ops not in ("decompose", "domain"):
        raise CodegenError(f"custom_ops must be 'decompose' or 'domain', got {custom_ops!r}")
    _check_lowerable(graph, custom_ops)
    em = OnnxEmitter(graph, opset)
    names: dict[int, str] = {}
    for value in graph.inputs:
        names[id(value)] = value.name
    initializers = []
    for constant in graph.constants.values():
        names[id(constant)] = constant.name
        initializers.append(numpy_helper.from_array(np.asarray(constant.data), constant.name))
    # a constant read only through a lowering's own copy (a transposed weight) is dropped below
    uses_custom = False
    for node in graph.nodes:
        inputs = ["" if v is None else names[id(v)] for v in node.inputs]
        while inputs and inputs[-1] == "":
            inputs.pop()
        em.prefix = node.name
        is_custom = "custom" in get_op(node.op).tags
        if is_custom and custom_ops == "domain" and node.op not in _onnx_qdq.STANDARD_QDQ_OPS:
            outputs = em.node(
                node.op, inputs, [v.name for v in node.outputs], domain=CUSTOM_DOMAIN, **_custom_attrs(node)
            )
            uses_custom = True
        else:
            lower = CUSTOM_DECOMPOSITIONS[node.op] if is_custom else ONNX_LOWERINGS[node.op]
            outputs = lower(em, node, inputs)
            for value, produced in zip(node.outputs, outputs, strict=False):
                if produced != value.name:  # give the value its IR name
                    em.nodes.append(helper.make_node("Identity", [produced], [value.name], name=em.fresh("rename")))
        for value in node.outputs:
            names[id(value)] = value.name
    em.prefix = ""
    outputs = []
    for value in graph.outputs:
        name = names[id(value)]
        if value in graph.inputs or value.is_constant or name in {o.name for o in outputs}:
            name = em.node("Identity", [name], [em.fresh(f"{value.name}_output")])[0]
        outputs.append(_value_info(name, value))
    used = {name for n in em.nodes for name in n.input} | {o.name for o in outputs}
    onnx_graph = helper.make_graph(
        em.nodes,
        graph.name,
        [_value_info(v.name, v) for v in graph.inputs],
        outputs,
        initializer=[t for t in initializers + em.initializers if t.name in used],
    )
    imports = [helper.make_opsetid("", opset)]
    if uses_custom:
        imports.append(helper.make_opsetid(CUSTOM_DOMAIN, CUSTOM_VERSION))
    model = helper.make_model(onnx_graph, opset_imports=imports, producer_name="reshift")
    model.ir_version = min(model.ir_version, _IR_VERSION_FOR_OPSET.get(opset, model.ir_version))
    large = graph.parameter_bytes() > EXTERNAL_DATA_THRESHOLD
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(model, str(path), save_as_external_data=large, location=path.name + ".data")
    return model


# onnxruntime releases lag the onnx package; keep the IR version the opset was released with
_IR_VERSION_FOR_OPSET = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}


def _check_lowerable(graph: Graph, custom_ops: str) -> None:
    missing: dict[str, list[str]] = {}
    for node in graph.nodes:
        custom = "custom" in get_op(node.op).tags
        ok = (custom and (custom_ops == "domain" or node.op in CUSTOM_DECOMPOSITIONS)) or (
            not custom and node.op in ONNX_LOWERINGS
        )
        if not ok:
            missing.setdefault(node.op, []).append(node.name)
    if missing:
        listed = "; ".join(f"{op} x{len(nodes)} ({', '.join(nodes[:3])})" for op, nodes in sorted(missing.items()))
        raise CodegenError(
            f"graph {graph.name}: no ONNX lowering for {listed}. Add an entry to ONNX_LOWERINGS (or, for a "
            "custom op, CUSTOM_DECOMPOSITIONS) in codegen/onnx.py, or export with custom_ops='domain'."
        )


def _value_info(name: str, value: Value) -> onnx.ValueInfoProto:
    dims = [d if isinstance(d, int) else str(d) for d in value.shape]
    return helper.make_tensor_value_info(name, IR_TO_ONNX_DTYPE[value.dtype], dims)


def _custom_attrs(node: Node) -> dict:
    """IR attributes as ONNX attributes for an ``ai.reshift`` node (shapes as strings)."""
    opdef = get_op(node.op)
    out = {}
    for key, value in node.attrs.items():
        kind = opdef.attrs[key].kind
        if value is None:
            continue
        if kind == "shape":
            out[key] = [str(d) for d in value]
        elif kind == "bool":
            out[key] = int(value)
        else:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


from reshift.codegen import onnx_lowering as _onnx_lowering  # noqa: E402,F401  (fills ONNX_LOWERINGS)
from reshift.codegen import onnx_qdq as _onnx_qdq  # noqa: E402  (QDQ export of the quantizers)

__all__ = [
    "CUSTOM_DECOMPOSITIONS",
    "CUSTOM_DOMAIN",
    "ONNX_LOWERINGS",
    "OnnxEmitter",
    "register_decomposition",
    "to_onnx",
]
from reshift.codegen import onnx_moe as _onnx_moe  # noqa: E402,F401  (moe_linear decomposition)
