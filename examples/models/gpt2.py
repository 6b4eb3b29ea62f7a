"""GPT-2-style decoder (Radford et al., "Language Models are Unsupervised Multitask Learners",
2019), built from Hugging Face ``transformers.GPT2LMHeadModel`` with random weights.

Two layers, width 128, 4 heads, vocabulary 1000, 128 positions, eager attention (explicit
matmul + additive causal mask + softmax), no KV cache. The wrapper returns logits ``[B, T, 1000]`` only.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import finalize


class GPT2Logits(nn.Module):
    """``forward(input_ids) -> logits``; hides the HF output dataclass, cache and mask building.

    The causal mask is a precomputed additive ``[1, 1, P, P]`` buffer (0 on and below the
    diagonal, float32 min above) sliced to the sequence length and passed as a 4D
    ``attention_mask``, which transformers forwards to eager attention unchanged. Without it,
    transformers 5 builds the mask itself from ``position_ids`` (``aten.diff`` + ``cumsum`` for
    packed-sequence detection, plus ``index``/``and`` mask functions): same logits, but a much
    noisier graph, and ``aten::diff`` has no legacy ONNX exporter symbolic.
    """

    def __init__(self, lm: nn.Module, n_positions: int) -> None:
        super().__init__()
        self.lm = lm
        blocked = torch.ones(n_positions, n_positions, dtype=torch.bool).triu(1)
        mask = torch.zeros(n_positions, n_positions).masked_fill(blocked, torch.finfo(torch.float32).min)
        self.register_buffer("causal_mask", mask[None, None], persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        mask = self.causal_mask[:, :, :t, :t]
        return self.lm(input_ids=input_ids, attention_mask=mask, use_cache=False).logits


def gpt2_small(seed: int = 0) -> nn.Module:
    """A seeded, randomly initialized 2-layer GPT-2 (n_embd 128, 4 heads, vocab 1000)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_embd=128,
        n_head=4,
        vocab_size=1000,
        n_positions=128,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    config._attn_implementation = "eager"
    lm = GPT2LMHeadModel(config)
    return finalize(GPT2Logits(lm, config.n_positions))


def gpt2_example_inputs(batch: int = 1, seq_len: int = 16, seed: int = 0) -> tuple[torch.Tensor]:
    """Deterministic int64 token ids ``[batch, seq_len]`` drawn uniformly from the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 1000, (batch, seq_len), generator=gen),)
