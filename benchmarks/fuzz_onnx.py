"""Mutation fuzzing of the ONNX frontend and the reference interpreter (issue #14).

Every case mutates a seed model (benchmarks/fuzz_models.py) with one mutator
(benchmarks/onnx_mutations.py), writes it to a file, runs ``from_onnx`` and, when that accepts
the file, ``interpret`` on random inputs (symbolic dims pinned to 2). Outcomes: ``accepted``,
``refused`` (a ``reshift.errors.ReshiftError``; its class is counted), ``raw`` (any other
exception: a bug) and ``hang`` (past the per-case timeout). Cases run in a worker process under
a watchdog, so a hang in C code is caught too; tensors are capped at ``--max-tensor-bytes``
(``RESHIFT_MAX_TENSOR_BYTES``) and the worker's address space at ``--memory-limit``.

    .venv/bin/python benchmarks/fuzz_onnx.py --cases 2000 [--models cnn vit] [--seed 0]

Prints outcome counts per model and overall, writes them as JSON under benchmarks/results/,
and exits 1 if any case was raw or hung. Replay one case with ``--replay MODEL:SEED:INDEX``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.fuzz_models import SEED_MODELS, seed_model_bytes  # noqa: E402
from benchmarks.onnx_mutations import mutate  # noqa: E402

STATUSES = ("accepted", "refused", "raw", "hang")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "reshift" / "fuzz_onnx"
FUZZ_MAX_TENSOR_BYTES = 64 << 20  # the stated limit for fuzzing: 64 MiB per tensor
BATCH = 2  # the value every symbolic dimension takes when inputs are drawn


# where a refusal points: a quoted name, or the part of the model (file, opset, node, tensor)
LOCATION = re.compile(
    r"'[^']+'|\b(node|initializer|graph (input|output)|opset|tensor name|empty graph|not a readable ONNX model)\b"
)


def names_location(message: str) -> bool:
    """Whether an error message says where the problem is, not only what numpy thought of it."""
    return LOCATION.search(message) is not None


class CaseTimeout(BaseException):
    """Raised inside a case by the alarm signal when it runs past its time.

    A ``BaseException``, so that the ``except Exception`` fallbacks in the code under test cannot
    turn a hang into a refusal.
    """


@dataclass
class Outcome:
    """The result of one fuzz case, with everything needed to replay it."""

    model: str
    seed: int
    index: int
    kind: str
    detail: str
    status: str
    error: str = ""  # exception class name
    message: str = ""
    trace: str = ""
    seconds: float = 0.0


def random_inputs(graph, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs matching ``graph.inputs``: normal floats, 0/1 ints and bools, symbols set to BATCH."""
    from reshift.ir.types import numpy_dtype

    feeds = {}
    for value in graph.inputs:
        shape = value.type.concrete_shape({symbol: BATCH for symbol in value.type.symbols})
        dtype = numpy_dtype(value.dtype)
        if np.issubdtype(dtype, np.floating) or value.dtype == "bfloat16":
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[value.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def run_case(model: str, data: bytes, seed: int, index: int, workdir: Path, timeout: float = 10.0) -> Outcome:
    """Mutate, import and interpret one case in this process (an alarm signal bounds its time)."""
    from reshift.errors import ReshiftError
    from reshift.frontend import from_onnx
    from reshift.ir import interpret

    mutation = mutate(model, data, seed, index)
    outcome = Outcome(model, seed, index, mutation.kind, mutation.detail, "accepted")
    path = Path(workdir) / f"{model}-{seed}-{index}.onnx"
    path.write_bytes(mutation.data)
    start = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        graph = from_onnx(path)
        interpret(graph, random_inputs(graph, np.random.default_rng(index)))
    except CaseTimeout:
        outcome.status = "hang"
    except ReshiftError as exc:
        outcome.status, outcome.error, outcome.message = "refused", _error_name(exc), str(exc)
    except BaseException as exc:  # noqa: BLE001  (anything else is the bug being hunted)
        if isinstance(exc, KeyboardInterrupt):
            raise
        outcome.status, outcome.error, outcome.message = "raw", type(exc).__name__, str(exc)[:2000]
        outcome.trace = traceback.format_exc()[-6000:]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        path.unlink(missing_ok=True)
    outcome.seconds = round(time.perf_counter() - start, 4)
    return outcome


def _error_name(exc: BaseException) -> str:
    """The class name, with the chained cause's for a late refusal: ``ExecutionError(IndexError)``."""
    cause = exc.__cause__
    return f"{type(exc).__name__}({type(cause).__name__})" if cause is not None else type(exc).__name__


def _on_alarm(signum, frame):
    raise CaseTimeout()


# -- the campaign: a worker process per batch of cases, watched for hangs -----------------------
def _worker(conn, tasks: list[tuple], models: dict[str, bytes], timeout: float, memory_limit: int) -> None:
    import resource

    if memory_limit:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    with tempfile.TemporaryDirectory(prefix="fuzz_onnx_") as workdir:
        for model, seed, index in tasks:
            conn.send(run_case(model, models[model], seed, index, Path(workdir), timeout))  # sent before the next


def run_campaign(
    models: dict[str, bytes], cases: list[tuple[str, int, int]], timeout: float, memory_limit: int, grace: float = 20
) -> list[Outcome]:
    """Run ``cases`` (model, seed, index) in a worker; a case silent past ``timeout + grace`` is a hang.

    The worker takes cases in order and sends each outcome before starting the next, so when it
    stops answering (stuck in C code, or dead) the culprit is the first case without an outcome;
    it is recorded and a fresh worker goes on with the rest.
    """
    context = mp.get_context("fork")
    outcomes: list[Outcome] = []
    pending = list(cases)
    while pending:
        receiver, sender = context.Pipe(duplex=False)
        worker = context.Process(target=_worker, args=(sender, pending, models, timeout, memory_limit), daemon=True)
        worker.start()
        sender.close()
        answered = 0
        while answered < len(pending):
            try:
                if not receiver.poll(timeout + grace):
                    break
                outcome = receiver.recv()
            except EOFError:  # the worker died
                break
            outcomes.append(outcome)
            answered += 1
            _progress(len(outcomes), len(cases))
        worker.join(1)
        exitcode = worker.exitcode
        worker.kill()
        worker.join()
        receiver.close()
        if answered == len(pending):
            break
        model, seed, index = pending[answered]
        mutation = mutate(model, models[model], seed, index)
        why = f"worker died (exit code {exitcode})" if exitcode is not None else "no answer"
        outcomes.append(Outcome(model, seed, index, mutation.kind, mutation.detail, "hang", why))
        pending = pending[answered + 1 :]
    return outcomes


def _progress(done: int, total: int) -> None:
    if sys.stderr.isatty() and (done % 50 == 0 or done == total):
        print(f"\r{done}/{total} cases", end="\n" if done == total else "", file=sys.stderr, flush=True)


# -- reporting ----------------------------------------------------------------------------------
def summarize(outcomes: list[Outcome]) -> dict:
    """Outcome counts per model and overall, refusal classes, and every raw or hung case."""
    per_model: dict[str, Counter] = {}
    for outcome in outcomes:
        per_model.setdefault(outcome.model, Counter())[outcome.status] += 1
    overall = sum(per_model.values(), Counter())
    return {
        "cases": len(outcomes),
        "overall": {status: overall[status] for status in STATUSES},
        "per_model": {m: {s: c[s] for s in STATUSES} for m, c in sorted(per_model.items())},
        "refusals": dict(Counter(o.error for o in outcomes if o.status == "refused").most_common()),
        "unnamed_refusals": sum(o.status == "refused" and not names_location(o.message) for o in outcomes),
        "per_kind": {
            kind: dict(Counter(o.status for o in outcomes if o.kind == kind))
            for kind in sorted({o.kind for o in outcomes})
        },
        "slowest": [
            f"{o.model}:{o.seed}:{o.index} {o.seconds:.3f} s ({o.kind})"
            for o in sorted(outcomes, key=lambda o: -o.seconds)[:5]
        ],
        "failures": [asdict(o) for o in outcomes if o.status in ("raw", "hang")],
    }


def print_summary(summary: dict) -> None:
    header = f"{'model':<12}" + "".join(f"{s:>10}" for s in STATUSES)
    print(header)
    print("-" * len(header))
    for model, counts in summary["per_model"].items():
        print(f"{model:<12}" + "".join(f"{counts[s]:>10}" for s in STATUSES))
    print(f"{'overall':<12}" + "".join(f"{summary['overall'][s]:>10}" for s in STATUSES))
    print("refusals: " + ", ".join(f"{name} {count}" for name, count in summary["refusals"].items()))
    print(f"refusals whose message names no node, tensor or input: {summary['unnamed_refusals']}")
    print("slowest cases: " + ", ".join(summary["slowest"][:3]))
    for failure in summary["failures"][:20]:
        print(f"\n{failure['status'].upper()} {failure['model']}:{failure['seed']}:{failure['index']} "
              f"[{failure['kind']}: {failure['detail']}] {failure['error']}: {failure['message'][:300]}")  # fmt: skip
        if failure["trace"]:
            print(failure["trace"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000, help="total cases, split evenly over the models")
    parser.add_argument("--models", nargs="*", default=list(SEED_MODELS), choices=list(SEED_MODELS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per case")
    parser.add_argument("--max-tensor-bytes", type=int, default=FUZZ_MAX_TENSOR_BYTES)
    parser.add_argument("--memory-limit", type=int, default=4 << 30, help="worker address space, bytes (0: none)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where seed exports are kept")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--replay", metavar="MODEL:SEED:INDEX", help="run one case here and print its outcome")
    args = parser.parse_args(argv)
    os.environ["RESHIFT_MAX_TENSOR_BYTES"] = str(args.max_tensor_bytes)
    if args.replay:
        model, seed, index = args.replay.split(":")
        data = seed_model_bytes(args.cache, [model])[model]
        with tempfile.TemporaryDirectory() as workdir:
            outcome = run_case(model, data, int(seed), int(index), Path(workdir), args.timeout)
        print(json.dumps(asdict(outcome), indent=1))
        return int(outcome.status in ("raw", "hang"))
    models = seed_model_bytes(args.cache, args.models)
    per_model = -(-args.cases // len(args.models))
    cases = [(m, args.seed, i) for m in args.models for i in range(per_model)]
    start = time.perf_counter()
    outcomes = run_campaign(models, cases, args.timeout, args.memory_limit)
    summary = summarize(outcomes)
    summary.update(seed=args.seed, max_tensor_bytes=args.max_tensor_bytes, seconds=round(time.perf_counter() - start))
    print_summary(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"fuzz_onnx-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(summary, indent=1))
    print(f"\n{summary['cases']} cases in {summary['seconds']} s; written to {path}")
    return int(bool(summary["failures"]))


if __name__ == "__main__":
    sys.exit(main())
