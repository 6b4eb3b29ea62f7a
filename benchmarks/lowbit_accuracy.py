"""Accuracy of reshift's low-bit weight passes on REAL weights: all-MiniLM-L6-v2 sentence embeddings.

Corpus: first sentences of the docstrings of Python standard-library modules and their public
functions/classes (:func:`docstring_sentences`: real English, offline, deterministic for one Python
version). Evaluation uses one set of sentences; calibration (activation-aware fitting) a disjoint one.

Metric: mean cosine similarity of each sentence's embedding to the fp32 model's. Methods, all on
the same layers (every ``linear`` of the encoder, 36 matrices; embeddings stay float) and the same
group size: BCQ q=2/3/4 and ternary (``passes/bcq.py``), power-of-two shift (``passes/shift.py``),
and round-to-nearest uniform group-wise quantization (RTN, asymmetric and symmetric, :func:`rtn_weight`)
at the same code bits. BCQ/ternary run weight-only and with calibration; shift and RTN have no
output-aware fit (their columns repeat). Runs the passes on the IR and evaluates with reshift's
reference interpreter. Calibrated BCQ/ternary use the passes' default sequential calibration with
the float model's outputs as target (``--calibration``: ``sequential-asymmetric``, ``sequential``
(GPTQ's procedure, target the layer's own float output) or ``independent`` (every layer on the
float model's activations)).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lowbit_accuracy.py [--quick] [--shift-only]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import argparse  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# modules whose docstrings form the corpus; order matters for determinism
CORPUS_MODULES = (
    "json", "collections", "pathlib", "argparse", "textwrap", "functools", "itertools", "string",
    "os", "shutil", "subprocess", "logging", "datetime", "calendar", "random", "statistics",
    "decimal", "fractions", "heapq", "bisect", "csv", "zipfile", "tarfile", "gzip", "email",
    "urllib.parse", "http.client", "socket", "threading", "queue", "asyncio", "unittest", "doctest",
    "pdb", "inspect", "typing", "dataclasses", "enum", "abc", "contextlib", "tempfile", "glob",
    "fnmatch", "difflib", "pprint", "copy", "pickle", "shelve", "sqlite3", "hashlib", "hmac",
    "secrets", "base64", "binascii", "struct", "codecs", "locale", "gettext", "uuid", "weakref",
    "operator", "math", "cmath", "time", "sched", "selectors", "signal", "mimetypes", "configparser",
    "tokenize", "ast", "dis", "traceback", "warnings", "platform", "sysconfig", "timeit", "trace",
    "getopt", "optparse", "ftplib", "smtplib", "imaplib", "poplib", "xml.dom.minidom", "html.parser",
    "wave", "colorsys", "graphlib", "ipaddress", "netrc", "plistlib", "reprlib", "runpy", "zipapp",
)  # fmt: skip
CALIBRATION_MODES = {
    "sequential-asymmetric": {"sequential": True, "asymmetric": True},
    "sequential": {"sequential": True, "asymmetric": False},
    "independent": {"sequential": False, "asymmetric": False},
}
_SENTENCE = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'()\-]+[a-z][.]$")


def _first_sentence(doc: str | None) -> str | None:
    if not doc:
        return None
    text = " ".join(doc.strip().split("\n\n")[0].split())
    end = re.search(r"(?<=[a-z)])\.(\s|$)", text)
    if end is None:
        return None
    sentence = text[: end.start() + 1]
    if not 30 <= len(sentence) <= 160 or len(sentence.split()) < 6 or not _SENTENCE.match(sentence):
        return None
    return sentence


def public_docstrings(module_name: str, methods: bool = True) -> list[str | None]:
    """Docstrings of a corpus module, its public functions and classes (and their public methods)."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []
    docs = [module.__doc__]
    for name in sorted(vars(module)):
        obj = getattr(module, name)
        if name.startswith("_") or getattr(obj, "__module__", module_name) != module.__name__:
            continue
        if inspect.isfunction(obj) or inspect.isclass(obj):
            docs.append(obj.__doc__)
            if methods and inspect.isclass(obj):
                # methods defined here: a library may patch its own into a stdlib class (transformers into Logger)
                docs += [
                    m.__doc__
                    for n, m in sorted(vars(obj).items())
                    if inspect.isfunction(m) and n[0] != "_" and m.__module__ == module.__name__
                ]
    return docs


