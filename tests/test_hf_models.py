"""Hugging Face ``transformers`` models end to end: from_torch, reshift.compile(target="cpu"),
torch.compile(backend="reshift"), each against torch eager (1e-4 relative).

The tiny random-init architectures come from ``examples/models/hf_tiny.py`` (offline); the full
table is ``benchmarks/hf_coverage.py``. The fast subset covers attention with transformers 5's
bool masks (DistilBERT), a causal LM whose ``DynamicCache`` output is dropped (Llama) and
run-time ``cumsum``/``torch.gather`` (RoBERTa position ids); the rest are ``slow``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import reshift
from examples.models.hf_tiny import build
from reshift.dynamo import ReshiftFallbackWarning
from reshift.errors import ExportError

from .helpers import relative_error

FAST = ["distilbert", "llama", "roberta"]
SLOW = ["bert", "vit", "swin", "t5_encoder", "gpt2", "qwen2", "segformer", "mamba", "wav2vec2", "whisper_encoder"]


def _eager(model, inputs) -> np.ndarray:
    with torch.no_grad():
        return model(*inputs)[0].numpy()


def _compiled(name: str):
    model, make = build(name)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        return reshift.compile(model, make(2), target="cpu")


def _check_compile(name: str) -> None:
    model, make = build(name)
    compiled = _compiled(name)
    for batch in (1, 3):  # the graph's batch is symbolic: other sizes than the traced 2
        inputs = make(batch, seed=batch)
        first = compiled(*[x.numpy() for x in inputs])
        first = first[0] if isinstance(first, tuple) else first
        assert relative_error(first, _eager(model, inputs)) < 1e-4, (name, batch)


@pytest.mark.parametrize("name", FAST)
def test_compile_matches_eager(name):
    _check_compile(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_compile_matches_eager_slow(name):
    _check_compile(name)


def test_causal_lm_cache_is_dropped_with_a_note():
    """A causal LM exports with use_cache=False (its DynamicCache cannot be an output); the note says so."""
    model, make = build("llama")
    assert model.config.use_cache is True
    graph = reshift.frontend.from_torch(model, make(2))
    assert model.config.use_cache is True  # restored for the user
    assert [v.type.shape for v in graph.outputs] == [("N", 8, 99)]  # logits only
    assert any("use_cache=False" in note for note in graph.notes)


def test_torch_compile_runs_attention_without_fallback():
    model, make = build("distilbert")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="reshift")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ReshiftFallbackWarning)
        for batch in (2, 1):
            inputs = make(batch, seed=batch)
            with torch.no_grad():
                out = compiled(*inputs)[0].numpy()
            assert relative_error(out, _eager(model, inputs)) < 1e-4
    assert not [w for w in caught if issubclass(w.category, ReshiftFallbackWarning)]


class _Boxed:
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class _ReturnsObject(torch.nn.Module):
    def forward(self, x):
        return _Boxed(x + 1)


class _DataDependent(torch.nn.Module):
    def forward(self, x):
        return x + 1 if x.sum() > 0 else x - 1


@pytest.mark.parametrize(
    ("module", "advice"),
    [(_ReturnsObject(), "returns tensors"), (_DataDependent(), "torch.compile")],
)
def test_untraceable_model_gives_a_reshift_error(module, advice):
    """torch.export failures reach the user as ExportError naming the model and what to do."""
    with pytest.raises(ExportError, match=type(module).__name__) as info:
        reshift.frontend.from_torch(module, (torch.randn(2, 3),))
    assert advice in str(info.value)
