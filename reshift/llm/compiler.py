"""``reshift.llm.compile``: a Hugging Face causal LM to a runnable LLM artifact (prefill + decode).

Steps: config -> :class:`~reshift.llm.config.DecoderSpec`; checkpoint -> canonical float32
weights, streamed one decoder block at a time (``reshift.llm.stream``: block ``i`` is read,
calibrated, fitted and packed, then its float copy is dropped); with ``pipeline="bcq"`` (or
``"ternary"``, ``fit_ternary``) every linear of every block (and ``lm_head`` with
``quantize_lm_head=True``) is fitted by ``reshift.passes.bcq.fit_bcq`` (ShiftAddLLM: weight error,
or output error on captured calibration activations) and packed for the lookup-table GEMV; the
weights become the parameters of one Relax module with ``prefill`` and ``decode``
(``codegen/tvm/llm.py``), built for the target and written with ``weights.npz`` and ``llm.json``.
The result is the runtime's :class:`~reshift.runtime.llm.LLM`, so compiling and loading give the
same object.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from reshift.errors import ArtifactError, InputError, ModelLoadError, PassError
from reshift.llm.config import DecoderSpec, spec_from_config
from reshift.llm.stream import BlockWeights, CalibrationStream, ModuleTensors, SafetensorsCheckpoint
from reshift.llm.weights import canonical_weights, read_config
from reshift.runtime.artifact import sha256_file, target_dict, write_meta
from reshift.runtime.llm import LLM, LLM_FORMAT, LLM_META, SO_FILE, WEIGHTS_FILE, foreign_target_message, runs_here

PIPELINES = ("exact", "bcq", "ternary")
GROUP_SIZE = 128


def open_model(model_or_dir: Any) -> tuple[DecoderSpec, BlockWeights, dict[str, Any]]:
    """``(spec, weights to stream one block at a time, config dict)`` of a transformers module or a
    local HF directory; every tensor the config needs is checked to exist, none is read yet."""
    if isinstance(model_or_dir, (str, Path)):
        path = Path(model_or_dir)
        if not path.is_dir():
            raise ModelLoadError(f"{path}: not a directory; give a local Hugging Face model directory or a module")
        config = read_config(path)
        spec = spec_from_config(config)  # an unsupported feature is named before the weights are read
        raw: Any = SafetensorsCheckpoint.of_directory(path)
    elif hasattr(model_or_dir, "config") and hasattr(model_or_dir, "state_dict"):
        config, raw = model_or_dir.config.to_dict(), ModuleTensors(model_or_dir)
        spec = spec_from_config(config)
    else:
        raise ModelLoadError(
            "reshift.llm.compile takes a transformers causal LM or a model directory, "
            f"got {type(model_or_dir).__name__}"
        )
    return spec, BlockWeights.streamed(spec, raw), config


def read_model(model_or_dir: Any) -> tuple[DecoderSpec, dict[str, np.ndarray], dict[str, Any]]:
    """``(spec, canonical weights, config dict)`` of a transformers module or a local HF directory,
    every tensor float32 in memory (:func:`open_model` streams them instead)."""
    spec, blocks, config = open_model(model_or_dir)
    return spec, canonical_weights(spec, blocks.raw), config


def calibration_rows(spec: DecoderSpec, weights: dict[str, np.ndarray], calibration: Any, max_rows: int = 512):
    """Inputs of every linear on the calibration token ids (rows of ``[sequences, tokens]`` or 1-D),
    captured block by block (:class:`~reshift.llm.stream.CalibrationStream`) from canonical weights."""
    blocks, stream = BlockWeights.in_memory(spec, weights), CalibrationStream(spec, calibration, max_rows)
    stream.start(blocks.embeddings())
    rows: dict[str, np.ndarray] = {}
    for i in range(spec.num_layers):
        rows.update(stream.block(i, blocks.layer(i)))
    rows.update(stream.head(blocks.final(weights["embed"])))
    return rows


def _alpha_storage(alpha: np.ndarray) -> np.ndarray:
    """Group scales as stored: float16 (the kernels convert) where every scale keeps float16's relative
    precision (finite, normal range), else float32, so a layer with extreme scales stays accurate."""
    a16 = np.asarray(alpha).astype(np.float16)
    tiny = np.finfo(np.float16).tiny
    small = (np.abs(a16) < 2 * tiny) & (np.asarray(alpha) != 0)  # 2x: ternary's halved scales stay normal too
    ok = np.isfinite(a16.astype(np.float32)).all() and not small.any()
    return a16 if ok else np.asarray(alpha, np.float32)


def _stored_bytes(params: dict[str, np.ndarray], fused: str, members: list[int]) -> list[int]:
    """Per member (by its output rows) the bytes its fused linear's parameters hold, padding rows and
    the bias included (the last member takes the padding), so the report sums to the stored arrays."""
    total = sum(params[fused + s].nbytes for s in (".panels", ".words", ".alpha", ".bias") if fused + s in params)
    padded_rows = params[fused + ".bias"].shape[0]
    per_row = total // padded_rows
    shares = [rows * per_row for rows in members]
    shares[-1] += total - sum(shares)
    return shares


def _linear_form(
    spec: DecoderSpec,
    weights: dict[str, np.ndarray],
    fused: str,
    members: list[str],
    quantize: bool,
    bits: int,
    rows: dict[str, np.ndarray] | None,
    params: dict[str, np.ndarray],
    report: list[dict[str, Any]],
    dequantized: dict[str, np.ndarray] | None = None,
    fitter: Any = None,
) -> dict[str, Any]:
    """Prepare one fused linear's parameters (dense ``[in, out]`` or packed BCQ) and its report rows;
    ``fitter(member, q)`` (memoized by bit allocation) returns the member's ``BCQFit``.

    BCQ/ternary scales are stored as float16 (:func:`_alpha_storage`); the dequantized weights, the
    errors and the bytes in the report are those of the stored (rounded) scales."""
    w = np.concatenate([weights[m + ".w"] for m in members])
    has_bias = any(m + ".b" in weights for m in members)
    bias = (
        np.concatenate([weights.get(m + ".b", np.zeros(weights[m + ".w"].shape[0], np.float32)) for m in members])
        if has_bias
        else None
    )
    out_features, in_features = w.shape
    member_rows = [weights[m + ".w"].shape[0] for m in members]
    if not quantize:  # packed 16-column panels for the register-tiled GEMM of kernels/dense_cpu.py
        from reshift.codegen.tvm.kernels.dense_cpu import pack_panels

        params[fused + ".panels"] = pack_panels(w)
        padded = np.zeros(params[fused + ".panels"].shape[0] * 16, np.float32)
        if bias is not None:
            padded[:out_features] = bias
        params[fused + ".bias"] = padded
        for m, stored in zip(members, _stored_bytes(params, fused, member_rows), strict=True):
            o, k = weights[m + ".w"].shape
            report.append(
                {
                    "name": m,
                    "shape": [o, k],
                    "bits": 32,
                    "bits_per_weight": round(8 * stored / (o * k), 3),
                    "weight_error": 0.0,
                    "bytes_fp32": 4 * o * k,
                    "bytes": stored,
                }
            )
        return {"kind": "dense", "out_features": out_features, "in_features": in_features}
    from reshift.codegen.tvm.kernels.lut_gemv import bias_row
    from reshift.codegen.tvm.kernels.packing import pack_bcq, pack_ternary
    from reshift.ir.ops_lowbit import pack_signs, pack_trits, ternary_planes
    from reshift.passes.bcq import BCQFit, fit_bcq, fit_ternary, ternary_dequant

    ternary = bits == 0  # BitNet b1.58 codes {-1, 0, +1}: two sign planes through the same LUT GEMV
    codes, alphas, rows_out = [], [], []
    for m in members:
        wm = weights[m + ".w"]
        x = rows.get(m) if rows else None
        if ternary:
            t, scale = fitter(m, 0) if fitter else fit_ternary(wm, group_size=GROUP_SIZE, x=x)
            scale = _alpha_storage(scale)
            w_hat = ternary_dequant(t, scale.astype(np.float32), GROUP_SIZE)
            codes.append(t)
        else:
            fit = fitter(m, bits) if fitter else fit_bcq(wm, q=bits, group_size=GROUP_SIZE, x=x)
            scale = _alpha_storage(fit.alpha)
            w_hat = BCQFit(fit.codes, scale.astype(np.float64), fit.history).weight(GROUP_SIZE)
            codes.append(fit.codes)
        alphas.append(scale)
        if dequantized is not None:  # the float weights, and the codes for the int8-table decode semantics
            dequantized[m + ".w"] = w_hat.astype(np.float32)
            if ternary:
                planes, alpha_planes = ternary_planes(pack_trits(t), scale.astype(np.float32), wm.shape[1])
            else:
                planes, alpha_planes = (np.asarray(fit.codes) > 0).astype(np.uint8), scale.astype(np.float32)
            dequantized[m + ".planes"], dequantized[m + ".alpha"] = planes, alpha_planes
            dequantized[m + ".group_size"] = np.array(GROUP_SIZE)
        row = {
            "name": m,
            "shape": list(wm.shape),
            "bits": "ternary" if ternary else bits,
            "weight_error": float(np.linalg.norm(wm - w_hat) / max(np.linalg.norm(wm), 1e-30)),
            "bytes_fp32": 4 * wm.size,
        }
        if x is not None:
            ref = x @ wm.T
            row["output_error"] = float(np.linalg.norm(ref - x @ w_hat.T) / max(np.linalg.norm(ref), 1e-30))
        rows_out.append(row)
    # one dtype per fused linear: float16 unless some member's scales needed float32
    alpha_dtype = np.result_type(*[a.dtype for a in alphas]).name
    if ternary:
        trits = pack_trits(np.concatenate(codes))
        words, alpha = pack_ternary(trits, np.concatenate(alphas), GROUP_SIZE, in_features, alpha_dtype)
    else:
        bits_packed = pack_signs(np.concatenate(codes, axis=1))
        words, alpha = pack_bcq(bits_packed, np.concatenate(alphas), GROUP_SIZE, in_features, alpha_dtype)
    params[fused + ".words"] = words
    params[fused + ".alpha"] = alpha
    params[fused + ".bias"] = bias_row(bias, out_features)
    for row, stored in zip(rows_out, _stored_bytes(params, fused, member_rows), strict=True):
        row["bytes"] = stored
        row["bits_per_weight"] = round(8 * stored / (row["shape"][0] * row["shape"][1]), 3)
        report.append(row)
    return {
        "kind": "bcq",
        "out_features": out_features,
        "in_features": in_features,
        "group_size": GROUP_SIZE,
        "bits": bits,
    }


def prepare(
    spec: DecoderSpec,
    weights: dict[str, np.ndarray] | BlockWeights,
    pipeline: str,
    bits: int,
    calibration: Any,
    max_seq_len: int,
    quantize_lm_head: bool,
    dequantized: dict[str, np.ndarray] | None = None,
    progress: Callable[[str, int, int], Any] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, dict], list[dict[str, Any]]]:
    """``(parameters in call order, per fused linear its form, per linear its report row)``;
    ``dequantized`` (if given) receives the BCQ weights as float32 (for checks against the reference) and
    per linear its sign planes ``.planes`` uint8 [q, O, K], scales ``.alpha`` float32 [O, groups, q] and
    ``.group_size`` (the int8-table decode semantics, ``reference.forward(int8_tables=True)``);
    ``progress(name, done, total)`` is called before each fused linear is prepared, and
    ``progress.linear_done(name, report rows, seconds)`` (if it has one) after.

    Block by block: block ``i``'s float weights (``weights`` is a canonical dict, or a
    :class:`~reshift.llm.stream.BlockWeights` that reads them from the checkpoint now), the
    calibration rows of its linears (:class:`~reshift.llm.stream.CalibrationStream`), one Hessian per
    input shared by the linears reading it (q/k/v, gate/up), the fits, the packed parameters; then the
    float copies go. A fractional ``bits`` keeps every fused linear packed at q = 2, 3, 4 until
    :func:`_allocate` has seen them all."""
    from reshift.codegen.tvm.llm import fused_linears

    blocks = weights if isinstance(weights, BlockWeights) else BlockWeights.in_memory(spec, weights)
    lossy = pipeline in ("bcq", "ternary")
    stream = CalibrationStream(spec, calibration) if (lossy and calibration is not None) else None
    allocating = pipeline == "bcq" and float(bits) not in (2.0, 3.0, 4.0)
    planes = 0 if pipeline == "ternary" else int(bits)
    linears = [(f, ms, lossy and (f != "lm_head" or quantize_lm_head)) for f, ms in fused_linears(spec)]
    per_block: dict[int, list] = {}
    for item in linears:
        per_block.setdefault(int(item[0].split(".")[1]) if item[0].startswith("layers.") else -1, []).append(item)

    embeddings = blocks.embeddings()
    head: dict[str, np.ndarray] = dict(embeddings)
    if spec.rotary_dim:
        head["rope.cos"], head["rope.sin"] = spec.rope_tables(max_seq_len)
    norms: dict[str, np.ndarray] = {}
    done: dict[str, tuple] = {}  # fused -> (params, form, report rows), or per q when allocating
    sensitivities = []
    if stream is not None:
        stream.start(embeddings)
    for i in [*range(spec.num_layers), -1]:
        w = blocks.layer(i) if i >= 0 else blocks.final(embeddings["embed"])
        norms.update({k: v for k, v in w.items() if ".norm" in k or k.startswith("norm.")})
        rows = None
        if stream is not None:
            rows = stream.block(i, w) if i >= 0 else stream.head(w)
        for fused, members, quantize in per_block.get(i, []):
            if progress is not None:
                progress(fused, len(done), len(linears))
            t0 = time.perf_counter()
            fitter = _Fitter(w, rows)
            choices = (2, 3, 4) if allocating and quantize else (planes,)
            done[fused] = {}
            for q in choices:
                p_q, r_q, d_q = {}, [], {} if dequantized is not None else None
                form = _linear_form(spec, w, fused, members, quantize, q, rows, p_q, r_q, d_q, fitter)
                for r in r_q:
                    r["seconds"] = round(fitter.seconds.get(r["name"], 0.0), 3)
                done[fused][q] = (p_q, form, r_q, d_q)
            if allocating and quantize:
                sensitivities.append(fitter.sensitivity(fused, members))
            fitter.release()
            if progress is not None and hasattr(progress, "linear_done"):
                progress.linear_done(fused, [r for c in done[fused].values() for r in c[2]], time.perf_counter() - t0)
        del w, rows

    chosen = _allocate(sensitivities, float(bits)) if allocating else {}
    params = {**head, **{k: norms[k] for k in sorted(norms)}}
    forms: dict[str, dict] = {}
    report: list[dict[str, Any]] = []
    for fused, _, _ in linears:
        candidates = done.pop(fused)
        p_q, forms[fused], r_q, d_q = candidates[chosen.get(fused, next(iter(candidates)))]
        params.update(p_q)
        report.extend(r_q)
        if dequantized is not None:
            dequantized.update(d_q)
    return params, forms, report


class _Fitter:
    """One fused linear's fits, ``fitter(member, q)`` (q = 0: ternary), memoized (bit allocation asks
    for each member at q = 2, 3, 4), with one :class:`~reshift.passes.bcq_fit.HessianFactor` per input
    array (q/k/v and gate/up share theirs), and the seconds each member's fits took."""

    def __init__(self, weights: dict[str, np.ndarray], rows: dict[str, np.ndarray] | None) -> None:
        self.weights, self.rows = weights, rows or {}
        self.fits: dict[tuple[str, int], Any] = {}
        self.factors: dict[int, Any] = {}
        self.seconds: dict[str, float] = {}

    def __call__(self, member: str, q: int):
        from reshift.passes.bcq import fit_bcq, fit_ternary, hessian_factor

        if (member, q) not in self.fits:
            t0 = time.perf_counter()
            x = self.rows.get(member)
            factor = None
            if x is not None:
                if id(x) not in self.factors:
                    self.factors[id(x)] = hessian_factor(x)
                factor = self.factors[id(x)]
            w = self.weights[member + ".w"]
            if q == 0:
                self.fits[member, q] = fit_ternary(w, group_size=GROUP_SIZE, x=x, factor=factor)
            else:
                self.fits[member, q] = fit_bcq(w, q=q, group_size=GROUP_SIZE, x=x, factor=factor)
            self.seconds[member] = self.seconds.get(member, 0.0) + time.perf_counter() - t0
        return self.fits[member, q]

    def sensitivity(self, fused: str, members: list[str]):
        """ShiftAddLLM's per-layer sensitivity: the output error ``||X (W - W_q)^T||^2`` summed over the
        members (the weight error without calibration) at each q."""
        from reshift.passes.bcq import LayerSensitivity

        errors = {}
        for q in (2, 3, 4):
            err = 0.0
            for m in members:
                diff = self.weights[m + ".w"] - self(m, q).weight(GROUP_SIZE)
                x = self.rows.get(m)
                err += float(np.sum((x @ diff.T) ** 2)) if x is not None else float(np.sum(diff**2))
            errors[q] = err
        return LayerSensitivity(fused, sum(self.weights[m + ".w"].size for m in members), errors)

    def release(self) -> None:
        self.fits.clear()
        self.factors.clear()


