"""``reshift.llm.compile``: a Hugging Face causal LM to a runnable LLM artifact (prefill + decode).

Steps: config -> :class:`~reshift.llm.config.DecoderSpec`; checkpoint -> canonical float32
weights; with ``pipeline="bcq"`` (or ``"ternary"``, ``fit_ternary``) every linear of every block (and ``lm_head`` with
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

from reshift.errors import InputError, ModelLoadError, PassError
from reshift.llm.config import DecoderSpec, spec_from_config
from reshift.llm.reference import forward
from reshift.llm.weights import canonical_weights, read_config, read_weights, state_dict_numpy
from reshift.runtime.artifact import sha256_file, write_meta
from reshift.runtime.llm import LLM, LLM_FORMAT, LLM_META, SO_FILE, WEIGHTS_FILE

PIPELINES = ("exact", "bcq", "ternary")
GROUP_SIZE = 128


def read_model(model_or_dir: Any) -> tuple[DecoderSpec, dict[str, np.ndarray], dict[str, Any]]:
    """``(spec, canonical weights, config dict)`` of a transformers module or a local HF directory."""
    if isinstance(model_or_dir, (str, Path)):
        path = Path(model_or_dir)
        if not path.is_dir():
            raise ModelLoadError(f"{path}: not a directory; give a local Hugging Face model directory or a module")
        config = read_config(path)
        spec = spec_from_config(config)  # an unsupported feature is named before the weights are read
        return spec, canonical_weights(spec, read_weights(path)), config
    elif hasattr(model_or_dir, "config") and hasattr(model_or_dir, "state_dict"):
        config, raw = model_or_dir.config.to_dict(), state_dict_numpy(model_or_dir)
    else:
        raise ModelLoadError(
            "reshift.llm.compile takes a transformers causal LM or a model directory, "
            f"got {type(model_or_dir).__name__}"
        )
    spec = spec_from_config(config)
    return spec, canonical_weights(spec, raw), config


def calibration_rows(spec: DecoderSpec, weights: dict[str, np.ndarray], calibration: Any, max_rows: int = 512):
    """Inputs of every linear on the calibration token ids (rows of ``[sequences, tokens]`` or 1-D)."""
    seqs = [np.asarray(calibration)] if np.asarray(calibration).ndim == 1 else list(np.asarray(calibration))
    capture: dict[str, list[np.ndarray]] = {}
    for seq in seqs:
        seq = np.asarray(seq, dtype=np.int64)
        if seq.size == 0 or seq.min() < 0 or seq.max() >= spec.vocab_size:
            raise PassError(f"calibration token ids must lie in [0, {spec.vocab_size}); got {seq.min()}..{seq.max()}")
        shape = (spec.num_layers, spec.num_kv_heads, len(seq), spec.head_dim)
        forward(spec, weights, seq, 0, np.zeros(shape, np.float32), np.zeros(shape, np.float32), capture=capture)
    return {k: np.concatenate(v)[:max_rows] for k, v in capture.items()}


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
    ``fitter(member, q)`` (memoized by bit allocation) returns the member's ``BCQFit``."""
    w = np.concatenate([weights[m + ".w"] for m in members])
    has_bias = any(m + ".b" in weights for m in members)
    bias = (
        np.concatenate([weights.get(m + ".b", np.zeros(weights[m + ".w"].shape[0], np.float32)) for m in members])
        if has_bias
        else None
    )
    out_features, in_features = w.shape
    if not quantize:  # packed 16-column panels for the register-tiled GEMM of kernels/dense_cpu.py
        from reshift.codegen.tvm.kernels.dense_cpu import pack_panels

        params[fused + ".panels"] = pack_panels(w)
        padded = np.zeros(params[fused + ".panels"].shape[0] * 16, np.float32)
        if bias is not None:
            padded[:out_features] = bias
        params[fused + ".bias"] = padded
        for m in members:
            o, k = weights[m + ".w"].shape
            report.append(
                {
                    "name": m,
                    "shape": [o, k],
                    "bits": 32,
                    "weight_error": 0.0,
                    "bytes_fp32": 4 * o * k,
                    "bytes": 4 * o * k,
                }
            )
        return {"kind": "dense", "out_features": out_features, "in_features": in_features}
    from reshift.codegen.tvm.kernels.lut_gemv import bias_row
    from reshift.codegen.tvm.kernels.packing import pack_bcq, pack_ternary
    from reshift.ir.ops_lowbit import pack_signs, pack_trits
    from reshift.passes.bcq import bits_per_weight, fit_bcq, fit_ternary, ternary_dequant

    ternary = bits == 0  # BitNet b1.58 codes {-1, 0, +1}: two sign planes through the same LUT GEMV
    codes, alphas = [], []
    for m in members:
        wm = weights[m + ".w"]
        x = rows.get(m) if rows else None
        if ternary:
            t, scale = fit_ternary(wm, group_size=GROUP_SIZE, x=x)
            w_hat = ternary_dequant(t, scale, GROUP_SIZE)
            codes.append(t)
            alphas.append(scale)
            stored_bits = 2 + 16.0 / GROUP_SIZE  # 2-bit trit codes + one fp16 scale per group
        else:
            fit = fitter(m, bits) if fitter else fit_bcq(wm, q=bits, group_size=GROUP_SIZE, x=x)
            w_hat = fit.weight(GROUP_SIZE)
            codes.append(fit.codes)
            alphas.append(fit.alpha)
            stored_bits = bits_per_weight(bits, GROUP_SIZE)
        if dequantized is not None:
            dequantized[m + ".w"] = w_hat.astype(np.float32)
        row = {
            "name": m,
            "shape": list(wm.shape),
            "bits": "ternary" if ternary else bits,
            "weight_error": float(np.linalg.norm(wm - w_hat) / max(np.linalg.norm(wm), 1e-30)),
            "bytes_fp32": 4 * wm.size,
            "bytes": int(np.ceil(wm.size * stored_bits / 8)),
        }
        if x is not None:
            ref = x @ wm.T
            row["output_error"] = float(np.linalg.norm(ref - x @ w_hat.T) / max(np.linalg.norm(ref), 1e-30))
        report.append(row)
    if ternary:
        trits = pack_trits(np.concatenate(codes))
        words, alpha = pack_ternary(trits, np.concatenate(alphas).astype(np.float32), GROUP_SIZE, in_features)
    else:
        bits_packed = pack_signs(np.concatenate(codes, axis=1))
        words, alpha = pack_bcq(bits_packed, np.concatenate(alphas).astype(np.float32), GROUP_SIZE, in_features)
    params[fused + ".words"] = words
    params[fused + ".alpha"] = alpha
    params[fused + ".bias"] = bias_row(bias, out_features)
    return {
        "kind": "bcq",
        "out_features": out_features,
        "in_features": in_features,
        "group_size": GROUP_SIZE,
        "bits": bits,
    }


