"""reshift.llm for CUDA without a GPU: the artifact builds, its CUDA source holds the expected kernels
(compiled by nvcc, no register spills, within the launch and shared-memory limits, no CPU intrinsics),
and the same GPU graph with its kernels' loops unbound runs on the CPU and matches the numpy reference.

Running on a GPU is ``benchmarks/llm_cuda_check.py`` (where a GPU machine is lent)."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import reshift.llm
from reshift.codegen.tvm.build import _find_cuda_path
from reshift.errors import ArtifactError, PassError

sys.path.insert(0, str(Path(__file__).parent))
from llm_tiny import tiny_model  # noqa: E402

NVCC = shutil.which("nvcc") or (_find_cuda_path() and str(Path(_find_cuda_path()) / "bin" / "nvcc"))
needs_nvcc = pytest.mark.skipif(not NVCC, reason="nvcc (the CUDA toolkit) is not installed: CUDA builds need it")
PROMPT = np.array([3, 17, 42, 9, 100, 7, 55, 21, 8, 64, 2, 90], np.int32)  # longer than mistral's window of 8


def _has_gpu() -> bool:
    from reshift.codegen.tvm.targets import local_cuda_arch

    return local_cuda_arch() is not None


@pytest.fixture(scope="module")
def bcq_cuda(tmp_path_factory):
    """The tiny llama, BCQ 3-bit (its lm_head stays dense: both linear forms), built for cuda-sm90."""
    out = tmp_path_factory.mktemp("llm_cuda")
    return reshift.llm.compile(tiny_model("llama"), "bcq", 3, target="cuda-sm90", max_seq_len=64, out_dir=out)


def _kernels(source: str) -> dict[str, str]:
    """Kernel name -> its body in TVM's CUDA source."""
    heads = list(re.finditer(r'extern "C" __global__ void __launch_bounds__\((\d+)\) (\w+)\([^)]*\) *\{', source))
    return {m.group(2): source[m.start() : (heads[i + 1].start() if i + 1 < len(heads) else len(source))]
            for i, m in enumerate(heads)}  # fmt: skip


@needs_nvcc
def test_bcq_artifact_for_cuda(bcq_cuda, tmp_path):
    llm = bcq_cuda
    meta = llm.meta
    target = meta["target"]
    assert target["name"] == "cuda-sm90" and target["device_type"] == "cuda"
    assert target["tvm_target"]["kind"] == "cuda" and target["tvm_target"]["arch"] == "sm_90"
    fatbin = (llm.path / "kernels.fatbin").read_bytes()
    assert meta["cuda_kernels"]["sha256"] == hashlib.sha256(fatbin).hexdigest() and len(fatbin) > 10_000
    assert meta["cuda_kernels"]["source_sha256"] == hashlib.sha256(llm.kernel_source.encode()).hexdigest()
    params = meta["params"]
    assert "lm_head.weight" in params and "lm_head.panels" not in params  # dense: row-major [N, K] for dlight
    assert "layers.0.qkv.words" in params and "layers.0.qkv.alpha" in params  # BCQ: the CPU's nibble words
    saved = llm.save(tmp_path / "saved")
    assert sorted(p.name for p in saved.iterdir()) == ["kernels.fatbin", "llm.json", "model.so", "weights.npz"]
    with pytest.raises(ArtifactError, match="built for cuda"):
        reshift.llm.load(saved, device="cpu")
    if not _has_gpu():
        with pytest.raises(ArtifactError, match="no CUDA device"):
            reshift.llm.load(saved, device="cuda")
        with pytest.raises(ArtifactError, match="no CUDA device"):
            llm.generate(PROMPT, max_new_tokens=2)


@needs_nvcc
def test_cuda_source_has_the_gpu_kernels(bcq_cuda):
    source = bcq_cuda.kernel_source
    kernels = _kernels(source)
    names = set(kernels)
    for layer in (0, 1):
        assert f"kv_append_l{layer}_kernel" in names and f"attention_l{layer}_kernel" in names
    assert {"embed_kernel", "rope_q_kernel"} <= names
    assert any(n.startswith("bcq_lut_gemv_cuda") for n in names) and any(n.startswith("rms_norm") for n in names)
    assert any(n.startswith("dense") for n in names)  # the dense lm_head through dlight's GEMV / Matmul
    attention = kernels["attention_l0_kernel"]
    assert "__shared__" in attention and attention.count("__syncthreads()") >= 3  # ThreadSync between phases
    assert "blockIdx.x" in attention and "threadIdx.x" in attention
    for name, body in kernels.items():
        bound = int(re.search(r"__launch_bounds__\((\d+)\)", body).group(1))
        shared = sum(
            int(n) * {"float": 4, "int": 4, "int64_t": 8, "half": 2}.get(t, 4)
            for t, n in re.findall(r"__shared__ alignas\(\d+\) (\w+) \w+\[(\d+)\]", body)
        )
        assert bound <= 1024 and shared <= 48 * 1024, (name, bound, shared)
    for cpu_only in ("llvm.x86", "avx512", "permvar", "vpermps", "__m512", "omp"):
        assert cpu_only not in source, cpu_only


