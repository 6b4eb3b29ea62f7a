"""The accuracy cost of the int8 decode tables: held-out perplexity, float32 vs int8 LUT semantics.

    .venv/bin/python benchmarks/llm_lut_accuracy.py [--steps 150] [--windows 32]

The decode GEMV of a ``decode_lut="int8"`` artifact computes ``ir.ops_lowbit.lut_int8_rows`` (T-MAC's
int8 tables, one scale per row and 128-column group) instead of the float product on the BCQ /
ternary weights. Its tables depend only on each row's own activations, so scoring every position of
a window with the int8 semantics is what decoding the window token by token computes. This script
takes the byte-level GPT-2 of ``train_tiny_gpt.py`` (trained and cached by it, ``--steps``), reads it
with ``reshift.llm`` (the decoder template of the LLM artifacts), fits each scheme as
``reshift.llm.compile`` does (``compiler.prepare``, weight-only, the tied LM head float) and reports
the held-out perplexity of the numpy decoder (``reshift/llm/reference.py``) with float32 and with
int8 tables, plus the mean KL divergence of the int8 next-byte distribution from the float one.
Writes ``benchmarks/results/llm_lut_accuracy-<date>.{json,txt}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

SCHEMES = (("bcq", 3), ("bcq", 2), ("ternary", 0))


def all_logits(spec, w: dict, ids: np.ndarray, int8: bool) -> np.ndarray:
    """Logits ``[n, vocab]`` of every position of ``ids`` (the numpy decoder, fresh caches)."""
    from reshift.llm.reference import block, embed, linear, norm

    shape = (spec.num_layers, spec.num_kv_heads, len(ids), spec.head_dim)
    ck, cv = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    x, cos, sin = embed(spec, w, ids, 0)
    for i in range(spec.num_layers):
        x = block(spec, w, i, x, 0, ck[i], cv[i], cos, sin, int8_tables=int8)
    return linear(w, "lm_head", norm(spec, w, "norm", x), int8)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def score(spec, w: dict, windows: np.ndarray) -> dict[str, float]:
    """Perplexity with float32 and with int8 tables, and the mean KL(float || int8) per position."""
    nll = {False: 0.0, True: 0.0}
    kl, count = 0.0, 0
    for ids in windows:
        lp = {int8: log_softmax(all_logits(spec, w, ids, int8)[:-1]) for int8 in (False, True)}
        target = ids[1:]
        for int8 in (False, True):
            nll[int8] -= lp[int8][np.arange(len(target)), target].sum()
        kl += float((np.exp(lp[False]) * (lp[False] - lp[True])).sum())
        count += len(target)
    return {"ppl_float32": float(np.exp(nll[False] / count)), "ppl_int8": float(np.exp(nll[True] / count)),
            "kl_int8": kl / count}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150, help="training steps of the cached tiny GPT-2")
    ap.add_argument("--windows", type=int, default=32, help="held-out 128-byte windows scored")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    from train_tiny_gpt import tiny_gpt, windows

    from reshift.llm.compiler import prepare, read_model

    model, curve, (_, held_ids) = tiny_gpt(args.steps)
    spec, weights, _ = read_model(model.lm)
    held = windows(held_ids, args.windows)
    t0 = time.perf_counter()
    rows = [{"scheme": "fp32", **score(spec, weights, held)}]
    for pipeline, bits in SCHEMES:
        deq: dict[str, np.ndarray] = {}
        prepare(spec, weights, pipeline, bits, None, held.shape[1], False, deq)
        name = f"{pipeline}{bits}" if pipeline == "bcq" else pipeline
        rows.append({"scheme": name, **score(spec, {**weights, **deq}, held)})
    lines = [
        f"tiny GPT-2 (train_tiny_gpt.py, {args.steps} steps, held-out loss {curve[-1][2]:.3f} nats/byte), "
        f"{args.windows} held-out windows of {held.shape[1]} bytes; weight-only fits, tied LM head float",
        f"{'scheme':<10} {'ppl float32 LUT':>15} {'ppl int8 LUT':>12} {'ratio':>7} {'KL(f32||int8)':>14}",
    ]
    for r in rows:
        ratio = r["ppl_int8"] / r["ppl_float32"]
        lines.append(f"{r['scheme']:<10} {r['ppl_float32']:>15.4f} {r['ppl_int8']:>12.4f} {ratio:>7.4f} "
                     f"{r['kl_int8']:>14.2e}")  # fmt: skip
    lines.append("fp32: the int8 column runs the float weights through no LUT (the same number twice, KL 0)")
    lines.append(f"{time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f}")
    text = "\n".join(lines)
    print(text)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"llm_lut_accuracy-{stamp}.txt").write_text(text + "\n")
    (out / f"llm_lut_accuracy-{stamp}.json").write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
