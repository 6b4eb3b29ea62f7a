"""The numerical kernels behind :mod:`reshift.passes.bcq`, vectorized so a 4096x4096 layer fits in seconds.

The objectives are those of ShiftAddLLM (You et al. 2024) as :mod:`~reshift.passes.bcq` states them;
this file only computes them faster:

* Codes are kept as one index per weight into the ``2^q`` sign combinations. The nearest code of a
  weight is found against the sorted codebook ``alpha . combo`` of its group by counting the
  midpoints below it (1-D Voronoi cells), for all rows and groups at once.
* Alternating least squares reads its normal equations off per-group statistics: with ``n[c]``
  weights on combination ``c`` and ``s[c]`` their sum, ``gram = sum_c n[c] c c^T`` and
  ``rhs = sum_c s[c] c``. Both come from each group's weights sorted once, with prefix sums, by a
  binary search of the codebook's midpoints (:class:`SortedGroups`): no pass over the weights per
  step; the codes themselves are formed once, at the end.
* :class:`HessianFactor` holds everything GPTQ needs of one input, computed once and shared by every
  layer reading that input (q/k/v, gate/up) and every ``q`` tried: ``H = X^T X + D`` (``D`` the
  damping diagonal), the act-order permutation and the upper Cholesky factor ``U`` of ``H^-1``,
  obtained as the inverse of the Cholesky factor of the reversed ``H`` (no explicit ``H^-1``).
* The output-aware scale refit ``(M H M^T) a = M H w`` is formed from ``A M^T`` with ``A^T A + D =
  H`` (``A = X`` when there are fewer rows than inputs, else a Cholesky factor): cost
  ``O * min(rows, K) * K * q`` instead of ``O * K^2 * q``.
* GPTQ's column loop (Frantar et al. 2023, Alg. 1) runs in float32 on the transposed weight (a
  column is contiguous) with two levels of lazy batch updates (16 columns eagerly, 128 by one
  GEMM, the rest by one GEMM per 128 columns). Many small GEMMs run on one BLAS thread.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

ROW_CHUNK_ELEMENTS = 1 << 20  # weights per chunk of rows in the code search (cache-sized)
GPTQ_DTYPE = np.float32  # GPTQ's column loop (its reference code runs in float32 too)


@functools.cache
def _blas_controller():
    try:
        from threadpoolctl import ThreadpoolController  # optional: without it BLAS keeps its threads
    except ImportError:
        return None
    return ThreadpoolController()


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Many small GEMMs (a batched ``[96, M] @ [M, 96]`` per output row, GPTQ's 16-column updates)
    lose more to BLAS thread hand-offs than threads gain (10x on a busy 2-core machine)."""
    controller = _blas_controller()
    if controller is None:
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield


def combos(q: int) -> np.ndarray:
    """All ``2^q`` sign vectors ``[2^q, q]``; combination ``c`` is ``+1`` at plane ``i`` iff bit ``q-1-i`` is set."""
    return np.array(list(itertools.product((-1.0, 1.0), repeat=q)))


