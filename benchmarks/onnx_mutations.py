"""Mutators for the ONNX fuzzer: each turns a valid model into one plausibly malformed file.

A mutator takes a parsed ``ModelProto`` (a private copy it may edit) and a numpy ``Generator``
and returns a short description of what it did, or ``None`` when the model offers nothing to
mutate that way. Byte-level mutators work on the serialized file instead. :func:`mutate` picks
the mutator and its target from ``(model name, seed, index)`` alone, so every case replays.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from google.protobuf.message import DecodeError

# dims and integers a corrupted file is likely to hold: empty, odd, negative, astronomically large
BAD_DIMS = (0, 7, -1, 2**31, 2**40, 2**62)
BAD_INTS = (0, -1, 7, 99, -99, 2**31, 2**40, -(2**40))
BAD_FLOATS = (float("nan"), float("inf"), -1.0, 0.0, 1e30)
ELEM_TYPES = tuple(range(0, 24)) + (99,)


@dataclass(frozen=True)
class Mutation:
    """One fuzz case: what was done (``kind``, ``detail``) and the resulting file bytes."""

    kind: str
    detail: str
    data: bytes


ProtoMutator = Callable[[onnx.ModelProto, np.random.Generator], str | None]
ByteMutator = Callable[[bytes, np.random.Generator], tuple[str, bytes] | None]


def _pick(rng: np.random.Generator, items):
    items = list(items)
    return items[int(rng.integers(len(items)))] if items else None


def _names(model: onnx.ModelProto) -> list[str]:
    """Every value name defined in the graph: inputs, initializers, node outputs."""
    graph = model.graph
    return (
        [v.name for v in graph.input] + [t.name for t in graph.initializer] + [o for n in graph.node for o in n.output]
    )


# -- byte level ---------------------------------------------------------------------------------
def truncate(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    cut = int(rng.integers(len(data)))
    return f"truncated to {cut} of {len(data)} bytes", data[:cut]


def flip_bytes(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    buffer = bytearray(data)
    positions = rng.integers(len(buffer), size=int(rng.integers(1, 9)))
    for position in positions:
        buffer[position] ^= int(rng.integers(1, 256))
    return f"flipped bytes at {sorted(int(p) for p in positions)}", bytes(buffer)


BYTE_MUTATORS: dict[str, ByteMutator] = {"truncate": truncate, "byte_flip": flip_bytes}


# -- structure: nodes ---------------------------------------------------------------------------
def flip_node_bytes(model: onnx.ModelProto, rng: np.random.Generator) -> str | None:
    """Byte flips inside one node's serialized form, kept only if it still parses."""
    node = _pick(rng, model.graph.node)
    if node is None:
        return None
    original = node.SerializeToString()
    for _ in range(8):
        buffer = bytearray(original)
        position = int(rng.integers(len(buffer)))
        buffer[position] ^= int(rng.integers(1, 256))
        try:
            node.ParseFromString(bytes(buffer))
        except DecodeError:
            continue
        return f"node {node.name!r}: flipped byte {position}"
    node.ParseFromString(original)
    return None


def dangling_input(model: onnx.ModelProto, rng: np.random.Generator) -> str | None:
    node = _pick(rng, [n for n in model.graph.node if n.input])
    if node is None:
        return None
    slot = int(rng.integers(len(node.input)))
    node.input[slot] = "no_such_value"
    return f"node {node.name!r}: input {slot} -> 'no_such_value'"


def cycle(model: onnx.ModelProto, rng: np.random.Generator) -> str | None:
    """A node reads its own output or one produced later (a cycle or a use before definition)."""
    nodes = list(model.graph.node)
    candidates = [i for i, n in enumerate(nodes) if n.input]
    index = _pick(rng, candidates)
    if index is None:
        return None
    node = nodes[index]
    later = _pick(rng, [o for n in nodes[index:] for o in n.output if o])
    if later is None:
        return None
    slot = int(rng.integers(len(node.input)))
    node.input[slot] = later
    return f"node {node.name!r}: input {slot} -> later output {later!r}"


