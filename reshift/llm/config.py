"""A Hugging Face causal-LM config read into one decoder description, :class:`DecoderSpec`.

Every supported family is one pre-norm decoder template with flags (ShiftAddLLM's targets are
all of this shape): token embedding (optionally scaled, Gemma; optionally plus learned positions,
GPT-2 / OPT), per layer ``x += o(attn(norm1(x)))``, ``x += mlp(norm2(x))``, a final norm and the
``lm_head``. The flags are the norm (RMSNorm, Gemma's ``1 + w`` folded into the weight at load,
LayerNorm), rotary embeddings (default / Llama-3 / linear scaling) or learned positions, the
MLP (gated SwiGLU / GeGLU, or fc1-act-fc2), biases, grouped-query heads and a per-layer sliding
window. A config feature outside this template is refused by name (:class:`UnsupportedFeatureError`)
rather than compiled into something that silently differs from transformers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from reshift.errors import ReshiftError

FAMILIES = ("llama", "qwen2", "mistral", "phi3", "gemma", "gpt2", "opt")
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}


class UnsupportedFeatureError(ReshiftError):
    """A model config asks for an architecture feature reshift's decoder template does not have."""

    def __init__(self, family: str, feature: str, hint: str = ""):
        self.feature = feature
        super().__init__(
            f"{family}: unsupported architecture feature {feature}"
            + (f"; {hint}" if hint else "")
            + f". reshift.llm supports {', '.join(FAMILIES)} decoders (see reshift/llm/config.py)."
        )