def grouped(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``w`` [O, K] as ``[O, groups, G]`` (zero padded) and the validity mask ``[groups, G]``."""
    out, k = w.shape
    ng = -(-k // group_size)
    padded = np.zeros((out, ng * group_size))
    padded[:, :k] = w
    mask = (np.arange(ng * group_size) < k).reshape(ng, group_size)
    return padded.reshape(out, ng, group_size), mask


def take_last(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``np.take_along_axis(a, idx, -1)`` through one flat gather (several times faster)."""
    n = a.shape[-1]
    rows = np.arange(a.size // n).reshape(a.shape[:-1] + (1,)) * n
    return a.reshape(-1)[rows + idx]


@one_blas_thread()
def _solve_small(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``gram^+ rhs`` for stacks of small symmetric systems: ``solve`` where well conditioned,
    the pseudo-inverse (the minimum-norm least-squares solution) where singular."""
    flat_g, flat_r = gram.reshape(-1, *gram.shape[-2:]), rhs.reshape(-1, rhs.shape[-1])
    scale = np.maximum(np.einsum("nii->n", flat_g) / gram.shape[-1], 1e-300)
    sign, logdet = np.linalg.slogdet(flat_g / scale[:, None, None])
    bad = (sign <= 0) | (logdet < -25.0)
    out = np.empty_like(flat_r)
    good = ~bad
    if good.any():
        out[good] = np.linalg.solve(flat_g[good], flat_r[good][..., None])[..., 0]
    if bad.any():
        out[bad] = (np.linalg.pinv(flat_g[bad]) @ flat_r[bad][..., None])[..., 0]
    return out.reshape(rhs.shape)


@dataclass
class Codebook:
    """Per (row, group) the sorted values of ``alpha . combo``, their midpoints and the combination
    behind each sorted value."""

    values: np.ndarray  # [..., C] ascending
    mids: np.ndarray  # [..., C-1]
    order: np.ndarray  # [..., C] combination index of each sorted value

    @classmethod
    def of(cls, alpha: np.ndarray, table: np.ndarray) -> Codebook:
        raw = alpha @ table.T
        order = np.argsort(raw, axis=-1, kind="stable")
        values = np.take_along_axis(raw, order, -1)
        return cls(values, 0.5 * (values[..., 1:] + values[..., :-1]), order.astype(np.uint8))

    def position(self, w: np.ndarray) -> np.ndarray:
        """Index of the nearest sorted value for each entry of ``w`` [..., G] (mids [..., C-1])."""
        if w.ndim == 1:  # one column, ``mids`` [O, C-1]
            return np.count_nonzero(w[:, None] > self.mids, axis=1)
        pos = np.zeros(w.shape, np.uint8)
        for t in range(self.mids.shape[-1]):
            pos += w > self.mids[..., t : t + 1]
        return pos


def nearest_codes(wg: np.ndarray, alpha: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Per weight of ``wg`` [O, groups, G] the combination index (uint8) whose value ``alpha . combo``
    is nearest, for all rows and groups at once (in row chunks that stay in cache)."""
    out, ng, g = wg.shape
    idx = np.empty(wg.shape, np.uint8)
    step = max(1, ROW_CHUNK_ELEMENTS // max(1, ng * g))
    for start in range(0, out, step):
        book = Codebook.of(alpha[start : start + step], table)
        pos = book.position(wg[start : start + step])
        idx[start : start + step] = take_last(book.order, pos)
    return idx


def planes(idx: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Combination indices ``[...]`` as code planes int8 ``[q, ...]`` (``table[idx]``, plane first)."""
    small = table.astype(np.int8)
    return np.stack([small[:, i][idx] for i in range(table.shape[1])])


def _histograms(wg: np.ndarray, idx: np.ndarray, valid: np.ndarray, n_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per (row, group, combination): how many weights take it and their sum, ``[O, groups, C]``."""
    out, ng, _ = wg.shape
    key = (np.arange(out * ng).reshape(out, ng, 1) * (n_codes + 1) + np.where(valid, idx, n_codes)).ravel()
    size = out * ng * (n_codes + 1)
    counts = np.bincount(key, minlength=size).reshape(out, ng, n_codes + 1)[..., :n_codes]
    sums = np.bincount(key, weights=wg.ravel(), minlength=size).reshape(out, ng, n_codes + 1)[..., :n_codes]
    return counts.astype(np.float64), sums


class SortedGroups:
    """Each group's weights sorted, with prefix sums: how many weights of a group fall in each cell
    of a codebook, and their sum, come from a binary search of its ``2^q - 1`` midpoints
    (``O(groups * 2^q * log G)`` per ALS step instead of a pass over every weight)."""

    def __init__(self, wg: np.ndarray, mask: np.ndarray) -> None:
        out, ng, g = wg.shape
        width = 1 << (g - 1).bit_length()  # a power of two: the search needs no bounds checks
        self.sorted = np.full((out, ng, width), np.inf)  # padding sorts last, never <= a midpoint
        self.sorted[..., :g] = np.sort(np.where(mask, wg, np.inf), axis=-1)
        finite = np.where(np.isfinite(self.sorted[..., :g]), self.sorted[..., :g], 0.0)
        self.prefix = np.concatenate([np.zeros((out, ng, 1)), np.cumsum(finite, axis=-1)], axis=-1)
        self.n_valid = np.broadcast_to(mask.sum(-1)[None, :, None], (out, ng, 1))

    def cells(self, book: Codebook) -> tuple[np.ndarray, np.ndarray]:
        """Per (row, group, sorted codebook value): weight count and weight sum, ``[O, groups, C]``."""
        out, ng, width = self.sorted.shape
        counts = np.empty(book.values.shape)
        sums = np.empty(book.values.shape)
        rows = max(1, ROW_CHUNK_ELEMENTS // 8 // (ng * width))  # the binary search probes stay in cache
        base = (np.arange(min(rows, out) * ng) * width - 1).reshape(-1, ng, 1)
        for start in range(0, out, rows):
            part = slice(start, start + rows)
            mids, ordered = book.mids[part], self.sorted[part].reshape(-1)
            at = base[: len(mids)]
            below = np.zeros(mids.shape, np.intp)  # weights <= each midpoint, by binary search
            step = width >> 1
            while step:
                cand = below + step
                below = np.where(ordered[at + cand] <= mids, cand, below)
                step >>= 1
            below += ordered[at + below + 1] <= mids  # the last candidate, index below (0-based)
            n_valid = self.n_valid[part]
            edges = np.concatenate([np.zeros_like(n_valid), below, n_valid], axis=-1)
            counts[part] = np.diff(edges, axis=-1)
            sums[part] = np.diff(take_last(self.prefix[part], edges), axis=-1)
        return counts, sums


@dataclass
class WeightOnlyFit:
    idx: np.ndarray  # [O, groups, G] combination index per weight
    alpha: np.ndarray  # [O, groups, q]
    history: list[float]


def fit_weight_only(w: np.ndarray, q: int, group_size: int, iters: int) -> WeightOnlyFit:
    """Greedy init (``alpha_i = mean|R|``, ``B_i = sign R``), then ``iters`` rounds of alternating least
    squares (alphas given codes, codes given alphas) while ``||W - W_hat||`` still falls."""
    wg, mask = grouped(np.asarray(w, np.float64), group_size)
    table = combos(q)
    residual = wg.copy()  # padding is zero and stays zero
    padded = not mask.all()
    idx = np.zeros(wg.shape, np.uint8)
    alphas = []
    for i in range(q):  # greedy init
        a = np.abs(residual).sum(-1) / mask.sum(-1)
        positive = residual >= 0
        residual -= np.copysign(a[..., None], residual)
        if padded:
            residual[:, -1] *= mask[-1]
        idx |= positive.view(np.uint8) << np.uint8(q - 1 - i)
        alphas.append(a)
    alpha = np.stack(alphas, axis=-1)
    history = [float(np.linalg.norm(residual))]
    if iters <= 0:
        return WeightOnlyFit(idx, alpha, history)
    del residual
    outer = np.einsum("ci,cj->cij", table, table).reshape(len(table), q * q)
    sumsq = float(np.einsum("ogk,ogk->", wg, wg))
    counts, sums = _histograms(wg, idx, np.broadcast_to(mask, wg.shape), len(table))
    groups = SortedGroups(wg, mask)
    for _ in range(iters):
        gram = (counts @ outer).reshape(counts.shape[:2] + (q, q))
        alpha = _solve_small(gram, sums @ table)
        book = Codebook.of(alpha, table)
        cell_counts, cell_sums = groups.cells(book)  # the nearest codes' statistics, codes not formed
        order = book.order.astype(np.intp)
        counts, sums = np.zeros_like(cell_counts), np.zeros_like(cell_sums)
        np.put_along_axis(counts, order, cell_counts, -1)
        np.put_along_axis(sums, order, cell_sums, -1)
        gram = (counts @ outer).reshape(counts.shape[:2] + (q, q))
        error = sumsq - 2.0 * np.sum(alpha * (sums @ table)) + np.einsum("ogi,ogij,ogj->", alpha, gram, alpha)
        history.append(float(np.sqrt(max(error, 0.0))))
        if history[-2] - history[-1] <= 1e-12 * max(history[0], 1e-30):
            break
    return WeightOnlyFit(nearest_codes(wg, alpha, table), alpha, history)


# -- the Hessian of one input, shared ----------------------------------------------------------
def _inverse_lower(lower: np.ndarray, leaf: int = 256) -> np.ndarray:
    """Inverse of a lower-triangular matrix by blocks (two GEMMs per level; numpy has no ``trtri``)."""
    n = len(lower)
    if n <= leaf:
        return np.tril(np.linalg.solve(lower, np.eye(n)))
    m = n // 2
    a, d = _inverse_lower(lower[:m, :m], leaf), _inverse_lower(lower[m:, m:], leaf)
    out = np.zeros_like(lower)
    out[:m, :m], out[m:, m:] = a, d
    out[m:, :m] = -d @ (lower[m:, :m] @ a)
    return out


@dataclass
class HessianFactor:
    """GPTQ's view of one layer input ``X`` [M, K] (see module docstring). Unpacks as the former
    ``(h, perm, dead)`` tuple."""

    h: np.ndarray  # [K, K] float64, X^T X + diag(d)
    perm: np.ndarray  # act order: columns by descending H[k, k]
    dead: np.ndarray  # inputs zero on every row
    u: np.ndarray  # [K, K] float32, upper Cholesky factor of H[perm][:, perm]^-1 (GPTQ's loop runs in float32)
    root: np.ndarray  # [r, K] with root^T root + diag(d) = H, r = min(M, K)
    d: np.ndarray  # [K] damping diagonal (zeros when root is a full Cholesky factor)

    def __iter__(self):
        return iter((self.h, self.perm, self.dead))

    @classmethod
    def of(cls, x: np.ndarray, damp: float = 0.01, act_order: bool = True) -> HessianFactor:
        x = np.asarray(x, np.float64)
        h = x.T @ x
        diag = np.diag(h).copy()
        zero = diag == 0
        diag[zero] = 1.0
        lam = damp * float(np.mean(diag))
        d = lam + zero.astype(np.float64)  # what hessian() adds: dead inputs get 1 + lambda
        h[np.diag_indices_from(h)] += d
        perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(len(h))
        # H_p = R R^T with R upper (R = flip(chol(flip(H_p)))), so H_p^-1 = (R^-1)^T R^-1 and U = R^-1
        flipped = np.linalg.cholesky(h[np.ix_(perm[::-1], perm[::-1])])
        u = np.ascontiguousarray(_inverse_lower(flipped)[::-1, ::-1], dtype=GPTQ_DTYPE)
        if len(x) < len(h):
            root = x
        else:  # A_p = R^T, columns back in the original order
            root = np.empty_like(h)
            root[:, perm] = flipped[::-1, ::-1].T
            d = np.zeros(len(h))
        return cls(h, perm, np.all(x == 0, axis=0), u, root, d)

    def apply_inverse_rows(self, x: np.ndarray) -> np.ndarray:
        """``X H^-1`` for the rows ``X`` this factor was computed from: Woodbury, ``(I + X D^-1 X^T)^-1
        X D^-1`` (``M x M``), when there are fewer rows than inputs, else through ``U``."""
        if self.d.all():  # root is X itself
            xd = self.root / self.d
            return np.linalg.solve(np.eye(len(xd)) + xd @ self.root.T, xd)
        u = self.u.astype(np.float64)
        xp = x[:, self.perm] @ u.T @ u
        out = np.empty_like(xp)
        out[:, self.perm] = xp
        return out


def as_factor(factor, x: np.ndarray | None, damp: float, act_order: bool) -> HessianFactor:
    """``factor`` if it is a :class:`HessianFactor`, else one computed from ``x``."""
    if isinstance(factor, HessianFactor):
        return factor
    return HessianFactor.of(x, damp, act_order)


def compensated_target(w: np.ndarray, x: np.ndarray, x_float: np.ndarray, factor: HessianFactor) -> np.ndarray:
    """:func:`reshift.passes.quant_common.compensated_target` through the factor:
    ``V = W + (W (X_f - X)^T) (X H^-1)`` (cost ``O M K`` rather than ``O K^2``)."""
    x = np.asarray(x, np.float64)
    return w + (w @ (np.asarray(x_float, np.float64) - x).T) @ factor.apply_inverse_rows(x)


def output_error(w: np.ndarray, w_hat: np.ndarray, factor: HessianFactor) -> float:
    """``tr((W - W_hat) H (W - W_hat)^T)`` through ``root`` and ``d``."""
    diff = w - w_hat
    return float(np.sum((diff @ factor.root.T) ** 2) + np.sum(diff**2 * factor.d))


# -- GPTQ over a per-group codebook ------------------------------------------------------------
def gptq_codes(
    w: np.ndarray,
    factor: HessianFactor,
    group_size: int,
    table: np.ndarray,
    init: Callable[[np.ndarray], np.ndarray],
    alpha: np.ndarray | None = None,
    block: int = 128,
    sub: int = 16,
    progress: Callable[[float], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al. 2023, Alg. 1) over a per-group codebook ``alpha[o, g] . combo``.

    Columns go in act order with ``U`` the upper Cholesky factor of ``H^-1``; each takes its nearest
    code and its error ``(w - w_q) / U[k,k]`` goes to the later columns (lazily: eagerly within
    ``sub`` columns, by one GEMM within ``block``, by one GEMM per block beyond). A group's scales
    are fitted by ``init`` to its error-compensated columns when its first column comes up
    (ShiftAddLLM Sec. 3.1), unless ``alpha`` fixes them: the columns inside the current block with
    every update so far, those beyond it with the updates of the earlier blocks (the lazy update
    reaches them at the block's end; fitting to fully updated columns measured no better).
    ``progress`` hears the fraction of columns done after each block. Returns the combination
    index per weight ``[O, K]`` (original column order) and ``alpha`` ``[O, groups, q]``.
    """
    out, k = w.shape
    perm, u = factor.perm, factor.u
    work = np.ascontiguousarray(w[:, perm].T, dtype=GPTQ_DTYPE)  # [K, O]: a column is one contiguous row
    position = np.empty(k, int)
    position[perm] = np.arange(k)
    ng = -(-k // group_size)
    group_of = perm // group_size
    books: list[Codebook | None] = [None] * ng
    fixed = alpha is not None
    alpha = np.zeros((out, ng, table.shape[1])) if alpha is None else np.array(alpha, np.float64)
    idx = np.empty((k, out), np.uint8)
    rows = np.arange(out)
    for b0 in range(0, k, block):
        b1 = min(k, b0 + block)
        errors = np.zeros((b1 - b0, out), GPTQ_DTYPE)
        with one_blas_thread():  # the trailing update below is one large GEMM and keeps them
            for s0 in range(b0, b1, sub):
                s1 = min(b1, s0 + sub)
                for j in range(s0, s1):
                    g = group_of[j]
                    if books[g] is None:
                        if not fixed:
                            cols = position[g * group_size : min(k, (g + 1) * group_size)]
                            current = work[cols]  # [G, O]
                            late = (cols >= s1) & (cols < b1)  # this sub-block's updates, still pending
                            if late.any() and j > s0:
                                current[late] -= u[s0:j, cols[late]].T @ errors[s0 - b0 : j - b0]
                            alpha[:, g] = init(current.T.astype(np.float64))
                        books[g] = Codebook.of(alpha[:, g].astype(GPTQ_DTYPE), table.astype(GPTQ_DTYPE))
                    book = books[g]
                    column = work[j]
                    pos = book.position(column)
                    idx[j] = book.order[rows, pos]
                    err = (column - book.values[rows, pos]) / u[j, j]
                    errors[j - b0] = err
                    if j + 1 < s1:
                        work[j + 1 : s1] -= np.outer(u[j, j + 1 : s1], err)
                if s1 < b1:
                    work[s1:b1] -= u[s0:s1, s1:b1].T @ errors[s0 - b0 : s1 - b0]
        if b1 < k:
            work[b1:] -= u[b0:b1, b1:].T @ errors
        if progress is not None:
            progress(b1 / k)
    return np.ascontiguousarray(idx[position].T), alpha


def refit_scales(w: np.ndarray, codes: np.ndarray, group_size: int, factor: HessianFactor) -> np.ndarray:
    """Group scales minimizing ``tr((W - W_hat) H (W - W_hat)^T)`` for fixed codes ``[q, O, K]``, as
    :func:`reshift.passes.quant_common.refit_scales_output` (same normal equations and ridge), with
    ``M H M^T = (A M^T)^T (A M^T) + M D M^T`` from ``A = factor.root``."""
    q, out, k = codes.shape
    ng = -(-k // group_size)
    kp = ng * group_size
    root = factor.root
    r = len(root)
    a_pad = np.zeros((r, kp))
    a_pad[:, :k] = root
    a_groups = np.ascontiguousarray(a_pad.reshape(r, ng, group_size).transpose(1, 2, 0))  # [ng, G, r]
    d_pad = np.zeros(kp)
    d_pad[:k] = factor.d
    d_groups = d_pad.reshape(ng, group_size)
    y = root @ w.T  # [r, O]
    result = np.zeros((out, ng, q))
    n = ng * q
    step = max(1, (1 << 25) // (8 * max(n * r, q * kp, n * n)))
    with one_blas_thread():  # one GEMM pair per output row: threads cost more than they gain (measured)
        for start in range(0, out, step):
            stop = min(out, start + step)
            oc = stop - start
            c = np.zeros((q, oc, kp))
            c[:, :, :k] = codes[:, start:stop]
            c = c.reshape(q, oc, ng, group_size)
            # z[o, (g, i), r] = sum_{t in g} codes[i, o, t] A[r, t]
            z = np.matmul(c.transpose(2, 0, 1, 3).reshape(ng, q * oc, group_size), a_groups)
            z = np.ascontiguousarray(z.reshape(ng, q, oc, r).transpose(2, 0, 1, 3)).reshape(oc, n, r)
            system = np.matmul(z, z.transpose(0, 2, 1))
            rhs = np.matmul(z, y[:, start:stop].T[:, :, None])[..., 0]
            if factor.d.any():
                wc = np.zeros((oc, kp))
                wc[:, :k] = w[start:stop]
                wc = wc.reshape(oc, ng, group_size)
                cd = c * d_groups  # [q, oc, ng, G]
                diag_block = np.einsum("iogt,jogt->ogij", cd, c, optimize=True)
                s6 = system.reshape(oc, ng, q, ng, q)
                gi = np.arange(ng)
                s6[:, gi, :, gi, :] += diag_block.transpose(1, 0, 2, 3)
                rhs += np.einsum("iogt,ogt->ogi", cd, wc, optimize=True).reshape(oc, n)
            ridge = 1e-9 * np.maximum(np.trace(system, axis1=1, axis2=2) / n, 1e-30)
            system[:, np.arange(n), np.arange(n)] += ridge[:, None]
            result[start:stop] = np.linalg.solve(system, rhs[..., None])[..., 0].reshape(oc, ng, q)
    return result


__all__ = [
    "Codebook",
    "HessianFactor",
    "as_factor",
    "combos",
    "compensated_target",
    "fit_weight_only",
    "gptq_codes",
    "grouped",
    "nearest_codes",
    "output_error",
    "planes",
    "refit_scales",
]
