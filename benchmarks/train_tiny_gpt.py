"""Perplexity of a small trained GPT-2 under reshift's low-bit weight passes.

Trains a byte-level GPT-2 (transformers ``GPT2Config``: 4 layers, n_embd 128, 4 heads, 128
positions, vocabulary 256 bytes, dropout 0.1) on the Python standard-library docstring corpus of
``lowbit_accuracy.py`` (whole docstrings of the modules, their public functions, classes and methods;
every 10th document held out) for a fixed number of steps, printing train and held-out loss as it goes
and caching the weights and that curve in ``~/.cache/reshift/`` under a hash of the config, the step
count and the corpus. Then reports held-out perplexity for fp32 and for the IR after BCQ q=2/3/4 and
ternary (weight-only and calibrated on training text), shift and RTN, all evaluated with reshift's
reference interpreter, and writes ``benchmarks/results/tiny_gpt-<date>.json``. The tied embedding /
LM head stays float (tied weights are refused by the passes); every other linear is quantized.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_tiny_gpt.py [--quick] [--steps N]

Training 1200 steps takes about 13 minutes on an idle core (33 on a loaded shared 2-core host).
``shiftadd.py --e2e`` compiles the same cached model (:func:`tiny_gpt`) end to end.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lowbit_accuracy import apply_rtn  # noqa: E402
from text_corpus import docstring_documents  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
CONFIG = {"n_layer": 4, "n_embd": 128, "n_head": 4, "vocab_size": 256, "n_positions": 128}
SEQ = 128
STEPS = 1200
QUICK_STEPS = 200


def corpus_bytes() -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) byte arrays; documents end with a blank line."""
    docs = docstring_documents()
    train = "".join(d + "\n\n" for i, d in enumerate(docs) if i % 10 != 9)
    held = "".join(d + "\n\n" for i, d in enumerate(docs) if i % 10 == 9)
    return tuple(np.frombuffer(text.encode(), np.uint8).astype(np.int64) for text in (train, held))


def build_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**CONFIG, use_cache=False, bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config)


