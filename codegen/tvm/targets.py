"""Target presets: a short name (``cpu``, ``arm64``, ``cuda-sm90``, ...) to a TVM target dict.

A preset also says how to link the artifact (a cross compiler for arm64) and which device the
runtime must open. Experts may pass a raw TVM target dict (``{"kind": "llvm", ...}``) instead.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from reshift.errors import CodegenError

ARM64_CROSS_COMPILER = "aarch64-linux-gnu-gcc"


@dataclass(frozen=True)
class TargetSpec:
    """A resolved target: the TVM target dict, the linker for export and the runtime device."""

    name: str
    tvm_target: dict[str, Any] = field(hash=False)
    cross_compiler: str | None = None
    device_type: str = "cpu"  # "cpu" or "cuda": what runtime.load must open

    @property
    def is_gpu(self) -> bool:
        return self.device_type == "cuda"

    def target(self):
        """The ``tvm.target.Target`` (tvm.compile rejects plain dicts, see NOTES_tvm.md §0)."""
        import tvm

        return tvm.target.Target(self.tvm_target)


def _cpuinfo() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo (empty off Linux)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    if info:
                        break
                    continue
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def host_cpu_flags() -> set[str]:
    return set(_cpuinfo().get("flags", "").split())


def _physical_cores() -> int:
    """Cores this process may use (affinity-aware); TVM needs it as the target's ``num-cores``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@functools.lru_cache(maxsize=1)
def host_mcpu() -> str:
    """LLVM's name for the host CPU (``'emeraldrapids'``), or ``'generic'`` if LLVM cannot tell."""
    try:
        from tvm.target import codegen

        return str(codegen.llvm_get_system_cpu()) or "generic"
    except Exception:  # noqa: BLE001 -- detection must never break a build
        return "generic"


def describe_host_cpu() -> str:
    """One line for benchmark reports: model name, LLVM cpu, vector ISA features, cores."""
    info = _cpuinfo()
    flags = host_cpu_flags()
    features = [
        label for flag, label in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "VNNI")) if flag in flags
    ]
    if "asimd" in flags:
        features.append("NEON")
    model = info.get("model name") or info.get("Hardware") or "unknown CPU"
    return f"{model} (llvm mcpu={host_mcpu()}; {', '.join(features) or 'no AVX2/AVX-512'}; {_physical_cores()} cores)"


def _cpu() -> dict[str, Any]:
    target: dict[str, Any] = {"kind": "llvm", "num-cores": _physical_cores()}
    mcpu = host_mcpu()
    if mcpu != "generic":
        target["mcpu"] = mcpu
    flags = host_cpu_flags()
    mattr = [f"+{flag}" for flag in ("avx2", "avx512f", "avx512vnni") if flag.replace("vnni", "_vnni") in flags]
    if mattr and mcpu == "generic":  # LLVM did not recognise the CPU: keep the vector ISA anyway
        target["mattr"] = mattr
    return target


def _arm64() -> dict[str, Any]:
    return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 4}


def _arm64_dotprod() -> dict[str, Any]:
    """Armv8.2-A with the dot-product extension (``sdot``/``udot``): Cortex-A55/A76/A78, Raspberry Pi 5,
    Jetson Orin's CPU. The int8 GEMM runs on ``sdot`` there (``kernels/int8_gemm.py``)."""
    return {**_arm64(), "mattr": ["+neon", "+v8.2a", "+dotprod"]}


def _cuda(arch: str | None) -> Callable[[], dict[str, Any]]:
    def make() -> dict[str, Any]:
        return {"kind": "cuda", "arch": arch or local_cuda_arch() or "sm_90", "host": {"kind": "llvm"}}

    return make


def current_target_is_gpu() -> bool:
    """Whether lowering runs under a GPU target (``with target:``); no current target means the host CPU."""
    import tvm

    target = tvm.target.Target.current(allow_none=True)
    return target is not None and ("gpu" in target.keys or target.kind.name != "llvm")


def local_cuda_arch() -> str | None:
    """``sm_XY`` of GPU 0 when this machine has one, else None."""
    try:
        import tvm

        device = tvm.cuda(0)
        if device.exist:
            return "sm_" + str(device.compute_version).replace(".", "")
    except Exception:  # noqa: BLE001 -- no driver, no GPU
        pass
    return None


# name -> (factory of the TVM target dict, cross compiler, device type, description)
TARGET_PRESETS: dict[str, tuple[Callable[[], dict[str, Any]], str | None, str, str]] = {
    "cpu": (_cpu, None, "cpu", "this machine's CPU (LLVM, mcpu detected)"),
    "arm64": (_arm64, ARM64_CROSS_COMPILER, "cpu", "64-bit ARM Linux with NEON, cross-linked"),
    "arm64-dotprod": (_arm64_dotprod, ARM64_CROSS_COMPILER, "cpu", "arm64 with the v8.2 dot product (sdot)"),
    "cuda": (_cuda(None), None, "cuda", "NVIDIA GPU: the local GPU's arch, else sm_90"),
    "cuda-sm80": (_cuda("sm_80"), None, "cuda", "NVIDIA Ampere (A100)"),
    "cuda-sm87": (_cuda("sm_87"), None, "cuda", "NVIDIA Jetson Orin"),
    "cuda-sm90": (_cuda("sm_90"), None, "cuda", "NVIDIA Hopper (H100/H200)"),
}


def resolve_target(target: str | dict[str, Any] | TargetSpec) -> TargetSpec:
    """A preset name or raw TVM target dict -> :class:`TargetSpec`."""
    if isinstance(target, TargetSpec):
        return target
    if isinstance(target, dict):
        return _from_dict(target)
    if not isinstance(target, str) or target not in TARGET_PRESETS:
        known = ", ".join(f"{name} ({entry[3]})" for name, entry in TARGET_PRESETS.items())
        raise CodegenError(
            f"unknown target {target!r}; presets: {known}; or pass a TVM target dict such as {{'kind': 'llvm'}}"
        )
    factory, cross, device, _ = TARGET_PRESETS[target]
    return TargetSpec(target, factory(), cross, device)


def _from_dict(target: dict[str, Any]) -> TargetSpec:
    import tvm

    try:
        tvm.target.Target(dict(target))
    except Exception as exc:  # noqa: BLE001 -- TVM raises ValueError/TVMError for bad configs
        raise CodegenError(f"invalid TVM target {target!r}: {str(exc).strip().splitlines()[0]}") from None
    kind = target.get("kind")
    device = "cuda" if kind in ("cuda", "nvptx") else "cpu"
    cross = None
    triple = str(target.get("mtriple", ""))
    if re.match(r"(aarch64|arm64)", triple) and not _is_host_triple(triple):
        cross = ARM64_CROSS_COMPILER
    return TargetSpec(str(kind), dict(target), cross, device)


def _is_host_triple(triple: str) -> bool:
    return os.uname().machine in triple


def have_cross_compiler(spec: TargetSpec) -> bool:
    return spec.cross_compiler is None or shutil.which(spec.cross_compiler) is not None
