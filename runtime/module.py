"""Load a compiled artifact and call it on numpy arrays or torch tensors.

    m = reshift.load("out_dir")          # checks meta.json, the .so checksum and the target
    y = m(x)                             # numpy in -> numpy out; torch in -> torch out (DLPack)
    y1, y2 = m(x=x, mask=mask)           # by name; a tuple when the model has several outputs

This module never imports torch: torch tensors are recognized by their type's module and cross
through ``__dlpack__`` (zero-copy in, zero-copy out via the already imported ``torch.from_dlpack``).
tvm is imported on first load.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from reshift.errors import ArtifactError, InputError
from reshift.runtime.artifact import check_target, read_meta, split_dim, verify_so
from reshift.runtime.cuda_kernels import register_prebuilt

# dtype names of meta.json -> numpy dtypes (bfloat16 resolved lazily through ml_dtypes)
_NUMPY_DTYPES = ("float32", "float16", "int8", "uint8", "int32", "int64", "bool")
_MAX_SIGNATURES = 64  # input signatures remembered as checked
_MAX_STAGING = 32  # staging tensors kept (one per input and shape)
_COPY_BYTES = 1 << 16  # inputs up to this size are copied (~0.3 us) rather than checked for a zero-copy share


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _device_type(x: Any) -> str | None:
    return x.device.type if _is_torch(x) else None


def _bind_slow(names: list[str], args: tuple, kwargs: dict[str, Any]) -> list[Any]:
    """Positional and named inputs in meta order; InputError naming what is extra, doubled or missing."""
    if len(args) > len(names):
        raise InputError(f"model takes {len(names)} input(s) {names}, got {len(args)} positional arguments")
    bound: dict[str, Any] = dict(zip(names, args, strict=False))
    for key, value in kwargs.items():
        if key not in names:
            raise InputError(f"unexpected input {key!r}; the model takes {names}")
        if key in bound:
            raise InputError(f"input {key!r} given both by position and by name")
        bound[key] = value
    missing = [n for n in names if n not in bound]
    if missing:
        raise InputError(f"missing input(s) {missing}; the model takes {names}")
    return [bound[n] for n in names]


def _dtype_name(x: Any) -> str:
    if _is_torch(x):
        return str(x.dtype).removeprefix("torch.")
    return np.asarray(x).dtype.name if not hasattr(x, "dtype") else np.dtype(x.dtype).name


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def tvm_device(device: str):
    """A TVM device from ``"cpu"``, ``"cuda"`` or ``"cuda:1"``."""
    import tvm

    kind, _, index = device.partition(":")
    try:
        return tvm.device(kind, int(index or 0))
    except Exception as exc:
        raise ArtifactError(f"unknown device {device!r} ({exc}); use 'cpu' or 'cuda[:index]'") from None


class LoadedModel:
    """A compiled model ready to run: a Relax VM over the executable plus the artifact's meta.

    Thread safety: one instance may be called from several threads; the calls into the VM are
    serialized by a lock (TVM's VirtualMachine keeps per-call state and crashes when entered
    concurrently). Each kernel already runs on TVM's thread pool over all cores; for calls truly in
    parallel, load the artifact once per thread (separate VMs run concurrently).
    """

    def __init__(self, executable: Any, meta: dict[str, Any], device: str = "cpu", path: str | Path | None = None):
        from tvm.runtime.vm import VirtualMachine  # not tvm.relax: that needs the compiler library

        self.meta = meta
        self.device = device
        self.path = Path(path) if path is not None else None
        self._dev = tvm_device(device)
        try:
            self._vm = VirtualMachine(executable, self._dev)
        except Exception as exc:  # a TVM error here means the module does not fit this device
            raise ArtifactError(
                f"{self.path or 'model'} cannot be initialized on {device}: {type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            ) from None
        self._main = self._vm["main"]
        self._lock = threading.Lock()  # the VM is not reentrant: one call at a time
        self._checked: dict[tuple, None] = {}  # input signatures (dtypes, shapes) that passed _check
        self._staging: dict[tuple, tuple[Any, np.ndarray]] = {}  # (input, shape, dtype) -> (tensor, numpy view)
        self._cpu = self._dev_kind() == "cpu"
        self._input_names = [s["name"] for s in meta["inputs"]]
        self._input_set = set(self._input_names)
        self._output_names = [s["name"] for s in meta["outputs"]]
        import tvm

        self._tvm = tvm  # imported by VirtualMachine above; kept for the per-call path

    def _invoke(self, tensors: list[Any]) -> list[Any]:
        """One VM call under the lock; the outputs are fresh tensors each call, safe to use unlocked."""
        with self._lock:
            return _flatten(self._main(*tensors))

    def _run_numpy(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Bound numpy inputs -> numpy outputs (copies), for a CPU model: the per-call fast path.

        An input that DLPack cannot share (numpy aligns small arrays to 16 bytes, TVM needs 64) is
        copied into a staging tensor kept for its shape instead of a new tensor per call, and the
        outputs are copied out through DLPack; both under the lock, so a staging buffer is never
        rewritten while another call reads it, and no output (which may be a view of an input or a
        constant) aliases memory a later call overwrites.
        """
        with self._lock:
            tensors = [self._stage(index, x) for index, x in enumerate(inputs)]
            outputs = _flatten(self._main(*tensors))
            self._check_count(outputs)
            return [_to_numpy(o) for o in outputs]

    def _stage(self, index: int, x: np.ndarray):
        """A CPU tensor holding ``x``: ``x`` itself when DLPack can share it, else its staging copy."""
        if x.nbytes > _COPY_BYTES and x.flags.c_contiguous and x.ctypes.data % 64 == 0:
            try:
                return self._tvm.runtime.from_dlpack(x)  # zero-copy
            except Exception:  # noqa: BLE001,S110 -- a dtype the DLPack path refuses: copy instead
                pass
        key = (index, x.shape, x.dtype)
        held = self._staging.get(key)
        if held is None:
            if len(self._staging) >= _MAX_STAGING:  # many shapes (a symbolic batch): start over
                self._staging.clear()
            try:
                tensor = self._tvm.runtime.empty(x.shape, x.dtype.name, self._dev)
                held = (tensor, np.from_dlpack(tensor))
            except Exception:  # noqa: BLE001 -- bfloat16 (numpy's DLPack refuses it)
                return self._tvm.runtime.tensor(np.ascontiguousarray(x).reshape(x.shape), self._dev)  # 0-d stays 0-d
            self._staging[key] = held
        np.copyto(held[1], x, casting="equiv")
        return held[0]

    # -- description ---------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [s["name"] for s in self.meta["inputs"]]

    @property
    def output_names(self) -> list[str]:
        return [s["name"] for s in self.meta["outputs"]]

    @property
    def target(self) -> str:
        return self.meta["target"].get("name", "?")

    def __repr__(self) -> str:
        ins = ", ".join(f"{s['name']}: {s['dtype']}{s['shape']}" for s in self.meta["inputs"])
        outs = ", ".join(f"{s['name']}: {s['dtype']}{s['shape']}" for s in self.meta["outputs"])
        return f"<LoadedModel {self.meta.get('name', '')} ({ins}) -> ({outs}) on {self.device}>"

    # -- calling -------------------------------------------------------------------------------
    def bind(self, args: tuple, kwargs: dict[str, Any]) -> list[Any]:
        """Inputs in meta order, checked for names, dtypes and shapes (InputError otherwise)."""
        specs = self.meta["inputs"]
        names = self.__dict__.get("_input_names") or [s["name"] for s in specs]
        if not args and kwargs.keys() == self.__dict__.get("_input_set", set(names)):  # by name (run_dict)
            ordered = [kwargs[n] for n in names]
        elif not kwargs and len(args) == len(names):  # by position
            ordered = list(args)
        else:
            ordered = _bind_slow(names, args, kwargs)
        for i, x in enumerate(ordered):
            if type(x) is not np.ndarray and not _is_torch(x):
                ordered[i] = np.asarray(x)
        # the checks depend only on each input's type, dtype, shape (and device): once per signature
        signature = tuple(
            [
                (x.dtype, x.shape) if type(x) is np.ndarray else (type(x), x.dtype, tuple(x.shape), _device_type(x))
                for x in ordered
            ]
        )
        checked = self.__dict__.setdefault("_checked", {})
        if signature not in checked:
            bindings: dict[str, int] = {}
            for spec, x in zip(specs, ordered, strict=True):
                self._check(spec, x, bindings)
            if len(checked) >= _MAX_SIGNATURES:
                checked.clear()
            checked[signature] = None
        return ordered

    def _check(self, spec: dict[str, Any], x: Any, bindings: dict[str, int]) -> None:
        name, expected = spec["name"], spec["shape"]
        dtype = _dtype_name(x)
        if dtype != spec["dtype"]:
            raise InputError(f"input {name!r}: expected dtype {spec['dtype']}, got {dtype} (cast it first)")
        shape = tuple(int(d) for d in x.shape)
        if len(shape) != len(expected):
            raise InputError(f"input {name!r}: expected shape {expected}, got {list(shape)} (rank differs)")
        for axis, (dim, actual) in enumerate(zip(expected, shape, strict=False)):
            coefficient, symbol = split_dim(dim)
            if symbol is None:
                if actual != coefficient:
                    raise InputError(f"input {name!r}: expected shape {expected}, got {list(shape)} (axis {axis})")
                continue
            if actual % coefficient or actual == 0:
                raise InputError(f"input {name!r}: axis {axis} is {actual}, not a positive multiple of {coefficient}")
            bound = bindings.setdefault(symbol, actual // coefficient)
            if bound != actual // coefficient:
                raise InputError(
                    f"input {name!r}: axis {axis} is {actual}, inconsistent with {symbol}={bound} from another input"
                )
            limit = self.meta.get("symbol_bounds", {}).get(symbol)
            if limit is not None and bound > limit:
                raise InputError(f"input {name!r}: axis {axis} gives {symbol}={bound}; the model takes up to {limit}")
        if _is_torch(x) and x.device.type != self._dev_kind():
            raise InputError(f"input {name!r} is on {x.device}, the model runs on {self.device}; move it first")

    def _dev_kind(self) -> str:
        kind = self.device.split(":")[0]
        return "cpu" if kind in ("cpu", "llvm") else kind

    def _to_tvm(self, x: Any):
        import tvm

        if _is_torch(x):
            x = x.detach()
            if not x.is_contiguous() or x.data_ptr() % 64:  # TVM needs contiguous, 64-byte aligned data
                x = x.clone(memory_format=sys.modules["torch"].contiguous_format)  # torch's allocator aligns
            return tvm.runtime.from_dlpack(x)  # zero-copy
        x = np.ascontiguousarray(x)
        if self._dev_kind() == "cpu" and x.ctypes.data % 64 == 0 and x.size:
            try:
                return tvm.runtime.from_dlpack(x)  # zero-copy
            except Exception:  # alignment or dtype the DLPack path refuses: copy instead
                pass
        return tvm.runtime.tensor(x, self._dev)

    def run(self, inputs: list[Any]) -> list[Any]:
        """Run on already bound inputs; returns the raw TVM output tensors."""
        outputs = self._invoke([self._to_tvm(x) for x in inputs])
        self._check_count(outputs)
        return outputs

    def _check_count(self, outputs: list[Any]) -> None:
        if len(outputs) != len(self.meta["outputs"]):
            raise ArtifactError(
                f"model returned {len(outputs)} output(s), meta.json lists {len(self.meta['outputs'])}; "
                "the artifact is inconsistent (recompile it)"
            )

    def _outputs(self, inputs: list[Any]) -> list[Any]:
        """Bound inputs -> outputs: numpy arrays (copies), or torch tensors when any input is one."""
        if self._cpu and all(type(x) is np.ndarray for x in inputs):
            return self._run_numpy(inputs)
        outputs = self.run(inputs)
        if any(_is_torch(x) for x in inputs):
            torch = sys.modules["torch"]  # the caller passed torch tensors, so torch is imported
            return [torch.from_dlpack(o) for o in outputs]
        return [o.numpy() for o in outputs]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        converted = self._outputs(self.bind(args, kwargs))
        return converted[0] if len(converted) == 1 else tuple(converted)

    def run_dict(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """``{input name: array} -> {output name: numpy array}`` (used by ``reshift run``)."""
        inputs = self.bind((), inputs)
        outputs = self._run_numpy(inputs) if self._cpu else [o.numpy() for o in self.run(inputs)]
        return dict(zip(self._output_names, outputs, strict=False))

    def benchmark(self, *args: Any, repeat: int = 50, warmup: int = 5, **kwargs: Any) -> dict[str, float]:
        """Latency in milliseconds over ``repeat`` calls (inputs bound and converted once)."""
        tensors = [self._to_tvm(x) for x in self.bind(args, kwargs)]
        for _ in range(warmup):
            self._invoke(tensors)
        self._sync()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            self._invoke(tensors)
            self._sync()
            times.append((time.perf_counter() - start) * 1e3)
        return latency_stats(times)

    def _sync(self) -> None:
        if self._dev_kind() != "cpu":
            self._dev.sync()


def latency_stats(times_ms: list[float]) -> dict[str, float]:
    array = np.asarray(times_ms, dtype=np.float64)
    return {
        "median_ms": float(np.median(array)),
        "p90_ms": float(np.percentile(array, 90)),
        "mean_ms": float(array.mean()),
        "min_ms": float(array.min()),
        "repeat": len(times_ms),
    }


def _to_numpy(tensor: Any) -> np.ndarray:
    """A numpy copy of a CPU tensor: through DLPack (~1 us) rather than ``.numpy()`` (~8 us)."""
    try:
        return np.from_dlpack(tensor).copy()
    except Exception:  # noqa: BLE001 -- bfloat16 and other dtypes numpy's DLPack import does not know
        return tensor.numpy()


def _flatten(result: Any) -> list[Any]:
    """A VM result (tensor or nested tuple of tensors) as a flat list of tensors."""
    if hasattr(result, "numpy") or hasattr(result, "__dlpack__"):
        return [result]
    out: list[Any] = []
    for item in result:
        out.extend(_flatten(item))
    return out


# device kind -> TVM runtime sidecar library holding that device's API and module loader
_DEVICE_RUNTIME_LIBS = {"cuda": "tvm_runtime_cuda"}


def load_device_runtime(kind: str) -> None:
    """Load the device's TVM runtime sidecar (``libtvm_runtime_cuda.so``) when ``import tvm`` did not.

    A full TVM loads it at import; a runtime-only TVM (``TVM_USE_RUNTIME_LIB=1``, the edge and GPU
    deployment setting) skips every backend, and a CUDA artifact then fails with "Device API cuda
    is not enabled". Raises :class:`ArtifactError` naming the library when it cannot be loaded.
    """
    name = _DEVICE_RUNTIME_LIBS.get(kind)
    if name is None:
        return
    from tvm.base import _LOADED_LIBS

    if name in _LOADED_LIBS:
        return
    from tvm_ffi.libinfo import load_lib_ctypes

    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS[name] = load_lib_ctypes(
            package="tvm", target_name=name, extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL"
        )
    except (OSError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(
            f"the TVM {kind} runtime (lib{name}.so) cannot be loaded: {reason}; "
            "is the NVIDIA driver (libcuda.so.1) and CUDA runtime (libcudart) on the library path?"
        ) from None


def load(path: str | Path, device: str = "cpu") -> LoadedModel:
    """Load an artifact directory written by ``CompiledModel.save`` / ``reshift compile``.

    Raises :class:`~reshift.errors.ArtifactError` for a missing or corrupted directory, a .so that
    does not match its checksum, or an artifact built for another device or CPU architecture.
    """
    meta = read_meta(path)
    check_target(meta, device, path)
    so = verify_so(path, meta)
    import tvm

    load_device_runtime(device.split(":")[0])
    register_prebuilt(path, meta)
    try:
        executable = tvm.runtime.load_module(str(so))
    except Exception as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"{so} cannot be loaded: {reason}; recompile the model") from None
    return LoadedModel(executable, meta, device, path)
