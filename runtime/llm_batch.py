"""Batch N generation on an LLM artifact compiled with ``max_batch = B > 1`` (``batch_prefill`` / ``batch_decode``).

The slotted caches ``float32 [layers, B, kv_heads, max_seq_len, head_dim]`` are allocated on first
use (``B`` times one sequence's cache, beside the batch-1 caches). Sequence ``j`` of a call lives in
slot ``j``. One ``batch`` call prefills every prompt (their tokens packed back to back, ragged
lengths), then each decode step feeds one token per still-running sequence at that sequence's own
position; a sequence that produced an end id leaves the step (its row is no longer sent), so a
finished sequence costs nothing. The linears run on all rows of a call at once: one read of the
weights serves every sequence, which is what batching buys on a memory-bound decode.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from reshift.errors import InputError


def split_batch(input_ids: Any) -> list[Any] | None:
    """The prompts of a batch input, or ``None`` for a single prompt.

    A batch is a list or tuple of prompts (1-D ids, ragged lengths allowed), an object array of them,
    or a 2-D array with several rows; 1-D ids, a ``[1, n]`` array and a list of ints are one prompt."""
    if isinstance(input_ids, np.ndarray):
        if input_ids.dtype == object:
            return list(input_ids)
        return list(input_ids) if input_ids.ndim == 2 and input_ids.shape[0] > 1 else None
    if isinstance(input_ids, (list, tuple)) and any(isinstance(x, (list, tuple, np.ndarray)) for x in input_ids):
        return list(input_ids)
    return None


def best_of(prefill: Callable[[], Any], step: Callable[[Any], Any], new_tokens: int, repeat: int) -> tuple[float, ...]:
    """Best-of-``repeat`` seconds of ``prefill()`` and of ``new_tokens`` greedy ``step(logits)`` calls after it
    (one untimed prefill first); the timing loop of both ``benchmark`` methods."""
    prefill()
    best_prefill = best_decode = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        logits = prefill()
        best_prefill = min(best_prefill, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            logits = step(logits)
        best_decode = min(best_decode, time.perf_counter() - t0)
    return best_prefill, best_decode


class BatchGeneration:
    """``prefill_batch`` / ``decode_batch`` / ``generate_batch`` of :class:`~reshift.runtime.llm.LLM`.

    Uses the loaded artifact's ``_vm``, ``_params``, ``_dev``, ``_tvm``, ``_lock``, ``meta``,
    ``max_batch``, ``max_seq_len`` and ``vocab_size``."""

    _batch_caches: tuple[Any, Any] | None = None
    batch_pos: np.ndarray | None = None

    # -- checks --------------------------------------------------------------------------------
    def check_batch(self, prompts: Sequence[Any], max_new_tokens: int = 0) -> list[np.ndarray]:
        """Every prompt as ``int32 [n_j]``; an :class:`InputError` names the first bad sequence."""
        if self.max_batch < 2:
            raise InputError(
                f"{len(prompts)} sequences given, but this artifact was compiled with max_batch=1; "
                "recompile with max_batch=N (CLI: --max-batch N) or generate one prompt at a time"
            )
        if not 1 <= len(prompts) <= self.max_batch:
            raise InputError(
                f"{len(prompts)} sequences given, this artifact takes 1 to max_batch={self.max_batch}; "
                "split the batch or recompile with a larger max_batch"
            )
        out = []
        for j, prompt in enumerate(prompts):
            try:
                arr = np.asarray(prompt)
            except ValueError:  # a ragged nested list
                arr = np.asarray(prompt, dtype=object)
            if arr.ndim != 1 or arr.size == 0 or arr.dtype == object:
                got = "a nested list" if arr.dtype == object else f"shape {arr.shape}"
                raise InputError(f"sequence {j}: a prompt must be non-empty 1-D token ids, got {got}")
            if arr.dtype.kind not in "iu":
                raise InputError(f"sequence {j}: token ids must be integers, got dtype {arr.dtype}")
            bad = arr[(arr < 0) | (arr >= self.vocab_size)]
            if bad.size:
                raise InputError(
                    f"sequence {j}: token id {int(bad[0])} is outside the vocabulary [0, {self.vocab_size}); "
                    "check the tokenizer matches this model"
                )
            if len(arr) + max_new_tokens > self.max_seq_len:
                raise InputError(
                    f"sequence {j}: prompt ({len(arr)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                    f"max_seq_len={self.max_seq_len}; shorten it or recompile with a larger max_seq_len"
                )
            out.append(arr.astype(np.int32))
        return out

    # -- the batched entry point ---------------------------------------------------------------
    def _slot_caches(self) -> tuple[Any, Any]:
        if self._batch_caches is None:
            shape = self.meta["batch_cache_shape"]
            zeros = np.zeros(shape, np.float32)
            self._batch_caches = (
                self._tvm.runtime.tensor(zeros, self._dev),
                self._tvm.runtime.tensor(zeros, self._dev),
            )
            self.batch_pos = np.zeros(self.max_batch, np.int64)
        return self._batch_caches

    def _run_batch(self, rows: list[np.ndarray], starts: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Sequence ``j``'s tokens ``rows[j]`` at positions ``starts[j]..`` of slot ``slots[j]``; logits ``[b, V]``."""
        lengths = np.array([len(r) for r in rows])
        if int((starts + lengths).max()) > self.max_seq_len:
            j = int(np.argmax(starts + lengths > self.max_seq_len))
            raise InputError(
                f"sequence {j}: {int(starts[j] + lengths[j])} tokens do not fit the KV cache of "
                f"max_seq_len={self.max_seq_len}; shorten it or recompile with a larger max_seq_len"
            )
        ck, cv = self._slot_caches()
        ids = np.concatenate(rows).astype(np.int32)
        where = np.stack(
            [
                np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)]),
                np.repeat(slots, lengths),
            ]
        ).astype(np.int32)
        last = (np.cumsum(lengths) - 1).astype(np.int32)
        tensor = self._tvm.runtime.tensor
        args = [tensor(ids, self._dev), tensor(np.ascontiguousarray(where), self._dev), tensor(last, self._dev)]
        entry = "batch_decode" if lengths.max() == 1 else "batch_prefill"  # GEMV / GEMM for BCQ linears
        logits, ck, cv = self._vm[entry](*args, ck, cv, *self._params)
        self._batch_caches = (ck, cv)
        self.batch_pos[slots] = starts + lengths
        return logits.numpy()

    def prefill_batch(self, prompts: Sequence[Any]) -> np.ndarray:
        """Logits ``[b, vocab]`` after each prompt; sequence ``j`` starts over in slot ``j`` at position 0."""
        rows = self.check_batch(prompts)
        with self._lock:
            self._slot_caches()
            return self._run_batch(rows, np.zeros(len(rows), np.int64), np.arange(len(rows)))

    def decode_batch(self, tokens: Sequence[int], slots: Sequence[int] | None = None) -> np.ndarray:
        """Logits ``[b, vocab]`` after one more token per sequence (slot ``slots[j]``, default ``j``), each at
        its own position (``self.batch_pos``)."""
        slots_arr = np.arange(len(tokens)) if slots is None else np.asarray(slots, np.int64)
        if len(slots_arr) != len(tokens) or slots_arr.size == 0:
            raise InputError(f"decode_batch: {len(tokens)} tokens for {len(slots_arr)} slots; give one token per slot")
        if slots_arr.min() < 0 or slots_arr.max() >= self.max_batch or len(set(slots_arr.tolist())) < len(slots_arr):
            raise InputError(f"decode_batch: slots {slots_arr.tolist()} must be distinct, in [0, {self.max_batch})")
        rows = self.check_batch([[t] for t in tokens])
        with self._lock:
            self._slot_caches()
            return self._run_batch(rows, self.batch_pos[slots_arr], slots_arr)

    # -- generation ----------------------------------------------------------------------------
    def generate_batch(
        self,
        prompts: Sequence[Any],
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        stream: Callable[[int, int], Any] | None = None,
        seed: int | None = None,
    ) -> list[np.ndarray]:
        """Per sequence its prompt followed by up to ``max_new_tokens`` ids (a list of 1-D int64 arrays).

        Options as ``LLM.generate``, applied to every sequence; each stops at its own end id.
        ``stream(j, token)`` is called per new id of sequence ``j``; with ``seed``, sequence ``j`` draws
        from ``default_rng(seed + j)`` (the draws ``generate(prompt_j, seed=seed + j)`` makes)."""
        from reshift.runtime.llm import sample_token

        rows = self.check_batch(prompts, max_new_tokens)
        stops = set() if eos_token_id is None else {int(e) for e in np.atleast_1d(eos_token_id)}
        rngs = [np.random.default_rng(None if seed is None else seed + j) for j in range(len(rows))]
        new: list[list[int]] = [[] for _ in rows]
        active = np.arange(len(rows))
        with self._lock:
            self._slot_caches()
            logits = self._run_batch(rows, np.zeros(len(rows), np.int64), active)
            for step in range(max_new_tokens):
                for r, j in enumerate(active):
                    token = sample_token(logits[r], rngs[j], do_sample, temperature, top_k, top_p)
                    new[j].append(token)
                    if stream is not None:
                        stream(int(j), token)
                active = np.array([j for j in active if new[j][-1] not in stops], np.int64)
                if step == max_new_tokens - 1 or active.size == 0:
                    break
                tokens = [np.array([new[j][-1]], np.int32) for j in active]
                logits = self._run_batch(tokens, self.batch_pos[active], active)
        return [np.concatenate([p, np.array(t, np.int32)]).astype(np.int64) for p, t in zip(rows, new, strict=True)]

    def benchmark_batch(self, batch: int, prompt_len: int = 128, new_tokens: int = 32, repeat: int = 3) -> dict:
        """Prefill and decode tokens/s (best of ``repeat``) of ``batch`` sequences on random in-vocabulary ids."""
        rng = np.random.default_rng(0)
        prompt_len = min(prompt_len, self.max_seq_len - new_tokens)
        prompts = [rng.integers(0, self.vocab_size, prompt_len).astype(np.int32) for _ in range(batch)]
        best_prefill, best_decode = best_of(
            lambda: self.prefill_batch(prompts),
            lambda logits: self.decode_batch([int(t) for t in np.argmax(logits, axis=1)]),
            new_tokens,
            repeat,
        )
        return {
            "batch": batch,
            "prompt_tokens": prompt_len,
            "new_tokens": new_tokens,
            "prefill_tokens_per_s": batch * prompt_len / best_prefill,
            "decode_tokens_per_s": batch * new_tokens / best_decode,
            "decode_tokens_per_s_per_sequence": new_tokens / best_decode,
            "decode_ms_per_step": best_decode * 1e3 / new_tokens,
        }
