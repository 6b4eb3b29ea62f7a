"""Run an LLM artifact on a remote device over TVM RPC: the same prefill/decode and generation loop.

    llm = connect_llm("out_arm64", rpc="127.0.0.1:9090")   # or tracker="HOST:PORT", key="reshift-edge"
    ids = llm.generate(prompt_ids, max_new_tokens=32)      # numpy in, numpy out, as reshift.llm.load's
    llm.close()

``model.so`` is checked against the device's architecture and uploaded (``remote.load_library``,
shared with graph artifacts), the weights are copied to the device once, and the KV caches are
allocated there. Every ``prefill``/``decode`` step is one bounded call (``rpc_session.py``): the
token ids and the position go to the device, the VM function runs there on the device's tensors
and only the logits ``[vocab]`` come back; sampling stays on the host. The VM function is called
directly, not through ``set_input``/``invoke_stateful``: over RPC ``set_input`` receives tensors as
``DLTensor*`` and copies every one of them (``ConvertArgToDevice`` in TVM's ``vm.cc``), which would
copy all weights and both caches per token, while a direct call runs on them in place. The
returned tuple stays on the device (an ``RPCObjectRef``); ``ffi.ArrayGetItem`` fetches the logits.
:class:`RemoteLLM` is an :class:`~reshift.runtime.llm.LLM` whose ``_run`` is remote, so
``generate``, ``prefill``, ``decode`` and ``benchmark`` are the local code. Needs numpy and the
TVM runtime only.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from reshift.errors import InputError
from reshift.runtime.llm import LLM, SO_FILE, WEIGHTS_FILE, built_target
from reshift.runtime.remote import SECONDS_PER_MB, bounded, connect, load_library
from reshift.runtime.rpc_session import DEFAULT_TIMEOUT, BoundedSession

__all__ = ["RemoteLLM", "connect_llm"]


class RemoteLLM(LLM):
    """An LLM artifact loaded on a remote device (``remote``: a session from ``remote.connect``).

    ``where`` names the device in messages. The device's KV caches are allocated uninitialized:
    attention reads only positions below ``pos + n``, which the step's KV append writes first.
    """

    def __init__(self, directory: str | Path, remote: Any, where: str | None = None):
        import tvm
        from tvm.runtime.vm import VirtualMachine  # not tvm.relax: that needs the compiler library

        self._read_artifact(directory)
        self.session: BoundedSession = bounded(remote, where or "the device")
        self.where = where or self.session.where
        self.device = "cpu"
        so = self.path / SO_FILE
        upload_name = f"reshift-llm-{str(self.meta['so_sha256'])[:16]}.so"
        rexec = load_library(self.session, self.path, so, built_target(self.meta), upload_name, self.where)
        self._tvm = tvm
        self._dev = self.session.session.cpu()
        self._vm = self.session.call("creating the VM", VirtualMachine, rexec, self._dev)
        self._entry, self._item = self.session.call("looking up prefill and decode", self._functions)
        with np.load(self.path / WEIGHTS_FILE) as weights:
            arrays = [np.ascontiguousarray(weights[n]) for n in self.meta["params"]]
        megabytes = sum(a.nbytes for a in arrays) / 1e6
        bound = self.session.timeout + SECONDS_PER_MB * megabytes
        self._params = self.session.call(f"uploading the weights ({megabytes:.1f} MB)", self._send, arrays, bound=bound)
        self.cache_k, self.cache_v = self.session.call("allocating the KV caches", self._alloc_caches)
        self._token, self._pos = self.session.call("allocating the step inputs", self._alloc_inputs)
        self._seconds_per_token = {"prefill": 0.0, "decode": 0.0}  # slowest seen: part of later bounds

    def __repr__(self) -> str:
        return f"<reshift remote LLM {self.spec['family']} on {self.where}, {self.path}>"

    def close(self) -> None:
        """End the RPC session (the device is free for the next client); later calls raise DeviceError."""
        self.session.close()

    def __enter__(self) -> RemoteLLM:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def check_batch(self, prompts: Any, max_new_tokens: int = 0) -> list[np.ndarray]:
        """Several sequences at once run only locally in this version (``llm_batch.py`` calls the local VM)."""
        rows = super().check_batch(prompts, max_new_tokens)  # the artifact's own refusals (max_batch) first
        raise InputError(
            f"{len(rows)} sequences given: batch generation over RPC is not supported in this version; "
            f"generate one prompt at a time on {self.where}"
        )

    def _functions(self) -> tuple[dict[str, Any], Any]:
        entry = {fn: self._vm.module[fn] for fn in ("prefill", "decode")}
        return entry, self.session.session.get_function("ffi.ArrayGetItem")

    def _send(self, arrays: list[np.ndarray]) -> list[Any]:
        return [self._tvm.runtime.tensor(a, self._dev) for a in arrays]

    def _alloc_caches(self) -> tuple[Any, Any]:
        shape = tuple(self.meta["cache_shape"])
        return tuple(self._tvm.runtime.empty(shape, "float32", self._dev) for _ in range(2))

    def _alloc_inputs(self) -> tuple[Any, Any]:
        return tuple(self._tvm.runtime.empty((1,), "int32", self._dev) for _ in range(2))

    def _step(self, fn: str, ids: np.ndarray, pos: int) -> np.ndarray:
        """One remote call of ``fn``: inputs to the device, run there in place, the logits back."""
        if len(ids) == 1:  # a decode step: the preallocated one-token inputs (a copy, not an allocation)
            self._token.copyfrom(ids)
            tokens = self._token
        else:
            tokens = self._tvm.runtime.tensor(ids, self._dev)
        self._pos.copyfrom(np.array([pos], np.int32))
        result = self._entry[fn](tokens, self._pos, self.cache_k, self.cache_v, *self._params)
        return self._item(result, 0).numpy()[0]

    def _run(self, fn: str, ids: np.ndarray, pos: int) -> np.ndarray:
        self._check_fits(ids, pos)
        bound = self.session.timeout + 2 * len(ids) * self._seconds_per_token[fn]
        start = time.monotonic()
        what = f"running {fn} on {len(ids)} token(s) at position {pos}"
        logits = self.session.call(what, self._step, fn, ids, pos, bound=bound)
        per_token = (time.monotonic() - start) / len(ids)
        self._seconds_per_token[fn] = max(self._seconds_per_token[fn], per_token)
        self.pos = pos + len(ids)
        return logits


def connect_llm(
    directory: str | Path,
    rpc: str | None = None,
    tracker: str | None = None,
    key: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> RemoteLLM:
    """Connect to a device (``rpc`` HOST:PORT, or a ``key`` device from ``tracker``) and load the LLM there."""
    session = connect(rpc=rpc, tracker=tracker, key=key, timeout=timeout)
    try:
        return RemoteLLM(directory, session)
    except BaseException:
        session.close()  # the device's server takes its next client at once
        raise
