"""Held-out perplexity of a trained Llama under reshift's low-bit pipelines, RTN and llama.cpp's quantizers.

Model: ``train_tiny_llama.py``'s decoder (trained here, cached) or ``--model DIR``. Text: its held-out split
(standard-library files never seen in training), tokenized by the model's ``tokenizer.json``; llama.cpp reads
the same text through a GGUF carrying that BPE (``llamacpp.write_gguf(..., tokenizer=True)``) and the run
checks that its token ids are ours, id for id (``--kl-divergence-base`` writes them).

Protocol: llama-perplexity's (``tools/perplexity/perplexity.cpp``, ``perplexity()``): the ids cut into
``--chunks`` consecutive windows of ``--ctx`` tokens, the KV cache cleared per window, no BOS (the GGUF says
``add_bos = false``), and only the second half scored: the logits at positions ``ctx/2 .. ctx-2`` against the
next token (``ctx/2 - 1`` tokens per window); PPL = exp(mean NLL), its error ``ppl * sqrt(var(NLL)/(n-1))``
(:func:`score_chunks`).

Schemes, every block linear (q/k/v/o/gate/up/down; 128-column groups):
- reshift ``exact`` (fp32), BCQ q=4/3/2 (ShiftAddLLM; weight-only and calibrated on training-split windows),
  ternary (BitNet b1.58 codes), per-layer allocation at 2.5 bits, each with the LM head float and (q=3, 2)
  quantized too; reshift keeps the embedding table float32 (a gather, read one row per token);
- round-to-nearest (``lowbit_accuracy.rtn_weight``: per group asymmetric min/max and symmetric absmax),
  LM head float;
- llama.cpp F16, Q4_0, Q3_K_S, Q2_K, TQ2_0 (``llama-quantize``; its mixes pick the type of every tensor,
  ``output.weight`` and ``token_embd.weight`` included, and the table lists them).

Bits per weight count the scales: BCQ ``q + 16 q / 128`` (fp16 alphas), RTN ``b + 32/128`` (fp16 scale and
zero) or ``b + 16/128``, llama.cpp the tensors' bytes in the GGUF. reshift rows are computed by a numpy
forward over all positions (:func:`all_logits`, checked against ``reshift.llm.reference.forward``) on the
pipeline's dequantized weights (``compiler.prepare(dequantized=...)``); ``--artifact`` schemes are also run
through the compiled artifact (``reshift.llm.compile``: prefill to the scored half, then decode step by step),
and the two perplexities are printed side by side.

    .venv/bin/python benchmarks/llm_perplexity.py [--chunks 48] [--ctx 256] [--artifact bcq3c,exact]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lowbit_accuracy import rtn_weight  # noqa: E402

GROUP = 128
LLAMACPP_QUANTS = ("F16", "Q4_0", "Q3_K_S", "Q2_K", "TQ2_0")


# -- the protocol ------------------------------------------------------------------------------------


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``log softmax(logits[i])[targets[i]]`` per row, max-shifted with a float64 sum as perplexity.cpp's."""
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return z[np.arange(len(targets)), targets] - np.log(np.exp(z).sum(-1))