def prepare(
    spec: DecoderSpec,
    weights: dict[str, np.ndarray],
    pipeline: str,
    bits: int,
    calibration: Any,
    max_seq_len: int,
    quantize_lm_head: bool,
    dequantized: dict[str, np.ndarray] | None = None,
    progress: Callable[[str, int, int], Any] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, dict], list[dict[str, Any]]]:
    """``(parameters in call order, per fused linear its form, per linear its report row)``;
    ``dequantized`` (if given) receives the BCQ weights as float32 (for checks against the reference);
    ``progress(name, done, total)`` is called before each fused linear is prepared."""
    from reshift.codegen.tvm.llm import fused_linears

    params: dict[str, np.ndarray] = {"embed": weights["embed"]}
    if spec.learned_positions:
        params["pos_embed"] = weights["pos_embed"]
    if spec.rotary_dim:
        params["rope.cos"], params["rope.sin"] = spec.rope_tables(max_seq_len)
    for name in sorted(k for k in weights if ".norm" in k or k.startswith("norm.")):
        params[name] = weights[name]
    lossy = pipeline in ("bcq", "ternary")
    rows = calibration_rows(spec, weights, calibration) if (lossy and calibration is not None) else None
    forms: dict[str, dict] = {}
    report: list[dict[str, Any]] = []
    linears = [(f, ms, lossy and (f != "lm_head" or quantize_lm_head)) for f, ms in fused_linears(spec)]
    fitter, per_layer = None, {}
    if pipeline == "bcq" and float(bits) not in (2.0, 3.0, 4.0):
        fitter, per_layer = _allocate(weights, [(f, ms) for f, ms, q in linears if q], float(bits), rows)
    for done, (fused, members, quantize) in enumerate(linears):
        if progress is not None:
            progress(fused, done, len(linears))
        planes = 0 if pipeline == "ternary" else per_layer.get(fused, int(bits))
        forms[fused] = _linear_form(
            spec, weights, fused, members, quantize, planes, rows, params, report, dequantized, fitter
        )
    return params, forms, report


