"""Post-training quantization accuracy of reshift's transformer pipelines (RepQ-ViT / AdaLog).

1. A tiny ViT (patch 4 on 8x8 sklearn digits upscaled to 16x16, dim 96, depth 4, 3 heads) is
   trained on CPU (weights cached under ~/.cache/reshift/ by a hash of the config), then
   quantized with W8A8 / W6A6 / W4A4 by four pipelines: uniform only, + log-sqrt2 softmax,
   + scale reparameterization (RepQ-ViT), + AdaLog (adaptive-base softmax and post-GELU, with
   scale reparam). Top-1 on the held-out split, via the reference interpreter, against fp32.
2. all-MiniLM-L6-v2 (real pretrained weights, offline): W8A8 cosine similarity to the fp32
   sentence embeddings on a fixed list of English sentences (calibration on the first 16); the
   first row is the default ``w8a8`` pipeline (activations per row at 8 bits), target >= 0.995.
3. Optional (``--speed``): end-to-end ViT-S int8 vs fp32 / onnxruntime, and (``--attention``, also
   part of ``--speed``) ViT-S attention probabilities @ V: the shift-add ``log2_matmul`` kernel vs
   the fp32 matmul and the fake-quant path, compiled by reshift, 2 threads, one process.

Results go to ``benchmarks/results/ptq_vit-<time>.json``.

    .venv/bin/python benchmarks/ptq_vit.py [--skip-vit] [--skip-minilm] [--speed] [--attention]
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reshift  # noqa: E402
from examples.models.minilm import SENTENCES as MINILM_SENTENCES  # noqa: E402
from examples.models.vit import VisionTransformer  # noqa: E402

CONFIG = {"img": 16, "patch": 4, "dim": 96, "depth": 4, "heads": 3, "epochs": 60, "lr": 1e-3, "seed": 0}
SENTENCES = [
    *MINILM_SENTENCES,  # the model's own example sentences first
    "The train to the airport leaves every fifteen minutes.",
    "Our team finished the project two days ahead of schedule.",
    "Photosynthesis converts sunlight into chemical energy in plants.",
    "The children built a sandcastle near the edge of the water.",
    "Interest rates rose again, and mortgage costs followed.",
    "A good night's sleep improves memory and concentration.",
    "The violinist tuned her instrument before the concert began.",
    "Quantization reduces the number of bits used to store weights.",
    "The recipe calls for two eggs, flour, sugar and a pinch of salt.",
    "Volcanic ash disrupted flights across northern Europe.",
    "He repaired the old bicycle with parts from a flea market.",
    "The library extended its opening hours during exam season.",
    "Electric cars are becoming cheaper to buy and to run.",
    "A cat slept in a patch of sunlight on the kitchen floor.",
    "The committee postponed its decision until next month.",
    "Mountain climbers set off before dawn to avoid the storm.",
    "The software update fixed a bug that drained the battery.",
    "She learned to speak Spanish while living in Madrid.",
    "Fresh bread smells wonderful early in the morning.",
    "The river flooded the lower streets after days of rain.",
    "Attention layers let a transformer relate every token to every other.",
    "The goalkeeper saved a penalty in the final minute.",
    "A new bridge will connect the two halves of the city.",
    "The doctor recommended more exercise and less sugar.",
    "Old letters revealed a forgotten chapter of family history.",
    "The startup raised money to expand into three new markets.",
    "Wind turbines turned slowly on the hills above the town.",
    "He prefers tea with milk, while she drinks black coffee.",
    "The telescope captured images of a distant spiral galaxy.",
    "Traffic was heavy on the highway because of an accident.",
    "The students presented their robot at the science fair.",
    "A sudden frost damaged the orange harvest this year.",
    "The chef sharpened his knives before the dinner service.",
    "Online shopping has changed how people buy groceries.",
    "The hikers followed a narrow path along the cliff.",
    "Lower precision arithmetic makes inference faster on CPUs.",
    "The orchestra played a symphony by Beethoven last night.",
    "Our neighbors adopted a puppy from the animal shelter.",
    "The election results will be announced on Sunday evening.",
    "A thick fog covered the harbor in the early morning.",
    "The painter mixed blue and yellow to make a soft green.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The printer ran out of paper in the middle of the report.",
    "They celebrated their anniversary at a small seaside restaurant.",
    "The marathon route passes through the old town center.",
    "Solar panels on the roof cover most of the house's electricity.",
    "The kids argued about which movie to watch on Friday.",
    "A power outage left thousands of homes without heating.",
    "The professor explained the proof step by step on the board.",
    "Farmers hope for rain after a long and dry summer.",
    "The airline cancelled dozens of flights because of the strike.",
    "He keeps a notebook of ideas next to his bed.",
    "The new phone has a larger screen and a better camera.",
    "Birds migrate south when the days grow shorter.",
    "The city council approved a plan for more bike lanes.",
    "She finished the crossword puzzle in under ten minutes.",
]


def cache_path() -> Path:
    key = hashlib.sha256(json.dumps(CONFIG, sort_keys=True).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "reshift" / f"ptq_vit_digits_{key}.pt"


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32)[:, None]
    x = torch.nn.functional.interpolate(x, size=CONFIG["img"], mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).repeat(1, 3, 1, 1).numpy()
    return train_test_split(x, data.target, test_size=0.25, random_state=0, stratify=data.target)


def build_vit() -> torch.nn.Module:
    torch.manual_seed(CONFIG["seed"])
    return VisionTransformer(CONFIG["img"], CONFIG["patch"], CONFIG["dim"], CONFIG["depth"], CONFIG["heads"], 10)


def trained_vit(x_train: np.ndarray, y_train: np.ndarray) -> torch.nn.Module:
    model = build_vit()
    path = cache_path()
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval()
    torch.set_num_threads(2)
    opt = torch.optim.AdamW(model.parameters(), lr=CONFIG["lr"], weight_decay=0.05)
    steps = CONFIG["epochs"] * (len(x_train) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, CONFIG["lr"], total_steps=steps)
    xt, yt = torch.tensor(x_train), torch.tensor(y_train)
    gen = torch.Generator().manual_seed(0)
    start = time.time()
    model.train()
    for epoch in range(CONFIG["epochs"]):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(len(xt) // 64):
            idx = perm[i * 64 : (i + 1) * 64]
            xb = xt[idx] + 0.1 * torch.randn(len(idx), *xt.shape[1:], generator=gen)
            loss = torch.nn.functional.cross_entropy(model(xb), yt[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if epoch % 10 == 9:
            print(f"  epoch {epoch + 1}: loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def top1(graph, x: np.ndarray, y: np.ndarray, batch: int = 120) -> float:
    out = graph.outputs[0].name
    preds = [reshift.ir.interpret(graph, {"x": x[i : i + batch]})[out].argmax(-1) for i in range(0, len(x), batch)]
    return float(np.mean(np.concatenate(preds) == y) * 100)


def vit_study() -> list[tuple]:
    x_train, x_test, y_train, y_test = digits()
    model = trained_vit(x_train, y_train)
    graph = reshift.frontend.from_torch(model, (torch.tensor(x_test[:2]),))
    calib = [{"x": x_train[i : i + 16]} for i in range(0, 64, 16)]
    fp32 = top1(graph, x_test, y_test)
    with torch.no_grad():
        torch_acc = float((model(torch.tensor(x_test)).argmax(-1).numpy() == y_test).mean() * 100)
    print(flush=True)
    print(f"fp32 top-1: reshift interpreter {fp32:.2f}%, torch {torch_acc:.2f}% ({len(x_test)} test images)")
    rows = []
    variants = [
        ("uniform", ""),
        ("+log2 (log-sqrt2 softmax)", "_log2"),
        ("+scale reparam (RepQ-ViT)", "_repq"),
        ("+AdaLog", "_adalog"),
    ]
    for bits in (8, 6, 4):
        for label, suffix in variants:
            start = time.time()
            g2, _ = reshift.passes.run(graph, f"w{bits}a{bits}{suffix}", calibration=calib)
            acc = top1(g2, x_test, y_test)
            rows.append((f"W{bits}A{bits}", label, acc, fp32 - acc, time.time() - start))
            print(
                f"  W{bits}A{bits} {label:<28} top-1 {acc:6.2f}%  drop {fp32 - acc:+6.2f}  ({time.time() - start:.0f} s)",  # noqa: E501
                flush=True,
            )
    return [("fp32", "-", fp32, 0.0, 0.0)] + rows


def minilm_study() -> dict:
    from transformers import AutoTokenizer

    from examples.models import MODELS
    from examples.models.minilm import _model_dir

    spec = MODELS["minilm"]
    model = spec.build()
    tok = AutoTokenizer.from_pretrained(_model_dir())
    enc = tok(SENTENCES, padding="max_length", truncation=True, max_length=24, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    graph = reshift.frontend.from_torch(model, (torch.tensor(ids[:2]), torch.tensor(mask[:2])))
    names = [v.name for v in graph.inputs]
    feed = lambda a, b: dict(zip(names, (a, b), strict=True))  # noqa: E731
    calib = [feed(ids[i : i + 8], mask[i : i + 8]) for i in range(0, 16, 8)]
    out = graph.outputs[0].name
    ref = np.concatenate(
        [reshift.ir.interpret(graph, feed(ids[i : i + 16], mask[i : i + 16]))[out] for i in range(0, 64, 16)]
    )
    with torch.no_grad():
        torch_ref = model(torch.tensor(ids), torch.tensor(mask)).numpy()
    result = {
        "interpreter_vs_torch": float(
            np.min(np.sum(ref * torch_ref, 1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(torch_ref, axis=1))
        )
    }
    runs = [
        ("w8a8", {}),  # the default pipeline: per-row dynamic activations at 8 bits
        ("w8a8", {"act_granularity": "tensor"}),
        ("w8a8", {"smooth_alpha": 0.5}),
        ("w8a8", {"act_granularity": "row", "smooth_alpha": 0.5}),
        ("w8a8_log2", {}),
        ("w8a8_log2", {"act_granularity": "row", "smooth_alpha": 0.5}),
        ("w6a6", {}),
        ("w6a6", {"act_granularity": "row", "smooth_alpha": 0.5}),
        ("w4a4", {}),
    ]
    for pipeline, options in runs:
        g2, _ = reshift.passes.run(graph, pipeline, calibration=calib, **options)
        q = np.concatenate(
            [reshift.ir.interpret(g2, feed(ids[i : i + 16], mask[i : i + 16]))[out] for i in range(0, 64, 16)]
        )
        cos = np.sum(q * ref, 1) / np.linalg.norm(q, axis=1) / np.linalg.norm(ref, axis=1)
        label = pipeline + "".join(f" {k}={v}" for k, v in options.items())
        result[label] = (float(cos[16:].mean()), float(cos[16:].min()), float(cos.mean()))
        if label == "w8a8":
            verdict = "meets" if cos[16:].mean() >= 0.995 else "MISSES"
            print(f"  MiniLM default w8a8 pipeline: mean cosine {cos[16:].mean():.5f} ({verdict} the 0.995 target)")
        print(
            f"  MiniLM {label:<46} cosine to fp32: mean {cos[16:].mean():.5f}, min {cos[16:].min():.5f} (48 held out)",  # noqa: E501
            flush=True,
        )
    return result


def _median_ms(fn, repeat: int) -> float:
    fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1e3)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def speed_study(depth: int = 12, repeat: int = 10) -> None:
    """End-to-end ViT-S/16 (random weights, ``depth`` blocks): reshift int8 (w8a8 + calibration,
    VNNI GEMM) vs reshift fp32, onnxruntime fp32 and onnxruntime's own QDQ int8 (quantize_static),
    batch 1 and 8, 2 threads everywhere, one process."""
    import tempfile

    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = VisionTransformer(224, 16, 384, depth, 6, 1000).eval()
    rng = np.random.default_rng(0)
    calib_x = [rng.standard_normal((2, 3, 224, 224)).astype(np.float32) for _ in range(2)]
    graph = reshift.frontend.from_torch(model, (torch.tensor(calib_x[0]),))
    name = graph.inputs[0].name
    start = time.time()
    m_fp32 = reshift.compile(graph, pipeline="exact")
    t_fp32 = time.time() - start
    variants = {}
    for label, opts in (("reshift int8 (static A)", {}), ("reshift int8 (row A)", {"act_granularity": "row"})):
        start = time.time()
        variants[label] = reshift.compile(graph, pipeline="w8a8", calibration=[{name: x} for x in calib_x], **opts)
        print(f"  compiled {label} in {time.time() - start:.0f} s", flush=True)
    print(f"  compiled reshift fp32 in {t_fp32:.0f} s", flush=True)
    tmp = Path(tempfile.mkdtemp())
    torch.onnx.export(
        model,
        (torch.tensor(calib_x[0]),),
        tmp / "vit.onnx",
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
        opset_version=17,
        dynamo=False,
    )

    class Reader(CalibrationDataReader):
        def __init__(self, feeds: list[dict[str, np.ndarray]]):
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(
        str(tmp / "vit.onnx"),
        str(tmp / "vit_int8.onnx"),
        Reader([{"x": x} for x in calib_x]),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    sessions = {
        "ort fp32": ort.InferenceSession(str(tmp / "vit.onnx"), opts, providers=["CPUExecutionProvider"]),
        "ort int8 QDQ": ort.InferenceSession(str(tmp / "vit_int8.onnx"), opts, providers=["CPUExecutionProvider"]),
    }
    print(f"\nViT-S/16 depth {depth}, random weights; CPU: {cpu_name()}; 2 threads; median ms of {repeat}")
    for batch in (1, 8):
        x = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
        times = {"reshift fp32": _median_ms(lambda x=x: m_fp32(x), repeat)}
        for label, m in variants.items():
            times[label] = _median_ms(lambda m=m, x=x: m(x), repeat)
        for label, sess in sessions.items():
            times[label] = _median_ms(lambda s=sess, x=x: s.run(None, {"x": x}), repeat)
        base = times["ort fp32"]
        print(f"batch {batch}: " + ", ".join(f"{k} {v:.1f} ms ({base / v:.2f}x vs ort fp32)" for k, v in times.items()))
        ref = m_fp32(x)
        for label, m in variants.items():
            y = np.asarray(m(x))
            cos = np.sum(y * ref, 1) / np.linalg.norm(y, axis=1) / np.linalg.norm(ref, axis=1)
            print(f"  {label}: cosine to reshift fp32 logits min {cos.min():.5f}")
        y = sessions["ort int8 QDQ"].run(None, {"x": x})[0]
        cos = np.sum(y * ref, 1) / np.linalg.norm(y, axis=1) / np.linalg.norm(ref, axis=1)
        print(f"  ort int8 QDQ: cosine to reshift fp32 logits min {cos.min():.5f}", flush=True)


def attention_speed(repeat: int = 20) -> list[dict]:
    """ViT-S attention ``P @ V`` (6 heads, 197 tokens, head dim 64): fp32 matmul vs the fake-quant
    path (log2_quant + quantize_uniform + fp32 matmul) vs the shift-add ``log2_matmul`` kernel
    (4-bit log-sqrt2 codes, 8-bit V), each compiled by reshift, batch 1 and 8, 2 threads."""
    from reshift.ir.builder import GraphBuilder

    rng = np.random.default_rng(0)
    heads, tokens, dim = 6, 197, 64
    attrs = {"bits": 4, "base_kind": "log_sqrt2", "scale": 1.0}
    v_attrs = {"v_scale": 0.03, "v_zero_point": 128, "v_bits": 8}

    def graph(kind: str):
        b = GraphBuilder(f"attention_{kind}")
        p = b.input("p", f"f32[N,{heads},{tokens},{tokens}]")
        v = b.input("v", f"f32[N,{heads},{tokens},{dim}]")
        if kind == "fp32":
            y = b.matmul(p, v)
        elif kind == "fake-quant":
            vq = b.quantize_uniform(v, scale=(v_attrs["v_scale"],), zero_point=(float(v_attrs["v_zero_point"]),))
            y = b.matmul(b.log2_quant(p, **attrs), vq)
        else:
            y = b.log2_matmul(p, v, **attrs, **v_attrs)
        return b.build(y)

    compiled = {kind: reshift.compile(graph(kind), pipeline="none") for kind in ("fp32", "fake-quant", "log2_matmul")}
    rows = []
    print(f"\nViT-S attention P @ V ({heads} heads, {tokens} tokens, head dim {dim}); CPU: {cpu_name()}; 2 threads")
    for batch in (1, 8):
        logits = rng.standard_normal((batch, heads, tokens, tokens)).astype(np.float32) * 3
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p = (p / p.sum(-1, keepdims=True)).astype(np.float32)
        v = rng.standard_normal((batch, heads, tokens, dim)).astype(np.float32)
        times = {k: _median_ms(lambda m=m, p=p, v=v: m(p, v), repeat) for k, m in compiled.items()}
        y, ref = np.asarray(compiled["log2_matmul"](p, v)), np.asarray(compiled["fake-quant"](p, v))
        err = float(np.abs(y - ref).max() / np.abs(ref).max())
        zero = float(np.mean(p < 2**-7.25))  # log-sqrt2 4-bit: below the smallest level -> zero code, skipped
        base = times["fp32"]
        print(
            f"batch {batch}: "
            + ", ".join(f"{k} {t:.3f} ms ({base / t:.2f}x vs fp32)" for k, t in times.items())
            + f"; log2_matmul vs fake-quant max rel. diff {err:.1e}; {zero:.0%} zero codes"
        )
        rows.append({"batch": batch, "ms": times, "speedup_vs_fp32": base / times["log2_matmul"], "zero_codes": zero})
    return rows


def save(result: dict) -> Path:
    out = Path(__file__).resolve().parent / "results" / time.strftime("ptq_vit-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_name(), "threads": 2, **result}, indent=1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-vit", action="store_true")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--attention", action="store_true", help="only the attention (log2_matmul) timing")
    parser.add_argument("--speed-depth", type=int, default=12, help="ViT-S blocks in the speed study")
    args = parser.parse_args()
    result: dict = {}
    if not args.skip_vit:
        rows = vit_study()
        result["vit_digits"] = [
            dict(zip(("bits", "pipeline", "top1", "drop", "seconds"), r, strict=True)) for r in rows
        ]
        print("\n| bits | pipeline | top-1 % | drop vs fp32 |\n|---|---|---|---|")
        for bits, label, acc, drop, _ in rows:
            print(f"| {bits} | {label} | {acc:.2f} | {drop:+.2f} |")
    if not args.skip_minilm:
        result["minilm_cosine_mean_min_all"] = minilm_study()
        print(json.dumps(result["minilm_cosine_mean_min_all"], indent=1))
    if args.speed or args.attention:
        torch.set_num_threads(2)
        result["attention_p_at_v"] = attention_speed()
    if args.speed:
        speed_study(args.speed_depth)
    print(f"results: {save(result)}")


if __name__ == "__main__":
    main()