@dataclass
class DecoderSpec:
    """Everything the decoder template needs from a config, JSON-serializable (kept in the artifact)."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_size: int
    norm: str  # "rms" or "layer"
    norm_eps: float
    act: str  # "silu", "gelu_tanh", "gelu", "relu"
    gated: bool  # SwiGLU / GeGLU (gate, up, down) vs fc1 -> act -> fc2
    rotary_dim: int  # 0: learned absolute positions instead of rotary embeddings
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    learned_positions: int = 0  # rows of the position table (GPT-2 / OPT), 0 if none
    position_offset: int = 0  # OPT's position ids start at 2
    embed_scale: float = 1.0  # Gemma multiplies the embedding by sqrt(hidden)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tied_embeddings: bool = False
    windows: list[int] = field(default_factory=list)  # per layer; 0 = full causal attention
    max_positions: int = 0
    eos_token_id: list[int] = field(default_factory=list)

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DecoderSpec:
        return cls(**data)

    def inv_freq(self) -> np.ndarray:
        """Rotary inverse frequencies in float32, as transformers' ``ROPE_INIT_FUNCTIONS`` compute them."""
        dim = self.rotary_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
        inv = inv.astype(np.float32)
        kind = self.rope_scaling.get("rope_type", "default")
        if kind == "linear":
            inv = inv / np.float32(self.rope_scaling["factor"])
        elif kind == "llama3":
            s = self.rope_scaling
            factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
            old = s["original_max_position_embeddings"]
            low_wavelen, high_wavelen = old / low, old / high
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (old / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            inv = np.where(medium, smoothed, scaled).astype(np.float32)
        return inv

    def rope_tables(self, max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """``cos, sin`` float32 ``[max_seq_len, rotary_dim // 2]`` (HF repeats them for both halves)."""
        freqs = np.arange(max_seq_len, dtype=np.float32)[:, None] * self.inv_freq()[None, :]
        return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def _get(config: dict, *names: str, default: Any = None) -> Any:
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return default


def _rope(config: dict, family: str) -> tuple[float, dict]:
    """``(theta, scaling)`` from either transformers 5's ``rope_parameters`` or ``rope_theta`` + ``rope_scaling``."""
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = float(_get(merged, "rope_theta", default=_get(config, "rope_theta", default=10000.0)))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if kind not in ("default", "llama3", "linear"):
        raise UnsupportedFeatureError(
            family, f"rope scaling type {kind!r}", "supported: default, linear, llama3 (drop rope_scaling to ignore it)"
        )
    merged["rope_type"] = kind
    merged.pop("rope_theta", None)
    merged.pop("partial_rotary_factor", None)
    if kind == "llama3":
        merged.setdefault("original_max_position_embeddings", config.get("max_position_embeddings", 8192))
    return theta, {k: v for k, v in merged.items() if isinstance(v, (int, float, str))}


def _eos(config: dict) -> list[int]:
    eos = config.get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def _windows(config: dict, family: str, layers: int) -> list[int]:
    window = config.get("sliding_window")
    types = config.get("layer_types")
    if family == "qwen2" and not config.get("use_sliding_window", False):
        window = None
    if types:
        if len(types) != layers or set(types) - {"full_attention", "sliding_attention"}:
            raise UnsupportedFeatureError(family, f"layer_types {sorted(set(types))}")
        return [int(window) if t == "sliding_attention" and window else 0 for t in types]
    if family == "qwen2" and window:
        first = int(config.get("max_window_layers", layers))
        return [int(window) if i >= first else 0 for i in range(layers)]
    return [int(window) if window else 0] * layers


def spec_from_config(config: dict[str, Any]) -> DecoderSpec:
    """Read a Hugging Face ``config.json`` (as a dict) into a :class:`DecoderSpec`."""
    family = str(config.get("model_type", ""))
    if family not in FAMILIES:
        raise UnsupportedFeatureError(family or "config.json", f"architecture model_type={family!r}")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if config.get(key):
            raise UnsupportedFeatureError(family, f"{key}={config[key]}")
    if family in ("gpt2", "opt"):
        return _learned_positions_spec(config, family)
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(_get(config, "head_dim", default=hidden // heads))
    layers = int(config["num_hidden_layers"])
    act = str(_get(config, "hidden_activation", "hidden_act", default="silu"))
    if family == "gemma" and config.get("hidden_activation") is None:
        act = "gelu_pytorch_tanh"  # transformers' Gemma ignores hidden_act="gelu" (approximate GELU)
    if act not in _ACTIVATIONS:
        raise UnsupportedFeatureError(family, f"activation {act!r}")
    theta, scaling = _rope(config, family)
    partial = float(
        _get(
            config,
            "partial_rotary_factor",
            default=(config.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0),
        )
    )
    rotary = int(head_dim * partial)
    if rotary % 2:
        raise UnsupportedFeatureError(family, f"odd rotary dimension {rotary}")
    bias = bool(config.get("attention_bias", family == "qwen2"))
    return DecoderSpec(
        family=family,
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(_get(config, "num_key_value_heads", default=heads)),
        head_dim=head_dim,
        ffn_size=int(config["intermediate_size"]),
        norm="rms",
        norm_eps=float(_get(config, "rms_norm_eps", default=1e-6)),
        act=_ACTIVATIONS[act],
        gated=True,
        rotary_dim=rotary,
        rope_theta=theta,
        rope_scaling=scaling,
        embed_scale=math.sqrt(hidden) if family == "gemma" else 1.0,
        qkv_bias=bias,
        o_bias=bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)),
        tied_embeddings=bool(config.get("tie_word_embeddings", family == "gemma")),
        windows=_windows(config, family, layers),
        max_positions=int(config.get("max_position_embeddings", 0) or 0),
        eos_token_id=_eos(config),
    )


def _learned_positions_spec(config: dict, family: str) -> DecoderSpec:
    if family == "gpt2":
        if config.get("scale_attn_by_inverse_layer_idx"):
            raise UnsupportedFeatureError(family, "scale_attn_by_inverse_layer_idx=True")
        if config.get("scale_attn_weights") is False:
            raise UnsupportedFeatureError(family, "scale_attn_weights=False")
        hidden, heads = int(config["n_embd"]), int(config["n_head"])
        act = str(config.get("activation_function", "gelu_new"))
        ffn = int(config.get("n_inner") or 4 * hidden)
        positions, offset, eps = int(config["n_positions"]), 0, float(config.get("layer_norm_epsilon", 1e-5))
        layers, bias = int(config["n_layer"]), True
    else:
        if not config.get("do_layer_norm_before", True):
            raise UnsupportedFeatureError(family, "do_layer_norm_before=False (post-LayerNorm OPT-350m)")
        hidden = int(config["hidden_size"])
        if int(config.get("word_embed_proj_dim", hidden)) != hidden:
            raise UnsupportedFeatureError(family, "word_embed_proj_dim != hidden_size (project_in/project_out)")
        if config.get("_remove_final_layer_norm"):
            raise UnsupportedFeatureError(family, "_remove_final_layer_norm=True")
        heads, act, ffn = (
            int(config["num_attention_heads"]),
            str(config.get("activation_function", "relu")),
            int(config["ffn_dim"]),
        )
        positions, offset, eps = int(config["max_position_embeddings"]) + 2, 2, 1e-5
        layers, bias = int(config["num_hidden_layers"]), bool(config.get("enable_bias", True))
    if act not in _ACTIVATIONS:
        raise UnsupportedFeatureError(family, f"activation {act!r}")
    return DecoderSpec(
        family=family,
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        ffn_size=ffn,
        norm="layer",
        norm_eps=eps,
        act=_ACTIVATIONS[act],
        gated=False,
        rotary_dim=0,
        learned_positions=positions,
        position_offset=offset,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
        windows=[0] * layers,
        max_positions=positions - offset,
        eos_token_id=_eos(config),
    )
