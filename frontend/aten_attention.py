"""``aten.scaled_dot_product_attention`` as IR ops: ``softmax(q k^T * scale + mask) v``.

Registered into :data:`reshift.frontend.aten_ops.ATEN_CONVERTERS`, so torch keeps SDPA whole
(transformers 5 uses it for every attention layer by default). Converting it here rather than
through torch's math decomposition keeps the graph small and avoids a decomposition that, under a
symbolic batch, hands back a non-contiguous layout a later ``view`` rejects (GPT-2's ``c_proj``).

Semantics follow ``torch.nn.functional.scaled_dot_product_attention``: ``scale`` defaults to
``1/sqrt(head_dim)``; a bool mask keeps the positions where it is True, a float mask is added;
``is_causal`` keeps the lower-left triangle; ``enable_gqa`` repeats each key/value head for
``Hq / Hkv`` query heads. A query row whose bool mask is all False gives zeros, as torch's
``_safe_softmax`` does.
"""

from __future__ import annotations

import math

import numpy as np

from reshift.frontend.aten_ops import Unsupported, converts
from reshift.ir import Value

MASKED = float(np.finfo(np.float32).min)  # finite, so a fast exp never sees -inf - -inf


@converts("scaled_dot_product_attention")
def _sdpa(cx, a):
    """SDPA in five IR ops (plus the mask): matmul, mul, where/add, softmax, matmul."""
    if a["dropout_p"]:
        raise Unsupported(f"dropout_p={a['dropout_p']} (training); call model.eval() first")
    q, k, v = cx.value(a["query"]), cx.value(a["key"]), cx.value(a["value"])
    if q.type.rank < 3 or q.dtype not in ("float32", "float16", "bfloat16"):
        raise Unsupported(f"query of type {q.type}; expected a float [..., L, E] tensor")
    if a.get("enable_gqa") and q.shape[-3] != k.shape[-3]:
        k, v = _repeat_heads(cx, k, q.shape[-3]), _repeat_heads(cx, v, q.shape[-3])
    rank = k.type.rank
    key_t = cx.emit("transpose", [k], perm=tuple(range(rank - 2)) + (rank - 1, rank - 2))
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = cx.emit("mul", [cx.emit("matmul", [q, key_t]), cx.value(float(scale), q.dtype)])
    keep = None
    if a["is_causal"]:
        if a["attn_mask"] is not None:
            raise Unsupported("is_causal together with attn_mask (torch refuses it too)")
        rows, cols = scores.shape[-2:]
        if isinstance(rows, str) or isinstance(cols, str):
            raise Unsupported("a causal mask over a batch-sized sequence")
        keep = cx.constant(np.tril(np.ones((rows, cols), dtype=bool)), f"{cx.node.name}_causal")
    elif a["attn_mask"] is not None:
        mask = cx.value(a["attn_mask"])
        if mask.dtype == "bool":
            keep = mask
        else:
            scores = cx.emit("add", [scores, cx.cast(mask, scores.dtype)])
    if keep is not None:
        scores = cx.emit("where", [keep, scores, cx.value(MASKED, scores.dtype)])
    probs = cx.emit("softmax", [scores], axis=-1)
    if keep is not None and not _every_row_kept(keep):
        any_kept = cx.emit("reduce_max", [keep], axes=(-1,), keepdims=True)
        probs = cx.emit("where", [any_kept, probs, cx.value(0.0, probs.dtype)])
    return cx.emit("matmul", [probs, v])


def _repeat_heads(cx, x: Value, heads: int) -> Value:
    """``[B, Hkv, S, D]`` -> ``[B, heads, S, D]``, query head ``h`` reading key/value head ``h // r``."""
    *lead, kv_heads, length, width = x.shape
    if heads % kv_heads:
        raise Unsupported(f"{heads} query heads over {kv_heads} key/value heads")
    wide = tuple(lead) + (kv_heads, 1, length, width)
    x = cx.emit("reshape", [x], shape=wide)
    x = cx.emit("expand", [x], shape=tuple(lead) + (kv_heads, heads // kv_heads, length, width))
    return cx.emit("reshape", [x], shape=tuple(lead) + (heads, length, width))


def _every_row_kept(keep: Value) -> bool:
    """A constant bool mask with at least one True per query row needs no all-masked guard."""
    return keep.is_constant and bool(np.all(np.any(keep.data, axis=-1)))
