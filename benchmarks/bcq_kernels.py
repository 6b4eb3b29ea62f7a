"""BCQ linear kernels at LLM shapes: the LUT GEMV vs the tile-decoding GEMM vs the fp32 GEMM, by rows.

For each weight shape ``OxK`` and row count it times, in one process with pinned threads (2 by
default): the lookup-table path (``lut_gemv.table_compute`` + ``gemv_func``, what decode runs), the
BCQ GEMM (``bcq_gemm.gemm_func``, what prefill runs) and the fp32 packed-panel GEMM of
``dense_cpu.py`` on the same (decoded) weights. Weights are cold: every call reads the next of
enough copies to exceed 2x the L3, as in a decoder where each layer's weights are read once per
step. Prints ms per call, GFLOP/s (2*rows*O*K), weight GB/s, and where the GEMM overtakes the LUT
GEMV (``bcq_gemm.GEMM_MIN_ROWS`` should sit there). The CPU and the load average are printed.

    .venv/bin/python benchmarks/bcq_kernels.py                       # TinyLlama shapes, q=3, rows 1..128
    .venv/bin/python benchmarks/bcq_kernels.py --shapes 11264x2048 --q 2 --rows 1,16,128
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def l3_bytes() -> int:
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text[:-1]) * 1024 if text.endswith("K") else int(text)
    except OSError:
        return 32 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="2560x2048,2048x2048,11264x2048,2048x5632", help="OxK weights")
    ap.add_argument("--q", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--rows", default="1,4,8,16,32,128")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--no-dense", action="store_true", help="skip the fp32 GEMM")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = args.threads

    import numpy as np
    import tvm
    from tvm import te

    from reshift.codegen.tvm.kernels.bcq_gemm import GEMM_MIN_ROWS, gemm_func
    from reshift.codegen.tvm.kernels.dense_cpu import dense_func, pack_panels
    from reshift.codegen.tvm.kernels.lowbit import kernel_flavor
    from reshift.codegen.tvm.kernels.lut_gemv import gemv_func, table_compute
    from reshift.codegen.tvm.kernels.packing import ROWS, pack_bcq
    from reshift.codegen.tvm.targets import resolve_target
    from reshift.ir.ops_lowbit import bcq_weight, pack_signs

    target = resolve_target("cpu").target()
    avx512 = kernel_flavor() == "avx512"

    def build(func):
        return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)["main"]

    def timed(call, copies, repeat):
        """Seconds per ``call(i)``, each call on the next copy of the weights (copy 0 warms the code up)."""
        call(0)
        t0 = time.perf_counter()
        for i in range(repeat):
            call(1 + i % (len(copies) - 1))
        return (time.perf_counter() - t0) / repeat

    def lut_path(funcs, acts, weights):
        table, gemv = funcs
        x, lut, y = acts
        table(x, lut)
        gemv(lut, *weights, y)

    rng = np.random.default_rng(0)
    rows_list = [int(r) for r in args.rows.split(",")]
    g, q = args.group_size, args.q
    print(f"CPU: {cpu_name()}  threads {args.threads}  flavor {kernel_flavor()}  load average {os.getloadavg()[0]:.1f}")
    print(f"{'shape':>11} {'rows':>4} {'LUT ms':>8} {'GEMM ms':>8} {'fp32 ms':>8} {'LUT GF/s':>8} {'GEMM GF/s':>9} "
          f"{'fp32 GF/s':>9} {'LUT GB/s':>8}")  # fmt: skip
    results = []
    for shape in args.shapes.split(","):
        out, k = (int(d) for d in shape.split("x"))
        bits = pack_signs(np.where(rng.random((q, out, k)) < 0.5, -1, 1))
        alpha = (rng.random((out, -(-k // g), q)) / np.sqrt(k)).astype(np.float16)
        words, alpha_p = pack_bcq(bits, alpha.astype(np.float32), g, k, "float16")
        blocks, n_groups = words.shape[:2]
        bias = np.zeros(blocks * ROWS, np.float32)
        packed_bytes = words.nbytes + alpha_p.nbytes + bias.nbytes
        n_copies = max(3, 2 * l3_bytes() // packed_bytes + 2)
        copies = [[tvm.runtime.tensor(a) for a in (words, alpha_p, bias)] for _ in range(n_copies)]
        dense_copies = []
        if not args.no_dense:
            panels = pack_panels(bcq_weight(bits, alpha.astype(np.float32), g, k))
            dense_copies = [
                [tvm.runtime.tensor(panels), tvm.runtime.tensor(bias)]
                for _ in range(max(3, 2 * l3_bytes() // panels.nbytes + 2))
            ]
        gemv = build(gemv_func(blocks, n_groups, q, g, avx512, alpha_dtype="float16"))
        gemm = build(gemm_func(blocks, n_groups, q, g, k, "float16"))
        x_ph = te.placeholder((te.var("rows", "int64"), k), "float32", name="x")
        table = build(te.create_prim_func([x_ph, table_compute(x_ph, k, g)]))
        dense = build(dense_func(k, blocks)) if dense_copies else None
        for rows in rows_list:
            x = tvm.runtime.tensor(rng.standard_normal((rows, k)).astype(np.float32))
            lut = tvm.runtime.tensor(np.zeros((rows, n_groups, 32 * (-(-g // 32)) // 4, ROWS), np.float32))
            y = tvm.runtime.tensor(np.zeros((rows, blocks * ROWS), np.float32))

            t_lut = timed(lambda i, f=(table, gemv), a=(x, lut, y), c=copies: lut_path(f, a, c[i]), copies, args.repeat)
            t_gemm = timed(lambda i, a=(x, y), f=gemm, c=copies: f(a[0], *c[i], a[1]), copies, args.repeat)
            t_dense = (
                timed(lambda i, a=(x, y), f=dense, c=dense_copies: f(a[0], *c[i], a[1]), dense_copies, args.repeat)
                if dense
                else float("nan")
            )
            flop = 2.0 * rows * out * k
            row = {
                "shape": shape,
                "q": q,
                "rows": rows,
                "lut_ms": t_lut * 1e3,
                "gemm_ms": t_gemm * 1e3,
                "fp32_ms": t_dense * 1e3,
                "lut_gflops": flop / t_lut / 1e9,
                "gemm_gflops": flop / t_gemm / 1e9,
                "fp32_gflops": flop / t_dense / 1e9,
                "lut_weight_gbs": packed_bytes / t_lut / 1e9,
            }
            results.append(row)
            print(
                f"{shape:>11} {rows:>4} {row['lut_ms']:>8.3f} {row['gemm_ms']:>8.3f} {row['fp32_ms']:>8.3f} "
                f"{row['lut_gflops']:>8.1f} {row['gemm_gflops']:>9.1f} {row['fp32_gflops']:>9.1f} "
                f"{row['lut_weight_gbs']:>8.1f}",
                flush=True,
            )
    faster = sorted({r["rows"] for r in results if r["gemm_ms"] < r["lut_ms"]})
    print(f"GEMM faster than the LUT GEMV at rows {faster} (GEMM_MIN_ROWS = {GEMM_MIN_ROWS})")
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    if args.json:
        meta = {"cpu": cpu_name(), "threads": args.threads, "load_end": os.getloadavg()[0]}
        Path(args.json).write_text(json.dumps({**meta, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