def swap_nodes(model: onnx.ModelProto, rng: np.random.Generator) -> str | None:
    nodes = model.graph.node
    if len(nodes) < 2:
        return None
    i, j = sorted(int(k) for k in rng.choice(len(nodes), 2, replace=False))
    a, b = onnx.NodeProto(), onnx.NodeProto()
    a.CopyFrom(nodes[i])
    b.CopyFrom(nodes[j])
    nodes[i].CopyFrom(b)
    nodes[j].CopyFrom(a)
    return f"swapped nodes {i} and {j}"


def duplicate_output(model: onnx.ModelProto, rng: np.random.Generator) -> str | None:
    """Two nodes write the same value name (breaks SSA)."""
    nodes = [n for n in model.graph.node if n.output]
    if len(nodes) < 2:
        return None
    a, b = (nodes[int(k)] for k in rng.choice(len(nodes), 2, replace=False))
    b.output[0] = a.output[0]
    return f"node {b.name!r} also writes {a.output[0]!r}"


def change_arity(model: onnx.ModelProto, rng: np.random.Generator) -> str | None:
    node = _pick(rng, model.graph.node)
    if node is None:
        return None
    if node.input and rng.random() < 0.5:
        slot = int(rng.integers(len(node.input)))
        del node.input[slot]
        return f"node {node.name!r}: removed input {slot}"
    extra = _pick(rng, _names(model))
    node.input.append(extra)
    return f"node {node.name!r}: extra input {extra!r}"


def drop_node_output(model: onnx.ModelProto, rng: np.random.Generator) -> str | None:
    node = _pick(rng, [n for n in model.graph.node if n.output])
    if node is None:
        return None
    if rng.random() < 0.5:
        node.output.append(f"{node.output[0]}_extra")
        return f"node {node.name!r}: extra output"
    del node.output[0]
    return f"node {node.name!r}: removed output 0"


KNOWN_OP_TYPES = (
    "Relu", "Softmax", "Conv", "MatMul", "Gemm", "Add", "Reshape", "Transpose", "Concat", "Gather",
    "MaxPool", "AveragePool", "LayerNormalization", "Slice", "Split", "Unsqueeze", "Expand", "Where",
    "Cast", "Shape", "ConstantOfShape", "Range", "Tile", "ReduceMean", "Pad", "Erf", "Flatten", "NoSuchOp",
)  # fmt: skip


def change_op_type(model: onnx.ModelProto, rng: np.random.Generator) -> str | None:
    node = _pick(rng, model.graph.node)
    if node is None:
        return None
    before = node.op_type
    node.op_type = _pick(rng, KNOWN_OP_TYPES)
    if rng.random() < 0.1:
        node.domain = _pick(rng, ("ai.reshift", "com.microsoft", "ai.onnx.ml"))
    return f"node {node.name!r}: {before} -> {node.domain + '::' if node.domain else ''}{node.op_type}"


# -- structure: attributes ----------------------------------------------------------------------
TARGETED_ATTRS = {
    "axis": BAD_INTS,
    "group": (0, -1, 3, 5, 2**40),
    "kernel_shape": ([0, 0], [2**20, 2**20], [99, 99], [-3, 3], [3]),
    "strides": ([0, 0], [-1, 1], [2**40, 1], [1]),
    "pads": ([-1, -1, -1, -1], [-5, 0, 0, 0], [2**40, 0, 0, 0], [1, 1]),
    "dilations": ([0, 0], [-1, 1], [2**20, 1]),
    "perm": ([0, 0, 1], [9, 0, 1, 2], [], [-1, 0, 1, 2]),
    "epsilon": BAD_FLOATS,
    "to": ELEM_TYPES,
    "keepdims": (-1, 2, 99),
    "axes": ([99], [0, 0], [-99], []),
    "split": ([0], [2**40, 1], [-1, 1]),
    "upper": (-1, 7),
}


