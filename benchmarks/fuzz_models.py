"""Seed models for the ONNX mutation fuzzer (benchmarks/fuzz_onnx.py): small, real exports.

Five models through ``torch.onnx.export`` (legacy exporter, opset 17), seeded and tiny so that
converting and interpreting one takes milliseconds: a CNN (conv/BN/ReLU, max pool, a grouped
conv, a residual add, global pooling, a linear head), a ViT (patch conv, class token, pre-norm
blocks), a BERT-style encoder (``transformers.BertModel`` from a tiny config, random init,
offline), the ViT again with a symbolic batch (``dynamic_axes``) and a mix of layout and
pooling ops the others lack. Exports are cached by name in a directory, so torch is imported
only when a file is missing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CACHE_VERSION = "v1"  # bump when a seed model changes, so cached exports are rebuilt


@dataclass(frozen=True)
class SeedModel:
    """How to build one seed model: a torch module, example inputs, names, a symbolic batch or not."""

    name: str
    build: Callable[[], tuple[object, tuple]]
    input_names: tuple[str, ...] = ("input",)
    symbolic_batch: bool = False


def _cnn():
    import torch
    from torch import nn

    class SmallCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
            self.pool = nn.MaxPool2d(3, 2, 1)
            self.grouped = nn.Conv2d(8, 8, 3, 1, 1, groups=4)
            self.down = nn.Conv2d(8, 16, 3, 2, 1)
            self.avg = nn.AvgPool2d(2)
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            x = self.pool(self.stem(x))
            x = torch.relu(x + self.grouped(x))
            x = self.avg(self.down(x))
            return torch.softmax(self.head(x.mean((2, 3))), dim=-1)

    torch.manual_seed(0)
    model = SmallCNN().eval()
    with torch.no_grad():
        bn = model.stem[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model, (torch.randn(1, 3, 16, 16),)


def _vit():
    import torch

    from examples.models.vit import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch=8, dim=16, depth=1, num_heads=2, num_classes=5).eval()
    return model, (torch.randn(1, 3, 16, 16),)


def _bert():
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    bert = BertModel(config, add_pooling_layer=False).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(0, 32, (1, 8))
    return Encoder().eval(), (ids, torch.ones(1, 8, dtype=torch.int64))


def _ops_mix():
    """Layout and pooling ops the other seeds lack: Pad, Split, Slice with steps, ceil-mode pools,
    Clip, Where, PRelu, ConvTranspose, LayerNorm, GELU, ReduceMax; two outputs."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class OpsMix(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3)
            self.up = nn.ConvTranspose2d(3, 3, 2, stride=2)
            self.act = nn.PReLU(5)
            self.norm = nn.LayerNorm(9)
            self.fc = nn.Linear(9, 6)

        def forward(self, x):
            x = self.conv(F.pad(x, (1, 1, 2, 0)))
            a, b = torch.split(x, [3, 5], dim=1)
            a = F.max_pool2d(self.up(a), 3, 2, ceil_mode=True)
            b = F.avg_pool2d(self.act(b), 2, 2, ceil_mode=True)
            y = torch.cat([a[:, :, ::2, ::2], b], 1)[:, :, 1:, 1:]
            y = torch.clamp(y, -1.0, 1.0) + torch.where(y > 0, y, 0.1 * y)
            y = F.gelu(self.norm(y.flatten(2)))
            return self.fc(y).softmax(-1), y.amax(dim=1)

    torch.manual_seed(0)
    return OpsMix().eval(), (torch.randn(1, 4, 8, 8),)


SEED_MODELS: dict[str, SeedModel] = {
    spec.name: spec
    for spec in (
        SeedModel("cnn", _cnn),
        SeedModel("vit", _vit),
        SeedModel("bert", _bert, ("input_ids", "attention_mask")),
        SeedModel("vit_batch", _vit, symbolic_batch=True),
        SeedModel("ops_mix", _ops_mix),
    )
}


def export_seed(spec: SeedModel, path: Path) -> Path:
    """Export one seed model to ``path`` (opset 17; axis 0 symbolic when ``spec.symbolic_batch``)."""
    import torch

    model, args = spec.build()
    dynamic = {name: {0: "batch"} for name in spec.input_names} if spec.symbolic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, args, str(path), input_names=list(spec.input_names), output_names=["output"],
            opset_version=17, dynamo=False, dynamic_axes=dynamic,
        )  # fmt: skip
    return path


def seed_model_bytes(directory: Path, names: list[str] | None = None) -> dict[str, bytes]:
    """Serialized seed models by name, exported into ``directory`` once and read back after."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    result = {}
    for name in names or list(SEED_MODELS):
        path = directory / f"{name}-{CACHE_VERSION}.onnx"
        if not path.is_file():
            partial = path.with_suffix(".partial")
            export_seed(SEED_MODELS[name], partial)
            partial.replace(path)
        result[name] = path.read_bytes()
    return result