def _allocate(layers: list, budget: float) -> dict[str, int]:
    """ShiftAddLLM's per-layer bit allocation: every fused linear (q/k/v, gate/up share one ``q``) fitted
    at q = 2, 3, 4 (:meth:`_Fitter.sensitivity`); ``passes.bcq.allocate_bits`` picks the ``q`` per linear
    that minimizes the summed output error (weight error without calibration) under an average of
    ``budget`` bits per weight."""
    from reshift.passes.bcq import allocate_bits

    try:
        return allocate_bits(layers, budget, GROUP_SIZE)
    except ValueError as exc:
        raise PassError(f"reshift.llm.compile: bits={budget}: {exc}") from None


def compile(  # noqa: A001 -- the public name the API contract fixes
    model_or_dir: Any,
    pipeline: str = "bcq",
    bits: float = 3,
    calibration: Any = None,
    target: str = "cpu",
    max_seq_len: int = 2048,
    quantize_lm_head: bool = False,
    out_dir: str | Path | None = None,
    progress: Callable[[str, int, int], Any] | None = None,
    max_batch: int = 1,
    decode_lut: str | None = None,
) -> LLM | CrossBuild:
    """Compile a causal LM for generation; returns the loaded :class:`~reshift.runtime.llm.LLM`
    (a :class:`CrossBuild` to save and deploy when ``target`` is another machine's CPU).

    ``pipeline``: ``"exact"`` (float32 weights, same tokens as transformers), ``"bcq"`` (every
    block linear as ``bits``-bit binary codes with group-wise scales, lookup-table GEMV) or
    ``"ternary"`` (BitNet b1.58 codes {-1, 0, +1} with group scales, same GEMV, ``bits`` ignored);
    ``bits``: 2, 3 or 4 planes everywhere, or a fractional average budget (e.g. 2.5) for per-layer
    allocation (:func:`_allocate`);
    ``calibration``: token ids ``[sequences, tokens]`` for ShiftAddLLM's output-aware fit;
    ``target``: ``"cpu"`` (this machine), ``"arm64"`` (aarch64 Linux with NEON, cross-linked with
    ``aarch64-linux-gnu-gcc``; run it with ``reshift generate OUT --remote HOST:PORT``) or an LLVM
    target dict; the kernels are chosen for the target, not the host; ``"cuda"`` / ``"cuda-sm80"`` /
    ``"cuda-sm90"`` / a TVM ``{"kind": "cuda", ...}`` dict: the GPU kernels of
    ``codegen/tvm/kernels/llm_cuda.py`` (batch 1), compiled with nvcc into the artifact's
    ``kernels.fatbin`` (no GPU needed to build; running it needs one: ``load(dir, device="cuda")``);
    ``quantize_lm_head``: the output projection in BCQ too; ``out_dir``: where the artifact is
    written (a temporary directory by default; ``.save(dir)`` copies it); ``progress(name, i, n)``
    is called per linear as it is fitted (the CLI prints it); ``max_batch``: with ``B > 1`` the artifact
    also has the batched entry point (``codegen/tvm/llm.py``), so ``generate`` takes up to ``B`` prompts;
    ``decode_lut``: the tables of the BCQ / ternary decode GEMV, ``"int8"`` (T-MAC's quantized tables,
    ``kernels/lut_gemv_int8.py``: about 2x faster here, relative output error of a linear about 0.7% on
    Gaussian activations; needs AVX-512 BW + VBMI + VNNI) or ``"float32"``; by default ``"int8"`` where
    the target has those, else ``"float32"``. Prefill stays float32 either way.
    """
    if pipeline not in PIPELINES:
        raise PassError(f"reshift.llm.compile: unknown pipeline {pipeline!r}; choose one of {', '.join(PIPELINES)}")
    if pipeline == "bcq" and not 2 <= float(bits) <= 4.5:
        raise PassError(
            f"reshift.llm.compile: bits={bits}; BCQ takes 2, 3 or 4 bit planes, or an average budget "
            "between 2 and 4.5 bits per weight (scales included) for per-layer allocation"
        )
    spec_t = llm_target(target)
    if spec_t.is_gpu and int(max_batch) > 1:
        raise PassError(f"reshift.llm.compile: max_batch={max_batch}; CUDA LLM artifacts serve batch 1 in this version")
    if not 1 <= int(max_seq_len) <= 1 << 20:
        raise InputError(f"max_seq_len must be a positive token count, got {max_seq_len}")
    if not 1 <= int(max_batch) <= 1024:
        raise InputError(f"max_batch must be a sequence count between 1 and 1024, got {max_batch}")
    decode_lut = _decode_lut(decode_lut, pipeline, spec_t)
    t0 = time.perf_counter()
    spec, weights, _ = open_model(model_or_dir)  # streamed: one block's float weights at a time
    params, forms, report = prepare(
        spec, weights, pipeline, bits, calibration, int(max_seq_len), quantize_lm_head, progress=progress
    )
    t_fit = time.perf_counter() - t0
    import tvm

    from reshift.codegen.tvm.build import cpu_pipeline
    from reshift.codegen.tvm.llm import build_module

    tvm_target = spec_t.target()
    kernels = None
    if spec_t.is_gpu:  # GPU kernels and layouts (kernels/llm_cuda.py); the kernels compiled with nvcc here
        from reshift.codegen.tvm.build import _cuda_toolchain
        from reshift.codegen.tvm.kernels.llm_cuda import gpu_params
        from reshift.codegen.tvm.llm import build_cuda

        params = gpu_params(params, forms)
        with tvm_target:
            mod = build_module(spec, params, forms, int(max_seq_len))
        executable, kernels = build_cuda(mod, spec_t)
    else:
        with tvm_target:  # kernel_flavor() and the schedules read the target being built for, not the host
            mod = build_module(spec, params, forms, int(max_seq_len), int(max_batch), decode_lut=decode_lut)
        executable = tvm.compile(mod, tvm_target, relax_pipeline=cpu_pipeline(tvm_target))
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="reshift_llm_"))
    out.mkdir(parents=True, exist_ok=True)
    if kernels is not None:
        from reshift.runtime.cuda_kernels import KERNELS_NAME, kernels_meta

        (out / KERNELS_NAME).write_bytes(kernels[0])
        with _cuda_toolchain(spec_t):  # the host part links with g++; the kernels stay inside as source
            executable.export_library(str(out / SO_FILE))
    else:
        link = {"cc": spec_t.cross_compiler} if spec_t.cross_compiler else {}  # aarch64-linux-gnu-gcc for arm64
        executable.export_library(str(out / SO_FILE), **link)
    np.savez(out / WEIGHTS_FILE, **params)
    weight_bytes = int(sum(a.nbytes for k, a in params.items() if not k.startswith("rope.")))
    meta = {
        "format": LLM_FORMAT,
        "spec": spec.to_json(),
        "pipeline": pipeline,
        "bits": {"bcq": bits, "ternary": 1.58}.get(pipeline, 32),
        "max_seq_len": int(max_seq_len),
        "cache_shape": [spec.num_layers, spec.num_kv_heads, int(max_seq_len), spec.head_dim],
        "max_batch": int(max_batch),
        "decode_lut": decode_lut,
        "batch_cache_shape": [spec.num_layers, int(max_batch), spec.num_kv_heads, int(max_seq_len), spec.head_dim],
        "params": list(params),
        "target": target_dict(spec_t),  # name, tvm_target, device_type: what load() and remote runs check
        "so_sha256": sha256_file(out / SO_FILE),
        "weights_sha256": sha256_file(out / WEIGHTS_FILE),
        "report": {
            "layers": report,
            "weight_bytes": weight_bytes,
            "linear_bytes_fp32": int(sum(r["bytes_fp32"] for r in report)),
            "linear_bytes": int(sum(r["bytes"] for r in report)),
            "fit_seconds": round(t_fit, 2),
            "build_seconds": round(time.perf_counter() - t0 - t_fit, 2),
            "calibrated": calibration is not None,
        },
        "forms_sha": hashlib.sha256(json.dumps(forms, sort_keys=True).encode()).hexdigest()[:16],
    }
    if kernels is not None:
        meta["cuda_kernels"] = kernels_meta(*kernels)
    write_meta(out, meta, name=LLM_META)
    del weights, params, mod, executable  # the runtime reloads them from the files: keep one copy alive
    # a cross build (arm64 on x86) runs on the device, over RPC (runtime/llm_remote.py)
    if spec_t.is_gpu:  # a CUDA build made without a GPU still saves and reports; running it says "no CUDA device"
        llm = LLM(out, device="cuda", lazy=True)
        llm.kernel_source = kernels[1]  # the CUDA C++ nvcc compiled (for inspection; the artifact has the binary)
    else:
        llm = LLM(out) if runs_here(meta) else CrossBuild(out, meta)
    if out_dir is None:  # a temporary artifact lives as long as the object (save() copies it first)
        weakref.finalize(llm, shutil.rmtree, out, ignore_errors=True)
    return llm


