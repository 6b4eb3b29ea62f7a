"""Ahead-of-time compiled CUDA kernels of an artifact (``kernels.fatbin``), served to TVM at load.

TVM's CUDA build on a machine without a GPU keeps the kernels as CUDA C++ source inside
``model.so``; loading it calls the Python hook ``tvm_callback_cuda_compile(code)``, which in
stock TVM needs NVRTC or nvcc *and* the full compiler library on the GPU machine. reshift instead
compiles the source with nvcc when it saves the artifact (``codegen.tvm.compile_cuda_kernels``)
and writes the fat binary beside ``model.so``; this module registers a hook that returns it for
exactly that source (matched by sha256), so a GPU machine needs only the TVM runtime and the
NVIDIA driver. Source without a prebuilt binary gets a clear error instead of a compiler crash.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from reshift.errors import ArtifactError

KERNELS_NAME = "kernels.fatbin"

# sha256 of the CUDA source -> its fat binary, for every artifact loaded in this process
_PREBUILT: dict[str, bytes] = {}
_HOOK = "tvm_callback_cuda_compile"
_stats = {"served": 0}


def source_sha256(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8")).hexdigest()


def kernels_meta(fatbin: bytes, source: str) -> dict[str, Any]:
    """The ``meta.json`` entry describing an artifact's prebuilt kernels."""
    return {
        "file": KERNELS_NAME,
        "source_sha256": source_sha256(source),
        "sha256": hashlib.sha256(fatbin).hexdigest(),
        "bytes": len(fatbin),
    }


def register_prebuilt(directory: str | Path, meta: dict[str, Any]) -> None:
    """Make the artifact's ``kernels.fatbin`` (if it has one) what TVM gets for its CUDA source."""
    entry = meta.get("cuda_kernels")
    if not entry:
        return
    path = Path(directory) / entry["file"]
    try:
        fatbin = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{path} is missing or unreadable ({exc.strerror}); recompile the model") from None
    if hashlib.sha256(fatbin).hexdigest() != entry["sha256"]:
        raise ArtifactError(f"{path} does not match its checksum in meta.json: corrupted or replaced; recompile")
    _PREBUILT[entry["source_sha256"]] = fatbin
    _install_hook()


def served() -> int:
    """How many CUDA modules were loaded from prebuilt binaries in this process (for checks)."""
    return _stats["served"]


def _compile_hook(code: str) -> bytes:
    fatbin = _PREBUILT.get(source_sha256(code))
    if fatbin is None:
        raise RuntimeError(
            "reshift: this CUDA kernel source has no prebuilt binary (kernels.fatbin) in any loaded "
            "artifact; re-save the artifact on a machine with nvcc (CompiledModel.save compiles it)"
        )
    _stats["served"] += 1
    return fatbin


def _install_hook() -> None:
    """(Re-)register the hook on every load: importing ``tvm.support.nvcc`` later would replace it."""
    import tvm_ffi

    tvm_ffi.register_global_func(_HOOK, _compile_hook, override=True)