def docstring_sentences(limit: int | None = None) -> list[str]:
    """Distinct first sentences of stdlib module / public member docstrings, in a fixed order."""
    seen: dict[str, None] = {}
    for module_name in CORPUS_MODULES:
        docs = public_docstrings(module_name)
        for doc in docs:
            sentence = _first_sentence(doc)
            if sentence:
                seen.setdefault(sentence, None)
        if limit is not None and len(seen) >= limit:
            break
    sentences = list(seen)
    return sentences[:limit] if limit is not None else sentences


def split_corpus(n_eval: int, n_calib: int) -> tuple[list[str], list[str]]:
    """Disjoint evaluation and calibration sentences: evaluation evenly spaced over the corpus (so
    it spans all modules and does not depend on ``n_calib``), calibration evenly spaced over the rest."""
    sentences = docstring_sentences()
    if len(sentences) < n_eval + n_calib:
        raise SystemExit(f"corpus has only {len(sentences)} sentences, need {n_eval + n_calib}")
    picked = {int(i * len(sentences) / n_eval) for i in range(n_eval)}
    evaluation = [s for i, s in enumerate(sentences) if i in picked]
    rest = [s for i, s in enumerate(sentences) if i not in picked]
    return evaluation, [rest[int(i * len(rest) / n_calib)] for i in range(n_calib)]


def pack_calibration(tokenizer, sentences: list[str], seq_len: int) -> dict[str, np.ndarray]:
    """Calibration sentences concatenated (``[SEP]`` between) into full ``seq_len`` windows, as GPTQ
    calibrates on text windows: every row is a real token. Padded rows would put ~half padding
    tokens, which the pooling ignores, into the Hessian ``X^T X``."""
    ids: list[int] = []
    for sentence in sentences:
        ids += tokenizer(sentence, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
    body = seq_len - 2
    windows = [
        [tokenizer.cls_token_id, *ids[i : i + body], tokenizer.sep_token_id]
        for i in range(0, len(ids) - body + 1, body)
    ]
    input_ids = np.array(windows, np.int64)
    return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)}


