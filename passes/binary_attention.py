"""Binary-code attention: ``softmax(q k^T s) v`` -> ``binary_attention(q P, k P - o, v)`` (ShiftAddViT).

ShiftAddViT (You et al., NeurIPS 2023, Sec. 4.1) maps queries and keys to ``b``-bit codes in
Hamming space (EcoFormer's kernel-based hashing, Liu et al., NeurIPS 2022) so that the attention
MatMuls become additions, as the linear attention ``B_Q (B_K^T V)`` with its normalizer; the op and
its equation are in ``ir/ops_attention.py``: ``w_ij = 1 + (b + c_qi . c_kj) / 2`` (one plus the
matching bits), ``out_i = sum_j w_ij v_j / sum_j w_ij``.

The hash is fitted per head on calibration activations (no KSH labels here; a data-driven
initialisation that recovery fine-tuning then trains):

* one projection ``P [D, b]`` shared by q and k, so matching bits track the angle between them
  (SimHash: for a random Gaussian ``P``, ``E[m_ij] / b = 1 - angle(q_i, k_j) / pi``);
* keys are centred, ``kh = (k - mean k) P``: softmax over ``j`` ignores ``q_i . mean k``, a
  constant per query, so centring keys loses nothing; queries are not centred;
* candidates: ``pca_itq`` (the top ``b`` principal directions of the joint q / centred-k data, then
  ITQ's orthogonal rotation, Gong & Lazebnik, CVPR 2011, Eq. 2, 30 iterations) and ``random``
  (SimHash); with ``binary_init="auto"`` the one with the lower output error on calibration wins.
* the positive scale ``s`` disappears: ``sign`` is scale free.

Beside the code form, a **local token mix** (Castling-ViT, You et al., CVPR 2023, Sec. 3.2, which
ShiftAddViT's attention keeps: a depthwise convolution of ``v`` over the token axis, kernel 9 per
head): ``out = binary_attention(qh, kh, v) + sum_t w_ht v_{i+t-p}``, the ``conv2d`` of ``v [B, H, S,
Dv]`` with an ``[H, 1, taps, 1]`` filter (``groups=H``; causal sites pad only the past, so no query
sees a later key). The linear code form spreads its weights over all keys (``1 + m_ij`` lies in
``1 .. b+1``), the local mix gives back the sharp near-diagonal part of softmax attention. Its taps are
fitted per head by least squares on calibration, to the residual ``softmax attention - code form``
(and then train in recovery); ``taps * Dv`` multiply-adds per token, in the reported count.
``binary_local_taps=0`` drops it (self-attention only: ``T == S`` with a static head count).

Refused, with the reason in the report: a softmax over another axis than the keys; a scale that is
not a positive constant scalar; additive score biases or float masks (relative position bias);
run-time masks (padding) and constant masks other than the causal triangle (``causal=True`` is the
prefix-sum form); probabilities or scores also read elsewhere; non-float32 attention. Options:
``hash_bits`` (default 16), ``binary_init`` (``auto`` | ``pca_itq`` | ``random``),
``binary_local_taps`` (default 9, ShiftAddViT's ``res_kernel_size``; 0: none), ``seed``.
The report gives, per layer, the output error on calibration and the fraction of multiplications
removed (``ir.ops_attention.binary_attention_mults``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reshift.ir.builder import create_node
from reshift.ir.graph import Graph, Node, Value
from reshift.ir.interpret import interpret
from reshift.ir.ops_attention import binary_attention_mults, binary_attention_ref
from reshift.passes.calibrate import require_calibration
from reshift.passes.manager import Pass, PassContext
from reshift.passes.rules import Refusal, RuleStats, replace_value

RULE = "binary_attention"
ITQ_ITERATIONS = 30
MASK_FILL_MAX = -1e30  # a where() fill at or below this is a mask, not a score edit
FIT_SAMPLES = 4096  # rows per head for the projection fit
LOCAL_TAPS = 9  # Castling-ViT / ShiftAddViT res_kernel_size
LOCAL_RIDGE = 1e-6  # relative to the Gram matrix's mean diagonal: keeps the taps finite on constant v


@dataclass
class Site:
    """One ``softmax(q k^T s [masked]) v`` found in the graph."""

    matmul: Node  # probabilities @ v (the root)
    interior: list[Node]  # the nodes the rewrite removes, q k^T first
    q: Value
    kt: Value
    v: Value
    causal: bool


def _constant_scalar(value: Value | None) -> float | None:
    if value is None or not value.is_constant or np.asarray(value.data).size != 1:
        return None
    return float(np.asarray(value.data).reshape(()))


def _is_last_two_swap(node: Node) -> bool:
    perm = node.attrs.get("perm")
    rank = len(perm) if perm is not None else 0
    return rank >= 2 and tuple(perm) == tuple(range(rank - 2)) + (rank - 1, rank - 2)


def find_site(graph: Graph, root: Node, producers, users) -> Site | str | None:
    """The attention ending at ``root`` (a matmul), a refusal reason, or None when it is no attention."""
    probs, v = root.inputs[:2]
    softmax = producers.get(probs)
    if softmax is None or softmax.op != "softmax":
        return None
    x = softmax.inputs[0]
    if softmax.attrs["axis"] not in (-1, x.type.rank - 1):
        return f"softmax over axis {softmax.attrs['axis']}, not the key axis: the code form normalizes over keys"
    interior, causal = [softmax], False
    node = producers.get(x)
    if node is not None and node.op == "where":
        keep, scores, fill = node.inputs
        fill_value = _constant_scalar(fill)
        if fill_value is None or fill_value > MASK_FILL_MAX:
            return f"where node {node.name} edits the scores (fill {fill.name}), not a mask the code form can express"
        if not keep.is_constant:
            return f"run-time mask %{keep.name} (padding): the code form sums over every key"
        mask = np.asarray(keep.data, bool)
        rows, cols = scores.shape[-2:]
        tril = rows == cols and isinstance(rows, int) and mask.shape[-2:] == (rows, cols)
        tril = tril and np.array_equal(
            np.broadcast_to(mask, mask.shape), np.broadcast_to(np.tril(np.ones((rows, cols), bool)), mask.shape)
        )
        if not tril:
            return f"mask %{keep.name} is not the causal triangle (a window or arbitrary mask has no prefix-sum form)"
        causal = True
        interior.append(node)
        node = producers.get(scores)
    elif node is not None and node.op == "add":
        return f"add node {node.name} adds a bias or float mask to the scores: the code form cannot express it"
    if node is not None and node.op in ("mul", "div"):
        operands = node.inputs[:2]
        constant = [i for i, o in enumerate(operands) if o.is_constant]
        if node.op == "div" and constant != [1]:
            return f"div node {node.name} does not divide the scores by a constant"
        if len(constant) != 1:
            return f"{node.op} node {node.name} scales the scores by a run-time value: the code form cannot replace it"
        scale = _constant_scalar(operands[constant[0]])
        if scale is None:
            return f"{node.op} node {node.name} scales scores by a non-scalar constant (per position or head)"
        if not scale > 0 or not np.isfinite(scale):
            return f"score scale {scale} is not positive and finite: sign codes keep only positive scales"
        interior.append(node)
        node = producers.get(operands[1 - constant[0]])
    if node is None or node.op != "matmul":
        what = "a graph input or constant" if node is None else f"{node.op} node {node.name}"
        return f"the scores come from {what}, not from q @ k^T"
    interior.append(node)
    q, kt = node.inputs[:2]
    for t in (q, kt, v):
        if t.dtype != "float32":
            return f"attention operand %{t.name} is {t.dtype}; binary_attention runs float32"
        if t.type.rank < 3:
            return f"attention operand %{t.name} has rank {t.type.rank}; expected [..., tokens, dim]"
    if not (q.shape[:-2] == kt.shape[:-2] == v.shape[:-2]):
        return f"q {q.type}, k^T {kt.type} and v {v.type} broadcast over their leading dims"
    interior.reverse()  # q k^T first
    for inner in interior:
        readers = users.get(inner.outputs[0], [])
        expected = interior[interior.index(inner) + 1] if inner is not interior[-1] else root
        if inner.outputs[0] in graph.outputs or any(r is not expected for r in readers):
            return f"%{inner.outputs[0].name} ({inner.op}) is also read elsewhere: it would stay computed"
    return Site(root, interior, q, kt, v, causal)


# -- fitting --------------------------------------------------------------------------------------
def _heads(x: np.ndarray) -> np.ndarray:
    """``[..., H, T, D]`` -> ``[H, rows, D]`` (rank 3 ``[B, T, D]``: one shared head)."""
    if x.ndim == 3:
        return x.reshape(1, -1, x.shape[-1])
    h = x.shape[-3]
    return np.moveaxis(x.reshape(-1, h, x.shape[-2], x.shape[-1]), 1, 0).reshape(h, -1, x.shape[-1])


def _subsample(x: np.ndarray, rows: int) -> np.ndarray:
    return x[:: max(1, len(x) // rows)]


def pca_itq(x: np.ndarray, bits: int, rng: np.random.Generator) -> np.ndarray:
    """``[D, bits]``: top principal directions of ``x`` (second moments) rotated by ITQ."""
    d = x.shape[1]
    x = x.astype(np.float64)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    take = min(bits, d)
    w = vt[:take].T
    if take < bits:  # more bits than dimensions: extra random directions
        w = np.concatenate([w, rng.standard_normal((d, bits - take))], axis=1)
    z = x @ w
    r, _ = np.linalg.qr(rng.standard_normal((bits, bits)))
    for _ in range(ITQ_ITERATIONS):  # min ||B - Z R||: B = sign(Z R), then orthogonal Procrustes
        b = np.where(z @ r >= 0, 1.0, -1.0)
        u, _, vt2 = np.linalg.svd(z.T @ b)
        r = u @ vt2
    return w @ r


def _softmax_attention(q, kt, v, scale: float, causal: bool) -> np.ndarray:
    s = np.matmul(q.astype(np.float64), kt.astype(np.float64)) * scale
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.matmul(p / p.sum(-1, keepdims=True), v.astype(np.float64))


def _relative(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30))


@dataclass
class Fit:
    projection: np.ndarray  # [H, D, b] (rank-3 sites: [D, b])
    key_offset: np.ndarray  # [H, 1, b] (rank-3 sites: [1, b])
    init: str
    output_error: float  # relative error of the site's output (code form + local mix) on calibration
    code_form_error: float  # the code form's alone
    local_mix: np.ndarray | None = None  # [H, taps] token-mix taps (None: no local mix)


def fit_projection(q, kt, v, scale: float, causal: bool, bits: int, init: str, seed: int, taps: int = 0) -> Fit:
    """The per-head hash projection with the lower output error, then (``taps > 0``) the local mix's
    least-squares taps on what the code form leaves (see module docstring)."""
    rng = np.random.default_rng(seed)
    k = np.swapaxes(kt, -1, -2)
    qh_, kh_ = _heads(q), _heads(k)
    mu = kh_.mean(axis=1, keepdims=True)  # [H, 1, D]
    candidates = {}
    heads, d = qh_.shape[0], qh_.shape[2]
    if init in ("auto", "pca_itq"):
        joint = [
            np.concatenate([_subsample(qh_[h], FIT_SAMPLES), _subsample(kh_[h] - mu[h], FIT_SAMPLES)])
            for h in range(heads)
        ]
        candidates["pca_itq"] = np.stack([pca_itq(joint[h], bits, rng) for h in range(heads)])
    if init in ("auto", "random"):
        candidates["random"] = rng.standard_normal((heads, d, bits))
    ref = _softmax_attention(q, kt, v, scale, causal)
    best = None
    for name, p in candidates.items():
        p32 = p.astype(np.float32)
        offset = (mu.astype(np.float64) @ p).astype(np.float32)  # [H, 1, b]
        if q.ndim == 3:
            p32, offset = p32[0], offset[0]
        qh = np.matmul(q, p32)
        kh = np.matmul(k, p32) - offset
        out = binary_attention_ref(qh, kh, v, causal).astype(np.float64)
        err = _relative(out, ref)
        if best is None or err < best.output_error:
            best, best_out = Fit(p32, offset, name, err, err), out
    if taps:
        w = fit_local_mix(v, ref - best_out, taps, causal)
        best.local_mix = w.astype(np.float32)
        best.output_error = _relative(best_out + local_mix_ref(v, best.local_mix.astype(np.float64), causal), ref)
    return best


def local_padding(taps: int, causal: bool) -> tuple[int, int]:
    """Token-axis padding ``(before, after)`` of the local mix: centred, or only the past when causal."""
    return (taps - 1, 0) if causal else ((taps - 1) // 2, taps // 2)


def _as_heads4(v: np.ndarray) -> np.ndarray:
    """``[B, H, S, D]`` (rank-3 ``[B, S, D]``: one head)."""
    return v[:, None] if v.ndim == 3 else v


def _token_taps(v4: np.ndarray, taps: int, causal: bool) -> list[np.ndarray]:
    """The ``taps`` shifted copies ``v[..., i + t - before, :]`` (zeros outside), each ``[B, H, S, D]``."""
    before, after = local_padding(taps, causal)
    pad = np.pad(v4, ((0, 0), (0, 0), (before, after), (0, 0)))
    s = v4.shape[2]
    return [pad[:, :, t : t + s] for t in range(taps)]


def local_mix_ref(v: np.ndarray, w: np.ndarray, causal: bool) -> np.ndarray:
    """``sum_t w[h, t] v[..., h, i + t - before, :]`` in float64 (``w [H, taps]``): the ``conv2d`` the rewrite emits."""
    v4 = _as_heads4(np.asarray(v, np.float64))
    out = sum(w[None, :, t, None, None] * x for t, x in enumerate(_token_taps(v4, w.shape[1], causal)))
    return out[:, 0] if np.ndim(v) == 3 else out


def fit_local_mix(v: np.ndarray, residual: np.ndarray, taps: int, causal: bool) -> np.ndarray:
    """``[H, taps]`` least-squares taps: ``min_w ||residual - local_mix(v, w)||^2`` per head (ridge-damped)."""
    v4, r4 = _as_heads4(np.asarray(v, np.float64)), _as_heads4(np.asarray(residual, np.float64))
    shifted = _token_taps(v4, taps, causal)
    gram = np.empty((v4.shape[1], taps, taps))
    rhs = np.stack([np.einsum("bhsd,bhsd->h", x, r4) for x in shifted], axis=1)
    for t in range(taps):
        for u in range(t, taps):
            gram[:, t, u] = gram[:, u, t] = np.einsum("bhsd,bhsd->h", shifted[t], shifted[u])
    damp = LOCAL_RIDGE * np.maximum(np.trace(gram, axis1=1, axis2=2) / taps, 1e-30)
    gram += damp[:, None, None] * np.eye(taps)
    return np.linalg.solve(gram, rhs[..., None])[..., 0]


def local_mix_reason(q: Value, v: Value) -> str | None:
    """Why a site takes no local mix (cross-attention, symbolic heads, other ranks), or None."""
    if q.shape[-2] != v.shape[-2]:
        return f"queries {q.type} and keys {v.type} differ in length: no token-aligned local mix"
    if v.type.rank not in (3, 4) or not all(isinstance(d, int) for d in v.shape[-3 if v.type.rank == 4 else -2 :]):
        return f"values {v.type} are not [B, H, S, D] / [B, S, D] with static heads, tokens and channels"
    return None


# -- the rewrite ----------------------------------------------------------------------------------
def _insert(graph: Graph, before: Node, op: str, inputs: list, attrs: dict | None = None, hint: str = "") -> Value:
    node = create_node(graph, op, inputs, attrs or {}, graph.fresh_name(hint or op))
    graph.nodes.insert(graph.nodes.index(before), node)
    return node.outputs[0]


def _local_mix(graph: Graph, root: Node, v: Value, w: np.ndarray, causal: bool, name: str) -> Value:
    """``conv2d`` of ``v`` over the token axis with the per-head taps ``w [H, taps]`` (rank 3: one head)."""
    heads, taps = w.shape
    v4 = v if v.type.rank == 4 else _insert(graph, root, "reshape", [v], {"shape": (-1, 1) + tuple(v.shape[-2:])})
    before, after = local_padding(taps, causal)
    filt = graph.add_constant(w.reshape(heads, 1, taps, 1).astype(np.float32), f"{name}_local_mix")
    attrs = {"padding": (before, 0, after, 0), "groups": heads}
    mixed = _insert(graph, root, "conv2d", [v4, filt], attrs, hint=f"{name}_local_mix")
    if v.type.rank == 4:
        return mixed
    return _insert(graph, root, "reshape", [mixed], {"shape": (-1,) + tuple(v.shape[-2:])})


def _rewrite(graph: Graph, site: Site, fit: Fit, producers) -> Value:
    root, name = site.matmul, site.matmul.name
    transpose = producers.get(site.kt)
    if transpose is not None and transpose.op == "transpose" and _is_last_two_swap(transpose):
        k = transpose.inputs[0]
    else:
        rank = site.kt.type.rank
        k = _insert(graph, root, "transpose", [site.kt], {"perm": tuple(range(rank - 2)) + (rank - 1, rank - 2)})
    p = graph.add_constant(fit.projection, f"{name}_hash_projection")
    offset = graph.add_constant(-fit.key_offset, f"{name}_hash_key_offset")
    qh = _insert(graph, root, "matmul", [site.q, p], hint=f"{name}_q_hash")
    kh = _insert(
        graph,
        root,
        "add",
        [_insert(graph, root, "matmul", [k, p], hint=f"{name}_k_proj"), offset],
        hint=f"{name}_k_hash",
    )
    out = _insert(graph, root, "binary_attention", [qh, kh, site.v], {"causal": site.causal}, hint=f"{name}_binary")
    if fit.local_mix is None:
        return out
    local = _local_mix(graph, root, site.v, fit.local_mix, site.causal, name)
    return _insert(graph, root, "add", [out, local], hint=f"{name}_attention")


def attention_result(node: Node, users, producers) -> Value:
    """The value a rewritten site hands on: the ``binary_attention`` output, or the ``add`` of its local mix."""
    out = node.outputs[0]
    readers = users.get(out, [])
    if len(readers) == 1 and readers[0].op == "add":
        other = next((v for v in readers[0].inputs if v is not out), None)
        mix = producers.get(other)
        if mix is not None and mix.op in ("conv2d", "reshape") and node.inputs[2] in _mix_sources(mix, producers):
            return readers[0].outputs[0]
    return out


def _mix_sources(mix: Node, producers) -> list[Value]:
    """The values a local mix reads: ``conv2d(v)`` or ``reshape(conv2d(reshape(v)))``."""
    if mix.op == "reshape":
        mix = producers.get(mix.inputs[0])
        if mix is None or mix.op != "conv2d":
            return []
    src = mix.inputs[0]
    inner = producers.get(src)
    return [src] + ([inner.inputs[0]] if inner is not None and inner.op == "reshape" else [])


def _scale_of(site: Site) -> float:
    for node in site.interior:
        if node.op in ("mul", "div"):
            c = next(o for o in node.inputs[:2] if o.is_constant)
            value = float(np.asarray(c.data).reshape(()))
            return 1.0 / value if node.op == "div" else value
    return 1.0


def binary_attention_pass(graph: Graph, ctx: PassContext) -> RuleStats:
    """Replace every softmax attention it can with ``binary_attention`` (see module docstring)."""
    stats = RuleStats()
    opts = ctx.options
    bits, init, seed = int(opts.get("hash_bits", 16)), str(opts.get("binary_init", "auto")), int(opts.get("seed", 0))
    if init not in ("auto", "pca_itq", "random"):
        raise ValueError(f"binary_init {init!r}: choose auto, pca_itq or random")
    if not 1 <= bits <= 64:
        raise ValueError(f"hash_bits {bits}: choose 1..64")
    taps = int(opts.get("binary_local_taps", LOCAL_TAPS))
    if not 0 <= taps <= 64:
        raise ValueError(f"binary_local_taps {taps}: choose 0 (no local mix) .. 64")
    producers, users = graph.producers(), graph.users()
    sites = []
    for node in [n for n in graph.nodes if n.op == "matmul"]:
        found = find_site(graph, node, producers, users)
        if isinstance(found, str):
            stats.refusals.append(Refusal(RULE, node.name, found))
        elif found is not None:
            sites.append(found)
    if not sites:
        return stats
    calibration = require_calibration(ctx.calibration, "binary-code attention (hash projection fit)")
    names = {v.name for s in sites for v in (s.q, s.kt, s.v)}
    seen: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for batch in calibration:
        env = interpret(graph, batch, return_all=True)
        for n in names:
            seen[n].append(env[n])
    for site in sites:
        q, kt, v = (np.concatenate(seen[t.name]) for t in (site.q, site.kt, site.v))
        no_mix = local_mix_reason(site.q, site.v) if taps else "binary_local_taps=0"
        site_taps = 0 if no_mix else taps
        fit = fit_projection(q, kt, v, _scale_of(site), site.causal, bits, init, seed, site_taps)
        out = _rewrite(graph, site, fit, producers)
        replace_value(graph, site.matmul.outputs[0], out)  # a fresh node output: always accepted
        tokens, dim, keys, v_dim = q.shape[-2], q.shape[-1], v.shape[-2], v.shape[-1]
        before, after = binary_attention_mults(tokens, keys, dim, v_dim, bits, site_taps)
        stats.matches[RULE] = stats.matches.get(RULE, 0) + 1
        stats.details[site.matmul.name] = {
            "bits": bits,
            "init": fit.init,
            "causal": site.causal,
            "local_taps": site_taps,
            **({"no_local_mix": no_mix} if no_mix and taps else {}),
            "output_error": fit.output_error,
            "code_form_error": fit.code_form_error,
            "mults_per_head": (before, after),
            "mults_removed": 1.0 - after / before,
        }
    graph.remove_unused()
    return stats


BINARY_ATTENTION_PASSES = [
    Pass(
        "binary_attention",
        binary_attention_pass,
        exact=False,
        doc="softmax(q k^T s) v -> ShiftAddViT binary-code linear attention (hash fitted on calibration)",
        options=frozenset({"hash_bits", "binary_init", "binary_local_taps", "seed"}),
    )
]

__all__ = [
    "BINARY_ATTENTION_PASSES",
    "LOCAL_TAPS",
    "Fit",
    "Site",
    "attention_result",
    "binary_attention_pass",
    "find_site",
    "fit_local_mix",
    "fit_projection",
    "local_mix_ref",
    "pca_itq",
]
