"""Batch-1/8 GEMV of reshift's multiplication-free kernels against torch and onnxruntime, weights cold.

Every implementation cycles through enough distinct weight matrices to exceed 4x the L3 cache (like
a model's layer sequence), so weights stream from DRAM. Two threads everywhere. Prints the CPU,
the memory bandwidth measured here, and per shape: µs per layer, speed-up vs torch fp32 and vs
onnxruntime MatMulNBits 4-bit (block 32, accuracy_level 4), and GB/s of weight bytes read.

    .venv/bin/python benchmarks/shiftadd.py [--quick] [--e2e | --no-e2e]

``--e2e`` (default on) adds the pretrained MiniLM-L6 encoder end to end at batch 1: artifact size on disk
(``reshift.compile(...).save(dir)``) and median latency of reshift fp32, reshift BCQ q=3 (weight-only fit,
every linear) and onnxruntime fp32 (all graph optimizations), two threads each; then the same for the byte-level
GPT-2 decoder that ``train_tiny_gpt.py`` trains (cached), one 64-byte full-sequence forward (no KV-cache decode),
BCQ calibrated on training text, plus each artifact's held-out perplexity. Every row also gives the max |output -
reference interpreter| of its own graph.

    .venv/bin/python benchmarks/shiftadd.py --e2e-only [--e2e-models minilm,gpt]

reshift kernels are the ones the lowerings emit (codegen/tvm/kernels/), built here with the packed
weights as function parameters instead of constants so that one build serves all weight copies.
"""

from __future__ import annotations

import os

os.environ["TVM_NUM_THREADS"] = "2"
os.environ.setdefault("OMP_NUM_THREADS", "2")

import argparse  # noqa: E402
import inspect  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402
from timing import interleaved  # noqa: E402
from tvm import relax, tirx  # noqa: E402

from reshift.codegen.tvm import describe_host_cpu  # noqa: E402
from reshift.codegen.tvm.kernels.lowbit import kernel_flavor  # noqa: E402
from reshift.codegen.tvm.kernels.lut_gemv import gemv_func, table_compute  # noqa: E402
from reshift.codegen.tvm.kernels.packing import ROWS, slot_layout  # noqa: E402
from reshift.codegen.tvm.kernels.shift_gemv import shift_gemv_func  # noqa: E402
from reshift.codegen.tvm.lower_lowbit import _quantize_rows  # noqa: E402
from reshift.codegen.tvm.targets import resolve_target  # noqa: E402

torch.set_num_threads(2)
RNG = np.random.default_rng(0)
GROUP = 128
MAX_BYTES = 1_500_000_000  # host RAM guard for the weight copies of one implementation


def l3_bytes() -> int:
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        return int(text.rstrip("KMG")) * unit
    except (OSError, ValueError):
        return 32 << 20


