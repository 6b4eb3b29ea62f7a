"""Opset upgrade on import: models below opset 13 are rewritten by ``onnx.version_converter``.

reshift's ONNX converters implement the opset 13..21 semantics (``Split``/``Squeeze`` axes as
inputs, ``Resize`` scales, ...). Older models (opset 6..12, as the model zoo, the ONNX package's
backend tests and many PyPI wheels ship them) are converted to :data:`UPGRADE_TO` first; the
graph's ``notes`` say so. Where the converter fails, the error names the opset and the
converter's complaint (usually the op that has no adapter), and says how to convert the model.
"""

from __future__ import annotations

import onnx
from onnx import version_converter

from reshift.errors import ModelLoadError

OLDEST_OPSET = 1
UPGRADE_TO = 13


def default_opset(proto: onnx.ModelProto) -> int | None:
    """The model's default-domain (``""`` or ``ai.onnx``) opset version, None when it imports none."""
    opsets = {entry.domain: entry.version for entry in proto.opset_import}
    return opsets.get("", opsets.get("ai.onnx"))


def upgrade_opset(proto: onnx.ModelProto, source: str) -> tuple[onnx.ModelProto, str | None]:
    """``(model, note)``: the model converted to opset :data:`UPGRADE_TO` when it is older, else as is."""
    opset = default_opset(proto)
    if opset is None or opset >= UPGRADE_TO:
        return proto, None
    if opset < OLDEST_OPSET:
        raise ModelLoadError(
            f"{source}: opset {opset} is older than reshift reads (opset {OLDEST_OPSET} and newer); "
            f"re-export the model with a current exporter, e.g. torch.onnx.export(..., opset_version=17)"
        )
    try:
        upgraded = version_converter.convert_version(proto, UPGRADE_TO)
    except Exception as exc:  # noqa: BLE001 -- the converter raises RuntimeError/ValueError/C++ errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"{source}: opset {opset} could not be upgraded to {UPGRADE_TO} by onnx.version_converter "
            f"({first}); convert it with another tool or re-export it with opset_version >= {UPGRADE_TO}"
        ) from None
    upgraded_opset = default_opset(upgraded)
    if upgraded_opset != UPGRADE_TO:
        raise ModelLoadError(f"{source}: onnx.version_converter left opset {upgraded_opset}, not {UPGRADE_TO}")
    return upgraded, f"upgraded from opset {opset} to {UPGRADE_TO} with onnx.version_converter"
