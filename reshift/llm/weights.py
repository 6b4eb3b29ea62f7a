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
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from reshift.errors import ModelLoadError
from reshift.llm.config import DecoderSpec


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one ``.safetensors`` file as float32 (bf16 widened by a 16-bit shift)."""
    from reshift.llm.stream import SafetensorsCheckpoint

    return dict(SafetensorsCheckpoint([Path(path)]))


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
    """Every tensor of the directory's ``*.safetensors`` files (shards merged), float32 in memory;
    :class:`reshift.llm.stream.SafetensorsCheckpoint` reads them one at a time instead."""
    from reshift.llm.stream import SafetensorsCheckpoint

    return dict(SafetensorsCheckpoint.of_directory(directory))


def state_dict_numpy(module: Any) -> dict[str, np.ndarray]:
    """A torch module's parameters and buffers as float32 numpy arrays (no torch import needed here)."""
    return {name: t.detach().float().cpu().numpy() for name, t in module.state_dict().items()}


class _Renamed(Mapping):
    """``raw`` under its names with the family's prefix stripped, values fetched only when read."""

    def __init__(self, raw: Mapping[str, np.ndarray], prefixes: tuple[str, ...]) -> None:
        self._raw, self._names = raw, {}
        for name in raw:
            short = name
            for prefix in prefixes:
                if name.startswith(prefix):
                    short = name[len(prefix) :]
                    break
            self._names[short] = name

    def __getitem__(self, name: str) -> np.ndarray:
        return self._raw[self._names[name]]

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _renamed(spec: DecoderSpec, raw: Mapping[str, np.ndarray]) -> _Renamed:
    if spec.family == "gpt2":
        return _Renamed(raw, ("transformer.",))
    if spec.family == "opt":
        return _Renamed(raw, ("model.decoder.", "decoder."))
    return _Renamed(raw, ("model.",))


def _taker(spec: DecoderSpec, t: Mapping[str, np.ndarray], out: dict[str, np.ndarray]):
    def take(dst: str, src: str, optional: bool = False) -> None:
        if src in t:
            out[dst] = t[src]
        elif not optional:
            raise ModelLoadError(
                f"{spec.family} checkpoint: tensor {src!r} is missing (have e.g. {sorted(t)[:4]}); "
                "is this the model the config describes?"
            )

    return take


def _need(spec: DecoderSpec, t: Mapping[str, np.ndarray], src: str) -> np.ndarray:
    if src not in t:
        _taker(spec, t, {})(src, src)
    return t[src]


def _finish(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def canonical_embeddings(spec: DecoderSpec, raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``embed`` (and ``pos_embed``) of the checkpoint ``raw``, float32."""
    t, out = _renamed(spec, raw), {}
    take = _taker(spec, t, out)
    if spec.family == "gpt2":
        take("embed", "wte.weight")
        take("pos_embed", "wpe.weight")
    else:
        take("embed", "embed_tokens.weight")
        if spec.family == "opt":
            take("pos_embed", "embed_positions.weight")
    return _finish(out)


def canonical_layer(spec: DecoderSpec, raw: Mapping[str, np.ndarray], i: int, t=None) -> dict[str, np.ndarray]:
    """Block ``i``'s norms and linears of the checkpoint ``raw`` in reshift's names, float32; raises
    naming the first missing tensor. Only this block's tensors are read (a lazy ``raw`` streams)."""
    fam, t, out = spec.family, t if t is not None else _renamed(spec, raw), {}
    take = _taker(spec, t, out)
    if fam == "gpt2":
        p, d = f"h.{i}.", f"layers.{i}."
        for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
            take(d + a + ".w", p + b + ".weight")
            take(d + a + ".b", p + b + ".bias")
        qkv_w, qkv_b = _need(spec, t, p + "attn.c_attn.weight").T, _need(spec, t, p + "attn.c_attn.bias")
        for j, name in enumerate("qkv"):
            h = spec.hidden_size
            out[d + name + ".w"] = qkv_w[j * h : (j + 1) * h]
            out[d + name + ".b"] = qkv_b[j * h : (j + 1) * h]
        for a, b in (("o", "attn.c_proj"), ("fc1", "mlp.c_fc"), ("fc2", "mlp.c_proj")):
            out[d + a + ".w"] = _need(spec, t, p + b + ".weight").T
            take(d + a + ".b", p + b + ".bias")
    elif fam == "opt":
        p, d = f"layers.{i}.", f"layers.{i}."
        for a, b in (("norm1", "self_attn_layer_norm"), ("norm2", "final_layer_norm")):
            take(d + a + ".w", p + b + ".weight")
            take(d + a + ".b", p + b + ".bias")
        for a, b in (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
                     ("o", "self_attn.out_proj"), ("fc1", "fc1"), ("fc2", "fc2")):  # fmt: skip
            take(d + a + ".w", p + b + ".weight")
            take(d + a + ".b", p + b + ".bias", optional=not spec.qkv_bias)
    else:
        p, d = f"layers.{i}.", f"layers.{i}."
        take(d + "norm1.w", p + "input_layernorm.weight")
        take(d + "norm2.w", p + "post_attention_layernorm.weight")
        if fam == "phi3":
            qkv = _need(spec, t, p + "self_attn.qkv_proj.weight")
            q_rows, kv_rows = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
            out[d + "q.w"], out[d + "k.w"], out[d + "v.w"] = np.split(qkv, [q_rows, q_rows + kv_rows])
            out[d + "gate.w"], out[d + "up.w"] = np.split(_need(spec, t, p + "mlp.gate_up_proj.weight"), 2)
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
        if fam == "gemma":  # Gemma's RMSNorm scales by 1 + w
            for name in (d + "norm1.w", d + "norm2.w"):
                out[name] = (out[name] + np.float32(1.0)).astype(np.float32)
    return _finish(out)


def canonical_final(spec: DecoderSpec, raw: Mapping[str, np.ndarray], embed: np.ndarray | None = None):
    """``norm.{w,b}`` and ``lm_head.w`` (``embed`` itself when tied or absent), float32."""
    t, out = _renamed(spec, raw), {}
    take = _taker(spec, t, out)
    if spec.family == "gpt2":
        take("norm.w", "ln_f.weight")
        take("norm.b", "ln_f.bias")
    elif spec.family == "opt":
        take("norm.w", "final_layer_norm.weight")
        take("norm.b", "final_layer_norm.bias")
    else:
        take("norm.w", "norm.weight")
        if spec.family == "gemma":
            out["norm.w"] = (out["norm.w"] + np.float32(1.0)).astype(np.float32)
    if spec.tied_embeddings or "lm_head.weight" not in raw:
        out["lm_head.w"] = embed if embed is not None else canonical_embeddings(spec, raw)["embed"]
    else:
        out["lm_head.w"] = raw["lm_head.weight"]
    return _finish(out)


def canonical_weights(spec: DecoderSpec, raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The whole checkpoint ``raw`` renamed to reshift's layout (every tensor float32 in memory;
    ``reshift.llm.stream`` reads one block at a time instead); raises naming the first missing tensor."""
    out = canonical_embeddings(spec, raw)
    t = _renamed(spec, raw)
    for i in range(spec.num_layers):
        out.update(canonical_layer(spec, raw, i, t))
    out.update(canonical_final(spec, raw, out["embed"]))
    return out
