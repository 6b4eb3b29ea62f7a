"""A generic, untuned CPU schedule: parallel outer loops, SIMD on a contiguous inner loop.

Relax's fused CPU pipeline leaves every kernel as naive scalar loops (NOTES_tvm.md §2), which makes
a ViT-S forward take seconds. This dlight rule applies the two cheap wins to every fused kernel:
- the outer spatial loops (enough of them for ``MIN_PARALLEL_JOBS`` jobs) are fused and run in
  parallel, the inner ones stay serial loops;
- if the output's innermost spatial axis is also innermost (or absent) in every buffer the block
  touches, that axis is split by the SIMD width and vectorized; for a reduction (matmul, conv)
  the reduction loops move outside the vector lane (``C[i, j:j+16] += A[i, k] * B[k, j:j+16]``).
MetaSchedule tuning, where it works, replaces this.
"""

from __future__ import annotations

import logging
from collections import deque

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline_contiguous_spatial
from tvm.target import Target

LOG = logging.getLogger("reshift.schedule_cpu")
# Blocks the rule gave up on, ``"block: error"``: they run as naive serial loops, so a kernel that
# lands here is a performance bug to look at (two such were hidden until this list existed).
SCHEDULE_FAILURES: deque[str] = deque(maxlen=1000)


class ParallelVectorize(dl.cpu.base.CPUScheduleRule):
    """Parallelize and vectorize every block of a fused CPU kernel (see the module docstring)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = try_inline_contiguous_spatial(sch, normalize_prim_func(sch))
        if infos is None:
            return None
        lanes = _vector_lanes(target)
        for info in infos:
            try:
                _schedule_block(sch, info, lanes)
            except Exception as exc:  # noqa: BLE001 -- a block this simple rule cannot handle stays naive
                name = sch.get(info.block_rv).name_hint
                SCHEDULE_FAILURES.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                LOG.debug("generic CPU schedule left block %s naive: %s", name, exc)
        return sch


def _vector_lanes(target: Target) -> int:
    """float32 lanes of one SIMD register (16 on AVX-512, 8 on AVX2, 4 on NEON)."""
    try:
        bits = int(tvm.target.codegen.llvm_get_vector_width(target))
    except Exception:  # noqa: BLE001 -- unknown CPU: assume 128-bit SIMD
        bits = 128
    return max(4, bits // 32)


def _static(extent) -> int | None:
    return int(extent) if isinstance(extent, (int, tirx.IntImm)) else None


def _vars_in(expr) -> list:
    return list(tirx.analysis.undefined_vars(expr))


def _innermost_everywhere(block, var: tirx.Var) -> bool:
    """``var`` indexes only the last dimension (or nothing) of every buffer region of the block."""
    for region in list(block.reads) + list(block.writes):
        ranges = list(region.region)
        for dim, rng in enumerate(ranges):
            if any(v.same_as(var) for v in _vars_in(rng.min)) and dim != len(ranges) - 1:
                return False
    return True


def _lane_partials(sch: s_tir.Schedule, block, kinds: str, reduce: list, lanes: int):
    """The block keeping one partial result per SIMD lane (``rfactor`` of the innermost reduce loop
    split by the vector width; the original block then combines the lanes), or None.

    For a reduction over a contiguous last axis with no spatial axis innermost (a global average
    pool: ``mean`` over ``h, w`` of NCHW), the scalar loop is one dependent add per element,
    latency bound (96x80x80: 0.37 ms single thread). Needs the reduce loops innermost and the last
    one innermost in every buffer."""
    stmt = sch.get(block)
    last = [iv for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    factor = _vector_factor(_static(sch.get(reduce[-1]).extent), lanes)
    if not kinds.endswith("R" * len(reduce)):  # a spatial loop inside the reduction
        return None
    if not last or factor is None or not _innermost_everywhere(stmt, last[-1].var) or len(stmt.writes) != 1:
        return None
    _, lane = sch.split(reduce[-1], factors=[None, factor])
    return sch.rfactor(lane, factor_axis=len(stmt.writes[0].region))  # lane axis last


def _vector_factor(extent: int | None, lanes: int) -> int | None:
    if extent is None:
        return None
    for factor in (lanes, lanes // 2, lanes // 4):
        if factor >= 4 and extent % factor == 0:
            return factor
    return None


def _row_length(block, var: tirx.Var, extent: int | None) -> int | None:
    """The largest constant ``d`` dividing ``extent`` with both ``var // d`` and ``var % d`` in the
    block's indices (a padded image flattened to ``[n, c, rows * row]``, as the conv kernels read
    it), or None.

    Split by ``d``, the indices simplify to the two loop variables; otherwise a fused parallel loop
    runs one element per job with a division chain (PP-OCRv4 det: 96x82x83 pad copy 4.5 ms)."""
    if extent is None:
        return None
    found: dict[type, set[int]] = {tirx.FloorDiv: set(), tirx.FloorMod: set()}

    def visit(expr) -> None:  # the index expressions are sums, products, divisions and mins
        if isinstance(expr, (tirx.FloorDiv, tirx.FloorMod)) and expr.a.same_as(var):
            d = _static(expr.b)
            if d is not None and 1 < d < extent and extent % d == 0:
                found[type(expr)].add(d)
        for child in ("a", "b"):
            if isinstance(getattr(expr, child, None), tvm.ir.expr.Expr):
                visit(getattr(expr, child))

    for region in list(block.reads) + list(block.writes):
        for rng in region.region:
            visit(rng.min)
    return max(found[tirx.FloorDiv] & found[tirx.FloorMod], default=None)


MIN_PARALLEL_JOBS = 128  # enough chunks for any thread count this targets, few enough to keep inner loops
SERIAL_ITERATIONS = 65536  # a block with fewer loop iterations in all runs serially (no pool barrier)


def _small(sch: s_tir.Schedule, loops: list) -> bool:
    """Whether the block's loop nest is static and under ``SERIAL_ITERATIONS`` iterations: a few
    microseconds of work, which a parallel launch (a barrier over the pool) would cost again."""
    total = 1
    for loop in loops:
        extent = _static(sch.get(loop).extent)
        if extent is None:
            return False
        total *= extent
    return total < SERIAL_ITERATIONS


def _parallel_prefix(sch: s_tir.Schedule, spatial: list) -> list:
    """The outer spatial loops to fuse and run in parallel: the shortest prefix with enough jobs.

    The loops after it stay serial inside each job, so the innermost axis keeps its plain loop
    (strength-reduced addressing, LLVM's own vectorizer) instead of one scalar element per parallel
    iteration with a div/mod chain to recover every index: 25x slower on a padding copy
    (NCHW 64x113x113: 2.75 ms vs ~0.1 ms). A symbolic extent (the batch) counts as 1.
    """
    jobs = 1
    for count, loop in enumerate(spatial, start=1):
        jobs *= _static(sch.get(loop).extent) or 1
        if jobs >= MIN_PARALLEL_JOBS:
            return spatial[:count]
    return spatial


def _schedule_block(sch: s_tir.Schedule, info, lanes: int) -> None:
    block = info.block_rv
    loops = sch.get_loops(block)
    kinds = info.dom_kind()
    if len(loops) != len(kinds) or "O" in kinds:
        return
    spatial = [loop for loop, kind in zip(loops, kinds, strict=True) if kind == "S"]
    small = _small(sch, loops)  # before the splits below replace some of these loops
    reduce = [loop for loop, kind in zip(loops, kinds, strict=True) if kind == "R"]
    stmt = sch.get(block)
    inner = None
    if spatial:
        last = [i for i, kind in enumerate(kinds) if kind == "S"][-1]
        row = _row_length(stmt, stmt.iter_vars[last].var, _static(info.iters[last].dom))
        factor = _vector_factor(_static(info.iters[last].dom), lanes)
        if row is not None:  # a flattened image axis: rows as a loop of their own, no div/mod per element
            spatial = spatial[:-1] + list(sch.split(spatial[-1], factors=[None, row]))
        elif factor and _innermost_everywhere(stmt, stmt.iter_vars[last].var):
            outer, inner = sch.split(spatial[-1], factors=[None, factor])
            spatial = spatial[:-1] + [outer]
    partial = _lane_partials(sch, block, kinds, reduce, lanes) if reduce and inner is None else None
    if partial is not None:  # schedule the per-lane block; the one combining the lanes stays serial
        block, loops = partial, sch.get_loops(partial)  # spatial, reduce, lane
        spatial, reduce, inner = loops[: len(spatial)], loops[len(spatial) : -1], loops[-1]
        stmt = sch.get(block)
    if reduce:
        sch.reorder(*spatial, *reduce, *([inner] if inner is not None else []))
    outer = [] if small else _parallel_prefix(sch, spatial)
    if len(outer) > 1:  # before decompose_reduction: a loop over a bare update block cannot be parallel
        sch.parallel(sch.fuse(*outer))
    elif outer:
        sch.parallel(outer[0])
    if inner is not None:
        sch.vectorize(inner)
        if reduce:  # the init block made by decompose_reduction gets a vector loop of its own
            sch.decompose_reduction(block, reduce[0])
            init = sch.get_loops(sch.get_sblock(stmt.name_hint + "_init"))[-1]
            sch.vectorize(init)


def schedule_passes() -> list[tvm.transform.Pass]:
    """The CPU scheduling passes to run after FuseTIR (under ``with target``)."""
    return [dl.ApplyDefaultSchedule(ParallelVectorize())]
