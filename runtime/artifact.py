"""The compiled artifact on disk: a directory with ``model.so`` and ``meta.json``.

    out_dir/
      model.so     TVM Relax VM executable (``export_library``); the weights are constants in
                   the executable's constant pool, so the .so is self-contained (no params file)
      meta.json    what the runtime needs to check and call it, see :func:`make_meta`
      kernels.fatbin  CUDA targets only: the kernels compiled ahead of time (runtime/cuda_kernels.py)

``meta.json`` holds: ``format`` (layout version), ``reshift_version``, ``tvm_version``, ``name``,
``inputs``/``outputs`` (``{"name", "shape", "dtype"}``; a symbolic dim is a string such as
``"N"`` or ``"197*N"``), ``target`` (``name``, ``tvm_target`` dict, ``device_type``),
``pipeline``, ``graph_sha256`` (sha256 of the source graph's text form with full weights),
``so_sha256`` (sha256 of model.so, checked on load), ``created`` (UTC, ISO 8601), for CUDA
``cuda_kernels`` (``file``, ``sha256``, ``bytes`` and the ``source_sha256`` it was compiled from,
checked on load) and ``meta_sha256``: the sha256 of meta.json's own content without this key
(:func:`meta_checksum`), so an edited or corrupted meta.json is refused on load; a meta.json swapped
in from another artifact is refused by ``so_sha256``. The weights are inside model.so, so these
checksums cover every file the runtime reads.

This module needs only the standard library (the runtime imports neither torch nor onnx).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import re
from pathlib import Path
from typing import Any

from reshift.errors import ArtifactError

FORMAT_VERSION = 1
SO_NAME = "model.so"
META_NAME = "meta.json"
META_CHECKSUM_KEY = "meta_sha256"
REQUIRED_KEYS = ("format", "inputs", "outputs", "target", "so_sha256")

# normalized CPU architecture names (platform.machine() and LLVM triple prefixes)
_ARCH_ALIASES = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "x64": "x86_64",
    "aarch64": "aarch64",
    "arm64": "aarch64",
    "armv8": "aarch64",
    "riscv64": "riscv64",
}
_SYMBOLIC_DIM = re.compile(r"^(?:(\d+)\*)?([A-Za-z_][A-Za-z0-9_]*(?:\*[A-Za-z_][A-Za-z0-9_]*)*)$")  # k*N*S


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def value_spec(graph: Any, value: Any) -> dict[str, Any]:
    """``{"name", "shape", "dtype"}`` of a graph input or output, named as the model names it."""
    shape = [d if isinstance(d, str) else int(d) for d in value.shape]
    return {"name": graph.user_name(value), "shape": shape, "dtype": value.dtype}


def symbol_bounds(graph: Any) -> dict[str, Any]:
    """``{"symbol_bounds": {...}}`` when the graph bounds a symbol (checked by the runtime), else ``{}``."""
    bounds = getattr(graph, "symbol_bounds", None)
    return {"symbol_bounds": {k: int(v) for k, v in bounds.items()}} if bounds else {}


def make_meta(
    graph: Any,
    target: Any,
    pipeline: str,
    so_path: str | Path,
    source_graph_text: str | None = None,
) -> dict[str, Any]:
    """The meta.json content for a built graph (``target`` is a codegen ``TargetSpec``)."""
    from reshift import __version__

    try:
        import tvm

        tvm_version = tvm.__version__
    except Exception:  # the version is informative only
        tvm_version = None
    return {
        "format": FORMAT_VERSION,
        "reshift_version": __version__,
        "tvm_version": tvm_version,
        "name": graph.name,
        "inputs": [value_spec(graph, v) for v in graph.inputs],
        "outputs": [value_spec(graph, v) for v in graph.outputs],
        "target": target_dict(target),
        "pipeline": pipeline,
        **symbol_bounds(graph),
        "graph_sha256": sha256_text(source_graph_text) if source_graph_text is not None else None,
        "so_sha256": sha256_file(so_path),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def target_dict(target: Any) -> dict[str, Any]:
    """A JSON-able description of a codegen ``TargetSpec`` (or an already made dict)."""
    if isinstance(target, dict):
        return dict(target)
    tvm_target = getattr(target, "tvm_target", None)
    if tvm_target is not None and not isinstance(tvm_target, dict):
        tvm_target = dict(tvm_target.export()) if hasattr(tvm_target, "export") else {"repr": str(tvm_target)}
    device_type = getattr(target, "device_type", None)
    return {
        "name": getattr(target, "name", str(target)),
        "tvm_target": _jsonable(tvm_target or {}),
        "device_type": device_name(device_type, tvm_target or {}),
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def device_name(device_type: Any, tvm_target: dict[str, Any]) -> str:
    """``"cpu"``, ``"cuda"``, ... from a TargetSpec's device_type (name or DLPack code) or the target kind."""
    codes = {1: "cpu", 2: "cuda", 4: "opencl", 8: "metal", 10: "rocm", 14: "vulkan"}
    if isinstance(device_type, str) and device_type:
        return "cpu" if device_type in ("llvm", "c") else device_type
    if isinstance(device_type, int) and device_type in codes:
        return codes[device_type]
    kind = tvm_target.get("kind", "llvm") if isinstance(tvm_target, dict) else "llvm"
    return "cpu" if kind in ("llvm", "c") else str(kind)


def meta_checksum(meta: dict[str, Any]) -> str:
    """sha256 of a meta dict's canonical JSON without its ``meta_sha256`` key (what write_meta stores)."""
    content = {k: v for k, v in meta.items() if k != META_CHECKSUM_KEY}
    return sha256_text(json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=True))


