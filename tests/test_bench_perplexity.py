"""benchmarks/llm_perplexity.py's protocol (llama-perplexity's chunking and scoring) on a tiny random Llama,
and the tokenizer-bearing GGUF writer against llama.cpp's own tokenization (skipped when it is not built)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from benchmarks import llamacpp
from benchmarks.llm_perplexity import (
    all_logits,
    artifact_logits_fn,
    check_against_reference,
    numpy_logits_fn,
    paired,
    score_chunks,
)

N_CTX = 16


@pytest.fixture(scope="module")
def tiny():
    """A random Llama (hidden 64, 2 layers, 4 heads / 2 KV heads, vocab 320), its spec and canonical weights."""
    from reshift.llm.compiler import read_model

    torch.manual_seed(0)
    shape = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    config = transformers.LlamaConfig(vocab_size=320, intermediate_size=128, max_position_embeddings=64, **shape)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    spec, weights, _ = read_model(model)
    return model, spec, weights


def _direct_ppl(model, tokens: np.ndarray, n_ctx: int, n_chunks: int) -> tuple[float, int]:
    """Perplexity written out by hand: torch logits per window, numpy log-softmax, second half scored."""
    nll = []
    for i in range(n_chunks):
        window = tokens[i * n_ctx : (i + 1) * n_ctx]
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(window)[None]).logits[0].double().numpy()
        logp = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        for pos in range(n_ctx // 2, n_ctx - 1):  # logits at pos predict token pos + 1
            nll.append(-logp[pos, window[pos + 1]])
    return float(np.exp(np.mean(nll))), len(nll)


def test_protocol_matches_a_direct_log_softmax_computation(tiny):
    model, spec, weights = tiny
    tokens = np.random.default_rng(1).integers(0, 320, 3 * N_CTX + 5)
    r = score_chunks(numpy_logits_fn(spec, weights), tokens, N_CTX, n_chunks=10)
    ppl, count = _direct_ppl(model, tokens, N_CTX, 3)
    assert r["chunks"] == 3 and r["scored_tokens"] == count == 3 * (N_CTX // 2 - 1)
    assert r["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert 0 < r["stderr"] < r["perplexity"]


def test_vectorized_forward_matches_the_reference_decoder(tiny):
    _, spec, weights = tiny
    ids = np.random.default_rng(2).integers(0, 320, 20)
    assert check_against_reference(spec, weights, ids, (1, 9, 20)) < 1e-5


def test_artifact_protocol_prefills_then_decodes_each_scored_position(tiny):
    _, spec, weights = tiny

    class StepModel:  # prefill / decode with the runtime's contract, computed by the numpy forward
        def prefill(self, ids, pos=0):
            assert pos == 0
            self.seen = list(ids)
            return all_logits(spec, weights, np.array(self.seen))[-1]

        def decode(self, token):
            self.seen.append(token)
            return all_logits(spec, weights, np.array(self.seen))[-1]

    tokens = np.random.default_rng(3).integers(0, 320, 2 * N_CTX)
    a = score_chunks(artifact_logits_fn(StepModel()), tokens, N_CTX, 2)
    b = score_chunks(numpy_logits_fn(spec, weights), tokens, N_CTX, 2)
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5)


def test_paired_statistics_are_zero_against_itself_and_positive_for_a_perturbed_model(tiny):
    _, spec, weights = tiny
    tokens = np.random.default_rng(4).integers(0, 320, 2 * N_CTX)
    a = score_chunks(numpy_logits_fn(spec, weights), tokens, N_CTX, 2, keep=True)
    noisy = {**weights, "layers.0.q.w": weights["layers.0.q.w"] * 1.5}
    b = score_chunks(numpy_logits_fn(spec, noisy), tokens, N_CTX, 2, keep=True)
    same = paired(a, a)
    assert same["ppl_ratio"] == 1.0 and same["kld"] == 0.0
    other = paired(a, b)
    assert other["kld"] > 0 and other["ppl_ratio"] == pytest.approx(b["perplexity"] / a["perplexity"], rel=1e-9)


def test_parse_perplexity_reads_the_kl_divergence_summary():
    text = """perplexity: computing over 16 chunks, n_ctx=256, batch_size=256, n_seq=1
====== Perplexity statistics ======
Mean PPL(Q)                   : 252.913120 ±   8.270061
Mean PPL(base)                : 250.501817 ±   8.181513
Mean PPL(Q)/PPL(base)         :   1.009626 ±   0.002100
====== KL divergence statistics ======
Mean    KLD:   0.012345 ±   0.000456
"""
    r = llamacpp.parse_perplexity(text)
    assert r["chunks"] == 16 and r["n_ctx"] == 256
    assert r["perplexity"] == 252.91312 and r["stderr"] == 8.270061
    assert r["ppl_ratio"] == 1.009626 and r["kld"] == 0.012345 and r["kld_stderr"] == 0.000456


def test_score_chunks_refuses_text_shorter_than_two_windows(tiny):
    _, spec, weights = tiny
    with pytest.raises(ValueError, match="at least 32 tokens"):
        score_chunks(numpy_logits_fn(spec, weights), np.zeros(31, np.int64), N_CTX, 4)


def _bins():
    bins = llamacpp.CACHE.glob("build-*/bin/llama-perplexity")
    found = sorted(bins)
    if not found:
        pytest.skip("llama.cpp is not built (`benchmarks/llamacpp.py build`)")
    return found[-1].parent


def test_gguf_bpe_tokenizer_reproduces_our_ids_and_perplexity(tiny, tmp_path):
    bins = _bins()
    from benchmarks.train_tiny_llama import train_tokenizer

    model, spec, weights = tiny
    text = "\n\n".join(
        f"Return the {w} of the path, as a string; raise OSError when {w} (e.g. 'x.y') can't be read: {i}."
        for i, w in enumerate(["name", "stem", "suffix", "parent", "anchor", "root"] * 4)
    )
    tok = train_tokenizer(text, vocab_size=320)
    ids = np.asarray(tok.encode(text).ids)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    f16 = llamacpp.write_gguf(tmp_path / "hf", tmp_path / "m-F16.gguf", tokenizer=True)
    (tmp_path / "t.txt").write_text(text)
    r = llamacpp.run_perplexity(bins, f16, tmp_path / "t.txt", N_CTX, 4, tokens_out=tmp_path / "ids.logits")
    n_ctx, theirs = llamacpp.read_logits_tokens(tmp_path / "ids.logits")
    assert n_ctx == N_CTX and len(theirs) == 4 * N_CTX
    np.testing.assert_array_equal(theirs, ids[: len(theirs)])
    ours = score_chunks(numpy_logits_fn(spec, weights), ids, N_CTX, 4)
    assert r["chunks"] == 4 and r["perplexity"] == pytest.approx(ours["perplexity"], rel=2e-2)  # F16 weights


def test_gguf_bpe_writer_refuses_a_tokenizer_llamacpp_would_split_differently(tmp_path):
    import json

    if not any(llamacpp.CACHE.glob("llama_cpp_python-*/vendor/llama.cpp/gguf-py")):
        pytest.skip("the llama.cpp sources (its gguf package) are not unpacked")
    gguf = llamacpp._gguf()
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}, "pre_tokenizer": None}))
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    with pytest.raises(ValueError, match="byte-level BPE"):
        llamacpp.add_bpe_vocab(w, gguf, path, 4)