def _set_attr(attr: onnx.AttributeProto, value) -> None:
    if isinstance(value, list):
        ints = all(isinstance(v, int) for v in value)
        del attr.ints[:], attr.floats[:]
        attr.type = onnx.AttributeProto.INTS if ints else onnx.AttributeProto.FLOATS
        (attr.ints if ints else attr.floats).extend(value)
    elif isinstance(value, float):
        attr.type, attr.f = onnx.AttributeProto.FLOAT, value
    else:
        attr.type, attr.i = onnx.AttributeProto.INT, int(value)


def bad_attribute(model: onnx.ModelProto, rng: np.random.Generator) -> str | None:
    """An out-of-range value for a known attribute (axis=99, strides 0, negative pads, ...)."""
    choices = [(n, a) for n in model.graph.node for a in n.attribute if a.name in TARGETED_ATTRS]
    picked = _pick(rng, choices)
    if picked is None:
        return None
    node, attr = picked
    value = _pick(rng, TARGETED_ATTRS[attr.name])
    _set_attr(attr, value)
    return f"node {node.name!r}: {attr.name} = {value!r}"


def random_attribute(model: onnx.ModelProto, rng: np.random.Generator) -> str | None:
    """Any attribute of any node: a bad number, a deleted attribute or an unknown extra one."""
    node = _pick(rng, model.graph.node)
    if node is None:
        return None
    roll = rng.random()
    if not node.attribute or roll < 0.2:
        node.attribute.append(onnx.helper.make_attribute("bogus", 1))
        return f"node {node.name!r}: extra attribute 'bogus'"
    slot = int(rng.integers(len(node.attribute)))
    attr = node.attribute[slot]
    if roll < 0.4:
        del node.attribute[slot]
        return f"node {node.name!r}: removed attribute {attr.name!r}"
    if attr.type == onnx.AttributeProto.INTS and attr.ints:
        index = int(rng.integers(len(attr.ints)))
        attr.ints[index] = _pick(rng, BAD_INTS)
        return f"node {node.name!r}: {attr.name}[{index}] = {attr.ints[index]}"
    if attr.type == onnx.AttributeProto.FLOAT:
        attr.f = _pick(rng, BAD_FLOATS)
        return f"node {node.name!r}: {attr.name} = {attr.f}"
    if attr.type == onnx.AttributeProto.TENSOR:
        description = _corrupt_tensor(attr.t, rng)
        return f"node {node.name!r}: attribute tensor {attr.name}: {description}"
    value = _pick(rng, BAD_INTS)
    _set_attr(attr, value)
    return f"node {node.name!r}: {attr.name} = {value} (was type {attr.type})"


# -- tensors: initializers and Constant values --------------------------------------------------
def _corrupt_tensor(tensor: onnx.TensorProto, rng: np.random.Generator) -> str:
    """One corruption of a tensor: raw_data length, dtype, dims or (for ints) a huge value."""
    roll = rng.random()
    if roll < 0.25 and tensor.raw_data:
        size = len(tensor.raw_data)
        cut = int(rng.integers(-size, size + 1)) or 1
        tensor.raw_data = tensor.raw_data[:cut] if cut < 0 else tensor.raw_data + bytes(cut)
        return f"raw_data {size} -> {len(tensor.raw_data)} bytes"
    if roll < 0.45:
        before, tensor.data_type = tensor.data_type, _pick(rng, ELEM_TYPES)
        return f"data_type {before} -> {tensor.data_type}"
    if roll < 0.6 and tensor.raw_data:
        return _reshape_tensor(tensor, rng)
    if roll < 0.8 or tensor.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
        dims = list(tensor.dims)
        if dims and rng.random() < 0.8:
            axis = int(rng.integers(len(dims)))
            dims[axis] = _pick(rng, BAD_DIMS)
        elif dims and rng.random() < 0.5:
            dims.pop()
        else:
            dims.append(_pick(rng, BAD_DIMS))
        del tensor.dims[:]
        tensor.dims.extend(dims)
        return f"dims -> {dims}"
    values = onnx.numpy_helper.to_array(tensor).copy()
    if values.size == 0:
        return "empty int tensor left alone"
    flat = values.reshape(-1)
    index = int(rng.integers(flat.size))
    flat[index] = np.clip(_pick(rng, BAD_INTS), np.iinfo(flat.dtype).min, np.iinfo(flat.dtype).max)
    tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
    return f"element {index} -> {int(flat[index])}"