def score_chunks(
    logits_fn: Callable[[np.ndarray, int], np.ndarray],
    tokens: np.ndarray,
    n_ctx: int,
    n_chunks: int,
    keep: bool = False,
):
    """llama-perplexity's estimate over ``n_chunks`` windows of ``n_ctx`` tokens of ``tokens``.

    ``logits_fn(window, first)`` returns the logits ``[n_ctx - 1 - first, vocab]`` of positions
    ``first .. n_ctx - 2`` of the window (causal, fresh cache); ``first = n_ctx // 2``. ``keep`` adds the
    scored positions' log-probabilities (``"logp"``, for :func:`paired`) and per-token NLLs."""
    if len(tokens) < 2 * n_ctx:
        raise ValueError(f"need at least {2 * n_ctx} tokens for n_ctx={n_ctx}, got {len(tokens)}")
    n_chunks = min(n_chunks, len(tokens) // n_ctx)
    first = n_ctx // 2
    nll, logps = [], []
    for i in range(n_chunks):
        window = np.asarray(tokens[i * n_ctx : (i + 1) * n_ctx])
        logits = logits_fn(window, first)
        if logits.shape[0] != n_ctx - 1 - first:
            raise ValueError(f"logits_fn gave {logits.shape[0]} rows, the protocol scores {n_ctx - 1 - first}")
        nll.append(-log_softmax_at(logits, window[first + 1 :]))
        if keep:
            z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
            logps.append((z - np.log(np.exp(z).sum(-1, keepdims=True))).astype(np.float32))
    v = np.concatenate(nll)
    mean = float(v.mean())
    var = float((v * v).mean() - mean * mean)
    ppl = float(np.exp(mean))
    out = {"perplexity": ppl, "stderr": ppl * float(np.sqrt(var / (len(v) - 1))), "nll": mean,
           "scored_tokens": len(v), "chunks": n_chunks, "n_ctx": n_ctx}  # fmt: skip
    if keep:
        out.update(logp=np.concatenate(logps), token_nll=v)
    return out


def paired(base: dict, other: dict) -> dict:
    """Paired statistics of two :func:`score_chunks` runs (``keep=True``) on the same tokens, as llama-perplexity's
    ``--kl-divergence`` prints them: PPL ratio ``exp(mean(nll_q - nll_base))`` with its standard error, and the
    mean KL divergence ``KL(base || q)`` per token with its standard error."""
    d = other["token_nll"] - base["token_nll"]
    ratio = float(np.exp(d.mean()))
    p = np.exp(base["logp"].astype(np.float64))
    kld = (p * (base["logp"] - other["logp"])).sum(-1)
    n = len(d)
    return {"ppl_ratio": ratio, "ppl_ratio_stderr": ratio * float(d.std(ddof=1) / np.sqrt(n)),
            "kld": float(kld.mean()), "kld_stderr": float(kld.std(ddof=1) / np.sqrt(n))}  # fmt: skip


def all_logits(spec, w: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Logits ``[n, vocab]`` of every position of ``ids`` from position 0 (one causal pass): the reference
    decoder (``reshift.llm.reference``'s norm / rope / activation) with attention vectorized over positions.
    Full attention only (the benchmark's Llama); :func:`check_against_reference` ties it to ``forward``."""
    from reshift.llm.reference import activation, norm, rope

    if any(spec.windows) or spec.learned_positions or not spec.gated:
        raise ValueError("all_logits covers rotary, gated, full-attention decoders (Llama-like)")
    n = len(ids)
    h_, kv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim

    def lin(name: str, x: np.ndarray) -> np.ndarray:
        y = x @ w[name + ".w"].T
        return y + w[name + ".b"] if name + ".b" in w else y

    x = w["embed"][ids] * np.float32(spec.embed_scale)
    cos, sin = spec.rope_tables(n)
    mask = np.triu(np.full((n, n), -np.inf, np.float32), 1)
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        hn = norm(spec, w, p + "norm1", x)
        q = rope(lin(p + "q", hn).reshape(n, h_, d), cos, sin, spec.rotary_dim)
        k = rope(lin(p + "k", hn).reshape(n, kv, d), cos, sin, spec.rotary_dim)
        v = lin(p + "v", hn).reshape(n, kv, d)
        k, v = np.repeat(k, h_ // kv, axis=1), np.repeat(v, h_ // kv, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) * np.float32(spec.attn_scale) + mask
        e = np.exp(scores - scores.max(-1, keepdims=True))
        attn = np.einsum("hts,shd->thd", e / e.sum(-1, keepdims=True), v)
        x = x + lin(p + "o", attn.reshape(n, h_ * d))
        hn = norm(spec, w, p + "norm2", x)
        x = x + lin(p + "down", activation(spec.act, lin(p + "gate", hn)) * lin(p + "up", hn))
    return lin("lm_head", norm(spec, w, "norm", x))


def check_against_reference(spec, w: dict[str, np.ndarray], ids: np.ndarray, lengths: tuple[int, ...]) -> float:
    """Largest relative difference between :func:`all_logits` and ``reference.forward``'s last-position logits
    for the prefixes of ``ids`` of the given ``lengths``."""
    from reshift.llm.reference import forward

    full = all_logits(spec, w, ids)
    worst = 0.0
    for n in lengths:
        shape = (spec.num_layers, spec.num_kv_heads, n, spec.head_dim)
        ref = forward(spec, w, ids[:n], 0, np.zeros(shape, np.float32), np.zeros(shape, np.float32))
        worst = max(worst, float(np.abs(full[n - 1] - ref).max() / np.abs(ref).max()))
    return worst


def numpy_logits_fn(spec, w: dict[str, np.ndarray]) -> Callable[[np.ndarray, int], np.ndarray]:
    return lambda window, first: all_logits(spec, w, window[:-1])[first:]


def artifact_logits_fn(llm) -> Callable[[np.ndarray, int], np.ndarray]:
    """The compiled artifact under the protocol: prefill the window up to ``first`` (cache from position 0),
    then one decode step per scored position."""

    def fn(window: np.ndarray, first: int) -> np.ndarray:
        rows = [llm.prefill(window[: first + 1], pos=0)]
        rows += [llm.decode(int(t)) for t in window[first + 1 : -1]]
        return np.stack(rows)

    return fn


# -- the schemes -------------------------------------------------------------------------------------


def rtn_scheme(weights: dict[str, np.ndarray], linears: list[str], bits: int, symmetric: bool):
    """RTN of every block linear (LM head float): ``(weights, per-linear bits with scales)``."""
    out = dict(weights)
    for name in linears:
        out[name + ".w"] = rtn_weight(weights[name + ".w"], bits, GROUP, symmetric)
    return out, bits + (16 if symmetric else 32) / GROUP


def reshift_scheme(spec, weights, pipeline: str, bits: float, calibration, n_ctx: int, lm_head: bool):
    """The pipeline's dequantized weights (``compiler.prepare``) and its report rows."""
    from reshift.llm.compiler import prepare

    deq: dict[str, np.ndarray] = {}
    _, _, report = prepare(spec, weights, pipeline, bits, calibration, n_ctx, lm_head, dequantized=deq)
    return {**weights, **deq}, report


def with_quantized_head(weights, report, bits: int, rows: dict[str, np.ndarray] | None):
    """A scheme's weights and report with ``lm_head`` fitted as ``compiler._linear_form`` fits it (``fit_bcq`` on
    the head's calibration rows, 128-column groups): the block fits are reused, not redone."""
    from reshift.passes.bcq import bits_per_weight, fit_bcq

    w = weights["lm_head.w"]
    x = rows.get("lm_head") if rows else None
    w_hat = fit_bcq(w, q=bits, group_size=GROUP, x=x).weight(GROUP).astype(np.float32)
    stored = int(np.ceil(w.size * bits_per_weight(bits, GROUP) / 8))
    row = {"name": "lm_head", "shape": list(w.shape), "bits": bits, "bytes": stored,
           "weight_error": float(np.linalg.norm(w - w_hat) / np.linalg.norm(w))}  # fmt: skip
    return {**weights, "lm_head.w": w_hat}, [r for r in report if r["name"] != "lm_head"] + [row]


def bits_of(report: list[dict], which: Callable[[str], bool]) -> float | None:
    """Stored bits per weight (scales included) over the report rows ``which`` selects."""
    rows = [r for r in report if which(r["name"])]
    if not rows:
        return None
    return 8 * sum(r["bytes"] for r in rows) / sum(int(np.prod(r["shape"])) for r in rows)


def llamacpp_bits(path: Path) -> dict:
    """Bits per weight of the block matrices, of ``output.weight`` and of ``token_embd.weight``, and their types."""
    import llamacpp

    table = llamacpp.tensor_table(path)
    blocks = [t for t in table if t["name"].startswith("blk.") and t["n_dims"] == 2]
    by = {t["name"]: t for t in table}
    types: dict[str, int] = {}
    for t in blocks:
        types[t["type"]] = types.get(t["type"], 0) + 1

    def bpw(ts):
        return 8 * sum(t["n_bytes"] for t in ts) / sum(t["n_elements"] for t in ts)

    return {
        "bits_block": bpw(blocks),
        "bits_lm_head": bpw([by["output.weight"]]),
        "bits_embed": bpw([by["token_embd.weight"]]),
        "block_types": types,
        "lm_head_type": by["output.weight"]["type"],
        "embed_type": by["token_embd.weight"]["type"],
    }


# name: (pipeline, bits, calibrated, lm_head quantized); RTN and llama.cpp rows are added in main()
RESHIFT_SCHEMES = {
    "exact": ("exact", 32, False, False),
    "bcq4": ("bcq", 4, False, False),
    "bcq3": ("bcq", 3, False, False),
    "bcq2": ("bcq", 2, False, False),
    "ternary": ("ternary", 0, False, False),
    "bcq4c": ("bcq", 4, True, False),
    "bcq3c": ("bcq", 3, True, False),
    "bcq2c": ("bcq", 2, True, False),
    "ternaryc": ("ternary", 0, True, False),
    "bcq2.5c": ("bcq", 2.5, True, False),
    "bcq3c+head": ("bcq", 3, True, True),
    "bcq2c+head": ("bcq", 2, True, True),
}
RTN_SCHEMES = {"rtn4": (4, False), "rtn3": (3, False), "rtn2": (2, False), "rtn4s": (4, True), "rtn3s": (3, True)}
# the default set leaves out ternary weight-only, symmetric 4-bit RTN and the 2.5-bit allocation (which fits every
# layer at q = 2, 3 and 4): on a loaded 2-core host each calibrated fit takes minutes
DEFAULT_SCHEMES = "exact,bcq4,bcq3,bcq2,bcq4c,bcq3c,bcq2c,ternaryc,bcq3c+head,bcq2c+head,rtn4,rtn3,rtn2,rtn3s"


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def held_out_tokens(model_dir: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """(held-out text, its ids, training ids) under the model's own tokenizer."""
    from text_corpus import split_documents
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    train_text, held_text = split_documents()
    return held_text, np.asarray(tok.encode(held_text).ids), np.asarray(tok.encode(train_text).ids)


def llamacpp_rows(model_dir: Path, work: Path, text_file: Path, tokens: np.ndarray, args) -> list[dict]:
    """llama-perplexity for each quantization type; the F16 run also checks llama.cpp's token ids against ours."""
    import llamacpp

    bins = llamacpp.build(needed=("llama-quantize", "llama-perplexity"))
    f16 = work / "model-F16.gguf"
    if not f16.exists() or f16.stat().st_mtime < (model_dir / "model.safetensors").stat().st_mtime:
        llamacpp.write_gguf(model_dir, f16, tokenizer=True)
    rows = []
    quants = args.llamacpp.split(",") if args.llamacpp else []
    base = work / "f16.logits"  # F16's logits: the other types are paired with them (--kl-divergence)
    for q in ["F16"] + [t for t in quants if t != "F16"] if quants else []:
        path = f16 if q == "F16" else llamacpp.quantize(bins, f16, q)
        ends = {"tokens_out": base} if q == "F16" else {"kl_base": base}
        r = llamacpp.run_perplexity(bins, path, text_file, args.ctx, args.chunks, args.threads, **ends)
        row = {"scheme": f"llama.cpp {q}", "evaluator": "llama-perplexity", "key": q, **r, **llamacpp_bits(path)}
        if q == "F16":
            n_ctx, ids = llamacpp.read_logits_tokens(base)
            same = n_ctx == args.ctx and np.array_equal(ids, tokens[: len(ids)])
            row["tokens_match"] = bool(same)
            print(f"llama.cpp tokenization of the held-out text: {len(ids)} ids, identical to ours: {same}")
            if not same:
                diff = int(np.argmax(ids != tokens[: len(ids)])) if len(ids) <= len(tokens) else -1
                print(f"  first difference at id {diff}: llama.cpp {ids[diff : diff + 5]} vs {tokens[diff : diff + 5]}")
        print(f"  {row['scheme']:<24} ppl {r['perplexity']:.4f}  ({r['seconds']:.0f} s)", flush=True)
        rows.append(row)
    base.unlink(missing_ok=True)
    return rows


def reshift_rows(spec, weights, model_dir: Path, tokens, calibration, args) -> list[dict]:
    """One row per reshift / RTN scheme, scored by the numpy forward (and the artifact for ``--artifact``)."""
    from reshift.llm.compiler import calibration_rows
    from reshift.llm.reference import linear_names

    block = [n for n in linear_names(spec) if n != "lm_head"]
    artifact = set(args.artifact.split(",")) if args.artifact else set()
    fitted: dict[tuple, tuple] = {}  # (pipeline, bits, calibrated) -> (weights, report), for the +head schemes
    head_rows = None
    rows = []
    base = None  # the exact scheme's scores: every other row is paired with it
    names = args.schemes.split(",")
    for name in ["exact"] + [n for n in names if n != "exact"]:
        t0 = time.perf_counter()
        if name in RTN_SCHEMES:
            bits, symmetric = RTN_SCHEMES[name]
            w, bpw = rtn_scheme(weights, block, bits, symmetric)
            row = {"scheme": f"RTN {'sym' if symmetric else 'asym'} {bits}-bit g{GROUP}", "bits_block": bpw,
                   "bits_lm_head": 32.0, "calibrated": False}  # fmt: skip
        elif name == "exact":
            w = weights
            row = {"scheme": "reshift exact fp32", "bits_block": 32.0, "bits_lm_head": 32.0, "calibrated": False}
        else:
            pipeline, bits, calibrated, head = RESHIFT_SCHEMES[name]
            calib = calibration if calibrated else None
            fit_key = (pipeline, bits, calibrated)
            if fit_key not in fitted:
                fitted[fit_key] = reshift_scheme(spec, weights, pipeline, bits, calib, args.ctx, False)
            w, report = fitted[fit_key]
            if head:
                if calibrated and head_rows is None:
                    head_rows = calibration_rows(spec, weights, calibration)
                w, report = with_quantized_head(w, report, bits, head_rows if calibrated else None)
            label = "reshift ternary" if pipeline == "ternary" else f"reshift BCQ {bits}"
            row = {"scheme": label + (" calib" if calibrated else "") + (" +head" if head else ""),
                   "bits_block": bits_of(report, lambda n: n != "lm_head"), "calibrated": calibrated,
                   "bits_lm_head": bits_of(report, lambda n: n == "lm_head") or 32.0,
                   "layers": [{k: r[k] for k in ("name", "bits", "weight_error", "output_error") if k in r}
                              for r in report]}  # fmt: skip
        t_fit = time.perf_counter() - t0
        row.update(key=name, bits_embed=32.0, lm_head_type="fp32" if row["bits_lm_head"] == 32 else "BCQ",
                   embed_type="fp32", evaluator="numpy (dequantized weights)", fit_s=t_fit)  # fmt: skip
        scores = score_chunks(numpy_logits_fn(spec, w), tokens, args.ctx, args.chunks, keep=True)
        if base is None:
            base = scores
        row.update({k: v for k, v in scores.items() if k not in ("logp", "token_nll")}, **paired(base, scores))
        row["eval_s"] = time.perf_counter() - t0 - t_fit
        print(f"  {row['scheme']:<32} ppl {row['perplexity']:.4f}  (fit {t_fit:.0f} s, eval {row['eval_s']:.0f} s)",
              flush=True)  # fmt: skip
        if name in artifact:
            row.update(artifact_row(model_dir, name, tokens, calibration, args))
        rows.append(row)
    return rows


def artifact_row(model_dir: Path, name: str, tokens, calibration, args) -> dict:
    """The scheme compiled (``reshift.llm.compile``) and scored through ``prefill`` + ``decode``."""
    import reshift.llm

    pipeline, bits, calibrated, head = RESHIFT_SCHEMES[name]
    t0 = time.perf_counter()
    llm = reshift.llm.compile(model_dir, pipeline=pipeline, bits=bits, calibration=calibration if calibrated else None,
                              max_seq_len=args.ctx, quantize_lm_head=head)  # fmt: skip
    t1 = time.perf_counter()
    r = score_chunks(artifact_logits_fn(llm), tokens, args.ctx, args.chunks)
    out = {"artifact_perplexity": r["perplexity"], "artifact_compile_s": t1 - t0,
           "artifact_eval_s": time.perf_counter() - t1}  # fmt: skip
    print(f"    artifact: ppl {r['perplexity']:.4f} (compile {t1 - t0:.0f} s, eval {out['artifact_eval_s']:.0f} s)")
    return out


def format_table(rows: list[dict], fp32: float) -> str:
    """One line per scheme; ``paired ratio`` and ``KLD`` are per-token statistics against the scheme's own float
    model (reshift rows: reshift fp32; llama.cpp rows: its F16, through ``--kl-divergence``)."""
    head = (f"{'scheme':<30} {'bits/w blocks':>13} {'lm_head':>12} {'embed':>5} {'perplexity':>17} {'x fp32':>6} "
            f"{'paired ratio':>16} {'KLD x1e3':>13}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        lm = f"{r['lm_head_type']} {r['bits_lm_head']:.2f}" if r["bits_lm_head"] != 32 else "fp32"
        ppl = f"{r['perplexity']:.2f} +/- {r['stderr']:.2f}"
        ratio = f"{r['ppl_ratio']:.4f} +/- {r['ppl_ratio_stderr']:.4f}" if r.get("ppl_ratio") is not None else "-"
        kld = f"{1e3 * r['kld']:.2f} +/- {1e3 * r['kld_stderr']:.2f}" if r.get("kld") is not None else "-"
        lines.append(f"{r['scheme']:<30} {r['bits_block']:>13.3f} {lm:>12} {r['embed_type']:>5} {ppl:>17} "
                     f"{r['perplexity'] / fp32:>6.3f} {ratio:>16} {kld:>13}")  # fmt: skip
        if "artifact_perplexity" in r:
            lines.append(f"{'  (compiled artifact, decode)':<30} {'':>13} {'':>12} {'':>5} "
                         f"{r['artifact_perplexity']:>17.2f} {r['artifact_perplexity'] / fp32:>6.3f}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="local HF Llama directory with tokenizer.json (default: train_tiny_llama's)")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--calib", default="4x128", help="calibration: SEQSxTOKENS training-split windows (default 4x128)")
    p.add_argument("--schemes", default=DEFAULT_SCHEMES)
    p.add_argument("--llamacpp", default=",".join(LLAMACPP_QUANTS), help="llama.cpp types ('' for none)")
    p.add_argument("--artifact", default="bcq3c", help="schemes also run as compiled artifacts")
    p.add_argument("--threads", type=int, default=int(os.environ["OMP_NUM_THREADS"]))
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    unknown = [n for n in args.schemes.split(",") + (args.artifact.split(",") if args.artifact else [])
               if n not in RESHIFT_SCHEMES and n not in RTN_SCHEMES]  # fmt: skip
    if unknown or any(n in RTN_SCHEMES for n in (args.artifact.split(",") if args.artifact else [])):
        p.error(f"unknown or non-compilable scheme(s) {unknown or args.artifact}; choose from "
                f"{', '.join([*RESHIFT_SCHEMES, *RTN_SCHEMES])} (artifacts: reshift schemes only)")  # fmt: skip

    from reshift.llm.compiler import read_model

    if args.model:
        model_dir = Path(args.model)
    else:
        from train_tiny_llama import train

        model_dir = train()
    log = json.loads((model_dir / "train_log.json").read_text()) if (model_dir / "train_log.json").exists() else {}
    spec, weights, _ = read_model(model_dir)
    text, tokens, train_ids = held_out_tokens(model_dir)
    work = model_dir / "perplexity"
    work.mkdir(exist_ok=True)
    text_file = work / "held_out.txt"
    text_file.write_text(text)
    seqs, length = (int(v) for v in args.calib.split("x"))
    starts = np.linspace(0, len(train_ids) - length - 1, seqs).astype(int)
    calibration = np.stack([train_ids[s : s + length] for s in starts])
    load = os.getloadavg()
    print(f"CPU: {cpu_name()}   threads: {args.threads}   load average: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"model: {model_dir} ({log.get('parameters', 0) / 1e6:.1f} M parameters, held-out loss at training end "
          f"{log.get('final_held_out_loss', float('nan')):.3f} nats/token)")  # fmt: skip
    chunks = min(args.chunks, len(tokens) // args.ctx)
    print(f"held-out text: {len(text)} chars, {len(tokens)} tokens; {chunks} chunks of {args.ctx} scored on their "
          f"second half; calibration {seqs} x {length} training tokens")  # fmt: skip
    first = args.ctx // 2
    err = check_against_reference(spec, weights, tokens[: args.ctx - 1], (first + 1, args.ctx - 1))
    print(f"all_logits vs reshift.llm.reference.forward (exact weights): max relative difference {err:.2e}")
    if err > 1e-4:
        raise SystemExit("the vectorized forward disagrees with the reference decoder")
    rows = reshift_rows(spec, weights, model_dir, tokens, calibration, args)
    rows += llamacpp_rows(model_dir, work, text_file, tokens, args)
    fp32 = next(r["perplexity"] for r in rows if r.get("key") == "exact")
    table = format_table(rows, fp32)
    print(table)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"model": str(model_dir), "train_log": log, "cpu": cpu_name(), "threads": args.threads,
               "load_average": load, "ctx": args.ctx, "chunks": args.chunks, "calibration": args.calib,
               "reference_check_max_rel": err, "rows": rows}  # fmt: skip
    (out / f"llm_perplexity-{stamp}.json").write_text(json.dumps(summary, indent=1))
    (out / f"llm_perplexity-{stamp}.txt").write_text(table + "\n")
    print(f"wrote {out / f'llm_perplexity-{stamp}.json'}")


if __name__ == "__main__":
    main()
