"""Error-compensating rounding of per-channel uniform weights (GPTQ / OPTQ, Frantar et al., ICLR 2023).

Round-to-nearest quantizes each weight alone. GPTQ quantizes the input columns of ``W [O, K]`` one at a
time and spreads each column's rounding error over the columns not yet quantized, weighted by the
inverse Hessian of the layer's squared output error ``H = 2 X^T X`` (``X [n, K]``: the layer's
calibration inputs), so the *output* ``X W^T`` stays close rather than each weight (Alg. 1):

    H^-1 = U^T U  (U upper Cholesky factor)
    for j in 0..K-1:   q_j = Q(w_j);   e = (w_j - q_j) / U_jj;   w_{j+1:} -= e U_{j, j+1:}

The grid (one symmetric scale per output channel, ``+-(2^(bits-1) - 1)``) is chosen beforehand by the
caller's clipping search and is not changed: only which grid point each weight takes. ``dampening``
adds ``1%`` of the mean diagonal to ``H`` (the paper's ``lambda``) for channels the data never excites.
Columns are processed in blocks of ``block`` with the lazy batch update of Sec. 3 (same result).
"""

from __future__ import annotations

import numpy as np

from reshift.errors import PassError


def input_hessian(x: np.ndarray) -> np.ndarray:
    """``2 X^T X / n`` (float64 ``[K, K]``) of the calibration inputs ``x [..., K]``."""
    rows = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    rows = rows[np.all(np.isfinite(rows), axis=1)]
    if not len(rows):
        raise PassError("gptq: no finite calibration rows to build the input Hessian from")
    return 2.0 * rows.T @ rows / len(rows)


def gptq_codes(
    w: np.ndarray, scales: np.ndarray, hessian: np.ndarray, bits: int, dampening: float = 0.01, block: int = 128
) -> np.ndarray:
    """Integer codes (int8 ``[O, K]``) of ``w`` on the per-row grid ``scales`` (``[O]``), GPTQ-rounded."""
    w = np.array(w, np.float64)
    out_features, k = w.shape
    if hessian.shape != (k, k):
        raise PassError(f"gptq: Hessian {hessian.shape} does not match weight {w.shape}")
    qmax = 2 ** (bits - 1) - 1
    s = np.asarray(scales, np.float64)[:, None]
    h = np.array(hessian, np.float64)
    dead = np.diag(h) <= 0  # inputs that are always zero: their weights do not matter; keep them out of H
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(k)] += dampening * float(np.mean(np.diag(h)))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor of H^-1
    codes = np.zeros((out_features, k), np.int8)
    for start in range(0, k, block):
        end = min(start + block, k)
        wb = w[:, start:end].copy()
        errors = np.zeros_like(wb)
        for j in range(end - start):
            col = start + j
            q = np.clip(np.rint(wb[:, j : j + 1] / s), -qmax, qmax)
            codes[:, col] = q[:, 0].astype(np.int8)
            err = (wb[:, j] - q[:, 0] * s[:, 0]) / u[col, col]
            wb[:, j + 1 :] -= np.outer(err, u[col, col + 1 : end])
            errors[:, j] = err
        w[:, end:] -= errors @ u[start:end, end:]
    return codes


__all__ = ["gptq_codes", "input_hessian"]
