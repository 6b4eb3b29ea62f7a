"""reshift.llm batch N: ragged prompts in one artifact compiled with ``max_batch``; every sequence's greedy
tokens equal transformers generating it alone, BCQ batch logits equal the numpy reference per sequence,
per-sequence end ids and sampling, the slotted cache written in place, bad input naming the sequence."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import reshift.llm
from reshift.errors import InputError
from reshift.llm.compiler import prepare, read_model
from reshift.llm.reference import forward

sys.path.insert(0, str(Path(__file__).parent))
from llm_tiny import hf_greedy, tiny_model  # noqa: E402

# ragged: 7, 2 and 12 tokens (12 > Mistral's window of 8, so the batched prefill masks by window too)
PROMPTS = [[3, 17, 42, 9, 100, 7, 55], [5, 6], [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
NEW = 24
MAX_SEQ = 64


@pytest.fixture(scope="module")
def compiled():
    cache: dict[tuple, tuple] = {}

    def get(family: str, pipeline: str = "exact"):
        if (family, pipeline) not in cache:
            model = tiny_model(family)
            llm = reshift.llm.compile(model, pipeline=pipeline, max_seq_len=MAX_SEQ, max_batch=3)
            cache[family, pipeline] = (model, llm)
        return cache[family, pipeline]

    return get


def _check_batch_against_transformers(model, llm) -> None:
    logits = llm.prefill_batch(PROMPTS)
    assert logits.shape == (3, llm.vocab_size)
    for j, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            ref = model(torch.tensor([prompt])).logits[0, -1].numpy()
        np.testing.assert_allclose(logits[j], ref, atol=1e-4, rtol=1e-4, err_msg=f"sequence {j}")
    outs = llm.generate(PROMPTS, max_new_tokens=NEW)
    assert isinstance(outs, list) and len(outs) == 3
    for j, (prompt, out) in enumerate(zip(PROMPTS, outs, strict=True)):
        assert out.tolist()[: len(prompt)] == prompt
        assert out.tolist()[len(prompt) :] == hf_greedy(model, prompt, NEW), f"sequence {j}"


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_batch_greedy_matches_transformers_alone(compiled, family):
    _check_batch_against_transformers(*compiled(family))


def test_cli_max_batch_gpt2(tmp_path):
    """`reshift llm compile --max-batch 3` (GPT-2: learned positions are per-sequence too)."""
    from reshift.cli import main

    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "hf")
    args = ["llm", "compile", str(tmp_path / "hf"), "-o", str(tmp_path / "art"), "--pipeline", "exact"]
    assert main([*args, "--max-seq-len", str(MAX_SEQ), "--max-batch", "3"]) == 0
    llm = reshift.llm.load(tmp_path / "art")
    assert llm.max_batch == 3 and llm.meta["batch_cache_shape"] == [2, 3, 4, 64, 16]
    _check_batch_against_transformers(model, llm)


def test_batch_bcq_logits_match_reference(compiled):
    """BCQ 3-bit: batched prefill, a decode step per sequence at its own position, then a step on slots
    2 and 0 only, each sequence's logits equal the numpy decoder on the dequantized weights."""
    model, llm = compiled("llama", "bcq")
    spec, weights, _ = read_model(model)
    dequant: dict[str, np.ndarray] = {}
    prepare(spec, weights, "bcq", 3, None, MAX_SEQ, False, dequant)
    w = {**weights, **dequant}
    shape = (spec.num_layers, spec.num_kv_heads, MAX_SEQ, spec.head_dim)
    caches = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in PROMPTS]

    int8 = llm.meta["decode_lut"] == "int8"  # batch_decode runs the decode GEMV (int8 tables by default)

    def ref(j, ids, pos, decode=True):
        return forward(spec, w, np.array(ids), pos, *caches[j], int8_tables=int8 and decode)

    logits = llm.prefill_batch(PROMPTS)
    for j, prompt in enumerate(PROMPTS):
        np.testing.assert_allclose(
            logits[j], ref(j, prompt, 0, decode=False), atol=2e-4, rtol=1e-4, err_msg=f"sequence {j}"
        )
    step = llm.decode_batch([11, 12, 13])
    for j, prompt in enumerate(PROMPTS):
        np.testing.assert_allclose(step[j], ref(j, [11 + j], len(prompt)), atol=2e-4, rtol=1e-4)
    step = llm.decode_batch([21, 20], slots=[2, 0])
    np.testing.assert_allclose(step[0], ref(2, [21], len(PROMPTS[2]) + 1), atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(step[1], ref(0, [20], len(PROMPTS[0]) + 1), atol=2e-4, rtol=1e-4)
    assert llm.batch_pos.tolist() == [len(PROMPTS[0]) + 2, len(PROMPTS[1]) + 1, len(PROMPTS[2]) + 2]


def test_batch_eos_stream_sampling_and_batch_one(compiled):
    """Each sequence stops at its own end id while the others go on; ``stream(j, id)``; seeded sampling of
    sequence j is generate(prompt_j, seed=seed + j); 1-D prompts still take the batch-1 functions."""
    model, llm = compiled("llama")
    greedy = [llm.generate(np.array(p), max_new_tokens=10) for p in PROMPTS]
    eos = int(greedy[1][len(PROMPTS[1]) + 2])  # sequence 1's third new token
    streamed: list[tuple[int, int]] = []
    outs = llm.generate(PROMPTS, max_new_tokens=10, eos_token_id=eos, stream=lambda j, t: streamed.append((j, t)))
    for j, (g, out) in enumerate(zip(greedy, outs, strict=True)):
        new = g.tolist()[len(PROMPTS[j]) :]
        expected = new[: new.index(eos) + 1] if eos in new else new
        assert out.tolist() == PROMPTS[j] + expected, f"sequence {j}"
        assert [t for s, t in streamed if s == j] == expected
    assert (
        len(outs[1]) <= len(PROMPTS[1]) + 3 and max(len(o) - len(p) for o, p in zip(outs, PROMPTS, strict=True)) == 10
    )
    kw = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    sampled = llm.generate(np.array(PROMPTS, dtype=object), seed=5, **kw)
    for j, prompt in enumerate(PROMPTS):
        np.testing.assert_array_equal(sampled[j], llm.generate(np.array(prompt), seed=5 + j, **kw))
    assert not all(np.array_equal(a, b) for a, b in zip(sampled, llm.generate(PROMPTS, seed=6, **kw), strict=True))
    square = llm.generate(np.array([PROMPTS[0], PROMPTS[0][::-1]]), max_new_tokens=4)  # 2-D, two rows
    assert isinstance(square, list) and square[0].tolist() == greedy[0].tolist()[: len(PROMPTS[0]) + 4]


def test_batch_decode_writes_the_slotted_cache_in_place(compiled):
    model, llm = compiled("llama")
    llm.prefill_batch(PROMPTS)
    ck, cv = llm._slot_caches()
    before = ck.numpy().copy()
    llm.decode_batch([1, 2], slots=[1, 2])
    ck2, cv2 = llm._slot_caches()
    assert ck2.same_as(ck) and cv2.same_as(cv)
    after = ck.numpy()  # [layers, slot, kv, pos, d]
    changed = np.argwhere(np.any(after != before, axis=(0, 2, 4)))
    assert changed.tolist() == [[1, len(PROMPTS[1])], [2, len(PROMPTS[2])]]


def test_batch_bad_input(compiled):
    model, llm = compiled("llama")
    with pytest.raises(InputError, match="4 sequences given, this artifact takes 1 to max_batch=3"):
        llm.generate([[1], [2], [3], [4]], max_new_tokens=4)
    with pytest.raises(InputError, match=r"sequence 1: a prompt must be non-empty 1-D token ids, got shape \(2, 2\)"):
        llm.generate([[1, 2], [[3, 4], [5, 6]]], max_new_tokens=4)
    with pytest.raises(InputError, match="sequence 1: a prompt must be .* got a nested list"):
        llm.generate([[1, 2], [[3, 4], [5]]], max_new_tokens=4)
    with pytest.raises(InputError, match="sequence 2: a prompt must be non-empty"):
        llm.generate([[1, 2], [3], []], max_new_tokens=4)
    with pytest.raises(InputError, match="sequence 2: prompt \\(65 tokens\\) \\+ max_new_tokens \\(1\\) exceeds"):
        llm.generate([[1], [2], [3] * 65], max_new_tokens=1)
    with pytest.raises(InputError, match="sequence 1: prompt \\(60 tokens\\) \\+ max_new_tokens \\(8\\) exceeds"):
        llm.generate([[1], [2] * 60], max_new_tokens=8)
    with pytest.raises(InputError, match="sequence 0: token id 256 is outside the vocabulary"):
        llm.generate([[256], [2]], max_new_tokens=4)
    with pytest.raises(InputError, match="sequence 1: token ids must be integers"):
        llm.generate([[1], [2.5]], max_new_tokens=4)
    llm.prefill_batch([[1] * 60])
    with pytest.raises(InputError, match="slots \\[0, 0\\] must be distinct"):
        llm.decode_batch([1, 2], slots=[0, 0])
    for _ in range(4):
        llm.decode_batch([1])
    with pytest.raises(InputError, match="sequence 0: 65 tokens do not fit the KV cache of max_seq_len=64"):
        llm.decode_batch([1])
    with pytest.raises(InputError, match="max_batch must be"):
        reshift.llm.compile(model, max_batch=0)
