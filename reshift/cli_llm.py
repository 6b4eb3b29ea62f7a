"""CLI commands for LLM artifacts: ``reshift llm compile``, ``reshift generate``, ``reshift bench`` on one.

    reshift llm compile MODEL_DIR -o OUT [--pipeline bcq --bits 3 --calib-text FILE] [--max-seq-len N] [-q]
    reshift llm compile MODEL_DIR -o OUT --max-batch 8   # also batched generation, up to 8 prompts at once
    reshift generate OUT --prompt-ids 1,2,3 -n 64 [--sample --temperature T --top-k K --top-p P --seed S]
    reshift generate OUT --prompt "text" --tokenizer MODEL_DIR     # needs the `tokenizers` package
    reshift bench OUT                                              # prefill and decode tokens/s
    reshift llm compile MODEL_DIR -o OUT_ARM64 --target arm64      # cross-linked for aarch64
    reshift generate OUT_ARM64 --remote 127.0.0.1:9090 --prompt-ids 1,2,3   # on the device, over TVM RPC

Bad input raises a :class:`~reshift.errors.ReshiftError`, which ``reshift.cli.main`` turns into exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np

from reshift.errors import InputError, ModelLoadError


def add_parsers(sub) -> None:
    """Register ``llm`` (with its ``compile`` subcommand) and ``generate``."""
    p = sub.add_parser("llm", help="LLM generation: compile a Hugging Face causal LM with a KV cache")
    llm_sub = p.add_subparsers(dest="llm_command", required=True)
    c = llm_sub.add_parser("compile", help="compile a local Hugging Face model directory to an LLM artifact")
    c.add_argument("model", help="model directory (config.json + *.safetensors)")
    c.add_argument("-o", "--output", required=True, help="artifact directory to write")
    c.add_argument("--pipeline", default="bcq", choices=["exact", "bcq", "ternary"], help="default: bcq")
    c.add_argument(
        "--bits",
        type=float,
        default=3,
        help="BCQ bit planes 2/3/4, or an average budget (e.g. 2.5) allocated per layer",
    )
    c.add_argument("--calib-text", help="calibration text file (tokenized with the model dir's tokenizer.json)")
    c.add_argument("--calib-tokens", type=int, default=256, help="calibration tokens to use (default: 256)")
    c.add_argument("--max-seq-len", type=int, default=2048, help="KV cache length (default: 2048)")
    c.add_argument("--lm-head", action="store_true", help="quantize lm_head too")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar (none when stderr is not a terminal)")
    c.add_argument(
        "--calib-ids", help="calibration token ids: a .npy file of [sequences, tokens] (instead of --calib-text)"
    )
    c.add_argument(
        "--target",
        default="cpu",
        help="cpu (this machine), arm64 (cross-linked) or cuda (sm_90 kernels; runs where a GPU is; default: cpu)",
    )
    c.add_argument("--max-batch", type=int, default=1, help="sequences per batched generate call (default: 1)")
    c.add_argument(
        "--decode-lut",
        choices=["int8", "float32"],
        help="tables of the BCQ/ternary decode GEMV: int8 (T-MAC) or float32 (default: int8 where the CPU has "
        "AVX-512 BW+VBMI+VNNI)",
    )

    g = sub.add_parser("generate", help="generate tokens with an LLM artifact")
    g.add_argument("model", help="LLM artifact directory")
    g.add_argument("--prompt-ids", help="prompt token ids, comma separated")
    g.add_argument("--prompt", help="prompt text (needs --tokenizer or a tokenizer.json in the artifact dir)")
    g.add_argument("--tokenizer", help="tokenizer.json, or a model directory holding one")
    g.add_argument("-n", "--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, help="random seed for sampling")
    g.add_argument("--no-eos", action="store_true", help="do not stop at the model's end-of-sequence id")
    g.add_argument("--json", action="store_true", help="print the ids as JSON")
    add_device_options(g)


def add_device_options(p: argparse.ArgumentParser) -> None:
    """``--remote``/``--rpc HOST:PORT``, ``--tracker``, ``--key``, ``--timeout``: run on a device over TVM RPC."""
    from reshift.cli_remote import add_remote_options, add_timeout_option

    add_remote_options(p)
    p.add_argument("--remote", dest="rpc", metavar="HOST:PORT", help="same as --rpc: run on this device over TVM RPC")
    add_timeout_option(p)


@contextlib.contextmanager
def _closing(llm):
    """Yield ``llm``; a remote one's session is ended afterwards (an RPC server serves one at a time)."""
    try:
        yield llm
    finally:
        if hasattr(llm, "close"):
            llm.close()


