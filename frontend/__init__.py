"""Frontends: turn a torch.nn.Module (via torch.export) or an ONNX model into a reshift IR graph.

Importing this package is cheap; torch and onnx load only when a frontend is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "from_torch": "reshift.frontend.torch",
    "from_onnx": "reshift.frontend.onnx",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
