"""LLM generation: a Hugging Face causal LM compiled to ``prefill`` + ``decode`` with a KV cache.

    llm = reshift.llm.compile(model_or_dir, pipeline="bcq", bits=3, max_seq_len=2048)
    ids = llm.generate(input_ids, max_new_tokens=64)      # numpy in, numpy out
    llm.save("llm_dir"); llm2 = reshift.llm.load("llm_dir")  # the runtime alone: no torch

``load`` (and everything ``generate`` needs) lives in ``reshift.runtime.llm``; ``compile`` is loaded
on first use so that importing this package on a runtime-only machine pulls in no compiler code.
"""

from __future__ import annotations

from typing import Any

from reshift.runtime.llm import LLM, load, sample_token


def compile(model_or_dir: Any, *args: Any, **kwargs: Any) -> LLM:  # noqa: A001 -- the API contract's name
    """See :func:`reshift.llm.compiler.compile`."""
    from reshift.llm.compiler import compile as _compile

    return _compile(model_or_dir, *args, **kwargs)


__all__ = ["LLM", "compile", "load", "sample_token"]
