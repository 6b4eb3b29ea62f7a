"""Einsum as transposes, reshapes, matmuls, muls and sums: one decomposition for ONNX and ATen.

The standard lowering (numpy's ``einsum`` path, opt_einsum, onnxruntime's CPU kernel): a label in
one operand and not in the output is summed away first; operands are then combined left to
right, two at a time. For a pair, labels in both that are still needed are *batch* labels, labels
in both that are not are *contracted*, the rest belong to one side. With contracted labels the pair
is one ``matmul`` of ``[batch.., left, k] @ [batch.., k, right]`` (each side transposed and
reshaped to that), without them a broadcasting ``mul``. The final operand is summed over what the
output lacks and transposed into the output's order. A size-1 axis facing a larger one of the same
label is broadcast (numpy and torch allow it): it is squeezed away, which makes the label one-sided.

``...`` stands for the broadcast leading axes (right-aligned across operands); it may be absent
from an explicit output, where its axes are summed as torch does. A label repeated within one
operand (a diagonal or trace, ``ii->i``, ``ii``) first takes that diagonal, exactly: the two axes
side by side, flattened to ``n * n`` and gathered at ``i * (n + 1)`` (a static ``n`` only).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from reshift.errors import IRTypeError
from reshift.ir.types import Dim, dims_product

LETTERS = frozenset(string.ascii_letters)


class EinsumError(ValueError):
    """The equation cannot be decomposed; the message says why and what to do."""


@dataclass
class Builders:
    """The frontend's own builders: ``op(name, *inputs, **attrs)``, ``matmul(a, b)``, ``shape_of(x)``
    and ``constant(array)`` (an operand holding a numpy array)."""

    op: Callable[..., Any]
    matmul: Callable[[Any, Any], Any]
    shape_of: Callable[[Any], Sequence[Dim]]
    constant: Callable[[np.ndarray], Any]


def _term_labels(term: str, rank: int | None, ellipsis_rank: int, where: str) -> list[str]:
    """The labels of one subscript term; ``...`` becomes labels ``.0``, ``.1`` ... right-aligned."""
    head, dots, tail = term.partition("...")
    if "." in head + tail or not set(head + tail) <= LETTERS:
        raise EinsumError(f"{where} {term!r}: subscripts are letters a-z, A-Z and at most one '...'")
    letters = len(head) + len(tail)
    if rank is not None:
        if not dots and letters != rank:
            raise EinsumError(f"{where} {term!r} names {letters} axes, the operand has rank {rank}")
        if letters > rank:
            raise EinsumError(f"{where} {term!r} names {letters} axes, the operand has rank {rank}")
    count = (rank - letters if rank is not None else ellipsis_rank) if dots else 0
    broadcast = [f".{ellipsis_rank - count + i}" for i in range(count)]
    return list(head) + broadcast + list(tail)


def parse_equation(equation: str, ranks: Sequence[int]) -> tuple[list[list[str]], list[str]]:
    """Input labels per operand and the output labels of an einsum equation (implicit output:
    the broadcast axes, then every letter used once, in alphabetical order, as numpy)."""
    text = equation.replace(" ", "")
    lhs, arrow, rhs = text.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise EinsumError(f"equation {equation!r} has {len(terms)} operand terms for {len(ranks)} operands")
    letters_of = [len(t.replace("...", "")) for t in terms]
    ellipsis_rank = max([r - n for t, r, n in zip(terms, ranks, letters_of, strict=True) if "..." in t], default=0)
    inputs = [_term_labels(t, ranks[i], ellipsis_rank, f"operand {i} term") for i, t in enumerate(terms)]
    if arrow:
        output = _term_labels(rhs, None, ellipsis_rank, "output term")
        if len(set(output)) != len(output):
            raise EinsumError(f"equation {equation!r}: the output names a label twice")
        missing = [label for label in output if not any(label in labels for labels in inputs)]
        if missing:
            raise EinsumError(f"equation {equation!r}: output label {missing[0]!r} appears in no operand")
    else:
        used = [label for labels in inputs for label in labels]
        output = [f".{i}" for i in range(ellipsis_rank)]
        output += sorted(label for label in set(used) if not label.startswith(".") and used.count(label) == 1)
    return inputs, output


def einsum(equation: str, operands: Sequence[Any], build: Builders) -> Any:
    """``einsum(equation, *operands)`` built from the frontend's ops (module docstring: how)."""
    shapes = [list(build.shape_of(x)) for x in operands]
    inputs, output = parse_equation(equation, [len(s) for s in shapes])
    operands = list(operands)
    for i, labels in enumerate(inputs):
        if len(set(labels)) != len(labels):
            operands[i], inputs[i] = _diagonal(operands[i], labels, equation, i, build)
            shapes[i] = list(build.shape_of(operands[i]))
    sizes = _label_sizes(equation, inputs, shapes)
    terms = []
    for x, labels, shape in zip(operands, inputs, shapes, strict=True):
        kept = [(label, d) for label, d in zip(labels, shape, strict=True) if not (d == 1 and sizes[label] != 1)]
        if len(kept) != len(labels):  # size-1 axes broadcast against a larger size: squeezed away
            x = build.op("reshape", x, shape=[d for _, d in kept])
        terms.append((x, [label for label, _ in kept]))
    while len(terms) > 1:
        terms = [_sum_unshared(t, terms, i, output, build) for i, t in enumerate(terms)]
        first, second, *rest = terms
        needed = set(output).union(*(labels for _, labels in rest))
        terms = [_combine(first, second, needed, sizes, build), *rest]
    x, labels = _sum_unshared(terms[0], terms, 0, output, build)
    return _transposed(x, labels, output, build)