@needs_nvcc
def test_cuda_kernels_compile_without_spills(bcq_cuda, tmp_path):
    """ptxas for sm_90: every kernel compiles, none spills registers or uses a stack frame."""
    src = tmp_path / "kernels.cu"
    src.write_text(bcq_cuda.kernel_source)
    res = subprocess.run(
        [NVCC, "-arch=sm_90", "--resource-usage", "-cubin", "-o", str(tmp_path / "k.cubin"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    usage = re.findall(
        r"Function properties for (\w+)\n\s+(\d+) bytes stack frame, (\d+) bytes spill stores", res.stderr
    )
    assert len(usage) == len(_kernels(bcq_cuda.kernel_source))
    assert all(stack == "0" and spills == "0" for _, stack, spills in usage), usage


@needs_nvcc
@pytest.mark.slow
def test_exact_artifact_for_cuda(tmp_path):
    llm = reshift.llm.compile(tiny_model("gpt2"), "exact", target="cuda", max_seq_len=64, out_dir=tmp_path)
    names = set(_kernels(llm.kernel_source))
    assert "embed_kernel" in names and "rope_q_kernel" not in names  # learned positions, no rotary
    assert {"layers.0.qkv.weight", "layers.0.fc1.weight", "lm_head.weight"} <= set(llm.meta["params"])
    assert (tmp_path / "kernels.fatbin").is_file()


def test_bad_target():
    with pytest.raises(PassError, match="unknown target"):
        reshift.llm.compile(tiny_model("llama"), "exact", target="tpu")
    with pytest.raises(PassError, match="batch 1"):
        reshift.llm.compile(tiny_model("llama"), "exact", target="cuda", max_batch=2)


# -- the GPU kernels' arithmetic on the CPU (their loops unbound: kernels="cuda-serial") -----------------


def _run_gpu_graph_on_cpu(family: str, pipeline: str) -> None:
    import tvm

    from reshift.codegen.tvm.kernels.llm_cuda import gpu_params
    from reshift.codegen.tvm.llm import build_module
    from reshift.llm.compiler import prepare, read_model
    from reshift.llm.reference import forward

    spec, weights, _ = read_model(tiny_model(family))
    dequant: dict[str, np.ndarray] = {}
    params, forms, _ = prepare(spec, weights, pipeline, 3, None, 64, False, dequant)
    params = gpu_params(params, forms)
    mod = build_module(spec, params, forms, 64, kernels="cuda-serial")
    vm = tvm.relax.VirtualMachine(tvm.compile(mod, tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    shape = (spec.num_layers, spec.num_kv_heads, 64, spec.head_dim)
    ck, cv = (tvm.runtime.tensor(np.zeros(shape, np.float32)) for _ in range(2))
    ref_k, ref_v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    args = [tvm.runtime.tensor(a) for a in params.values()]
    ref_w = {**weights, **dequant}
    logits, ck, cv = vm["prefill"](
        tvm.runtime.tensor(PROMPT), tvm.runtime.tensor(np.array([0], np.int32)), ck, cv, *args
    )
    ref = forward(spec, ref_w, PROMPT, 0, ref_k, ref_v)
    np.testing.assert_allclose(logits.numpy()[0], ref, atol=5e-5, rtol=1e-4)
    for step, token in enumerate((5, 77)):
        pos = np.array([len(PROMPT) + step], np.int32)
        logits, ck, cv = vm["decode"](tvm.runtime.tensor(np.array([token], np.int32)), tvm.runtime.tensor(pos), ck, cv,
                                      *args)  # fmt: skip
        ref = forward(spec, ref_w, np.array([token]), int(pos[0]), ref_k, ref_v)
        np.testing.assert_allclose(logits.numpy()[0], ref, atol=5e-5, rtol=1e-4)
    np.testing.assert_allclose(ck.numpy(), ref_k, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(cv.numpy(), ref_v, atol=1e-5, rtol=1e-5)


def test_gpu_graph_on_cpu_matches_reference_bcq():
    """llama BCQ 3-bit: embed, rope, in-place append, attention, LUT GEMV split-K + sum, dense lm_head."""
    _run_gpu_graph_on_cpu("llama", "bcq")


@pytest.mark.slow
@pytest.mark.parametrize(
    "family,pipeline", [("gpt2", "exact"), ("mistral", "exact"), ("gemma", "ternary"), ("phi3", "exact")]
)
def test_gpu_graph_on_cpu_matches_reference_families(family, pipeline):
    """Learned positions + layer norm (gpt2), a sliding window shorter than the prompt (mistral), GeGLU,
    head_dim 24 and ternary codes (gemma), phi3's fused checkpoint projections."""
    _run_gpu_graph_on_cpu(family, pipeline)


def test_attention_kernel_many_rows_per_thread():
    """More cache rows than threads (each thread's online softmax runs over several rows), GQA, a window,
    head_dim 64 (128 threads): the serial form of the CUDA kernel against the CPU kernel."""
    import tvm

    from reshift.codegen.tvm.kernels.decode_attention import attention_func
    from reshift.codegen.tvm.kernels.llm_cuda import attention_cuda_func, attention_threads

    layers, heads, kv, d, seq = 2, 4, 2, 64, 320
    assert attention_threads(d) == 128
    target = tvm.target.Target({"kind": "llvm"})
    rng = np.random.default_rng(0)
    n = 3
    q = rng.standard_normal((n, heads, d)).astype(np.float32)
    ck, cv = (rng.standard_normal((layers, kv, seq, d)).astype(np.float32) for _ in range(2))
    for window in (0, 200):
        funcs = [f(1, layers, heads, kv, d, seq, window, d**-0.5) for f in (attention_func, attention_cuda_func)]
        funcs[1] = attention_cuda_func(1, layers, heads, kv, d, seq, window, d**-0.5, serial=True)
        built = [tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target) for f in funcs]
        for pos in (0, 130, 300):
            outs = []
            for ex in built:
                out = tvm.runtime.tensor(np.zeros((n, heads * d), np.float32))
                ex["main"](*(tvm.runtime.tensor(a) for a in (q, ck, cv, np.array([pos], np.int32))), out)
                outs.append(out.numpy())
            np.testing.assert_allclose(outs[1], outs[0], atol=2e-6, rtol=1e-5)


def test_lut_gemv_cuda_float16_alpha():
    """The GPU LUT GEMV reads float16 scales (widened as read) as well as float32 ones."""
    import tvm

    from reshift.codegen.tvm.kernels.lut_gemv_cuda import gemv_cuda_func, split_for
    from reshift.codegen.tvm.kernels.packing import nibble_position

    blocks, n_groups, planes, group = 2, 3, 3, 128
    rng = np.random.default_rng(1)
    lut = rng.standard_normal((2, n_groups, 32, 16)).astype(np.float32)
    words = rng.integers(0, 2**32, (blocks, n_groups, planes, 4, 16), dtype=np.uint64).astype(np.uint32)
    alpha = rng.random((blocks, n_groups, planes, 16)).astype(np.float16)
    positions = np.array([nibble_position(j) for j in range(8)], np.uint32)
    nib = (words[..., None] >> (4 * positions)) & 15  # [ob, g, i, wi, l, j]: slot j's nibble
    index = np.moveaxis(nib, -1, -2).reshape(blocks, n_groups, planes, 32, 16).astype(np.int64)  # slot 8 wi + j
    m_, g_, s_ = np.arange(2)[:, None, None, None, None, None], np.arange(n_groups)[:, None, None, None], np.arange(32)
    looked = lut[m_, g_, s_[:, None], index[None]]  # [m, ob, g, i, slot, l]
    sums = looked.sum(axis=4)  # [m, ob, g, i, l]
    ref = (sums * alpha.astype(np.float32)[None]).sum(axis=(2, 3)).reshape(2, blocks * 16)
    f = gemv_cuda_func(blocks, n_groups, planes, group, serial=True, alpha_dtype="float16")
    ex = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), tvm.target.Target({"kind": "llvm"}))
    part = tvm.runtime.tensor(np.zeros((split_for(n_groups), 2, blocks * 16), np.float32))
    ex["main"](tvm.runtime.tensor(lut), tvm.runtime.tensor(words), tvm.runtime.tensor(alpha), part)
    np.testing.assert_allclose(part.numpy().sum(axis=0), ref, rtol=1e-5, atol=1e-4)
