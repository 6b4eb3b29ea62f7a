"""The decoder template in numpy: the ground truth for the TVM build and the calibration capture.

``forward`` runs ``ids`` (positions ``pos .. pos + n - 1``) through the decoder of a
:class:`~reshift.llm.config.DecoderSpec`, writes their keys and values into the caches
``[layers, kv_heads, max_seq_len, head_dim]`` at those positions (the cache is state, modelled as
an in/out argument exactly as the compiled ``prefill`` / ``decode`` functions do) and returns the
logits of the last position. ``capture`` collects the input rows of every linear (BCQ calibration);
``embed``, ``block`` and ``head`` are its pieces, for running it one block at a time.

``int8_tables=True`` states what a ``decode_lut="int8"`` artifact's decode step computes: every linear
whose codes are in ``w`` (``name.planes``, ``name.alpha``, ``name.group_size``, as
``compiler.prepare(dequantized=...)`` gives them) is ``ir.ops_lowbit.lut_int8_rows`` (T-MAC int8
tables), the others ``x @ W^T``; prefill is always the float form.
"""

from __future__ import annotations

import math

import numpy as np

from reshift.ir.ops_lowbit import lut_int8_rows
from reshift.llm.config import DecoderSpec

LINEARS_GATED = ("q", "k", "v", "o", "gate", "up", "down")
LINEARS_PLAIN = ("q", "k", "v", "o", "fc1", "fc2")


def linear_names(spec: DecoderSpec) -> list[str]:
    """The canonical names of every linear layer, in execution order (``lm_head`` last)."""
    per_layer = LINEARS_GATED if spec.gated else LINEARS_PLAIN
    return [f"layers.{i}.{p}" for i in range(spec.num_layers) for p in per_layer] + ["lm_head"]


def activation(name: str, x: np.ndarray) -> np.ndarray:
    if name == "silu":
        return x / (1.0 + np.exp(-x))
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if name == "gelu":
        from math import erf

        return 0.5 * x * (1.0 + np.vectorize(erf)(x / math.sqrt(2.0)).astype(x.dtype))
    if name == "relu":
        return np.maximum(x, 0)
    raise ValueError(name)


def norm(spec: DecoderSpec, w: dict[str, np.ndarray], prefix: str, x: np.ndarray) -> np.ndarray:
    if spec.norm == "rms":
        return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + spec.norm_eps)) * w[prefix + ".w"]
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + spec.norm_eps) * w[prefix + ".w"] + w[prefix + ".b"]


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rotary_dim: int) -> np.ndarray:
    """HF ``rotate_half`` on the first ``rotary_dim`` of each head: ``x [n, heads, D]``, ``cos [n, rot/2]``."""
    half = rotary_dim // 2
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, rest], axis=-1)


def forward(
    spec: DecoderSpec,
    w: dict[str, np.ndarray],
    ids: np.ndarray,
    pos: int,
    cache_k: np.ndarray,
    cache_v: np.ndarray,
    capture: dict[str, list[np.ndarray]] | None = None,
    int8_tables: bool = False,
) -> np.ndarray:
    """Logits ``[vocab]`` of the last of ``ids`` (1-D), the caches updated in place."""
    x, cos, sin = embed(spec, w, ids, pos)
    for i in range(spec.num_layers):
        x = block(spec, w, i, x, pos, cache_k[i], cache_v[i], cos, sin, capture, int8_tables)
    return head(spec, w, x, capture, int8_tables)


def linear(w: dict[str, np.ndarray], name: str, x: np.ndarray, int8_tables: bool = False) -> np.ndarray:
    """``x @ W^T + b`` of linear ``name``; with ``int8_tables`` and its codes in ``w``, the int8-table form."""
    if int8_tables and name + ".planes" in w:
        g = int(w[name + ".group_size"])
        return lut_int8_rows(x, w[name + ".planes"], w[name + ".alpha"], g, w.get(name + ".b"))
    y = x @ w[name + ".w"].T
    return y + w[name + ".b"] if name + ".b" in w else y


def embed(spec: DecoderSpec, w: dict[str, np.ndarray], ids: np.ndarray, pos: int):
    """``(hidden states [n, hidden], rope cos, rope sin)`` of ``ids`` at positions ``pos ..``."""
    n = len(ids)
    x = w["embed"][ids] * np.float32(spec.embed_scale)
    positions = np.arange(pos, pos + n)
    if spec.learned_positions:
        x = x + w["pos_embed"][positions + spec.position_offset]
    cos = sin = None
    if spec.rotary_dim:
        cos_t, sin_t = spec.rope_tables(pos + n)
        cos, sin = cos_t[positions], sin_t[positions]
    return x, cos, sin


def block(
    spec: DecoderSpec,
    w: dict[str, np.ndarray],
    i: int,
    x: np.ndarray,
    pos: int,
    cache_k: np.ndarray,
    cache_v: np.ndarray,
    cos: np.ndarray | None,
    sin: np.ndarray | None,
    capture: dict[str, list[np.ndarray]] | None = None,
    int8_tables: bool = False,
) -> np.ndarray:
    """Decoder block ``i`` on hidden states ``x [n, hidden]`` at positions ``pos ..``: writes this
    block's keys and values into ``cache_k`` / ``cache_v`` ``[kv_heads, max_seq_len, head_dim]``
    (in place) and returns the block's output. ``w`` needs only block ``i``'s tensors, so that
    calibration can run the model one block at a time (``reshift.llm.stream``). ``capture`` gets the
    input rows of each linear; linears reading one input (q/k/v, gate/up) get the same array."""
    n = len(x)
    h_, kv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim

    def lin(name: str, x: np.ndarray) -> np.ndarray:
        if capture is not None:
            capture.setdefault(name, []).append(x)  # never written to afterwards: no copy
        return linear(w, name, x, int8_tables)

    p = f"layers.{i}."
    hn = norm(spec, w, p + "norm1", x)
    q = lin(p + "q", hn).reshape(n, h_, d)
    k = lin(p + "k", hn).reshape(n, kv, d)
    v = lin(p + "v", hn).reshape(n, kv, d)
    if spec.rotary_dim:
        q, k = rope(q, cos, sin, spec.rotary_dim), rope(k, cos, sin, spec.rotary_dim)
    cache_k[:, pos : pos + n] = k.transpose(1, 0, 2)
    cache_v[:, pos : pos + n] = v.transpose(1, 0, 2)
    attn = np.zeros((n, h_, d), np.float32)
    window = spec.windows[i]
    for t in range(n):
        end = pos + t + 1
        start = max(0, end - window) if window else 0
        for head in range(h_):
            g = head // (h_ // kv)
            scores = cache_k[g, start:end] @ q[t, head] * np.float32(spec.attn_scale)
            e = np.exp(scores - scores.max())
            attn[t, head] = (e / e.sum()) @ cache_v[g, start:end]
    x = x + lin(p + "o", attn.reshape(n, h_ * d))
    hn = norm(spec, w, p + "norm2", x)
    if spec.gated:
        return x + lin(p + "down", activation(spec.act, lin(p + "gate", hn)) * lin(p + "up", hn))
    return x + lin(p + "fc2", activation(spec.act, lin(p + "fc1", hn)))


def head(spec: DecoderSpec, w: dict[str, np.ndarray], x: np.ndarray, capture=None, int8_tables=False) -> np.ndarray:
    """Logits ``[vocab]`` of the last row of ``x`` (final norm, ``lm_head``)."""
    last = norm(spec, w, "norm", x[-1:])
    if capture is not None:
        capture.setdefault("lm_head", []).append(last)
    return linear(w, "lm_head", last, int8_tables)[0]