# -- round-to-nearest baseline --------------------------------------------------------------------
def rtn_weight(w: np.ndarray, bits: int, group_size: int, symmetric: bool) -> np.ndarray:
    """Round-to-nearest uniform quantization per group of ``group_size`` input columns, dequantized.

    Asymmetric: ``2^b`` levels from the group's min to max (scale and zero point per group).
    Symmetric: levels ``-(2^(b-1)-1) .. 2^(b-1)-1`` times ``max|w| / (2^(b-1)-1)`` (so 2-bit is ternary-like
    with 3 levels; the extra negative level is not used, as in most symmetric int kernels).
    """
    out, k = w.shape
    ng = -(-k // group_size)
    padded = np.zeros((out, ng * group_size))
    padded[:, :k] = w
    wg = padded.reshape(out, ng, group_size)
    valid = (np.arange(ng * group_size) < k).reshape(ng, group_size)
    masked_max = np.where(valid, wg, -np.inf).max(-1, keepdims=True)
    masked_min = np.where(valid, wg, np.inf).min(-1, keepdims=True)
    if symmetric:
        levels = 2 ** (bits - 1) - 1
        scale = np.maximum(np.abs(masked_max), np.abs(masked_min)) / levels
        scale = np.where(scale > 0, scale, 1.0)
        deq = np.clip(np.rint(wg / scale), -levels, levels) * scale
    else:
        levels = 2**bits - 1
        scale = (masked_max - masked_min) / levels
        scale = np.where(scale > 0, scale, 1.0)
        deq = np.clip(np.rint((wg - masked_min) / scale), 0, levels) * scale + masked_min
    return deq.reshape(out, -1)[:, :k].astype(np.float32)


def apply_rtn(graph, bits: int, group_size: int, symmetric: bool, skip: tuple = ()):
    """A copy of ``graph`` whose quantizable linears (the BCQ pass's selection) hold RTN weights."""
    from reshift.passes.pattern import match
    from reshift.passes.quant_common import LINEAR, candidate_reason

    graph = graph.copy()
    producers, users = graph.producers(), graph.users()
    count = 0
    for node in graph.nodes:
        if node.op != "linear":
            continue
        m = match(LINEAR, node, producers)
        if m is None or candidate_reason(m, graph, users, {"skip": skip}):
            continue
        weight = m["weight"]
        weight.data = rtn_weight(weight.data, bits, group_size, symmetric)
        count += 1
    return graph, count


# -- model and evaluation ------------------------------------------------------------------------
def minilm_graph(seq_len: int):
    """(IR graph with a dynamic batch, tokenizer) of the pretrained MiniLM encoder."""
    import torch
    from transformers import AutoTokenizer

    from examples.models import MODELS
    from examples.models.minilm import _model_dir
    from reshift.api import to_graph

    torch.set_num_threads(2)
    spec = MODELS["minilm"]
    model = spec.build()
    ids, mask = spec.example_inputs(2, seq_len)
    graph, _ = to_graph(model, (ids, mask), {"dynamic_batch": True})
    return graph, AutoTokenizer.from_pretrained(_model_dir())


def encode(tokenizer, sentences: list[str], seq_len: int) -> dict[str, np.ndarray]:
    enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def embed(graph, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    from reshift.ir.interpret import interpret

    outs = [next(iter(interpret(graph, b).values())) for b in batches]
    return np.concatenate(outs).astype(np.float64)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(np.mean(cos)), float(np.min(cos))


def batched(inputs: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(inputs.values())))
    return [{k: v[i : i + size] for k, v in inputs.items()} for i in range(0, n, size)]


def main() -> None:
    from reshift import passes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 eval / 256 calibration sentences, q=3 and 4 only")
    parser.add_argument("--shift-only", action="store_true", help="only the shift rows (3 and 4 exponent bits)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--calib-sentences", type=int, default=None, help="default 512 (quick: 256)")
    parser.add_argument("--calib-rows", type=int, default=4096, help="activation rows kept per layer input")
    parser.add_argument("--gptq-rounds", type=int, default=None, help="BCQ/ternary GPTQ rounds (pass default)")
    parser.add_argument(
        "--calibration",
        choices=tuple(CALIBRATION_MODES),
        default="sequential-asymmetric",
        help="how calibrated BCQ/ternary layers get their activations and target (see module docstring)",
    )
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    n_eval = 64 if args.quick else 128
    n_calib = args.calib_sentences or (256 if args.quick else 512)
    bit_widths = () if args.shift_only else (3, 4) if args.quick else (2, 3, 4)
    evaluation, calib = split_corpus(n_eval, n_calib)
    n_corpus = len(docstring_sentences())
    graph, tok = minilm_graph(args.seq_len)
    eval_batches = batched(encode(tok, evaluation, args.seq_len), 64)
    calib_inputs = pack_calibration(tok, calib, args.seq_len)
    calib_batches = batched(calib_inputs, 32)
    n_tokens = calib_inputs["input_ids"].size
    print(f"corpus: {n_corpus} stdlib docstring sentences; eval {len(evaluation)}, calib {len(calib)}")
    print(f"  e.g. {evaluation[0]!r}; {evaluation[-1]!r}")
    print(f"  calibration: {n_tokens} tokens packed into {len(calib_inputs['input_ids'])} windows of {args.seq_len}")
    reference = embed(graph, eval_batches)
    g = args.group_size
    options = {"group_size": g, "skip": [], "calib_rows": args.calib_rows, **CALIBRATION_MODES[args.calibration]}
    if args.gptq_rounds is not None:
        options["gptq_rounds"] = args.gptq_rounds
    config = {**options, "seq_len": args.seq_len, "n_eval": len(evaluation), "n_calib_sentences": len(calib)}
    config["calib_tokens"] = int(n_tokens)
    print(f"  pass options: {options} (everything else at the pass defaults)")
    started = time.perf_counter()

    rows: list[tuple[str, float, str, tuple[float, float] | None, tuple[float, float] | None]] = []

    def run_pass(pipeline: str, calibrated: bool, **extra) -> tuple[tuple[float, float], int]:
        start = time.perf_counter()
        out, report = passes.run(
            graph, pipeline, calibration=calib_batches if calibrated else None, verify_each=False, **options, **extra
        )
        quantized = sum(n.op in ("bcq_linear", "ternary_linear", "shift_linear") for n in out.nodes)
        result = mean_cosine(embed(out, eval_batches), reference)
        print(f"  {pipeline} {extra} calib={calibrated}: {result[0]:.5f} ({time.perf_counter() - start:.0f} s)")
        return result, quantized

    def rtn(bits: int, symmetric: bool) -> tuple[float, float]:
        out, _ = apply_rtn(graph, bits, g, symmetric)
        return mean_cosine(embed(out, eval_batches), reference)

    n_linear = sum(n.op == "linear" for n in graph.nodes)
    for q in bit_widths:
        wo, count = run_pass("bcq", False, bcq_q=q)
        cal, _ = run_pass("bcq", True, bcq_q=q)
        rows.append((f"BCQ q={q}", q + 16 * q / g, "ShiftAddLLM", wo, cal))
        rows.append((f"RTN asym {q}-bit", q + 32 / g, "", rtn(q, False), None))
        rows.append((f"RTN sym {q}-bit", q + 16 / g, "", rtn(q, True), None))
    if not args.shift_only:
        tern_wo, _ = run_pass("ternary", False)
        tern_cal, _ = run_pass("ternary", True)
        rows.append(("ternary {-1,0,1}", 2 + 16 / g, "BitNet b1.58 absmean", tern_wo, tern_cal))
    shift, count = run_pass("shift", False)  # the default: 3 exponent bits, 7 levels (the int8 kernels)
    rows.append(("shift sign*2^-p (3 exp bits, 7 levels)", 4.0, "DeepShift-PS, per-row scale", shift, None))
    shift4, _ = run_pass("shift", False, shift_bits=4)
    rows.append(("shift sign*2^-p (4 exp bits, 16 levels)", 5.0, "DeepShift-PS, per-row scale", shift4, None))

    print(f"\n## MiniLM-L6 (real weights), {count}/{n_linear} linears quantized, group {g}, seq {args.seq_len}")
    print("mean (min) cosine similarity of sentence embeddings to fp32 over the eval sentences")
    print("| method | bits/weight | weight-only | calibrated (output-aware) |")
    print("|---|---|---|---|")
    for name, bpw, _, wo, cal in rows:
        cal_text = f"{cal[0]:.4f} ({cal[1]:.3f})" if cal else "n/a"
        print(f"| {name} | {bpw:.2f} | {wo[0]:.4f} ({wo[1]:.3f}) | {cal_text} |")

    print("\n## targets")
    best = {name: max(wo[0], cal[0] if cal else -1) for name, _, _, wo, cal in rows}
    for q, target in ((4, 0.99), (3, 0.97)):
        if q in bit_widths:
            calibrated = next(cal for name, _, _, _, cal in rows if name == f"BCQ q={q}")[0]
            print(f"BCQ q={q} calibrated {calibrated:.4f} >= {target}: {'MET' if calibrated >= target else 'NOT MET'}")
    for q in bit_widths:
        bcq_wo = next(wo for name, _, _, wo, _ in rows if name == f"BCQ q={q}")[0]
        rtn_best = max(best[f"RTN asym {q}-bit"], best[f"RTN sym {q}-bit"])
        print(
            f"{q}-bit: BCQ weight-only {bcq_wo:.4f} / calibrated {best[f'BCQ q={q}']:.4f} vs best RTN {rtn_best:.4f}: "
            f"{'BCQ wins' if best[f'BCQ q={q}'] > rtn_best else 'RTN wins'} "
            f"(weight-only vs weight-only: {'BCQ' if bcq_wo > rtn_best else 'RTN'})"
        )

    elapsed = time.perf_counter() - started
    command = " ".join(["HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lowbit_accuracy.py", *sys.argv[1:]])
    print(f"\nruntime {elapsed:.0f} s; reproduce: {command}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"lowbit-accuracy-{time.strftime('%Y%m%d-%H%M%S')}.json"
    table = [
        {"method": name, "bits_per_weight": bpw, "weight_only": wo, "calibrated": cal} for name, bpw, _, wo, cal in rows
    ]
    record = {"model": "all-MiniLM-L6-v2", "config": config, "argv": sys.argv[1:], "runtime_s": elapsed}
    path.write_text(json.dumps({**record, "results": table}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