def write_meta(directory: str | Path, meta: dict[str, Any], name: str = META_NAME) -> Path:
    """Write meta.json (or ``name``) with its own checksum (``meta_sha256``) added; ``meta`` is not changed."""
    path = Path(directory) / name
    content = json.loads(json.dumps(meta))  # the form read_meta will see (tuples -> lists, keys -> str)
    content[META_CHECKSUM_KEY] = meta_checksum(content)
    path.write_text(json.dumps(content, indent=2) + "\n")
    return path


def check_meta_checksum(path: Path, meta: dict[str, Any]) -> None:
    """ArtifactError when meta.json was edited after it was written (artifacts without the key pass)."""
    stored = meta.get(META_CHECKSUM_KEY)
    if stored is None:
        return
    actual = meta_checksum(meta)
    if actual != stored:
        raise ArtifactError(
            f"{path} does not match its own checksum ({META_CHECKSUM_KEY} {str(stored)[:12]}..., content "
            f"{actual[:12]}...): it was edited or corrupted after `reshift compile` wrote it; recompile the model"
        )


def read_meta(directory: str | Path) -> dict[str, Any]:
    """meta.json of an artifact directory, checked for the keys the runtime needs."""
    directory = Path(directory)
    if not directory.exists():
        raise ArtifactError(f"{directory}: no such artifact directory (create one with `reshift compile`)")
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is a file; an artifact is a directory holding {SO_NAME} and {META_NAME}")
    path = directory / META_NAME
    if not path.is_file():
        raise ArtifactError(f"{directory} has no {META_NAME}; it is not a reshift artifact (recompile it)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is corrupted ({exc}); recompile the model") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path} is corrupted (not a JSON object); recompile the model")
    check_meta_checksum(path, meta)
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ArtifactError(f"{path} is corrupted: missing {', '.join(missing)}; recompile the model")
    if meta["format"] != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has artifact format {meta['format']!r}, this runtime reads format {FORMAT_VERSION}; "
            "recompile the model with this reshift version"
        )
    for key in ("inputs", "outputs"):
        specs = meta[key]
        if not isinstance(specs, list) or not all(
            isinstance(s, dict) and {"name", "shape", "dtype"} <= set(s) and isinstance(s["shape"], list) for s in specs
        ):
            raise ArtifactError(f"{path} is corrupted: {key!r} must be a list of {{name, shape, dtype}}")
        for spec in specs:
            for dim in spec["shape"]:
                if not (isinstance(dim, int) or (isinstance(dim, str) and _SYMBOLIC_DIM.match(dim))):
                    raise ArtifactError(f"{path} is corrupted: {key} {spec['name']!r} has dimension {dim!r}")
    if not isinstance(meta["target"], dict):
        raise ArtifactError(f"{path} is corrupted: 'target' must be an object")
    return meta


def verify_so(directory: str | Path, meta: dict[str, Any]) -> Path:
    """Path of model.so after checking it exists and matches the checksum in meta.json."""
    so = Path(directory) / SO_NAME
    if not so.is_file():
        raise ArtifactError(f"{Path(directory)} has no {SO_NAME}; the artifact is incomplete (recompile it)")
    actual = sha256_file(so)
    if actual != meta["so_sha256"]:
        raise ArtifactError(
            f"{so} does not match its checksum in {META_NAME} (sha256 {actual[:12]}..., expected "
            f"{str(meta['so_sha256'])[:12]}...): the file is corrupted or was replaced; recompile the model"
        )
    return so


def normalize_arch(name: str) -> str:
    name = name.lower()
    return _ARCH_ALIASES.get(name, name)


def target_arch(target: dict[str, Any]) -> str | None:
    """CPU architecture a target's code runs on (from ``mtriple``), None for the host default."""
    tvm_target = target.get("tvm_target") or {}
    host = tvm_target.get("host") if isinstance(tvm_target.get("host"), dict) else None
    triple = tvm_target.get("mtriple") or (host or {}).get("mtriple")
    if not triple:
        return None
    return normalize_arch(str(triple).split("-")[0])


def check_target(meta: dict[str, Any], device: str, directory: str | Path = "") -> None:
    """ArtifactError if the artifact was built for another device kind or CPU architecture."""
    target = meta["target"]
    built_for = target.get("device_type") or device_name(None, target.get("tvm_target") or {})
    wanted = device.split(":")[0]
    name = target.get("name", built_for)
    if built_for != wanted:
        raise ArtifactError(
            f"{directory or 'artifact'} was built for target {name!r} ({built_for}) and cannot run on device "
            f"{device!r}; load it with device={built_for!r} on a machine that has one, or recompile with "
            f"--target {wanted}"
        )
    arch = target_arch(target)
    host = normalize_arch(platform.machine())
    if built_for == "cpu" and arch is not None and arch != host:
        raise ArtifactError(
            f"{directory or 'artifact'} was built for target {name!r} ({arch}) but this machine is {host}; "
            f"run it on an {arch} device (or over RPC), or recompile with --target cpu"
        )


def split_dim(dim: int | str) -> tuple[int, str | None]:
    """``7 -> (7, None)``, ``"4*N" -> (4, "N")``, ``"4*N*S" -> (4, "N*S")`` (the IR's dims, without the IR)."""
    if isinstance(dim, int):
        return dim, None
    match = _SYMBOLIC_DIM.match(dim)
    if match is None:
        raise ArtifactError(f"malformed dimension {dim!r} in meta.json")
    return int(match.group(1) or 1), match.group(2)
