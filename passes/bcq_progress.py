"""Progress bars for the weight-fitting passes (``bcq_weights``, ``ternary_weights``): one bar over the
layers and one for the layer being fitted (its GPTQ columns), drawn with rich on stderr.

Shown when the ``progress`` option is true, or by default only when stderr is a terminal, so test
logs and pipes never get them. Disabled, every method is a no-op and the fits get no callback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from reshift.ir.graph import Graph
from reshift.passes.manager import PassContext
from reshift.passes.pattern import match
from reshift.passes.quant_common import LINEAR, candidate_reason


def _count_candidates(graph: Graph, ctx: PassContext) -> int:
    """How many linears :func:`~reshift.passes.quant_common.plan_layers` will hand to the fit."""
    producers, users = graph.producers(), graph.users()
    count = 0
    for node in graph.nodes:
        if node.op == "linear":
            m = match(LINEAR, node, producers)
            count += m is not None and candidate_reason(m, graph, users, ctx.options) is None
    return count


class LayerTicker:
    """The current layer's bar: ``fit(n)`` is the callback for its ``n``-th fit (fraction done in [0, 1])."""

    def __init__(self, progress: Any, task: Any) -> None:
        self._progress, self._task = progress, task

    def fit(self, index: int) -> Callable[[float], None] | None:
        if self._progress is None:
            return None
        return lambda fraction: self._progress.update(self._task, completed=index + fraction)


class LayerProgress:
    """See module docstring; ``LayerProgress(False)`` draws nothing."""

    def __init__(self, enabled: bool, total: int = 0, title: str = "") -> None:
        self._progress = None
        self._overall = None
        if not enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        except ImportError:  # rich is a dependency of the CLI; without it, no bars
            return
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._overall = self._progress.add_task(title or "layers", total=total)

    @classmethod
    @contextmanager
    def for_pass(cls, graph: Graph, ctx: PassContext, title: str) -> Iterator[LayerProgress]:
        option = ctx.options.get("progress")
        enabled = sys.stderr.isatty() if option is None else bool(option)
        progress = cls(enabled, _count_candidates(graph, ctx) if enabled else 0, title)
        if progress._progress is None:
            yield progress
            return
        try:
            progress._progress.start()
        except Exception:  # rich < 14 refuses a second live display (the CLI's spinner): no bars then
            yield cls(False)
            return
        try:
            yield progress
        finally:
            progress._progress.stop()

    @contextmanager
    def layer(self, name: str, fits: int) -> Iterator[LayerTicker]:
        """The bar of one layer (``fits`` fits of it, e.g. one per candidate ``q``), removed when done."""
        if self._progress is None:
            yield LayerTicker(None, None)
            return
        task = self._progress.add_task(f"  {name}", total=fits)
        try:
            yield LayerTicker(self._progress, task)
        finally:
            self._progress.remove_task(task)
            self._progress.advance(self._overall)


__all__ = ["LayerProgress", "LayerTicker"]
