"""Weights of a Hugging Face causal LM in reshift's canonical names, as float32 numpy arrays.

A local model directory is read offline: ``config.json`` plus ``*.safetensors`` (sharded or not),
parsed here with numpy alone (F32 / F16 / BF16), so compiling needs neither torch nor a network.
A transformers module gives its ``config`` and ``state_dict()``. Each family's checkpoint names are
mapped to one layout: ``embed``, ``pos_embed``, ``layers.{i}.{norm1,norm2}.{w,b}``,
``layers.{i}.{q,k,v,o,gate,up,down,fc1,fc2}.{w,b}`` (linear weights ``[out, in]``), ``norm.{w,b}``,
``lm_head.w``. Fused checkpoint tensors (GPT-2's ``c_attn``, Phi-3's ``qkv_proj`` / ``gate_up_proj``)
are split; GPT-2's Conv1D weights are transposed; Gemma's ``1 + w`` norm weights are folded.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from reshift.errors import ModelLoadError
from reshift.llm.config import DecoderSpec

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I64": np.int64}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one ``.safetensors`` file as float32 (bf16 widened by a 16-bit shift)."""
    try:
        data = path.read_bytes()
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + size])
    except (OSError, struct.error, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({exc})") from None
    base = 8 + size
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        kind = info["dtype"]
        if kind not in _DTYPES:
            raise ModelLoadError(f"{path}: tensor {name} has dtype {kind}; reshift.llm reads F32, F16, BF16")
        start, end = info["data_offsets"]
        raw = np.frombuffer(data[base + start : base + end], dtype=_DTYPES[kind]).reshape(info["shape"])
        if kind == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        out[name] = np.ascontiguousarray(raw, dtype=np.float32) if raw.dtype.kind == "f" else raw
    return out


def read_model_dir(directory: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(config dict, raw checkpoint tensors)`` of a local Hugging Face model directory."""
    return read_config(directory), read_weights(directory)


def read_config(directory: str | Path) -> dict[str, Any]:
    """``config.json`` of a local Hugging Face model directory."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{directory}: no config.json; give a Hugging Face model directory (config + safetensors)")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise ModelLoadError(f"{config_path}: not valid JSON ({exc})") from None
    return config


def read_weights(directory: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of the directory's ``*.safetensors`` files (shards merged)."""
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        others = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".gguf", ".pth")]
        hint = f" (found {', '.join(others)}: re-save with save_pretrained(safe_serialization=True))" if others else ""
        raise ModelLoadError(f"{directory}: no *.safetensors weights{hint}")
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        tensors.update(read_safetensors(path))
    return tensors


def state_dict_numpy(module: Any) -> dict[str, np.ndarray]:
    """A torch module's parameters and buffers as float32 numpy arrays (no torch import needed here)."""
    return {name: t.detach().float().cpu().numpy() for name, t in module.state_dict().items()}


def _strip(tensors: dict[str, np.ndarray], prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
    out = {}
    for name, value in tensors.items():
        for prefix in prefixes:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        out[name] = value
    return out


def canonical_weights(spec: DecoderSpec, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The checkpoint ``raw`` renamed to reshift's layout; raises naming the first missing tensor."""
    fam = spec.family
    if fam == "gpt2":
        t = _strip(raw, ("transformer.",))
    elif fam == "opt":
        t = _strip(raw, ("model.decoder.", "decoder."))
    else:
        t = _strip(raw, ("model.",))
    out: dict[str, np.ndarray] = {}

    def take(dst: str, src: str, optional: bool = False) -> None:
        if src in t:
            out[dst] = t[src]
        elif not optional:
            raise ModelLoadError(
                f"{fam} checkpoint: tensor {src!r} is missing (have e.g. {sorted(t)[:4]}); "
                "is this the model the config describes?"
            )

    if fam == "gpt2":
        take("embed", "wte.weight")
        take("pos_embed", "wpe.weight")
        for i in range(spec.num_layers):
            p, d = f"h.{i}.", f"layers.{i}."
            for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
                take(d + a + ".w", p + b + ".weight")
                take(d + a + ".b", p + b + ".bias")
            qkv_w, qkv_b = t[p + "attn.c_attn.weight"].T, t[p + "attn.c_attn.bias"]
            for j, name in enumerate("qkv"):
                h = spec.hidden_size
                out[d + name + ".w"] = np.ascontiguousarray(qkv_w[j * h : (j + 1) * h])
                out[d + name + ".b"] = qkv_b[j * h : (j + 1) * h]
            for a, b in (("o", "attn.c_proj"), ("fc1", "mlp.c_fc"), ("fc2", "mlp.c_proj")):
                out[d + a + ".w"] = np.ascontiguousarray(t[p + b + ".weight"].T)
                take(d + a + ".b", p + b + ".bias")
        take("norm.w", "ln_f.weight")
        take("norm.b", "ln_f.bias")
    elif fam == "opt":
        take("embed", "embed_tokens.weight")
        take("pos_embed", "embed_positions.weight")
        for i in range(spec.num_layers):
            p, d = f"layers.{i}.", f"layers.{i}."
            for a, b in (("norm1", "self_attn_layer_norm"), ("norm2", "final_layer_norm")):
                take(d + a + ".w", p + b + ".weight")
                take(d + a + ".b", p + b + ".bias")
            for a, b in (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
                         ("o", "self_attn.out_proj"), ("fc1", "fc1"), ("fc2", "fc2")):  # fmt: skip
                take(d + a + ".w", p + b + ".weight")
                take(d + a + ".b", p + b + ".bias", optional=not spec.qkv_bias)
        take("norm.w", "final_layer_norm.weight")
        take("norm.b", "final_layer_norm.bias")
    else:
        take("embed", "embed_tokens.weight")
        for i in range(spec.num_layers):
            p, d = f"layers.{i}.", f"layers.{i}."
            take(d + "norm1.w", p + "input_layernorm.weight")
            take(d + "norm2.w", p + "post_attention_layernorm.weight")
            if fam == "phi3":
                qkv = t[p + "self_attn.qkv_proj.weight"]
                q_rows, kv_rows = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
                out[d + "q.w"], out[d + "k.w"], out[d + "v.w"] = np.split(qkv, [q_rows, q_rows + kv_rows])
                out[d + "gate.w"], out[d + "up.w"] = np.split(t[p + "mlp.gate_up_proj.weight"], 2)
            else:
                for a in "qkv":
                    take(d + a + ".w", p + f"self_attn.{a}_proj.weight")
                    take(d + a + ".b", p + f"self_attn.{a}_proj.bias", optional=not spec.qkv_bias)
                for a in ("gate", "up"):
                    take(d + a + ".w", p + f"mlp.{a}_proj.weight")
                    take(d + a + ".b", p + f"mlp.{a}_proj.bias", optional=True)
            take(d + "o.w", p + "self_attn.o_proj.weight")
            take(d + "o.b", p + "self_attn.o_proj.bias", optional=True)
            take(d + "down.w", p + "mlp.down_proj.weight")
            take(d + "down.b", p + "mlp.down_proj.bias", optional=True)
        take("norm.w", "norm.weight")
        if fam == "gemma":
            for name in [n for n in out if n.endswith((".norm1.w", ".norm2.w"))] + ["norm.w"]:
                out[name] = (out[name] + np.float32(1.0)).astype(np.float32)
    if spec.tied_embeddings or "lm_head.weight" not in raw:
        out["lm_head.w"] = out["embed"]
    else:
        out["lm_head.w"] = raw["lm_head.weight"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}