def open_llm(args: argparse.Namespace):
    """The artifact loaded here, or on the device given by --remote/--rpc or --tracker/--key."""
    import reshift.llm

    if getattr(args, "rpc", None) or getattr(args, "tracker", None):
        from reshift.runtime.llm_remote import connect_llm

        return connect_llm(args.model, rpc=args.rpc, tracker=args.tracker, key=args.key, timeout=args.timeout)
    return reshift.llm.load(args.model, device=_built_device(args.model))


def _built_device(directory: str) -> str:
    """``cuda`` for an artifact built for CUDA, else ``cpu`` (a broken llm.json is load()'s to report)."""
    from reshift.runtime.llm import LLM_META, built_target

    try:
        meta = json.loads((Path(directory) / LLM_META).read_text())
        return str(built_target(meta).get("device_type", "cpu"))
    except (OSError, ValueError, AttributeError):
        return "cpu"


def _tokenizer(path: str | Path):
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ModelLoadError(f"{path}: no tokenizer.json; pass --prompt-ids, or --tokenizer with a tokenizers file")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ModelLoadError("--prompt needs the `tokenizers` package (pip install tokenizers)") from None
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # noqa: BLE001 -- tokenizers raises its own exception type
        raise ModelLoadError(f"{file}: the tokenizers package cannot read it ({exc})") from None


def parse_ids(text: str) -> np.ndarray:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise InputError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise InputError("--prompt-ids is empty")
    return np.array(ids, np.int64)


class FitProgress:
    """``reshift llm compile``'s progress (rich, on stderr): a bar over the fused linears and, as each
    is done, a line with its members' bits, relative weight / output error and fit seconds. Draws
    nothing when ``enabled`` is false (``--quiet``, or stderr not a terminal) or rich is missing."""

    def __init__(self, enabled: bool, console=None) -> None:
        self._bar = self._task = None
        if not enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        except ImportError:
            return
        self._bar = Progress(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
        )

    def __enter__(self) -> FitProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, name: str, done: int, total: int) -> None:
        if self._bar is None:
            return
        if self._task is None:
            self._task = self._bar.add_task(name, total=total)
        self._bar.update(self._task, completed=done, description=name)

    def linear_done(self, name: str, rows: list[dict], seconds: float) -> None:
        if self._bar is None:
            return
        self._bar.advance(self._task)
        task = self._bar.tasks[-1]
        if task.total is not None and task.completed >= task.total:
            self._bar.update(self._task, description="TVM build")
        for r in rows:
            out_err = f" out_err {r['output_error']:.4f}" if "output_error" in r else ""
            self._bar.console.print(
                f"  {r['name']:<22} {r['bits']!s:>7} bits  w_err {r['weight_error']:.4f}{out_err}"
                f"  {r.get('seconds', 0.0):6.2f} s",
                highlight=False,
            )
        if len(rows) > 1:
            self._bar.console.print(f"  {name:<22} {seconds:.2f} s", style="dim", highlight=False)