def _reshape_tensor(tensor: onnx.TensorProto, rng: np.random.Generator) -> str:
    """New dims with raw_data cut or padded to match, so the file stays self-consistent."""
    dims = list(tensor.dims)
    itemsize = len(tensor.raw_data) // max(int(np.prod(dims)), 1)
    if dims and rng.random() < 0.5:
        dims = [int(d) for d in rng.permutation(dims)] if rng.random() < 0.5 else [int(np.prod(dims))]
    elif dims:
        dims[int(rng.integers(len(dims)))] = int(rng.choice([0, 1, 2, 7, 33]))
    else:
        dims = [int(rng.choice([0, 2, 7]))]
    size = int(np.prod(dims)) * itemsize
    tensor.raw_data = (tensor.raw_data * (size // max(len(tensor.raw_data), 1) + 1))[:size]
    del tensor.dims[:]
    tensor.dims.extend(dims)
    return f"dims -> {dims} with matching raw_data"


def corrupt_initializer(model: onnx.ModelProto, rng: np.random.Generator) -> str | None:
    tensor = _pick(rng, model.graph.initializer)
    if tensor is None:
        return None
    return f"initializer {tensor.name!r}: {_corrupt_tensor(tensor, rng)}"


def corrupt_int_constant(model: onnx.ModelProto, rng: np.random.Generator) -> str | None:
    """A shape-like int constant (Reshape target, Slice bounds, axes) gets a bad element."""
    tensors = [(f"initializer {t.name!r}", t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT64]
    tensors += [
        (f"Constant {n.name!r}", a.t) for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
        if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == onnx.TensorProto.INT64
    ]  # fmt: skip
    picked = _pick(rng, [(what, t) for what, t in tensors if int(np.prod(t.dims)) > 0])
    if picked is None:
        return None
    what, tensor = picked
    values = onnx.numpy_helper.to_array(tensor).copy()
    flat = values.reshape(-1)
    index = int(rng.integers(flat.size))
    flat[index] = _pick(rng, BAD_INTS)
    tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
    return f"int constant in {what}: element {index} -> {int(flat[index])}"


def remove_initializer(model: onnx.ModelProto, rng: np.random.Generator) -> str | None:
    initializers = model.graph.initializer
    if not initializers:
        return None
    index = int(rng.integers(len(initializers)))
    name = initializers[index].name
    del initializers[index]
    return f"removed initializer {name!r}"


# -- graph interface ----------------------------------------------------------------------------
def input_dims(model: onnx.ModelProto, rng: np.random.Generator) -> str | None:
    value = _pick(rng, model.graph.input)
    if value is None or not value.type.tensor_type.shape.dim:
        return None
    dims = value.type.tensor_type.shape.dim
    axis = int(rng.integers(len(dims)))
    roll = rng.random()
    if roll < 0.15:
        value.type.tensor_type.ClearField("shape")
        return f"input {value.name!r}: shape removed"
    if roll < 0.3:
        dims[axis].dim_param = "seq"
        return f"input {value.name!r}: axis {axis} -> 'seq'"
    size = _pick(rng, BAD_DIMS)
    dims[axis].dim_value = size
    return f"input {value.name!r}: axis {axis} -> {size}"


def input_elem_type(model: onnx.ModelProto, rng: np.random.Generator) -> str | None:
    value = _pick(rng, model.graph.input)
    if value is None:
        return None
    value.type.tensor_type.elem_type = _pick(rng, ELEM_TYPES)
    return f"input {value.name!r}: elem_type -> {value.type.tensor_type.elem_type}"


def graph_outputs(model: onnx.ModelProto, rng: np.random.Generator) -> str | None:
    outputs = model.graph.output
    roll = rng.random()
    if roll < 0.3 and outputs:
        del outputs[int(rng.integers(len(outputs)))]
        return "removed a graph output"
    if roll < 0.6 and outputs:
        outputs.add().CopyFrom(outputs[0])
        return f"duplicated graph output {outputs[0].name!r}"
    if roll < 0.8 and outputs:
        outputs[0].name = "no_such_value"
        return "graph output renamed to 'no_such_value'"
    name = _pick(rng, _names(model))
    outputs.add().CopyFrom(onnx.helper.make_empty_tensor_value_info(name))
    return f"extra graph output {name!r}"


def opset_version(model: onnx.ModelProto, rng: np.random.Generator) -> str | None:
    entry = _pick(rng, [e for e in model.opset_import if e.domain in ("", "ai.onnx")])
    if entry is None:
        return None
    entry.version = int(_pick(rng, (1, 7, 12, 14, 18, 21, 22, 99)))
    return f"opset -> {entry.version}"


STACKABLE = ("bad_attribute", "random_attribute", "int_constant", "initializer", "input_dims")


def stacked(model: onnx.ModelProto, rng: np.random.Generator) -> str | None:
    """Two or three of the mutators the ONNX checker tends to let through, one after another."""
    done = [_apply(str(kind), model, rng) for kind in rng.choice(STACKABLE, int(rng.integers(2, 4)))]
    return "; ".join(d for d in done if d) or None


PROTO_MUTATORS: dict[str, ProtoMutator] = {
    "node_byte_flip": flip_node_bytes,
    "dangling_input": dangling_input,
    "cycle": cycle,
    "swap_nodes": swap_nodes,
    "duplicate_output": duplicate_output,
    "arity": change_arity,
    "node_outputs": drop_node_output,
    "op_type": change_op_type,
    "bad_attribute": bad_attribute,
    "random_attribute": random_attribute,
    "initializer": corrupt_initializer,
    "int_constant": corrupt_int_constant,
    "remove_initializer": remove_initializer,
    "input_dims": input_dims,
    "input_elem_type": input_elem_type,
    "graph_outputs": graph_outputs,
    "opset": opset_version,
    "stacked": stacked,
}
# tensor and attribute corruption are the interesting cases; weight them up
WEIGHTS: dict[str, float] = {
    "initializer": 3.0, "int_constant": 2.0, "bad_attribute": 3.0, "random_attribute": 2.0, "stacked": 2.0,
}  # fmt: skip
KINDS: tuple[str, ...] = tuple(BYTE_MUTATORS) + tuple(PROTO_MUTATORS)


def _apply(kind: str, model: onnx.ModelProto, rng: np.random.Generator) -> str | None:
    """One proto mutator; ``None`` if it does not apply, or trips over an earlier corruption."""
    try:
        return PROTO_MUTATORS[kind](model, rng)
    except (ValueError, TypeError, IndexError, KeyError, OverflowError):  # e.g. to_array of a corrupted tensor
        return None


def case_rng(model_name: str, seed: int, index: int) -> np.random.Generator:
    """The generator for one case, determined by the model name, the seed and the index."""
    return np.random.default_rng([zlib.crc32(model_name.encode()), seed, index])


def mutate(model_name: str, data: bytes, seed: int, index: int) -> Mutation:
    """Fuzz case ``index`` of ``seed`` for the serialized model ``data`` (reproducible)."""
    rng = case_rng(model_name, seed, index)
    weights = np.array([WEIGHTS.get(kind, 1.0) for kind in KINDS])
    for _ in range(16):
        kind = KINDS[int(rng.choice(len(KINDS), p=weights / weights.sum()))]
        if kind in BYTE_MUTATORS:
            detail, mutated = BYTE_MUTATORS[kind](data, rng)
            return Mutation(kind, detail, mutated)
        model = onnx.load_from_string(data)
        detail = _apply(kind, model, rng)
        if detail is not None:
            return Mutation(kind, detail, model.SerializeToString())
    detail, mutated = flip_bytes(data, rng)
    return Mutation("byte_flip", detail, mutated)
