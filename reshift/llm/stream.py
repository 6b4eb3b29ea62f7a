"""A checkpoint read one tensor at a time, and canonical weights handed out one decoder block at a time.

``reshift.llm.compile`` on a model directory never holds the whole model in float32: the
safetensors headers are parsed up front (every tensor's file, dtype, shape and byte range; every
tensor the config needs is checked to exist before any fitting starts), then
``reshift.llm.compiler.prepare`` asks for block ``i``'s weights, widens just those to float32 (F32,
F16 or BF16 on disk; ``model.safetensors.index.json`` shards or a plain glob), fits and packs them,
and drops them. What stays alive is the packed result (BCQ / ternary codes and scales), the float32
embedding and norms, and ``lm_head`` (dense float32 unless it is quantized too); with
``pipeline="exact"`` every linear stays float32 by definition, so nothing is saved there.

Tensors are read with ``pread`` (``numpy.fromfile`` at an offset) rather than through a long-lived
``mmap``: the pages of a file mapping that a process has touched count in its resident set (``VmHWM``)
until it unmaps them, so mapping a 2 GiB checkpoint and reading it through would add 2 GiB to the
peak; a read buffer is freed as soon as its float32 copy exists (fp32 files: it is the copy).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from reshift.errors import ModelLoadError
from reshift.llm.config import DecoderSpec
from reshift.llm.weights import canonical_embeddings, canonical_final, canonical_layer

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I64": np.int64}
INDEX_FILE = "model.safetensors.index.json"


def widen(raw: np.ndarray, kind: str) -> np.ndarray:
    """A float tensor as float32 (bf16 by the 16-bit shift torch uses, so the values are exact)."""
    if kind == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False) if raw.dtype.kind == "f" else raw


class SafetensorsCheckpoint(Mapping):
    """The tensors of one or more ``.safetensors`` files by name, each read (and widened to float32)
    only when it is looked up; nothing is cached, so the caller decides what stays in memory."""

    def __init__(self, files: list[Path]) -> None:
        self._entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        for path in files:
            for name, entry in _header(path).items():
                self._entries[name] = entry

    @classmethod
    def of_directory(cls, directory: str | Path) -> SafetensorsCheckpoint:
        """A Hugging Face model directory's weights: the shards ``model.safetensors.index.json`` names
        (each must exist), else every ``*.safetensors`` file."""
        directory = Path(directory)
        index = directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ModelLoadError(f"{index}: not a safetensors index (no weight_map: {exc})") from None
            files = [directory / f for f in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ModelLoadError(f"{index} names shard(s) {', '.join(missing)}, not in {directory}")
            checkpoint = cls(files)
            absent = sorted(n for n in weight_map if n not in checkpoint)
            if absent:
                raise ModelLoadError(f"{index}: tensor {absent[0]!r} is not in its shard {weight_map[absent[0]]}")
            return checkpoint
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            others = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".gguf", ".pth")]
            hint = f" (found {', '.join(others)}: re-save with save_pretrained(safe_serialization=True))"
            hint = hint if others else ""
            raise ModelLoadError(f"{directory}: no *.safetensors weights{hint}")
        return cls(files)

    def __getitem__(self, name: str) -> np.ndarray:
        path, kind, shape, start, end = self._entries[name]
        dtype = np.dtype(_DTYPES[kind])
        count = (end - start) // dtype.itemsize
        try:
            raw = np.fromfile(path, dtype=dtype, count=count, offset=start)
        except OSError as exc:
            raise ModelLoadError(f"{path}: cannot read tensor {name} ({exc})") from None
        if raw.size != count:
            raise ModelLoadError(f"{path}: tensor {name} is truncated ({raw.size} of {count} values)")
        return widen(raw.reshape(shape), kind)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][2]

    def nbytes(self) -> int:
        """Bytes of every tensor as stored (fp16 checkpoint: 2 per weight)."""
        return sum(end - start for _, _, _, start, end in self._entries.values())

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


def _header(path: Path) -> dict[str, tuple[Path, str, tuple[int, ...], int, int]]:
    """``name -> (file, dtype, shape, absolute start, end)`` from a safetensors header alone."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 << 20:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
        file_size = os.path.getsize(path)
    except (OSError, struct.error, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({exc})") from None
    base, out = 8 + size, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        kind = info.get("dtype")
        if kind not in _DTYPES:
            raise ModelLoadError(f"{path}: tensor {name} has dtype {kind}; reshift.llm reads F32, F16, BF16")
        start, end = info["data_offsets"]
        shape = tuple(int(s) for s in info["shape"])
        if end - start != int(np.prod(shape)) * np.dtype(_DTYPES[kind]).itemsize or base + end > file_size:
            raise ModelLoadError(f"{path}: tensor {name}'s byte range {start}..{end} does not fit shape {list(shape)}")
        out[name] = (path, kind, shape, base + start, base + end)
    return out


class ModuleTensors(Mapping):
    """A torch module's ``state_dict()`` as float32 numpy arrays, converted one at a time when read."""

    def __init__(self, module: Any) -> None:
        self._state = module.state_dict()

    def __getitem__(self, name: str) -> np.ndarray:
        return self._state[name].detach().float().cpu().numpy()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def __contains__(self, name: object) -> bool:
        return name in self._state

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


class _NamesOnly(Mapping):
    """``raw``'s names with empty stand-ins of the right rank: canonicalizing it checks that every
    tensor the config needs is there, without reading any."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self._raw = raw

    def __getitem__(self, name: str) -> np.ndarray:
        shape = self._raw.shape(name) if hasattr(self._raw, "shape") else np.shape(self._raw[name])
        return np.zeros((0,) * len(shape), np.float32)

    def __contains__(self, name: object) -> bool:
        return name in self._raw

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


class BlockWeights:
    """Canonical float32 weights, handed out as embeddings, one block's tensors, and the final norm +
    ``lm_head``: streamed from a raw checkpoint (:meth:`streamed`) or cut from a canonical dict."""

    def __init__(self, spec: DecoderSpec, raw: Mapping[str, np.ndarray] | None, canonical: dict | None = None):
        self.spec, self.raw, self._canonical = spec, raw, canonical

    @classmethod
    def streamed(cls, spec: DecoderSpec, raw: Mapping[str, np.ndarray]) -> BlockWeights:
        """Checks every needed tensor is in ``raw`` (a :class:`ModelLoadError` names the first missing)."""
        names = _NamesOnly(raw)
        canonical_embeddings(spec, names)
        for i in range(spec.num_layers):
            canonical_layer(spec, names, i)
        canonical_final(spec, names, np.zeros((0, 0), np.float32))
        return cls(spec, raw)

    @classmethod
    def in_memory(cls, spec: DecoderSpec, canonical: dict[str, np.ndarray]) -> BlockWeights:
        return cls(spec, None, canonical)

    def embeddings(self) -> dict[str, np.ndarray]:
        if self._canonical is not None:
            return {k: self._canonical[k] for k in ("embed", "pos_embed") if k in self._canonical}
        return canonical_embeddings(self.spec, self.raw)

    def layer(self, i: int) -> dict[str, np.ndarray]:
        if self._canonical is not None:
            prefix = f"layers.{i}."
            return {k: v for k, v in self._canonical.items() if k.startswith(prefix)}
        return canonical_layer(self.spec, self.raw, i)

    def final(self, embed: np.ndarray) -> dict[str, np.ndarray]:
        if self._canonical is not None:
            return {k: v for k, v in self._canonical.items() if k.startswith(("norm.", "lm_head."))}
        return canonical_final(self.spec, self.raw, embed)


class CalibrationStream:
    """ShiftAddLLM's calibration activations, one block at a time: the hidden states of the calibration
    sequences go through block ``i`` (:func:`reshift.llm.reference.block`) and the inputs of that
    block's linears are returned for its fit, then dropped.

    The hidden states propagate through the *float* block (not the just-quantized one): each block is
    fitted to the activations of the original model, so the fits do not depend on each other and are
    exactly those of capturing the whole float forward at once (``calibration_rows``). GPTQ's
    reference code (``llama_sequential`` in IST-DASLab/gptq, Frantar et al. 2023) and ShiftAddLLM's,
    built on it, instead feed block ``i + 1`` the outputs of the already quantized block ``i``; AWQ's
    ``run_awq`` (Lin et al. 2024) passes the float block outputs on, as here.
    """

    def __init__(self, spec: DecoderSpec, calibration: Any, max_rows: int = 512) -> None:
        arr = np.asarray(calibration)
        seqs = [arr] if arr.ndim == 1 else list(arr)
        self.spec, self.max_rows, self.seqs = spec, max_rows, []
        for seq in seqs:
            seq = np.asarray(seq, dtype=np.int64)
            if seq.size == 0 or seq.min() < 0 or seq.max() >= spec.vocab_size:
                from reshift.errors import PassError

                lo, hi = (seq.min(), seq.max()) if seq.size else ("", "(empty)")
                raise PassError(f"calibration token ids must lie in [0, {spec.vocab_size}); got {lo}..{hi}")
            self.seqs.append(seq)
        self._states: list[tuple[np.ndarray, Any, Any]] = []

    def start(self, embeddings: dict[str, np.ndarray]) -> None:
        from reshift.llm.reference import embed

        self._states = [embed(self.spec, embeddings, seq, 0) for seq in self.seqs]

    def _rows(self, capture: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
        """Each linear's rows, concatenated over the sequences; linears that read the same input
        (q/k/v, gate/up) share one array, so their Hessian is computed once."""
        by_input: dict[tuple[int, ...], np.ndarray] = {}
        rows = {}
        for name, parts in capture.items():
            key = tuple(id(p) for p in parts)
            if key not in by_input:
                by_input[key] = np.concatenate(parts)[: self.max_rows]
            rows[name] = by_input[key]
        return rows

    def block(self, i: int, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The rows of block ``i``'s linears; the hidden states move on to block ``i + 1``."""
        from reshift.llm.reference import block

        spec, capture = self.spec, {}
        for j, (x, cos, sin) in enumerate(self._states):
            cache = np.zeros((spec.num_kv_heads, len(x), spec.head_dim), np.float32)
            x = block(spec, weights, i, x, 0, cache, np.zeros_like(cache), cos, sin, capture)
            self._states[j] = (x, cos, sin)
        return self._rows(capture)

    def head(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The rows of ``lm_head`` (the final-normed last position of each sequence)."""
        from reshift.llm.reference import head

        capture: dict[str, list[np.ndarray]] = {}
        for x, _, _ in self._states:
            head(self.spec, weights, x, capture)
        return self._rows(capture)


__all__ = ["BlockWeights", "CalibrationStream", "ModuleTensors", "SafetensorsCheckpoint", "widen"]
