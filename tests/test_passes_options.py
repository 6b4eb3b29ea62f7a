"""Pass options: each pass declares the ``PassContext.options`` keys it reads (``Pass.options``);
``passes.run`` refuses an option no pass reads (a typo) and warns about one the pipeline does not read."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import reshift
from reshift import passes
from reshift.errors import PassError
from reshift.ir import GraphBuilder

PASSES_DIR = Path(passes.__file__).resolve().parent
# a literal key read from an options dict: options.get("k"...), opts["k"], ctx.options.get("k")
READ = re.compile(r"\b(?:options|opts)(?:\.get\(|\[)\"([a-z_0-9]+)\"")


def _graph():
    b = GraphBuilder("opts")
    x = b.input("x", "f32[2,8]")
    w = b.constant(np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32), "w")
    return b.build(b.op("linear", x, w, None, name="fc"))


def test_every_option_a_pass_reads_is_declared():
    """The declarations cover every literal key the pass modules read (a new read must be declared)."""
    declared = set().union(*(p.options for p in passes.PASSES.values()))
    read = {key for path in PASSES_DIR.glob("*.py") for key in READ.findall(path.read_text())}
    assert read, "the scan found no option reads: the pattern no longer matches the code"
    assert read <= declared, f"read but not declared by any pass: {sorted(read - declared)}"


def test_declared_options_are_accepted():
    graph, _ = passes.run(_graph(), "shift", skip=[], shift_bits=4, calib_rows=64)
    assert any(n.op == "shift_linear" for n in graph.nodes)


def test_a_misspelt_option_is_refused_with_the_likely_name():
    with pytest.raises(
        PassError, match=r"unknown pass option 'shift_bit'; did you mean 'shift_bits'\? \(pipeline 'shift'"
    ):
        passes.run(_graph(), "shift", shift_bit=4)


def test_an_option_of_another_pipeline_is_a_warning_naming_its_readers():
    """One option set may serve several pipelines (a sweep): not an error, but not silent either."""
    with pytest.warns(
        UserWarning, match=r"option 'hash_bits' is ignored: pipeline 'shift' does not read it, only binary_"
    ):
        graph, _ = passes.run(_graph(), "shift", hash_bits=8, skip=[])
    assert any(n.op == "shift_linear" for n in graph.nodes)


def test_an_unrelated_name_gets_no_suggestion_and_exact_reads_nothing():
    with pytest.raises(PassError, match=r"unknown pass option 'zzz' \(pipeline 'exact' reads: none\)"):
        passes.run(_graph(), "exact", zzz=1)


def test_composed_pipelines_accept_the_union():
    graph, _ = passes.run(_graph(), "exact+shift", shift_bits=3, skip=[])
    assert any(n.op == "shift_linear" for n in graph.nodes)


def test_compile_refuses_a_misspelt_option():
    with pytest.raises(PassError, match="did you mean 'shift_levels'"):
        reshift.compile(_graph(), pipeline="shift", shift_level=7)