def held_out_loss(lm, held: torch.Tensor) -> float:
    """Mean next-byte cross-entropy (nats) over the held-out windows, dropout off."""
    lm.eval()
    with torch.no_grad():
        loss = sum(lm(input_ids=held[i : i + 16], labels=held[i : i + 16]).loss.item() for i in range(0, len(held), 16))
    lm.train()
    return loss / -(-len(held) // 16)


def train(train_ids: np.ndarray, held_ids: np.ndarray, steps: int, batch: int = 32, lr: float = 3e-3):
    """Train (or load from the cache) and return the eval-mode LM and its loss curve.

    The curve has one row per ``steps // 15``: step, mean train loss since the previous row, held-out loss
    on 32 fixed windows (reported only; nothing is selected on it).
    """
    key = json.dumps({**CONFIG, "steps": steps, "batch": batch, "lr": lr, "seq": SEQ}, sort_keys=True)
    digest = hashlib.sha256(key.encode() + hashlib.sha256(train_ids.tobytes()).digest()).hexdigest()[:12]
    path = Path.home() / ".cache" / "reshift" / f"tiny_gpt_{digest}.pt"
    torch.manual_seed(0)
    lm = build_lm()
    if path.exists():
        saved = torch.load(path)
        lm.load_state_dict(saved["state_dict"])
        print(f"loaded cached weights {path} (trained {saved['train_s']:.0f} s)")
        return lm.eval(), saved["curve"]
    data = torch.from_numpy(train_ids)
    held = torch.from_numpy(windows(held_ids, 32))
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    every = max(1, steps // 15)
    curve, window_losses = [], []
    print(f"training {steps} steps, batch {batch} x {SEQ} bytes, {torch.get_num_threads()} thread(s)")
    print("  step | train loss | held-out loss (nats/byte) | s")
    lm.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(data) - SEQ - 1, (batch,), generator=gen)
        x = torch.stack([data[i : i + SEQ] for i in idx])
        loss = lm(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        window_losses.append(loss.item())
        if step % every == 0 or step == steps:
            curve.append((step, float(np.mean(window_losses)), held_out_loss(lm, held)))
            window_losses = []
            print(f"  {step:5d} | {curve[-1][1]:.3f} | {curve[-1][2]:.3f} | {time.perf_counter() - start:.0f}")
    train_s = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": lm.state_dict(), "curve": curve, "train_s": train_s}, path)
    print(f"trained {steps} steps in {train_s:.0f} s; cached {path}")
    return lm.eval(), curve


def tiny_gpt(steps: int = STEPS):
    """The trained (cached) LM wrapped to return logits, its loss curve, and the (train, held-out) bytes."""
    from examples.models.gpt2 import GPT2Logits

    train_ids, held_ids = corpus_bytes()
    lm, curve = train(train_ids, held_ids, steps)
    return GPT2Logits(lm, CONFIG["n_positions"]).eval(), curve, (train_ids, held_ids)


def windows(ids: np.ndarray, count: int, seq: int = SEQ) -> np.ndarray:
    """``count`` ``seq``-token windows spread evenly over ``ids`` (non-overlapping while they fit)."""
    starts = np.linspace(0, len(ids) - seq - 1, count).astype(int)
    return np.stack([ids[s : s + seq] for s in starts])


def calibration_batches(name: str, train_ids: np.ndarray, seq: int = SEQ) -> list[dict[str, np.ndarray]]:
    """32 training windows in batches of 16: the calibration set of every calibrated pass here."""
    tokens = windows(train_ids, 32, seq)
    return [{name: tokens[i : i + 16]} for i in range(0, len(tokens), 16)]


def perplexity(graph, tokens: np.ndarray, batch: int = 16) -> float:
    """exp(mean next-token NLL) over all windows, every position predicting the next byte."""
    from reshift.ir.interpret import interpret

    nll, count = 0.0, 0
    for i in range(0, len(tokens), batch):
        x = tokens[i : i + batch]
        logits = next(iter(interpret(graph, {graph.inputs[0].name: x}).values())).astype(np.float64)
        logits = logits[:, :-1]
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        target = x[:, 1:]
        nll -= np.take_along_axis(logp, target[..., None], -1).sum()
        count += target.size
    return float(np.exp(nll / count))


def main() -> None:
    from reshift import passes
    from reshift.api import to_graph
    from reshift.ir.interpret import interpret

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} training steps, 16 eval windows")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (default {STEPS})")
    parser.add_argument("--group-size", type=int, default=128, help="BCQ/RTN group (K is 128 or 512 here)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/, none with --quick)")
    args = parser.parse_args()
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    started = time.perf_counter()
    model, curve, (train_ids, held_ids) = tiny_gpt(steps)
    print(f"corpus: {len(train_ids):,} train bytes, {len(held_ids):,} held-out bytes; model {CONFIG}")
    print("curve (step, train loss, held-out loss): " + ", ".join(f"{s} {t:.2f}/{h:.2f}" for s, t, h in curve))
    held = windows(held_ids, 16 if args.quick else 256)
    graph, _ = to_graph(model, (torch.from_numpy(held[:2]),), {"dynamic_batch": True})
    name = graph.inputs[0].name
    calibration = calibration_batches(name, train_ids)
    g = args.group_size
    options = {"group_size": g, "skip": []}
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(held[:2])).numpy()
    ir_logits = next(iter(interpret(graph, {name: held[:2]}).values()))
    print(f"IR vs torch max |logit diff|: {np.abs(ir_logits - torch_logits).max():.2e}")
    rows = [("fp32", 32.0, perplexity(graph, held), None)]
    print(f"  fp32: {rows[0][2]:.3f}")
    counts = {}

    def quantized(pipeline: str, calibrated: bool, **extra) -> float:
        out, _ = passes.run(
            graph, pipeline, calibration=calibration if calibrated else None, verify_each=False, **options, **extra
        )
        counts[pipeline] = sum(n.op in ("bcq_linear", "ternary_linear", "shift_linear") for n in out.nodes)
        ppl = perplexity(out, held)
        print(f"  {pipeline} {extra} calibrated={calibrated}: {ppl:.3f} ({time.perf_counter() - started:.0f} s)")
        return ppl

    for q in (2, 3, 4):
        rows.append((f"BCQ q={q}", q + 16 * q / g, quantized("bcq", False, bcq_q=q), quantized("bcq", True, bcq_q=q)))
        rows.append((f"RTN asym {q}-bit", q + 32 / g, perplexity(apply_rtn(graph, q, g, False)[0], held), None))
        rows.append((f"RTN sym {q}-bit", q + 16 / g, perplexity(apply_rtn(graph, q, g, True)[0], held), None))
    rows.append(("ternary", 2 + 16 / g, quantized("ternary", False), quantized("ternary", True)))
    rows.append(("shift (4 exp bits)", 5.0, quantized("shift", False), None))
    n_linear = sum(n.op == "linear" for n in graph.nodes)
    print(
        f"\n## tiny GPT-2 (byte-level, {CONFIG['n_layer']} layers, n_embd {CONFIG['n_embd']}, {steps} steps), "
        f"held-out perplexity ({held.size:,} bytes), group {g}, {counts['bcq']}/{n_linear} linears quantized"
    )
    print("| method | bits/weight | weight-only | calibrated |")
    print("|---|---|---|---|")
    for label, bpw, wo, cal in rows:
        print(f"| {label} | {bpw:.2f} | {wo:.3f} | {f'{cal:.3f}' if cal else 'n/a'} |")
    best = {label: min(wo, cal or wo) for label, _, wo, cal in rows}
    for q in (2, 3, 4):
        bcq_wo = next(wo for label, _, wo, _ in rows if label == f"BCQ q={q}")
        rtn = min(best[f"RTN asym {q}-bit"], best[f"RTN sym {q}-bit"])
        verdict = "BCQ wins" if best[f"BCQ q={q}"] < rtn else "RTN wins"
        print(f"{q}-bit: BCQ weight-only {bcq_wo:.3f} / best {best[f'BCQ q={q}']:.3f} vs best RTN {rtn:.3f}: {verdict}")
    elapsed = time.perf_counter() - started
    print(
        f"\nruntime {elapsed:.0f} s; reproduce: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_tiny_gpt.py "
        + " ".join(sys.argv[1:])
    )
    if args.quick and args.out is None:
        return
    out = Path(args.out or Path(__file__).resolve().parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"tiny_gpt-{time.strftime('%Y%m%d-%H%M%S')}.json"
    record = {
        "model": {**CONFIG, "steps": steps, "seq": SEQ, "dropout": 0.1},
        "corpus": {"train_bytes": len(train_ids), "held_out_bytes": len(held_ids), "eval_bytes": int(held.size)},
        "config": {**options, "calibration_windows": 32, "quantized_linears": counts["bcq"], "linears": n_linear},
        "curve": [{"step": s, "train_loss": t, "held_out_loss": h} for s, t, h in curve],
        "argv": sys.argv[1:],
        "runtime_s": elapsed,
        "results": [
            {"method": label, "bits_per_weight": bpw, "weight_only": wo, "calibrated": cal}
            for label, bpw, wo, cal in rows
        ],
    }
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