def copy_bandwidth() -> float:
    """GB/s of a 512 MiB numpy copy (read + write bytes), best of 5."""
    src = np.ones(64 << 20, np.float64)
    dst = np.empty_like(src)
    best = 1e9
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def copies_for(weight_bytes: int, l3: int) -> int:
    return max(2, min(-(-4 * l3 // weight_bytes), MAX_BYTES // weight_bytes))


def time_cycle(call, copies: int, reps: int) -> float:
    """Median over ``reps`` passes of the µs per call, each pass calling every weight copy once."""
    call(0)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for c in range(copies):
            call(c)
        samples.append((time.perf_counter() - start) / copies * 1e6)
    return float(np.median(samples))


# -- reshift -----------------------------------------------------------------------------------
def _lut_module(out: int, k: int, planes: int, avx512: bool) -> tvm.IRModule:
    blocks = -(-out // ROWS)
    n_groups = -(-k // GROUP)
    _, words = slot_layout(GROUP)
    n = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType((n, k), "float32"))
    w = relax.Var("w", relax.TensorType((blocks, n_groups, planes, words, ROWS), "uint32"))
    a = relax.Var("a", relax.TensorType((blocks, n_groups, planes, ROWS), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w, a]):
        with bb.dataflow():
            lut = bb.emit(bb.call_te(table_compute, x, k, GROUP, primfunc_name_hint="lut"))
            gv = bb.add_func(gemv_func(blocks, n_groups, planes, GROUP, avx512), "lut_gemv")
            bias = relax.const(np.zeros(blocks * ROWS, np.float32))
            y = bb.emit_output(
                relax.op.call_tir(gv, [lut, w, a, bias], out_ty=relax.TensorType((n, blocks * ROWS), "float32"))
            )
        bb.emit_func_output(y)
    return bb.get()


def _shift_module(out: int, k: int, avx512: bool) -> tvm.IRModule:
    blocks = -(-out // ROWS)
    n = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType((n, k), "float32"))
    code = relax.Var("code", relax.TensorType((blocks, k, ROWS), "int8"))
    scale = relax.Var("scale", relax.TensorType((blocks * ROWS,), "float32"))
    op = relax.op
    bb = relax.BlockBuilder()
    with bb.function("main", [x, code, scale]):
        with bb.dataflow():
            s = bb.emit(op.divide(op.max(op.abs(x), axis=[-1], keepdims=True), relax.const(127.0)))
            q = bb.emit(bb.call_te(_quantize_rows, x, s, primfunc_name_hint="quantize"))
            gv = bb.add_func(shift_gemv_func(blocks, k, avx512), "shift_gemv")
            acc = bb.emit(relax.op.call_tir(gv, [code, q], out_ty=relax.TensorType((n, blocks * ROWS), "int32")))
            y = bb.emit(op.multiply(op.multiply(op.astype(acc, "float32"), s), scale))
            y = bb.emit_output(y)
        bb.emit_func_output(y)
    return bb.get()


def _vm(mod: tvm.IRModule):
    from reshift.codegen.tvm.build import cpu_pipeline

    target = resolve_target("cpu").target()
    with target:
        ex = tvm.compile(mod, target, relax_pipeline=cpu_pipeline(target))
    return relax.VirtualMachine(ex, tvm.cpu())["main"]


def bench_reshift(kind: str, planes: int, out: int, k: int, batch: int, l3: int, reps: int) -> tuple[float, int]:
    avx512 = kernel_flavor() == "avx512"
    blocks = -(-out // ROWS)
    x = tvm.runtime.tensor(RNG.standard_normal((batch, k)).astype(np.float32))
    if kind == "shift":
        fn = _vm(_shift_module(out, k, avx512))
        nbytes = blocks * ROWS * k + 4 * out
        copies = copies_for(nbytes, l3)
        codes = RNG.integers(0, 16, (blocks, k, ROWS)).astype(np.int8)
        weights = [
            (tvm.runtime.tensor(np.roll(codes, c)), tvm.runtime.tensor(np.ones(blocks * ROWS, np.float32)))
            for c in range(copies)
        ]
    else:
        fn = _vm(_lut_module(out, k, planes, avx512))
        n_groups = -(-k // GROUP)
        words = RNG.integers(0, 2**32, (blocks, n_groups, planes, GROUP // 32, ROWS), dtype=np.uint64).astype(np.uint32)
        alpha = RNG.random((blocks, n_groups, planes, ROWS)).astype(np.float32)
        nbytes = words.nbytes + alpha.nbytes
        copies = copies_for(nbytes, l3)
        weights = [(tvm.runtime.tensor(words ^ np.uint32(c)), tvm.runtime.tensor(alpha)) for c in range(copies)]
    return time_cycle(lambda c: fn(x, *weights[c]), copies, reps), nbytes


# -- torch / onnxruntime -------------------------------------------------------------------------
def bench_torch(out: int, k: int, batch: int, l3: int, reps: int) -> tuple[float, int]:
    nbytes = out * k * 4
    copies = copies_for(nbytes, l3)
    base = torch.randn(out, k)
    weights = [base + float(c) for c in range(copies)]
    x = torch.randn(batch, k)
    with torch.inference_mode():
        return time_cycle(lambda c: torch.nn.functional.linear(x, weights[c]), copies, reps), nbytes


def _ort_session(nodes, initializers, copies: int, k: int, out: int) -> ort.InferenceSession:
    graph = helper.make_graph(
        nodes,
        "layers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info(f"y{c}", TensorProto.FLOAT, ["M", out]) for c in range(copies)],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _time_ort(session, copies: int, batch: int, k: int, reps: int) -> float:
    """One run executes every layer copy in sequence: µs per layer."""
    feed = {"x": RNG.standard_normal((batch, k)).astype(np.float32)}
    session.run(None, feed)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        session.run(None, feed)
        samples.append((time.perf_counter() - start) / copies * 1e6)
    return float(np.median(samples))


def bench_ort_fp32(out: int, k: int, batch: int, l3: int, reps: int) -> tuple[float, int]:
    nbytes = out * k * 4
    copies = copies_for(nbytes, l3)
    base = RNG.standard_normal((k, out)).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(base + np.float32(c), f"w{c}") for c in range(copies)]
    nodes = [helper.make_node("MatMul", ["x", f"w{c}"], [f"y{c}"]) for c in range(copies)]
    return _time_ort(_ort_session(nodes, inits, copies, k, out), copies, batch, k, reps), nbytes


def bench_ort_nbits(out: int, k: int, batch: int, l3: int, reps: int) -> tuple[float, int]:
    """MatMulNBits 4-bit, block 32, accuracy_level 4, packed per the contrib-op spec (random codes)."""
    block = 32
    n_blocks = -(-k // block)
    packed = RNG.integers(0, 256, (out, n_blocks, block // 2), dtype=np.uint8)
    scales = (RNG.random(out * n_blocks).astype(np.float32) + 0.5) * 0.01
    nbytes = packed.nbytes + scales.nbytes
    copies = copies_for(nbytes, l3)
    inits, nodes = [], []
    for c in range(copies):
        inits += [
            onnx.numpy_helper.from_array(packed ^ np.uint8(c % 256), f"b{c}"),
            onnx.numpy_helper.from_array(scales, f"s{c}"),
        ]
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                ["x", f"b{c}", f"s{c}"],
                [f"y{c}"],
                domain="com.microsoft",
                K=k,
                N=out,
                bits=4,
                block_size=block,
                accuracy_level=4,
            )
        )
    return _time_ort(_ort_session(nodes, inits, copies, k, out), copies, batch, k, reps), nbytes


# -- end to end: MiniLM and the tiny GPT-2 decoder ---------------------------------------------------
def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _first_output(graph, feed: tuple[np.ndarray, ...]) -> np.ndarray:
    from reshift.ir.interpret import interpret

    outputs = interpret(graph, dict(zip([v.name for v in graph.inputs], feed, strict=True)))
    return outputs[graph.outputs[0].name]


def _ort_file_session(onnx_path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def run_e2e(model, example_inputs: tuple, variants, reps: int, score=None) -> tuple[dict, dict]:
    """Compile ``model`` once per ``(label, pipeline, options)`` variant and export its fp32 source graph
    to onnxruntime (all graph optimizations); all at two threads on ``example_inputs``.

    Per implementation: artifact bytes on disk, weight bytes in the IR, median ms (the implementations take
    turns, ``reps`` rounds of 10 calls after settling, ``timing.interleaved``), compile s, max |output -
    reference interpreter on the same graph| and ``score(run)`` (``run``: numpy inputs -> first output) if
    given. Returns those rows and each implementation's output on ``example_inputs``.
    """
    import tempfile

    import reshift
    from reshift.codegen.onnx import to_onnx

    feed = tuple(x.numpy() for x in example_inputs)
    runs, references, sizes = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, pipeline, options) in enumerate(variants):
            start = time.perf_counter()
            cm = reshift.compile(model, example_inputs, pipeline=pipeline, **options)
            build_s = time.perf_counter() - start
            runs[label], references[label] = cm, _first_output(cm.graph, feed)
            sizes[label] = (_dir_bytes(cm.save(Path(tmp) / f"variant{i}")), cm.graph.parameter_bytes(), build_s)
        onnx_path = Path(tmp) / "model.onnx"
        to_onnx(cm.source_graph, onnx_path)
        session = _ort_file_session(onnx_path)
        names = [i.name for i in session.get_inputs()]
        runs["onnxruntime fp32"] = lambda *arrays: session.run(None, dict(zip(names, arrays, strict=True)))[0]
        references["onnxruntime fp32"] = _first_output(cm.source_graph, feed)
        sizes["onnxruntime fp32"] = (onnx_path.stat().st_size, None, None)
        ms = interleaved({label: (lambda run=run: run(*feed)) for label, run in runs.items()}, reps, block=10)
        outputs = {label: run(*feed) for label, run in runs.items()}
        rows = {
            label: (
                *sizes[label][:2],
                ms[label],
                sizes[label][2],
                float(np.abs(outputs[label] - references[label]).max()),
                score and score(run),
            )
            for label, run in runs.items()
        }
    return rows, outputs


def print_e2e(rows: dict, score_name: str | None = None) -> None:
    """The end-to-end table, speed relative to onnxruntime fp32."""
    score_head = f" {score_name} |" if score_name else ""
    print(
        "| implementation | artifact bytes on disk | weight bytes in IR | median ms | vs onnxruntime | compile s "
        f"| max abs diff vs interpreter |{score_head}"
    )
    print("|---|---|---|---|---|---|---|" + ("---|" if score_name else ""))
    ort_ms = rows["onnxruntime fp32"][2]
    for label, (disk, params, ms, build_s, diff, score) in rows.items():
        params_text = f"{params:,}" if params is not None else "-"
        build_text = f"{build_s:.0f}" if build_s is not None else "-"
        score_text = f" {score:.3f} |" if score_name else ""
        print(
            f"| {label} | {disk:,} | {params_text} | {ms:.2f} | {ort_ms / ms:.2f}x | {build_text} | {diff:.1e} |"
            f"{score_text}"
        )


def bench_minilm_e2e(reps: int, seq_len: int = 32, q: int = 3) -> None:
    """Artifact bytes and batch-1 latency of MiniLM: reshift fp32 vs reshift BCQ vs onnxruntime fp32."""
    from examples.models import MODELS

    spec = MODELS["minilm"]
    example = spec.example_inputs(1, seq_len)
    bcq = f"reshift BCQ q={q} g{GROUP}"
    variants = [("reshift fp32 (exact)", "exact", {}), (bcq, "bcq", {"bcq_q": q, "group_size": GROUP, "skip": []})]
    rows, outputs = run_e2e(spec.build(), example, variants, reps)
    reference, quantized = outputs["reshift fp32 (exact)"], outputs[bcq]
    cos = float(np.sum(reference * quantized) / (np.linalg.norm(reference) * np.linalg.norm(quantized)))
    print(f"\n## MiniLM-L6 end to end, batch 1, seq {seq_len}, 2 threads (cosine BCQ vs fp32 output: {cos:.4f})")
    print_e2e(rows)


def bench_gpt_e2e(reps: int, seq_len: int = 64, q: int = 3, eval_windows: int = 64) -> None:
    """The trained tiny GPT-2 of train_tiny_gpt.py (cached; trained first if absent) at batch 1: one
    full-sequence forward of ``seq_len`` bytes (no incremental KV-cache decode). reshift fp32 vs reshift
    BCQ (calibrated, every linear but the tied LM head) vs onnxruntime fp32; each artifact also scores
    held-out perplexity over ``eval_windows`` windows of ``seq_len`` bytes."""
    from train_tiny_gpt import calibration_batches, tiny_gpt, windows

    model, _, (train_ids, held_ids) = tiny_gpt()
    held = windows(held_ids, eval_windows, seq_len)
    example = (torch.from_numpy(held[:1]),)
    name = list(inspect.signature(model.forward).parameters)[0]
    calibration = calibration_batches(name, train_ids, seq_len)

    def perplexity(run) -> float:
        nll = 0.0
        for window in held:
            logits = np.asarray(run(window[None]), np.float64)[0, :-1]
            logits -= logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            nll -= logp[np.arange(seq_len - 1), window[1:]].sum()
        return float(np.exp(nll / (len(held) * (seq_len - 1))))

    options = {"bcq_q": q, "group_size": GROUP, "skip": [], "calibration": calibration}
    variants = [("reshift fp32 (exact)", "exact", {}), (f"reshift BCQ q={q} g{GROUP} calibrated", "bcq", options)]
    rows, _ = run_e2e(model, example, variants, reps, score=perplexity if seq_len > 1 else None)
    print(f"\n## tiny GPT-2 decoder end to end, batch 1, {seq_len}-byte context (full-sequence forward), 2 threads")
    print_e2e(rows, f"held-out ppl ({eval_windows} x {seq_len} bytes)" if seq_len > 1 else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape (4096x4096, batch 1) and fewer repetitions")
    parser.add_argument(
        "--e2e", action=argparse.BooleanOptionalAction, default=True, help="MiniLM, tiny GPT end to end"
    )
    parser.add_argument("--e2e-only", action="store_true", help="only the end-to-end section")
    parser.add_argument(
        "--e2e-models", default="minilm,gpt", help="comma-separated: minilm, gpt (train_tiny_gpt.py's decoder)"
    )
    parser.add_argument("--gpt-context", type=int, default=64, help="bytes in the decoder's full-sequence forward")
    parser.add_argument("--cases", help="kernel-table shapes, comma-separated OUTxINxBATCH: 4096x4096x1,4096x4096x8")
    args = parser.parse_args()
    l3 = l3_bytes()
    print(f"CPU: {describe_host_cpu()}; reshift kernel flavor: {kernel_flavor()}")
    print(f"L3: {l3 / 2**20:.0f} MiB; cold = cycling > 4x L3 of distinct weights (capped at {MAX_BYTES / 1e9:.1f} GB)")
    print(f"memory bandwidth (numpy copy, read+write): {copy_bandwidth():.1f} GB/s; threads: 2")
    cases = [(4096, 4096, 1)] if args.quick else [(4096, 4096, 1), (11008, 4096, 1), (4096, 11008, 1), (4096, 4096, 8)]
    if args.cases:
        cases = [tuple(int(v) for v in case.split("x")) for case in args.cases.split(",")]
    reps = 3 if args.quick else 7
    impls = [
        ("torch fp32 F.linear", lambda o, k, b: bench_torch(o, k, b, l3, reps)),
        ("onnxruntime fp32 MatMul", lambda o, k, b: bench_ort_fp32(o, k, b, l3, reps)),
        ("ORT MatMulNBits 4b g32 acc4", lambda o, k, b: bench_ort_nbits(o, k, b, l3, reps)),
        *[
            (f"reshift BCQ q={q} g128", lambda o, k, b, q=q: bench_reshift("bcq", q, o, k, b, l3, reps))
            for q in (2, 3, 4)
        ],
        ("reshift ternary g128", lambda o, k, b: bench_reshift("bcq", 2, o, k, b, l3, reps)),
        ("reshift shift (int8 x, 8b codes)", lambda o, k, b: bench_reshift("shift", 0, o, k, b, l3, reps)),
    ]
    if args.e2e or args.e2e_only:
        models = args.e2e_models.split(",")
        if "minilm" in models:
            bench_minilm_e2e(reps)
        if "gpt" in models:
            bench_gpt_e2e(reps, args.gpt_context)
    if args.e2e_only:
        return
    for out, k, batch in cases:
        print(f"\n## y = x @ W^T, W {out}x{k} (out x in), batch {batch}")
        results = {}
        for name, fn in impls:
            try:
                results[name] = fn(out, k, batch)
            except Exception as exc:  # noqa: BLE001 -- report a failing baseline, keep going
                print(f"{name}: failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}")
        torch_us = results.get("torch fp32 F.linear", (float("nan"), 0))[0]
        nbits_us = results.get("ORT MatMulNBits 4b g32 acc4", (float("nan"), 0))[0]
        print("| implementation | bits/weight | µs/layer | vs torch fp32 | vs MatMulNBits-4b | weight GB/s |")
        print("|---|---|---|---|---|---|")
        for name, (us, nbytes) in results.items():
            print(
                f"| {name} | {8 * nbytes / (out * k):.2f} | {us:.0f} | {torch_us / us:.2f}x | {nbits_us / us:.2f}x "
                f"| {nbytes / us / 1e3:.1f} |"
            )
        for name in ("reshift BCQ q=3 g128", "reshift BCQ q=2 g128"):
            if name in results and results[name][0] > nbits_us:
                print(
                    f"note: {name} is SLOWER than MatMulNBits 4-bit here ({results[name][0]:.0f} vs {nbits_us:.0f} µs)"
                )


if __name__ == "__main__":
    main()
