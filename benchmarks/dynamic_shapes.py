"""Several symbolic dims against onnxruntime: transformers exported with ``[batch, sequence]``
inputs compile once and run at several batches and lengths; OCR CNNs with a symbolic width go
through :class:`reshift.specializing.SpecializingModel` (one build per width, the batch kept).

    .venv/bin/python benchmarks/dynamic_shapes.py [--json results/dynamic_shapes.json]

Tiny random-init Hugging Face models (BERT, GPT-2, Llama) are exported with torch.onnx's
TorchScript exporter (``dynamic_axes``); the OCR models come from their PyPI wheels
(:mod:`benchmarks.wheel_models`) with the width left symbolic. Each case reports the max
relative error (max |diff| / max |reference|) per shape, how many builds it took and their seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import reshift  # noqa: E402
from benchmarks import wheel_models  # noqa: E402

TEXT_SHAPES = ((1, 5), (3, 5), (2, 13), (1, 40))  # (batch, sequence): two batches at one length, three lengths
OCR_WIDTHS = {"ch_PP-OCRv4_rec_infer": (320, 160), "ch_ppocr_mobile_v2.0_cls_infer": (192, 96)}


def _export_text_model(kind: str, path: Path) -> list[str]:
    """A tiny random-init transformers model as ONNX with [batch, sequence] inputs; its input names."""
    import torch
    import transformers

    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
        )
        base, names = transformers.BertModel(config), ["input_ids", "attention_mask", "token_type_ids"]
    elif kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        base, names = transformers.GPT2Model(config), ["input_ids", "attention_mask"]
    else:
        config = transformers.LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
        base, names = transformers.LlamaModel(config), ["input_ids", "attention_mask"]

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base.eval()

        def forward(self, *inputs):
            return self.base(**dict(zip(names, inputs, strict=True)), use_cache=False).last_hidden_state

    example = tuple(torch.ones(2, 8, dtype=torch.int64) for _ in names)
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Wrapper().eval(),
            example,
            str(path),
            input_names=names,
            output_names=["hidden"],
            dynamic_axes={**{n: axes for n in names}, "hidden": axes},
            opset_version=17,
            dynamo=False,
        )
    return names


def _text_feeds(names: list[str], batch: int, length: int, rng) -> dict[str, np.ndarray]:
    feeds = {"input_ids": rng.integers(0, 100, (batch, length)).astype(np.int64)}
    if "attention_mask" in names:
        feeds["attention_mask"] = np.ones((batch, length), np.int64)
        feeds["attention_mask"][0, length // 2 :] = 0  # one padded row
    if "token_type_ids" in names:
        feeds["token_type_ids"] = np.zeros((batch, length), np.int64)
    return feeds


def _relative(got, want) -> float:
    return float(np.abs(np.asarray(got) - want).max() / max(float(np.abs(want).max()), 1e-30))


def text_case(kind: str, workdir: Path) -> dict:
    path = workdir / f"{kind}.onnx"
    names = _export_text_model(kind, path)
    start = time.perf_counter()
    compiled = reshift.compile(str(path))
    seconds = time.perf_counter() - start
    session, rng = ort.InferenceSession(str(path)), np.random.default_rng(0)
    errors = {}
    for batch, length in TEXT_SHAPES:
        feeds = _text_feeds(names, batch, length, rng)
        errors[f"{batch}x{length}"] = _relative(compiled(**feeds), session.run(None, feeds)[0])
    inputs = [f"{s['name']}: {s['shape']}" for s in compiled.meta["inputs"]]
    return {"model": f"tiny {kind}", "inputs": inputs, "builds": 1, "build_s": round(seconds, 1), "errors": errors}


def ocr_case(model: wheel_models.WheelModel) -> dict:
    path = wheel_models.fetch(model)
    compiled = reshift.compile(str(path))  # no input_shapes: the width stays symbolic
    session, rng = ort.InferenceSession(str(path)), np.random.default_rng(0)
    errors, seconds = {}, 0.0
    widths = OCR_WIDTHS[path.stem]
    for batch, width in [(1, w) for w in widths] + [(2, widths[0])]:
        x = rng.standard_normal((batch, 3, 48, width)).astype(np.float32)
        start = time.perf_counter()
        got = compiled(x)
        seconds += time.perf_counter() - start
        errors[f"{batch}x3x48x{width}"] = _relative(got, session.run(None, {"x": x})[0])
    return {
        "model": model.name,
        "kind": type(compiled).__name__,
        "builds": compiled.compiles,
        "calls_s": round(seconds, 1),  # the calls, the builds of new widths included
        "errors": errors,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="where to write the results")
    parser.add_argument("--skip-ocr", action="store_true", help="only the exported transformers")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("bert", "gpt2", "llama"):
            results.append(text_case(kind, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    for model in [] if args.skip_ocr else [m for m in wheel_models.MODELS if Path(m.member).stem in OCR_WIDTHS]:
        results.append(ocr_case(model))
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
