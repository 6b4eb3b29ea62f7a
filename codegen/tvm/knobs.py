"""Knobs of reshift's hand-written CPU kernels, and the persistent record of the tuned choices.

A hand-written kernel (``kernels/dense_cpu.py``, ``kernels/conv2d_ocvec_cpu.py``) exposes a
:class:`KnobSpace`: for one *shape* (a flat dict of ints, everything the kernel is specialized
to), the default knobs (what an untuned build uses), the candidates a search tries, a check of
any knobs against the shape, and a standalone instance with inputs to time. Lowering asks
:func:`choose` for the knobs of each kernel instance it emits; outside :func:`using` that is
always the default, so an untuned build is unchanged. ``tune_knobs.py`` searches the candidates
and writes the winners to ``reshift_knobs.json`` in the target's subdirectory of the MetaSchedule
tuning database (``tune.target_db_dir``), keyed by kernel and shape; a build given that database
reads them back. An entry whose knobs do not fit the shape (an edited or foreign file) is ignored
with a warning and the default is used.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Shape = dict[str, int]
Knobs = dict[str, int]
DB_NAME = "reshift_knobs.json"


@dataclass(frozen=True)
class Instance:
    """A kernel compiled alone for timing: the PrimFunc, its inputs and the shapes/dtypes of its outputs."""

    func: Any
    inputs: list[np.ndarray]
    outputs: list[tuple[tuple[int, ...], str]]


@dataclass(frozen=True)
class KnobSpace:
    """The tunable knobs of one hand-written kernel (see the module docstring)."""

    kernel: str
    default: Callable[[Shape], Knobs]
    candidates: Callable[[Shape], list[Knobs]]
    check: Callable[[Shape, Knobs], str | None]  # None if ``knobs`` are valid for ``shape``, else why not
    instance: Callable[[Shape, Knobs, np.random.Generator], Instance]


SPACES: dict[str, KnobSpace] = {}


def register(space: KnobSpace) -> KnobSpace:
    SPACES[space.kernel] = space
    return space


def key(kernel: str, shape: Shape) -> str:
    """``kernel|name=value,...`` (sorted): the database key of one kernel instance."""
    return kernel + "|" + ",".join(f"{name}={shape[name]}" for name in sorted(shape))


@dataclass
class Choice:
    """What a build used for one tuned kernel instance (a database entry)."""

    kernel: str
    shape: Shape
    knobs: Knobs
    default: Knobs
    default_ms: float
    tuned_ms: float

    def line(self) -> str:
        shape = " ".join(f"{k}={v}" for k, v in self.shape.items())
        knobs = " ".join(f"{k}={v}" for k, v in self.knobs.items())
        same = " (the default)" if self.knobs == self.default else ""
        return (
            f"{self.kernel} [{shape}]: {knobs}{same}; {self.default_ms:.3f} -> {self.tuned_ms:.3f} ms "
            f"({self.default_ms / max(self.tuned_ms, 1e-9):.2f}x)"
        )


@dataclass
class _Session:
    entries: dict[str, dict]  # database entries by key (empty: defaults everywhere)
    used: dict[str, Choice] = field(default_factory=dict)
    requests: dict[str, tuple[str, Shape]] | None = None  # recording(): every (kernel, shape) asked for


_SESSION: contextvars.ContextVar[_Session | None] = contextvars.ContextVar("reshift_knobs", default=None)


def db_file(db_dir: str | os.PathLike, target: Any = None) -> Path:
    """The knob file of ``db_dir``: in it directly, or in ``target``'s subdirectory (``tune.target_db_dir``)."""
    direct = Path(db_dir) / DB_NAME
    if direct.exists() or target is None:
        return direct
    from reshift.codegen.tvm.tune import target_db_dir

    return target_db_dir(db_dir, target) / DB_NAME


def load(path: Path) -> dict[str, dict]:
    """The entries of a knob file (missing: none; unreadable: none, with a warning)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        return dict(data["kernels"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"ignoring the kernel knob database {path}: unreadable ({exc})", stacklevel=2)
        return {}


def save(path: Path, entries: dict[str, dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"format": 1, "kernels": entries}, indent=1, sort_keys=True))
    tmp.replace(path)


@contextlib.contextmanager
def using(entries: dict[str, dict]) -> Iterator[_Session]:
    """Within it, :func:`choose` returns the knobs of ``entries`` where they fit; ``session.used`` lists them."""
    session = _Session(entries)
    token = _SESSION.set(session)
    try:
        yield session
    finally:
        _SESSION.reset(token)


@contextlib.contextmanager
def recording() -> Iterator[dict[str, tuple[str, Shape]]]:
    """Within it, every kernel instance :func:`choose` is asked about is recorded (defaults are returned)."""
    session = _Session({}, requests={})
    token = _SESSION.set(session)
    try:
        yield session.requests
    finally:
        _SESSION.reset(token)


def choose(kernel: str, shape: Shape) -> Knobs:
    """The knobs for one instance of ``kernel``: the database's when a build reads one and they fit, else default."""
    space = SPACES[kernel]
    default = space.default(shape)
    session = _SESSION.get()
    if session is None:
        return default
    name = key(kernel, shape)
    if session.requests is not None:
        session.requests.setdefault(name, (kernel, dict(shape)))
        return default
    entry = session.entries.get(name)
    if entry is None:
        return default
    knobs = entry.get("knobs")
    why = "knobs missing" if not isinstance(knobs, dict) else _check(space, shape, knobs)
    if why:
        warnings.warn(f"ignoring tuned knobs {knobs} for {name}: {why}; using the default {default}", stacklevel=2)
        return default
    knobs = {k: int(v) for k, v in knobs.items()}
    session.used[name] = Choice(
        kernel, dict(shape), knobs, default, float(entry.get("default_ms", 0.0)), float(entry.get("tuned_ms", 0.0))
    )
    return knobs


def _check(space: KnobSpace, shape: Shape, knobs: dict) -> str | None:
    names = set(space.default(shape))
    if set(knobs) != names:
        return f"expected the knobs {sorted(names)}, got {sorted(knobs)}"
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in knobs.values()):
        return "knob values must be integers"
    return space.check(shape, knobs)
