"""TVM backend: lower reshift's IR to Relax, compile it for a target preset, export a shared library.

This package imports tvm; nothing outside ``codegen/`` and ``runtime/`` may.
"""

from reshift.codegen.tvm.build import BuildResult, build, compile_cuda_kernels, export_library
from reshift.codegen.tvm.lower import LOWERINGS, lower
from reshift.codegen.tvm.targets import TARGET_PRESETS, TargetSpec, describe_host_cpu, resolve_target
from reshift.codegen.tvm.tune import tune, tuning_available

__all__ = [
    "LOWERINGS",
    "TARGET_PRESETS",
    "BuildResult",
    "TargetSpec",
    "build",
    "compile_cuda_kernels",
    "describe_host_cpu",
    "export_library",
    "lower",
    "resolve_target",
    "tune",
    "tuning_available",
]