def llm_compile(args: argparse.Namespace) -> int:
    import reshift.llm
    from reshift.llm.compiler import format_report

    calibration = None
    if args.calib_text:
        text_path = Path(args.calib_text)
        if not text_path.is_file():
            raise InputError(f"--calib-text {text_path}: no such file")
        ids = _tokenizer(args.model).encode(text_path.read_text()).ids[: args.calib_tokens]
        if not ids:
            raise InputError(f"--calib-text {text_path} tokenizes to no tokens")
        calibration = np.array(ids, np.int64)
    elif args.calib_ids:
        try:
            calibration = np.load(args.calib_ids)
        except (OSError, ValueError) as exc:
            raise InputError(f"--calib-ids {args.calib_ids}: not a readable .npy file ({exc})") from None
    print(
        f"compiling {args.model} ({args.pipeline}{f', {args.bits} bits' if args.pipeline == 'bcq' else ''}) ...",
        file=sys.stderr,
    )
    with FitProgress(not args.quiet and sys.stderr.isatty()) as progress:
        llm = reshift.llm.compile(
            args.model,
            pipeline=args.pipeline,
            bits=int(args.bits) if float(args.bits).is_integer() else args.bits,
            calibration=calibration,
            max_seq_len=args.max_seq_len,
            quantize_lm_head=args.lm_head,
            target=args.target,
            out_dir=args.output,
            max_batch=args.max_batch,
            decode_lut=args.decode_lut,
            progress=progress,
        )
    tok = Path(args.model) / "tokenizer.json"
    if tok.is_file():
        (Path(args.output) / "tokenizer.json").write_bytes(tok.read_bytes())
    print(format_report(llm.report))
    print(f"wrote {args.output} ({llm.spec['family']}, {llm.spec['num_layers']} layers, max_seq_len {llm.max_seq_len})")
    return 0


def generate(args: argparse.Namespace) -> int:
    if (args.prompt_ids is None) == (args.prompt is None):
        raise InputError("give exactly one of --prompt-ids 1,2,3 or --prompt TEXT")
    with _closing(open_llm(args)) as llm:
        return _generate(args, llm)


def _generate(args: argparse.Namespace, llm) -> int:
    tokenizer = None
    if args.prompt is not None:
        tokenizer = _tokenizer(args.tokenizer or args.model)
        prompt = np.array(tokenizer.encode(args.prompt).ids, np.int64)
    else:
        prompt = parse_ids(args.prompt_ids)
    ids = llm.generate(
        prompt,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=None if args.no_eos else (llm.eos_token_id or None),
        seed=args.seed,
    )
    new = [int(t) for t in ids[len(prompt) :]]
    if args.json:
        print(json.dumps({"prompt_ids": prompt.tolist(), "new_ids": new}))
    elif tokenizer is not None:
        print(tokenizer.decode([int(t) for t in ids]))
    else:
        print(",".join(map(str, new)))
    return 0


def bench_llm(args: argparse.Namespace) -> int:
    """``reshift bench OUT`` for an LLM artifact: prefill and decode tokens/s (on the device with --rpc,
    where the host's round trips per step are included)."""
    with _closing(open_llm(args)) as llm:
        prompt = min(128, llm.max_seq_len // 2)
        stats = llm.benchmark(prompt_len=prompt, new_tokens=min(32, llm.max_seq_len - prompt))
    where = f" on {llm.where}" if hasattr(llm, "where") else ""
    print(
        f"{llm.spec['family']} ({llm.meta['pipeline']}){where}: prefill {stats['prefill_tokens_per_s']:.1f} tokens/s "
        f"({stats['prompt_tokens']}-token prompt), decode {stats['decode_tokens_per_s']:.1f} tokens/s "
        f"({stats['decode_ms_per_token']:.2f} ms/token)"
    )
    return 0


def inspect_llm(args: argparse.Namespace) -> int:
    """``reshift inspect OUT`` for an LLM artifact: the decoder description and the per-layer report
    (read from llm.json; nothing is loaded)."""
    from reshift.llm.compiler import format_report
    from reshift.runtime.llm import LLM_META, built_target

    meta = json.loads((Path(args.model) / LLM_META).read_text())
    spec = meta["spec"]
    print(
        f"{spec['family']}: {spec['num_layers']} layers, hidden {spec['hidden_size']}, heads "
        f"{spec['num_heads']}/{spec['num_kv_heads']} (head_dim {spec['head_dim']}), ffn {spec['ffn_size']}, "
        f"vocab {spec['vocab_size']}; pipeline {meta['pipeline']}, max_seq_len {meta['max_seq_len']}, "
        f"KV cache {meta['cache_shape']} x2 float32; target {built_target(meta)['name']}"
    )
    print(format_report(meta.get("report", {})))
    return 0