def _allocate(weights, linears, budget: float, rows) -> tuple[Any, dict[str, int]]:
    """ShiftAddLLM's per-layer bit allocation: every fused linear (q/k/v, gate/up share one ``q``) fitted
    at q = 2, 3, 4; ``passes.bcq.allocate_bits`` picks the ``q`` per linear that minimizes the summed
    output error (weight error without calibration) under an average of ``budget`` bits per weight."""
    from reshift.passes.bcq import LayerSensitivity, allocate_bits, fit_bcq

    fits: dict[tuple[str, int], Any] = {}

    def fitter(member: str, q: int):
        if (member, q) not in fits:
            x = rows.get(member) if rows else None
            fits[member, q] = fit_bcq(weights[member + ".w"], q=q, group_size=GROUP_SIZE, x=x)
        return fits[member, q]

    layers = []
    for fused, members in linears:
        errors = {}
        for q in (2, 3, 4):
            err = 0.0
            for m in members:
                diff = weights[m + ".w"] - fitter(m, q).weight(GROUP_SIZE)
                x = rows.get(m) if rows else None
                err += float(np.sum((x @ diff.T) ** 2)) if x is not None else float(np.sum(diff**2))
            errors[q] = err
        layers.append(LayerSensitivity(fused, sum(weights[m + ".w"].size for m in members), errors))
    try:
        return fitter, allocate_bits(layers, budget, GROUP_SIZE)
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
) -> LLM:
    """Compile a causal LM for generation; returns the loaded :class:`~reshift.runtime.llm.LLM`.

    ``pipeline``: ``"exact"`` (float32 weights, same tokens as transformers), ``"bcq"`` (every
    block linear as ``bits``-bit binary codes with group-wise scales, lookup-table GEMV) or
    ``"ternary"`` (BitNet b1.58 codes {-1, 0, +1} with group scales, same GEMV, ``bits`` ignored);
    ``bits``: 2, 3 or 4 planes everywhere, or a fractional average budget (e.g. 2.5) for per-layer
    allocation (:func:`_allocate`);
    ``calibration``: token ids ``[sequences, tokens]`` for ShiftAddLLM's output-aware fit;
    ``quantize_lm_head``: the output projection in BCQ too; ``out_dir``: where the artifact is
    written (a temporary directory by default; ``.save(dir)`` copies it); ``progress(name, i, n)``
    is called per linear as it is fitted (the CLI prints it).
    """
    if pipeline not in PIPELINES:
        raise PassError(f"reshift.llm.compile: unknown pipeline {pipeline!r}; choose one of {', '.join(PIPELINES)}")
    if pipeline == "bcq" and not 2 <= float(bits) <= 4.5:
        raise PassError(
            f"reshift.llm.compile: bits={bits}; BCQ takes 2, 3 or 4 bit planes, or an average budget "
            "between 2 and 4.5 bits per weight (scales included) for per-layer allocation"
        )
    if target != "cpu":
        raise PassError(f"reshift.llm.compile: target {target!r}; LLM artifacts build for 'cpu' in this version")
    if not 1 <= int(max_seq_len) <= 1 << 20:
        raise InputError(f"max_seq_len must be a positive token count, got {max_seq_len}")
    t0 = time.perf_counter()
    spec, weights, _ = read_model(model_or_dir)
    params, forms, report = prepare(
        spec, weights, pipeline, bits, calibration, int(max_seq_len), quantize_lm_head, progress=progress
    )
    t_fit = time.perf_counter() - t0
    import tvm

    from reshift.codegen.tvm.build import cpu_pipeline
    from reshift.codegen.tvm.llm import build_module
    from reshift.codegen.tvm.targets import resolve_target

    spec_t = resolve_target(target)
    tvm_target = spec_t.target()
    with tvm_target:
        mod = build_module(spec, params, forms, int(max_seq_len))
    executable = tvm.compile(mod, tvm_target, relax_pipeline=cpu_pipeline(tvm_target))
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="reshift_llm_"))
    out.mkdir(parents=True, exist_ok=True)
    executable.export_library(str(out / SO_FILE))
    np.savez(out / WEIGHTS_FILE, **params)
    weight_bytes = int(sum(a.nbytes for k, a in params.items() if not k.startswith("rope.")))
    meta = {
        "format": LLM_FORMAT,
        "spec": spec.to_json(),
        "pipeline": pipeline,
        "bits": {"bcq": bits, "ternary": 1.58}.get(pipeline, 32),
        "max_seq_len": int(max_seq_len),
        "cache_shape": [spec.num_layers, spec.num_kv_heads, int(max_seq_len), spec.head_dim],
        "params": list(params),
        "target": spec_t.tvm_target,
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
    write_meta(out, meta, name=LLM_META)
    del weights, params, mod, executable  # the runtime reloads them from the files: keep one copy alive
    llm = LLM(out)
    if out_dir is None:  # a temporary artifact lives as long as the object (save() copies it first)
        weakref.finalize(llm, shutil.rmtree, out, ignore_errors=True)
    return llm


def format_report(report: dict[str, Any]) -> str:
    """The per-layer table: bits, relative weight (and output) error, bytes."""
    lines = [f"{'layer':<24} {'shape':>12} {'bits':>4} {'w_err':>8} {'out_err':>8} {'bytes':>10} {'fp32':>10}"]
    for r in report.get("layers", []):
        out_err = f"{r['output_error']:.4f}" if "output_error" in r else "-"
        shape = "x".join(map(str, r["shape"]))
        lines.append(
            f"{r['name']:<24} {shape:>12} {r['bits']:>4} {r['weight_error']:>8.4f} {out_err:>8} "
            f"{r['bytes']:>10} {r['bytes_fp32']:>10}"
        )
    lines.append(
        f"linears: {report.get('linear_bytes', 0)} bytes (fp32 {report.get('linear_bytes_fp32', 0)}); "
        f"all weights as stored {report.get('weight_bytes', 0)} bytes"
    )
    return "\n".join(lines)