def _decode_lut(decode_lut: str | None, pipeline: str, spec_t: Any) -> str:
    """The decode GEMV's table type: ``"int8"`` by default for BCQ / ternary on a CPU target with the
    int8 kernel's instructions, else ``"float32"``; an explicit ``"int8"`` the target cannot run is refused."""
    from reshift.codegen.tvm.kernels.lut_gemv_int8 import has_int8_lut

    if decode_lut not in (None, "int8", "float32"):
        raise PassError(f"reshift.llm.compile: decode_lut={decode_lut!r}; choose 'int8' or 'float32'")
    if pipeline == "exact" or spec_t.is_gpu:
        if decode_lut == "int8" and spec_t.is_gpu:
            raise PassError("reshift.llm.compile: decode_lut='int8' builds for CPU targets only in this version")
        return "float32"
    with spec_t.target():
        capable = has_int8_lut()
    if decode_lut == "int8" and not capable:
        raise PassError(
            f"reshift.llm.compile: decode_lut='int8' needs AVX-512 BW, VBMI and VNNI, which target "
            f"{spec_t.name!r} lacks; use decode_lut='float32'"
        )
    return decode_lut or ("int8" if capable else "float32")


def llm_target(target: Any):
    """The :class:`~reshift.codegen.tvm.targets.TargetSpec` an LLM builds for: a CPU preset (``cpu``,
    ``arm64``), a CUDA preset, or a raw LLVM / CUDA target dict; refused before any fitting when it
    cannot be built here."""
    from reshift.codegen.tvm.targets import have_cross_compiler, resolve_target
    from reshift.errors import CodegenError

    try:
        spec_t = resolve_target(target)
    except CodegenError as exc:
        raise PassError(f"reshift.llm.compile: {exc}") from None
    if spec_t.device_type not in ("cpu", "cuda"):
        raise PassError(
            f"reshift.llm.compile: target {spec_t.name!r} ({spec_t.device_type}); LLM artifacts build for CPU "
            "targets (cpu, arm64, an LLVM target dict) and CUDA (cuda, cuda-sm80, cuda-sm90) in this version"
        )
    if not have_cross_compiler(spec_t):
        raise PassError(
            f"reshift.llm.compile: target {spec_t.name!r} links with the cross compiler {spec_t.cross_compiler!r}, "
            "which is not on PATH; install it (Debian/Ubuntu: apt-get install gcc-aarch64-linux-gnu)"
        )
    return spec_t


