"""llama.cpp as the baseline of benchmarks/llm.py: build, convert, quantize, llama-bench.

    .venv/bin/python benchmarks/llamacpp.py build                              # download + build (cached)
    .venv/bin/python benchmarks/llamacpp.py bench HF_DIR --quants Q4_0,Q2_K    # llama.cpp rows alone

llama.cpp is built from the sources vendored in the ``llama-cpp-python`` sdist (``pip download
--no-deps --no-binary :all:``) into ``~/.cache/reshift/llamacpp`` (``RESHIFT_LLAMACPP_CACHE``):
CPU only, Release, ``-DGGML_NATIVE=ON``, the llama-bench / llama-quantize / llama-perplexity
targets, ``nice`` and ``-j2``; a second run finds the binaries and skips the build.
A local Hugging Face Llama directory (``benchmarks/llm.py``'s random weights) is written as GGUF
(F16 matrices, F32 norms) with the ``gguf`` package vendored beside those sources (its version
matches the binaries), q/k rows permuted as ``convert_hf_to_gguf.py`` does, with a placeholder
SentencePiece vocabulary (llama-bench feeds random token ids, so only its size matters), then
``llama-quantize``-d. ``llama-bench`` times prefill (``-p``) and decode at a context depth of the
prompt length (``-n`` after ``-d``), the same decode ``reshift.llm``'s benchmark times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("RESHIFT_LLAMACPP_CACHE", "~/.cache/reshift/llamacpp")).expanduser()
# llama-cli is left out: in this llama.cpp it links the whole server (LLAMA_BUILD_SERVER), minutes more on 2 cores
TARGETS = ("llama-bench", "llama-quantize", "llama-perplexity")
QUANTS = ("Q4_0", "Q3_K_S", "Q2_K", "TQ2_0", "TQ1_0")
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_CUDA=OFF",
               "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DLLAMA_BUILD_APP=OFF"]  # fmt: skip


def _log(msg: str) -> None:
    print(f"[llamacpp] {msg}", file=sys.stderr, flush=True)


def source_dir() -> Path:
    """The vendored llama.cpp of the newest cached llama-cpp-python sdist (downloaded if none is)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    sdists = sorted(CACHE.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        _log(f"downloading the llama-cpp-python sdist into {CACHE}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python"]
        subprocess.run([*cmd, "-d", str(CACHE)], check=True, stdout=sys.stderr)
        sdists = sorted(CACHE.glob("llama_cpp_python-*.tar.gz"))
    sdist = sdists[-1]
    root = CACHE / sdist.name.removesuffix(".tar.gz")
    if not (root / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        _log(f"unpacking {sdist.name}")
        with tarfile.open(sdist) as tar:
            tar.extractall(CACHE, filter="data")
    return root / "vendor" / "llama.cpp"


def _cmake() -> str:
    found = shutil.which("cmake") or str(Path(sys.executable).with_name("cmake"))
    if not Path(found).exists():
        raise SystemExit("cmake not found: install it (`.venv/bin/pip install cmake`, in the bench extra)")
    return found


def build(needed: tuple[str, ...] = TARGETS) -> Path:
    """The built llama.cpp bin/ folder; builds all targets (minutes on 2 cores) when one ``needed`` is missing."""
    src = source_dir()
    out = CACHE / f"build-{src.parent.parent.name.removeprefix('llama_cpp_python-')}"
    bins = out / "bin"
    if all((bins / t).exists() for t in needed):
        return bins
    cmake = _cmake()
    _log(f"building llama.cpp from {src} into {out} (nice, -j2; minutes)")
    nice = ["nice", "-n", "10"]
    subprocess.run([*nice, cmake, "-S", str(src), "-B", str(out), *CMAKE_FLAGS], check=True, stdout=sys.stderr)
    build_cmd = [*nice, cmake, "--build", str(out), "--config", "Release", "-j2", "--target", *TARGETS]
    subprocess.run(build_cmd, check=True, stdout=sys.stderr)
    return bins


def _gguf():
    """The ``gguf`` package vendored with the built sources (an installed one would not match the binaries)."""
    sys.path.insert(0, str(source_dir() / "gguf-py"))
    import gguf

    return gguf


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-mapped tensors of one safetensors file (F32 / F16 / BF16-as-uint16 are what the writer makes)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    dtypes = {"F32": np.float32, "F16": np.float16}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = dtypes[info["dtype"]]
        count = (end - begin) // np.dtype(dtype).itemsize
        arr = np.memmap(path, dtype=dtype, mode="r", offset=8 + n + begin, shape=(count,))
        out[name] = arr.reshape(info["shape"])
    return out


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k row order to GGML's interleaved pairs (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm"}  # fmt: skip


def add_placeholder_vocab(w, gguf, vocab: int) -> None:
    """A SentencePiece-layout vocabulary of ``vocab`` pieces that tokenizes no text meaningfully (llama-bench only)."""
    # SentencePiece layout: unk, bos, eos, the 256 byte tokens llama.cpp looks up, then filler pieces
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    tokens += [f"\u2581t{i}" for i in range(vocab - len(tokens))]
    types += [gguf.TokenType.NORMAL] * (vocab - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def add_bpe_vocab(w, gguf, tokenizer_json: Path, vocab: int) -> None:
    """The byte-level BPE of a ``tokenizers`` ``tokenizer.json`` (GPT-2 pre-tokenizer, no normalizer) as
    llama.cpp's ``gpt2`` tokenizer: the tokens by id, the merges in rank order, the special tokens as
    CONTROL, the first special token as BOS/EOS, no BOS or EOS added (``train_tiny_llama.py``'s tokenizer).
    Other tokenizers are refused, since llama.cpp would silently split their text differently."""
    tj = json.loads(tokenizer_json.read_text())
    model, pre = tj["model"], tj.get("pre_tokenizer") or {}
    if (
        model.get("type") != "BPE"
        or pre.get("type") != "ByteLevel"
        or not pre.get("use_regex", True)
        or tj.get("normalizer")
    ):
        raise ValueError(
            f"{tokenizer_json}: only a byte-level BPE with GPT-2's regex and no normalizer maps to llama.cpp's gpt2"
        )
    if pre.get("add_prefix_space"):
        raise ValueError(f"{tokenizer_json}: add_prefix_space has no llama.cpp gpt2 equivalent")
    ids = {**model["vocab"], **{t["content"]: t["id"] for t in tj.get("added_tokens", [])}}
    if sorted(ids.values()) != list(range(vocab)):
        raise ValueError(f"{tokenizer_json}: token ids are not 0..{vocab - 1} (the model's vocabulary)")
    tokens = sorted(ids, key=ids.get)
    special = {t["id"] for t in tj.get("added_tokens", []) if t.get("special")}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if special:
        w.add_bos_token_id(min(special))
        w.add_eos_token_id(min(special))
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def write_gguf(hf_dir: Path, path: Path, tokenizer: bool = False) -> Path:
    """The HF Llama directory as an F16 GGUF (norms F32): with ``tokenizer``, the directory's byte-level BPE
    ``tokenizer.json`` (:func:`add_bpe_vocab`, for llama-perplexity on text), else a placeholder vocabulary
    of the config's size (llama-bench feeds random ids)."""
    gguf = _gguf()
    cfg = json.loads((hf_dir / "config.json").read_text())
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv_heads, vocab = cfg.get("num_key_value_heads", heads), cfg["vocab_size"]
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(read_safetensors(f))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(hf_dir.name)
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(h)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(h // heads)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-5))
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    if tokenizer:
        add_bpe_vocab(w, gguf, hf_dir / "tokenizer.json", vocab)
    else:
        add_placeholder_vocab(w, gguf, vocab)
    for name, t in tensors.items():
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            gname = f"blk.{layer}.{HF_TO_GGUF[rest.removesuffix('.weight')]}.weight"
            if rest.startswith("self_attn.q_proj"):
                t = _permute(t, heads)
            elif rest.startswith("self_attn.k_proj"):
                t = _permute(t, kv_heads)
        w.add_tensor(gname, np.asarray(t, np.float32 if t.ndim == 1 else np.float16))
    if "lm_head.weight" not in tensors:  # tied embeddings
        w.add_tensor("output.weight", np.asarray(tensors["model.embed_tokens.weight"], np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def quantize(bins: Path, f16: Path, qtype: str, threads: int = 2) -> Path:
    """``llama-quantize`` f16 to qtype (kept beside it; reused while newer than the f16 file)."""
    out = f16.with_name(f"{f16.stem.removesuffix('-F16')}-{qtype}.gguf")
    if out.exists() and out.stat().st_mtime >= f16.stat().st_mtime:
        return out
    cmd = ["nice", "-n", "10", str(bins / "llama-quantize"), str(f16), str(out), qtype, str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama-quantize {qtype} failed:\n{done.stderr[-2000:]}")
    return out


def tensor_bytes(path: Path) -> dict:
    """Bytes per decoded token (every matrix but the embedding, which reads one row) and the tensor types."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    types: dict[str, int] = {}
    linear = 0
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        if t.name != "token_embd.weight":
            linear += int(t.n_bytes)
    return {"linear_bytes": linear, "tensor_types": types}


def tensor_table(path: Path) -> list[dict]:
    """Every tensor of a GGUF: name, type, element count, bytes and dimension count (for bits per weight)."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    return [
        {
            "name": t.name,
            "type": t.tensor_type.name,
            "n_elements": int(t.n_elements),
            "n_bytes": int(t.n_bytes),
            "n_dims": len(t.shape),
        }  # fmt: skip
        for t in reader.tensors
    ]


def parse_perplexity(text: str) -> dict:
    """``Final estimate: PPL = X +/- Y`` and the chunk count from llama-perplexity's log."""
    import re

    final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", text)
    chunks = re.search(r"(?:calculating perplexity|computing) over (\d+) chunks, n_ctx=(\d+)", text)
    kl = {key: re.search(rf"{pattern}\s*:\s*([-0-9.]+) ± +([-0-9.]+)", text) for key, pattern in KL_LINES.items()}
    if final is None and kl["perplexity"] is not None:  # --kl-divergence prints PPL(Q) in its own summary
        final = kl["perplexity"]
    if final is None or chunks is None:
        raise ValueError(f"llama-perplexity printed no final estimate:\n{text[-2000:]}")
    out = {"perplexity": float(final.group(1)), "stderr": float(final.group(2)), "chunks": int(chunks.group(1)),
           "n_ctx": int(chunks.group(2))}  # fmt: skip
    for key, m in kl.items():
        if key != "perplexity" and m is not None:
            out[key], out[key + "_stderr"] = float(m.group(1)), float(m.group(2))
    return out


# --kl-divergence summary lines (perplexity.cpp's kl_divergence()): statistics paired with the base logits
KL_LINES = {"perplexity": r"Mean PPL\(Q\)", "ppl_ratio": r"Mean PPL\(Q\)/PPL\(base\)", "kld": r"Mean +KLD"}


def read_logits_tokens(path: Path) -> tuple[int, np.ndarray]:
    """``(n_ctx, token ids [n_chunk * n_ctx])`` from the header of a ``--kl-divergence-base`` file: the ids
    llama.cpp's tokenizer gave the text (perplexity.cpp writes ``_logits_``, n_ctx, n_vocab, n_chunk, ids)."""
    with open(path, "rb") as f:
        if f.read(8) != b"_logits_":
            raise ValueError(f"{path}: not a llama-perplexity logits file")
        n_ctx, _, n_chunk = np.frombuffer(f.read(12), np.int32)
        return int(n_ctx), np.frombuffer(f.read(4 * int(n_chunk) * int(n_ctx)), np.int32).copy()


def run_perplexity(
    bins: Path,
    model: Path,
    text_file: Path,
    n_ctx: int,
    chunks: int,
    threads: int = 2,
    tokens_out: Path | None = None,
    kl_base: Path | None = None,
) -> dict:
    """llama-perplexity on ``text_file``: ``chunks`` windows of ``n_ctx`` tokens, the second half of each scored
    (perplexity.cpp's protocol), one sequence per batch; ``tokens_out`` keeps the logits file whose header holds
    the token ids (:func:`read_logits_tokens`) for checking the tokenizer; ``kl_base`` (such a file from another
    model) runs ``--kl-divergence`` against it, adding the paired PPL ratio and the mean KL divergence."""
    cmd = [str(bins / "llama-perplexity"), "-m", str(model), "-f", str(text_file), "-c", str(n_ctx), "-b", str(n_ctx),
           "--chunks", str(chunks), "-t", str(threads)]  # fmt: skip
    if tokens_out is not None:
        cmd += ["--kl-divergence-base", str(tokens_out)]
    elif kl_base is not None:
        cmd += ["--kl-divergence-base", str(kl_base), "--kl-divergence"]
    env = {**os.environ, "OMP_WAIT_POLICY": "passive"}
    for attempt in range(3):  # its log is written by a thread: now and then the summary lines are lost at exit
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"llama-perplexity failed ({done.returncode}):\n{done.stderr[-3000:]}")
        try:
            parsed = parse_perplexity(done.stdout + done.stderr)
        except ValueError:
            if attempt == 2:
                raise
            _log("llama-perplexity's log lost its summary; running it again")
            continue
        return {**parsed, "seconds": time.perf_counter() - t0, "command": " ".join(cmd)}
    raise AssertionError("unreachable")


def parse_bench_json(text: str, prompt: int, new: int) -> dict:
    """Prefill (pp``prompt`` at depth 0) and decode (tg``new`` at depth ``prompt``, else 0) from llama-bench -o json."""
    rows = json.loads(text)
    pp = [r for r in rows if r["n_prompt"] == prompt and r["n_gen"] == 0 and r.get("n_depth", 0) == 0]
    tg = {r.get("n_depth", 0): r for r in rows if r["n_prompt"] == 0 and r["n_gen"] == new}
    if not pp or not tg:
        raise ValueError(
            f"llama-bench output has no pp{prompt} / tg{new} rows: {[(r['n_prompt'], r['n_gen']) for r in rows]}"
        )
    decode = tg.get(prompt, tg.get(0))
    first = rows[0]
    return {
        "prefill_tokens_per_s": pp[0]["avg_ts"],
        "prefill_stddev": pp[0]["stddev_ts"],
        "decode_tokens_per_s": decode["avg_ts"],
        "decode_stddev": decode["stddev_ts"],
        "decode_depth": decode.get("n_depth", 0),
        "decode_d0_tokens_per_s": tg[0]["avg_ts"] if 0 in tg else None,
        "cpu_info": first.get("cpu_info"),
        "build_commit": first.get("build_commit"),
        "model_type": first.get("model_type"),
        "model_size": first.get("model_size"),
        "threads": first.get("n_threads"),
    }


def run_bench(bins: Path, model: Path, threads: int, prompt: int, new: int, repeat: int) -> dict:
    """llama-bench: prefill at depth 0, decode at depth ``prompt``, and the peak RSS.

    ``OMP_WAIT_POLICY=passive``: with libgomp's default spinning, 2-thread Q4_0 decode measured 0.7 tokens/s
    on this shared 2-core host against 19 passive. Where the AMX prefill kernel (``ggml_backend_amx_mul_mat``)
    segfaults, prefill is timed with ``--repack 0`` (no AMX, no repacked kernels) and decode with the default
    kernels at depth 0 (a depth needs that prefill), each its own process; the row says so."""
    try:
        rows, rss, cmd = _bench_once(
            bins, model, threads, ["-p", str(prompt), "-n", str(new), "-d", f"0,{prompt}"], repeat
        )
        return {**parse_bench_json(rows, prompt, new), "rss_mb": rss, "command": cmd, "prefill_repack": True}
    except RuntimeError as exc:
        if "(-11)" not in str(exc):
            raise
        _log(f"{exc}; prefill with --repack 0, decode at depth 0 with the default kernels")
    pp_rows, pp_rss, pp_cmd = _bench_once(bins, model, threads, ["-p", str(prompt), "-n", "0", "--repack", "0"], repeat)
    tg_rows, tg_rss, tg_cmd = _bench_once(bins, model, threads, ["-p", "0", "-n", str(new)], repeat)
    merged = json.dumps(json.loads(pp_rows) + json.loads(tg_rows))
    return {**parse_bench_json(merged, prompt, new), "rss_mb": max(pp_rss, tg_rss), "command": f"{pp_cmd}; {tg_cmd}",
            "prefill_repack": False}  # fmt: skip


def _bench_once(bins: Path, model: Path, threads: int, args: list[str], repeat: int) -> tuple[str, float, str]:
    """One llama-bench process: its JSON, its peak RSS in MB, the command line."""
    cmd = [str(bins / "llama-bench"), "-m", str(model), "-t", str(threads), "-r", str(repeat), "-o", "json", *args]
    env = {**os.environ, "OMP_WAIT_POLICY": "passive"}
    out_path = model.with_suffix(".bench.json")
    with open(out_path, "w") as out, open(model.with_suffix(".bench.log"), "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        peak_kib = 0
        while proc.poll() is None:  # VmHWM, polled: wait4's ru_maxrss carries this Python's peak over the exec
            try:
                for line in open(f"/proc/{proc.pid}/status"):
                    if line.startswith("VmHWM:"):
                        peak_kib = max(peak_kib, int(line.split()[1]))
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
            time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({proc.returncode}): see {model.with_suffix('.bench.log')}")
    return out_path.read_text(), peak_kib / 1024, "OMP_WAIT_POLICY=passive " + " ".join(cmd)


def llamacpp_rows(hf_dir: Path, work: Path, quants, threads: int, prompt: int, new: int, repeat: int) -> list[dict]:
    """One row per quantization type, with the bytes one decoded token reads."""
    bins = build(needed=("llama-bench", "llama-quantize"))
    work.mkdir(parents=True, exist_ok=True)
    f16 = work / "model-F16.gguf"
    if not f16.exists():
        _log(f"writing {f16}")
        write_gguf(hf_dir, f16)
    rows = []
    for q in quants:
        _log(f"llama-quantize {q}")
        path = f16 if q == "F16" else quantize(bins, f16, q, threads)
        _log(f"llama-bench {q}")
        r = run_bench(bins, path, threads, prompt, new, repeat)
        rows.append({"pipeline": f"llama.cpp {q}", "quant": q, **r, "model_bytes": path.stat().st_size,
                     **tensor_bytes(path)})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="download and build llama.cpp (cached)")
    b = sub.add_parser("bench", help="llama-bench rows for a local HF Llama directory")
    b.add_argument("model")
    b.add_argument("--quants", default=",".join(QUANTS))
    b.add_argument("--work", help="where the GGUF files go (default: MODEL/gguf)")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--prompt", type=int, default=128)
    b.add_argument("--new", type=int, default=64)
    b.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.cmd == "build":
        print(build())
        return
    work = Path(args.work) if args.work else Path(args.model) / "gguf"
    rows = llamacpp_rows(
        Path(args.model), work, args.quants.split(","), args.threads, args.prompt, args.new, args.repeat
    )
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
