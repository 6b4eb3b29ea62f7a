"""Perplexity of a small trained GPT-2 under reshift's low-bit weight passes.

Trains a byte-level GPT-2 (transformers ``GPT2Config``: 2 layers, n_embd 128, 4 heads, 128
positions, vocabulary 256 bytes) on the Python standard-library docstring corpus of
``lowbit_accuracy.py`` (whole docstrings; every 10th document held out) for a fixed number of
steps on 2 CPU threads, caching the weights in ``~/.cache/reshift/`` under a hash of the config,
the step count and the corpus. Then reports held-out perplexity for fp32 and for the IR after
BCQ q=2/3/4 and ternary (weight-only and calibrated on training text), shift and RTN, all
evaluated with reshift's reference interpreter. The tied embedding / LM head stays float
(tied weights are refused by the passes), so 8 linears are quantized.

    .venv/bin/python benchmarks/train_tiny_gpt.py [--quick] [--steps N]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lowbit_accuracy import CORPUS_MODULES, apply_rtn, public_docstrings  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
CONFIG = {"n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 256, "n_positions": 128}
SEQ = 128


def docstring_documents() -> list[str]:
    """Whole docstrings (module and public members) of the corpus modules, ASCII, deduplicated."""
    seen: dict[str, None] = {}
    for module_name in CORPUS_MODULES:
        docs = public_docstrings(module_name, methods=False)
        for doc in docs:
            if doc and len(doc) >= 40:
                seen.setdefault(inspect.cleandoc(doc).encode("ascii", "ignore").decode(), None)
    return list(seen)


def corpus_bytes() -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) byte arrays; documents end with a blank line."""
    docs = docstring_documents()
    train = "".join(d + "\n\n" for i, d in enumerate(docs) if i % 10 != 9)
    held = "".join(d + "\n\n" for i, d in enumerate(docs) if i % 10 == 9)
    return np.frombuffer(train.encode(), np.uint8).astype(np.int64), np.frombuffer(held.encode(), np.uint8).astype(
        np.int64
    )


def build_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**CONFIG, use_cache=False, bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config)


def train(train_ids: np.ndarray, steps: int, batch: int = 32, lr: float = 3e-3):
    """Train (or load from the cache) and return the eval-mode LM."""
    key = json.dumps({**CONFIG, "steps": steps, "batch": batch, "lr": lr, "seq": SEQ}, sort_keys=True)
    digest = hashlib.sha256(key.encode() + hashlib.sha256(train_ids.tobytes()).digest()).hexdigest()[:12]
    path = Path.home() / ".cache" / "reshift" / f"tiny_gpt_{digest}.pt"
    torch.manual_seed(0)
    lm = build_lm()
    if path.exists():
        lm.load_state_dict(torch.load(path))
        print(f"loaded cached weights {path}")
        return lm.eval()
    data = torch.from_numpy(train_ids)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    lm.train()
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(data) - SEQ - 1, (batch,), generator=gen)
        x = torch.stack([data[i : i + SEQ] for i in idx])
        loss = lm(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            print(f"  step {step:5d} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(lm.state_dict(), path)
    print(f"trained {steps} steps in {time.perf_counter() - start:.0f} s; cached {path}")
    return lm.eval()


def windows(ids: np.ndarray, count: int) -> np.ndarray:
    """``count`` non-overlapping ``SEQ``-token windows spread evenly over ``ids``."""
    starts = np.linspace(0, len(ids) - SEQ - 1, count).astype(int)
    return np.stack([ids[s : s + SEQ] for s in starts])


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
    from examples.models.gpt2 import GPT2Logits
    from reshift import passes
    from reshift.api import to_graph

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 training steps, 16 eval windows")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--group-size", type=int, default=64, help="BCQ/RTN group (K is 128 or 512 here)")
    args = parser.parse_args()
    steps = args.steps or (300 if args.quick else 2500)
    train_ids, held_ids = corpus_bytes()
    print(f"corpus: {len(train_ids):,} train bytes, {len(held_ids):,} held-out bytes; model {CONFIG}")
    lm = train(train_ids, steps)
    model = GPT2Logits(lm, CONFIG["n_positions"]).eval()
    held = windows(held_ids, 16 if args.quick else 64)
    calib_tokens = windows(train_ids, 32)
    graph, _ = to_graph(model, (torch.from_numpy(held[:2]),), {"dynamic_batch": True})
    name = graph.inputs[0].name
    calibration = [{name: calib_tokens[i : i + 16]} for i in range(0, len(calib_tokens), 16)]
    g = args.group_size
    options = {"group_size": g, "skip": []}
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(held[:2])).numpy()
    from reshift.ir.interpret import interpret

    ir_logits = next(iter(interpret(graph, {name: held[:2]}).values()))
    print(f"IR vs torch max |logit diff|: {np.abs(ir_logits - torch_logits).max():.2e}")
    fp32 = perplexity(graph, held)
    rows = [("fp32", 32.0, fp32, None)]

    def quantized(pipeline: str, calibrated: bool, **extra) -> float:
        out, _ = passes.run(
            graph, pipeline, calibration=calibration if calibrated else None, verify_each=False, **options, **extra
        )
        return perplexity(out, held)

    for q in (2, 3, 4):
        rows.append((f"BCQ q={q}", q + 16 * q / g, quantized("bcq", False, bcq_q=q), quantized("bcq", True, bcq_q=q)))
        rows.append((f"RTN asym {q}-bit", q + 32 / g, perplexity(apply_rtn(graph, q, g, False)[0], held), None))
        rows.append((f"RTN sym {q}-bit", q + 16 / g, perplexity(apply_rtn(graph, q, g, True)[0], held), None))
    rows.append(("ternary", 2 + 16 / g, quantized("ternary", False), quantized("ternary", True)))
    rows.append(("shift (4 exp bits)", 5.0, quantized("shift", False), None))
    print(f"\n## tiny GPT-2 (byte-level, {steps} steps), held-out perplexity ({held.size:,} bytes), group {g}")
    print("| method | bits/weight | weight-only | calibrated |")
    print("|---|---|---|---|")
    for label, bpw, wo, cal in rows:
        print(f"| {label} | {bpw:.2f} | {wo:.3f} | {f'{cal:.3f}' if cal else 'n/a'} |")


if __name__ == "__main__":
    main()