class CrossBuild:
    """An LLM artifact built for another machine (``target="arm64"`` on x86): it can be saved and
    deployed (``reshift.runtime.llm_remote.connect_llm``), not run here."""

    def __init__(self, path: Path, meta: dict[str, Any]):
        self.path, self.meta = path, meta
        self.spec, self.report = meta["spec"], meta["report"]
        self.max_seq_len = int(meta["max_seq_len"])

    def __repr__(self) -> str:
        return f"<reshift LLM cross build for {self.meta['target']['name']!r}, {self.path}>"

    def save(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if out.resolve() != self.path.resolve():
            for name in (SO_FILE, WEIGHTS_FILE, LLM_META):
                shutil.copyfile(self.path / name, out / name)
        return out

    def generate(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise ArtifactError(foreign_target_message(self.path, self.meta))

    prefill = decode = benchmark = generate


def format_report(report: dict[str, Any]) -> str:
    """The per-layer table: bits, relative weight (and output) error, bytes."""
    lines = [
        f"{'layer':<24} {'shape':>12} {'bits':>4} {'bits/w':>7} {'w_err':>8} {'out_err':>8} {'bytes':>10} {'fp32':>10}"
    ]
    for r in report.get("layers", []):
        out_err = f"{r['output_error']:.4f}" if "output_error" in r else "-"
        shape = "x".join(map(str, r["shape"]))
        lines.append(
            f"{r['name']:<24} {shape:>12} {r['bits']:>4} {r.get('bits_per_weight', 0):>7.3f} "
            f"{r['weight_error']:>8.4f} {out_err:>8} "
            f"{r['bytes']:>10} {r['bytes_fp32']:>10}"
        )
    lines.append(
        f"linears: {report.get('linear_bytes', 0)} bytes (fp32 {report.get('linear_bytes_fp32', 0)}); "
        f"all weights as stored {report.get('weight_bytes', 0)} bytes"
    )
    return "\n".join(lines)
