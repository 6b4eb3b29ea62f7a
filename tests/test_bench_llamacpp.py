"""benchmarks/llamacpp.py without building llama.cpp: llama-bench JSON parsing and the q/k row permutation."""

import json

import numpy as np
import pytest

from benchmarks.llamacpp import _permute, parse_bench_json


def _row(n_prompt: int, n_gen: int, n_depth: int, avg_ts: float) -> dict:
    # the fields llama-bench -o json prints that the parser reads, values as a 2-thread CPU run gives them
    return {"build_commit": "0c1e570", "cpu_info": "Intel(R) Xeon(R) Processor", "model_type": "llama 1B Q4_0",
            "model_size": 636854272, "n_threads": 2, "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": n_depth,
            "avg_ns": int(1e9 * max(n_prompt, n_gen) / avg_ts), "avg_ts": avg_ts, "stddev_ts": 0.5,
            "samples_ts": [avg_ts]}  # fmt: skip


def test_parse_prefill_at_depth_0_and_decode_at_the_prompt_depth():
    text = json.dumps([_row(128, 0, 0, 61.0), _row(128, 0, 128, 55.0), _row(0, 64, 0, 21.0), _row(0, 64, 128, 19.5)])
    r = parse_bench_json(text, prompt=128, new=64)
    assert r["prefill_tokens_per_s"] == 61.0
    assert r["decode_tokens_per_s"] == 19.5 and r["decode_depth"] == 128
    assert r["decode_d0_tokens_per_s"] == 21.0
    assert r["threads"] == 2 and r["build_commit"] == "0c1e570"


def test_parse_falls_back_to_decode_at_depth_0():
    r = parse_bench_json(json.dumps([_row(128, 0, 0, 61.0), _row(0, 64, 0, 21.0)]), prompt=128, new=64)
    assert r["decode_tokens_per_s"] == 21.0 and r["decode_depth"] == 0


def test_parse_refuses_output_without_the_requested_tests():
    with pytest.raises(ValueError, match="no pp128 / tg64"):
        parse_bench_json(json.dumps([_row(512, 0, 0, 61.0)]), prompt=128, new=64)


def test_permute_interleaves_rotary_halves_per_head():
    # one head of dim 4, rows [a0 a1 b0 b1] (HF rotate-half) -> [a0 b0 a1 b1] (GGML pairs)
    w = np.arange(8).reshape(8, 1)
    assert _permute(w, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
