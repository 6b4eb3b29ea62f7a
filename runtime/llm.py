"""Run a compiled LLM artifact: prefill, decode steps on a preallocated KV cache, sampling in numpy.

An LLM artifact directory holds ``model.so`` (the Relax VM executable with the ``prefill`` and
``decode`` functions, see ``codegen/tvm/llm.py``), ``weights.npz`` (the weights, packed BCQ codes
included, uploaded once and passed to both functions) and ``llm.json`` (the decoder description,
parameter order, cache shape, checksums and the compile report); a CUDA build adds
``kernels.fatbin``, its kernels compiled ahead of time (``runtime/cuda_kernels.py``). This module needs numpy and the
TVM runtime only: no torch, no transformers, no tokenizer (token ids in, token ids out).
"""

from __future__ import annotations

import json
import platform
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from reshift.errors import ArtifactError, InputError
from reshift.runtime.artifact import check_meta_checksum, normalize_arch, sha256_file, target_arch
from reshift.runtime.llm_batch import BatchGeneration, best_of, split_batch

LLM_META = "llm.json"
LLM_FORMAT = "reshift-llm-1"
SO_FILE = "model.so"
WEIGHTS_FILE = "weights.npz"


def is_llm_artifact(directory: str | Path) -> bool:
    return (Path(directory) / LLM_META).is_file()