def _diagonal(x, labels: list[str], equation: str, index: int, build: Builders):
    """``x`` with every label repeated in it reduced to its diagonal (module docstring: how)."""
    while len(set(labels)) != len(labels):
        label = next(label for label in labels if labels.count(label) > 1)
        first = labels.index(label)
        second = labels.index(label, first + 1)
        shape = list(build.shape_of(x))
        n = shape[first]
        if shape[second] != n or isinstance(n, str):
            raise EinsumError(
                f"equation {equation!r}: the diagonal of label {label!r} in operand {index} needs two equal static "
                f"axes, got {n} and {shape[second]}; pin the symbolic size (input_shapes / --input-shape)"
            )
        order = [axis for axis in range(len(labels)) if axis != second]
        order.insert(first + 1, second)
        if order != list(range(len(labels))):
            x = build.op("transpose", x, perm=order)
        shape, labels = [shape[a] for a in order], [labels[a] for a in order]
        x = build.op("reshape", x, shape=shape[:first] + [n * n] + shape[first + 2 :])
        x = build.op("gather", x, build.constant(np.arange(n, dtype=np.int64) * (n + 1)), axis=first)
        labels = labels[: first + 1] + labels[first + 2 :]
    return x, labels


def _label_sizes(equation: str, inputs: list[list[str]], shapes: list[list[Dim]]) -> dict[str, Dim]:
    sizes: dict[str, Dim] = {}
    for i, (labels, shape) in enumerate(zip(inputs, shapes, strict=True)):
        for label, d in zip(labels, shape, strict=True):
            known = sizes.get(label, 1)
            if d != 1 and known != 1 and d != known:
                name = "a '...' axis" if label.startswith(".") else f"label {label!r}"
                raise EinsumError(f"equation {equation!r}: {name} is {known} in one operand and {d} in operand {i}")
            sizes[label] = d if d != 1 else known
    return sizes


def _sum_unshared(term, terms, index: int, output: list[str], build: Builders):
    """Sum the labels of ``term`` that neither the output nor any other operand has."""
    x, labels = term
    others = set(output).union(*(ls for j, (_, ls) in enumerate(terms) if j != index))
    axes = [axis for axis, label in enumerate(labels) if label not in others]
    if not axes:
        return term
    return build.op("reduce_sum", x, axes=axes, keepdims=False), [label for label in labels if label in others]


def _transposed(x, labels: list[str], order: list[str], build: Builders):
    if labels == order:
        return x
    return build.op("transpose", x, perm=[labels.index(label) for label in order])


def _reshaped(x, shape: list[Dim], build: Builders):
    return x if list(build.shape_of(x)) == list(shape) else build.op("reshape", x, shape=shape)


def _product(dims: list[Dim]) -> Dim:
    try:
        return dims_product(dims)
    except IRTypeError as exc:
        raise EinsumError(f"cannot flatten the axes {dims} into one: {exc}") from None


def _combine(first, second, needed: set[str], sizes: dict[str, Dim], build: Builders):
    """One pairwise step: ``matmul`` over the contracted labels, or a broadcasting ``mul``."""
    (a, la), (b, lb) = first, second
    batch = [label for label in la if label in lb and label in needed]
    contracted = [label for label in la if label in lb and label not in needed]
    left = [label for label in la if label not in lb]
    right = [label for label in lb if label not in la]
    dims = lambda labels: [sizes[label] for label in labels]  # noqa: E731
    if not contracted:  # outer or elementwise product: both broadcast to the first's labels, then right
        shared = [label for label in la if label in lb]
        a = _reshaped(a, dims(la) + [1] * len(right), build)
        b = _transposed(b, lb, shared + right, build)
        b = _reshaped(b, [sizes[label] if label in lb else 1 for label in la] + dims(right), build)
        return build.op("mul", a, b), la + right
    k = _product(dims(contracted))
    a = _transposed(a, la, batch + left + contracted, build)
    b = _transposed(b, lb, batch + contracted + right, build)
    if batch:  # [batch.., L, K] @ [batch.., K, R]
        a = _reshaped(a, dims(batch) + [_product(dims(left)), k], build)
        b = _reshaped(b, dims(batch) + [k, _product(dims(right))], build)
    else:  # [left.., K] @ [K, R]: the left axes stay (a symbolic batch among them is never merged)
        a = _reshaped(a, (dims(left) or [1]) + [k], build)
        b = _reshaped(b, [k, _product(dims(right))], build)
    y = build.matmul(a, b)
    return _reshaped(y, dims(batch + left + right), build), batch + left + right
