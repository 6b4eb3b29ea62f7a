"""Tiny random-init Hugging Face causal LMs, one per family reshift.llm supports (built offline).

hidden 64, 2 layers, 4 heads / 2 KV heads (GPT-2 and OPT: 4 heads; Gemma head_dim 24), vocab 256..320, float32.
Mistral gets a sliding window of 8 tokens so that a 64-token generation exercises it.
"""

from __future__ import annotations

import torch
import transformers

FAMILIES = ("llama", "llama3", "qwen2", "mistral", "phi3", "gemma", "gpt2", "opt")


def tiny_config(family: str) -> transformers.PretrainedConfig:
    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=512)  # fmt: skip
    if family == "llama":
        return transformers.LlamaConfig(**common, rms_norm_eps=1e-5)
    if family == "llama3":
        return transformers.LlamaConfig(
            **common,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },  # fmt: skip
            tie_word_embeddings=True,
        )
    if family == "qwen2":
        return transformers.Qwen2Config(**{**common, "vocab_size": 300}, tie_word_embeddings=True)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=8)
    if family == "phi3":
        return transformers.Phi3Config(**{**common, "vocab_size": 320}, pad_token_id=0)
    if family == "gemma":
        return transformers.GemmaConfig(**common, head_dim=24)  # not a multiple of 16: the scalar attention loops
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=512)
    if family == "opt":
        return transformers.OPTConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      ffn_dim=128, max_position_embeddings=512, word_embed_proj_dim=64)  # fmt: skip
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="eager")
    std = 0.4 if family in ("gpt2", "gemma", "opt") else 0.15  # larger than the 0.02 init: varied greedy tokens
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, std)
            elif "bias" in name:
                p.normal_(0.0, 0.05)
    return model.eval().float()


def hf_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
            min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()