def sample_token(
    logits: np.ndarray,
    rng: np.random.Generator,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> int:
    """Greedy argmax, or a draw from ``softmax(logits / temperature)`` restricted to the top-k ids and
    then to the smallest set whose probability reaches ``top_p`` (transformers' order of warpers)."""
    if not do_sample:
        return int(np.argmax(logits))
    if temperature <= 0:
        raise InputError(f"temperature must be > 0 when sampling, got {temperature}")
    z = logits.astype(np.float64) / temperature
    if top_k and top_k < len(z):
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = np.zeros_like(p, dtype=bool)
        keep[order[: int(np.searchsorted(cum, top_p) + 1)]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return int(rng.choice(len(p), p=p))


class LLM(BatchGeneration):
    """A loaded LLM artifact: ``generate`` token ids, or call ``prefill`` / ``decode`` for logits.

    The KV caches (``float32 [layers, kv_heads, max_seq_len, head_dim]`` each) are allocated once
    here and updated in place by every call; ``generate`` starts a new sequence at position 0.
    An artifact compiled with ``max_batch > 1`` also generates several sequences at once
    (``runtime/llm_batch.py``: ``generate`` on a list of prompts, ``prefill_batch`` / ``decode_batch``).
    Calls are serialized by a lock (the VM and the caches are the sequences' state).
    """

    def __init__(self, directory: str | Path, device: str = "cpu", lazy: bool = False):
        self._read_artifact(directory)
        kind, _, index = device.partition(":")
        built_for = built_target(self.meta).get("device_type", "cpu")
        if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
            raise ArtifactError(f"unknown device {device!r}; LLM artifacts run on 'cpu' or 'cuda[:index]'")
        if kind != built_for:
            raise ArtifactError(
                f"{self.path} was built for {built_for} (target {built_target(self.meta).get('name')!r}), not "
                f"{kind}; load it with device={built_for!r} or recompile with reshift.llm.compile(..., target={kind!r})"
            )
        if not runs_here(self.meta):
            raise ArtifactError(foreign_target_message(self.path, self.meta))
        self.device = device
        self._vm = None
        if not lazy:  # lazy: a CUDA build on a machine without a GPU opens the device on first use
            self._open()

    def _open(self) -> None:
        """Open the device, load the executable and upload the weights and the zeroed caches."""
        import tvm
        from tvm.runtime.vm import VirtualMachine

        kind, _, index = self.device.partition(":")
        if kind == "cuda":
            from reshift.runtime.cuda_kernels import register_prebuilt
            from reshift.runtime.module import load_device_runtime

            try:
                load_device_runtime("cuda")
            except ArtifactError as exc:
                raise ArtifactError(f"no CUDA device usable for {self.path}: {exc}") from None
            dev = tvm.cuda(int(index or 0))
            if not dev.exist:
                raise ArtifactError(
                    f"no CUDA device {self.device!r} on this machine: {self.path} is a CUDA artifact "
                    "(it saves and loads anywhere, it runs where an NVIDIA GPU and its driver are)"
                )
            register_prebuilt(self.path, self.meta)  # the kernels nvcc compiled at build time (no compiler here)
        else:
            dev = tvm.cpu()
        self._dev = dev
        self._tvm = tvm
        self._vm = VirtualMachine(tvm.runtime.load_module(str(self.path / SO_FILE)), self._dev)
        self._prefill, self._decode = self._vm["prefill"], self._vm["decode"]
        with np.load(self.path / WEIGHTS_FILE) as weights:
            self._params = [
                tvm.runtime.tensor(np.ascontiguousarray(weights[n]), self._dev) for n in self.meta["params"]
            ]
        shape = self.meta["cache_shape"]
        self.cache_k = tvm.runtime.tensor(np.zeros(shape, np.float32), self._dev)
        self.cache_v = tvm.runtime.tensor(np.zeros(shape, np.float32), self._dev)

    def _read_artifact(self, directory: str | Path) -> None:
        """Read and check ``llm.json`` and the checksums of ``model.so`` and ``weights.npz`` (the remote
        runner shares this and everything below but ``_run``: the generation loop is one code path)."""
        self.path = Path(directory)
        meta_path = self.path / LLM_META
        if not meta_path.is_file():
            raise ArtifactError(
                f"{self.path}: no {LLM_META}; not a reshift LLM artifact (build one with `reshift llm compile`)"
            )
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        except ValueError as exc:
            raise ArtifactError(f"{meta_path} is corrupted ({exc}); recompile the model") from None
        check_meta_checksum(meta_path, self.meta)
        if self.meta.get("format") != LLM_FORMAT:
            raise ArtifactError(f"{meta_path}: format {self.meta.get('format')!r}, this runtime reads {LLM_FORMAT}")
        for name, key in ((SO_FILE, "so_sha256"), (WEIGHTS_FILE, "weights_sha256")):
            f = self.path / name
            if not f.is_file():
                raise ArtifactError(f"{self.path} has no {name}; the artifact is incomplete (recompile it)")
            if sha256_file(f) != self.meta.get(key):
                raise ArtifactError(f"{f} does not match its checksum in {LLM_META}: corrupted or replaced; recompile")
        self.spec = self.meta["spec"]
        self.max_seq_len = int(self.meta["max_seq_len"])
        self.max_batch = int(self.meta.get("max_batch", 1))
        self.vocab_size = int(self.spec["vocab_size"])
        self.pos = 0
        self._lock = threading.Lock()

    # -- description ---------------------------------------------------------------------------
    @property
    def report(self) -> dict[str, Any]:
        return self.meta.get("report", {})

    @property
    def eos_token_id(self) -> list[int]:
        return list(self.spec.get("eos_token_id", []))

    def __repr__(self) -> str:
        return (
            f"<reshift LLM {self.spec['family']} {self.spec['num_layers']} layers, pipeline "
            f"{self.meta.get('pipeline')}, max_seq_len {self.max_seq_len}, {self.path}>"
        )

    def save(self, directory: str | Path) -> Path:
        """Copy the artifact to ``directory`` (a later ``reshift.llm.load`` needs nothing else)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if out.resolve() != self.path.resolve():
            extra = [self.meta["cuda_kernels"]["file"]] if self.meta.get("cuda_kernels") else []
            for name in (SO_FILE, WEIGHTS_FILE, LLM_META, *extra):
                shutil.copyfile(self.path / name, out / name)
        return out

    # -- the two entry points ------------------------------------------------------------------
    def _check_ids(self, ids: Any) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim == 2 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 1 or arr.size == 0:
            raise InputError(f"input_ids must be a non-empty 1-D array (or [1, n]: batch 1), got shape {arr.shape}")
        if arr.dtype.kind not in "iu":
            raise InputError(f"input_ids must be integers, got dtype {arr.dtype}")
        bad = arr[(arr < 0) | (arr >= self.vocab_size)]
        if bad.size:
            raise InputError(
                f"token id {int(bad[0])} is outside the vocabulary [0, {self.vocab_size}) "
                f"({bad.size} such id(s)); check the tokenizer matches this model"
            )
        return arr.astype(np.int32)

    def _check_fits(self, ids: np.ndarray, pos: int) -> None:
        if pos + len(ids) > self.max_seq_len:
            raise InputError(
                f"{pos + len(ids)} tokens do not fit the KV cache of max_seq_len={self.max_seq_len}; "
                "shorten the prompt or recompile with a larger max_seq_len"
            )

    def _run(self, fn: str, ids: np.ndarray, pos: int) -> np.ndarray:
        """Logits ``[vocab]`` of ``fn`` (``"prefill"`` or ``"decode"``) on ``ids`` at ``pos``; advances ``self.pos``."""
        self._check_fits(ids, pos)
        if self._vm is None:
            self._open()
        tvm = self._tvm
        args = [tvm.runtime.tensor(ids, self._dev), tvm.runtime.tensor(np.array([pos], np.int32), self._dev)]
        entry = self._prefill if fn == "prefill" else self._decode
        logits, self.cache_k, self.cache_v = entry(*args, self.cache_k, self.cache_v, *self._params)
        self.pos = pos + len(ids)
        return logits.numpy()[0]

    def prefill(self, input_ids: Any, pos: int = 0) -> np.ndarray:
        """Logits ``[vocab]`` after the prompt ``input_ids`` at positions ``pos..``; fills the cache."""
        ids = self._check_ids(input_ids)
        with self._lock:
            return self._run("prefill", ids, pos)

    def decode(self, token: int) -> np.ndarray:
        """Logits ``[vocab]`` after one more token at the current position (``self.pos``)."""
        ids = self._check_ids([token])
        with self._lock:
            return self._run("decode", ids, self.pos)

    # -- generation ----------------------------------------------------------------------------
    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        stream: Callable[..., Any] | None = None,
        seed: int | None = None,
    ) -> np.ndarray | list[np.ndarray]:
        """The prompt followed by up to ``max_new_tokens`` generated ids (same rank as ``input_ids``).

        ``eos_token_id`` (an id or a list) stops generation after it is produced (``None``: never
        stop early; pass ``llm.eos_token_id`` for the model's own). ``stream`` is called with every
        new id as it is produced. ``seed`` makes sampling reproducible.
        A batch (a list of 1-D prompts, ragged lengths allowed, or a 2-D array of several rows) returns
        a list of 1-D arrays, one per sequence (:meth:`generate_batch`: ``stream(j, id)``, per-sequence end).
        """
        prompts = split_batch(input_ids)
        if prompts is not None and len(prompts) == 1 and self.max_batch < 2:
            # a batch of one needs no batch functions: the batch-1 path, the batch's return type
            stream1 = None if stream is None else (lambda token: stream(0, token))
            one = np.asarray(prompts[0])
            if one.dtype == object or one.ndim != 1:
                raise InputError(f"sequence 0: a prompt must be 1-D token ids, got shape {one.shape}")
            return [
                self.generate(one, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, stream1, seed)
            ]
        if prompts is not None:
            return self.generate_batch(
                prompts, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, stream, seed
            )
        prompt = self._check_ids(input_ids)
        if len(prompt) > self.max_seq_len:
            raise InputError(
                f"the prompt has {len(prompt)} tokens, more than max_seq_len={self.max_seq_len}; "
                "shorten it or recompile with a larger max_seq_len"
            )
        if len(prompt) + max_new_tokens > self.max_seq_len:
            raise InputError(
                f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={self.max_seq_len}"
            )
        stops = set() if eos_token_id is None else {int(e) for e in np.atleast_1d(eos_token_id)}
        rng = np.random.default_rng(seed)
        out: list[int] = []
        with self._lock:
            logits = self._run("prefill", prompt, 0)
            for step in range(max_new_tokens):
                token = sample_token(logits, rng, do_sample, temperature, top_k, top_p)
                out.append(token)
                if stream is not None:
                    stream(token)
                if token in stops or step == max_new_tokens - 1:
                    break
                logits = self._run("decode", np.array([token], np.int32), self.pos)
        result = np.concatenate([prompt, np.array(out, np.int32)]).astype(np.int64)
        return result[None] if np.asarray(input_ids).ndim == 2 else result

    def benchmark(self, prompt_len: int = 128, new_tokens: int = 32, repeat: int = 3) -> dict[str, float]:
        """Prefill and decode tokens/s (best of ``repeat``) on random in-vocabulary ids."""
        rng = np.random.default_rng(0)
        prompt = rng.integers(0, self.vocab_size, prompt_len).astype(np.int32)
        prompt_len = min(prompt_len, self.max_seq_len - new_tokens)
        prompt = prompt[:prompt_len]
        best_prefill, best_decode = best_of(
            lambda: self.prefill(prompt), lambda logits: self.decode(int(np.argmax(logits))), new_tokens, repeat
        )
        return {
            "prompt_tokens": prompt_len,
            "new_tokens": new_tokens,
            "prefill_tokens_per_s": prompt_len / best_prefill,
            "decode_tokens_per_s": new_tokens / best_decode,
            "prefill_ms": best_prefill * 1e3,
            "decode_ms_per_token": best_decode * 1e3 / new_tokens,
        }


def built_target(meta: dict[str, Any]) -> dict[str, Any]:
    """``{"name", "tvm_target", "device_type"}`` of an artifact (early ones stored the bare TVM dict)."""
    target = meta.get("target") or {}
    if "tvm_target" in target:
        return target
    return {"name": "cpu", "tvm_target": target, "device_type": "cpu"}


def runs_here(meta: dict[str, Any]) -> bool:
    """Whether the artifact's code is for this machine's CPU architecture (an arm64 build is not, on x86)."""
    arch = target_arch(built_target(meta))
    return arch is None or arch == normalize_arch(platform.machine())


def foreign_target_message(path: str | Path, meta: dict[str, Any]) -> str:
    target = built_target(meta)
    arch, host = target_arch(target), normalize_arch(platform.machine())
    return (
        f"{path} was built for target {target.get('name')!r} ({arch}) but this machine is {host}; run it on an "
        f"{arch} device over TVM RPC (`reshift generate {path} --remote HOST:PORT`, or "
        "reshift.runtime.llm_remote.connect_llm), or recompile it with target='cpu'"
    )


def load(directory: str | Path, device: str = "cpu") -> LLM:
    """Load an LLM artifact written by ``reshift.llm.compile(...).save(dir)`` / ``reshift llm compile``."""
    path = Path(directory)
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such LLM artifact directory (create one with `reshift llm compile`)")
    return LLM(path, device)
