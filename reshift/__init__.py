"""reshift: a model compiler that fuses branches and turns multiplications into shifts and lookups.

    import reshift
    g = reshift.frontend.from_torch(model, (x,))
    g2, report = reshift.passes.run(g, pipeline="exact")
    outs = reshift.ir.interpret(g2, {"x": x.numpy()})

Submodules load lazily so that ``import reshift.runtime`` on an edge device pulls in neither
torch nor onnx.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("ir", "frontend", "passes", "codegen", "runtime", "errors")
_API = {
    "compile": "reshift.api",
    "load": "reshift.runtime",
    "CompiledModel": "reshift.api",
    "recover": "reshift.recovery",  # the module is not named recover: it would shadow the function
    "RecoveryReport": "reshift.recovery",
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"reshift.{name}")
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'reshift' has no attribute {name!r}")


__all__ = ["__version__", "compile", "load", "recover", "CompiledModel", "RecoveryReport", *_SUBMODULES]
