"""The ``torch.compile`` backend: ``torch.compile(model, backend="reshift", options={...})``.

Registered through the ``torch_dynamo_backends`` entry point, so ``import reshift`` is not needed.
Options: ``pipeline`` (default ``"exact"``), ``target`` (default ``"cpu"``), ``calibration`` and
anything else :func:`reshift.compile` takes.

* Each subgraph dynamo hands over (graph breaks make several) is converted with
  :mod:`reshift.frontend.fx`, run through the pass pipeline and built with TVM. A subgraph that
  cannot be compiled (unsupported ops, non-tensor inputs or outputs, a codegen failure) runs
  eagerly instead, with one :class:`ReshiftFallbackWarning` naming the ops; nothing crashes.
* Weights are frozen into the compiled code (inference only): outputs carry no autograd graph.
* Shapes: by default dynamo first compiles for the exact input shapes (static IR graph). On a new
  shape dynamo recompiles and marks the size dynamic; that second subgraph is compiled with a
  symbolic batch (dim 0 = ``N``), so every later batch size reuses it. With ``dynamic=True`` the
  first compile is already symbolic. A call whose shapes the compiled graph does not accept (a
  dynamic dimension other than the batch) runs the subgraph eagerly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

from reshift.errors import InputError, ReshiftError, UnsupportedOpError


class ReshiftFallbackWarning(UserWarning):
    """A torch.compile subgraph runs eagerly because reshift could not compile it."""


def _fallback(gm, reason: str) -> Callable:
    warnings.warn(f"reshift: running a torch.compile subgraph eagerly: {reason}", ReshiftFallbackWarning, stacklevel=2)
    return gm.forward


def _op_names(exc: UnsupportedOpError) -> str:
    return ", ".join(f"{op} x{len(nodes)}" for op, nodes in sorted(exc.unsupported.items()))


def reshift_backend(gm, example_inputs: Sequence[Any], options: dict[str, Any] | None = None, **kwargs: Any):
    """Compile a dynamo FX GraphModule with reshift; returns a callable with the gm's signature."""
    import torch

    from reshift.api import compile as reshift_compile
    from reshift.frontend.fx import from_fx

    options = dict(options or {})
    options.pop("mode", None)
    kwargs.pop("mode", None)
    options.update(kwargs)
    pipeline = options.pop("pipeline", "exact")
    target = options.pop("target", "cpu")
    dynamic_batch = options.pop("dynamic_batch", None)
    try:
        with torch._guards.tracing(None):  # keep torch.export's tracing out of dynamo's own context
            converted = from_fx(gm, example_inputs, dynamic_batch=dynamic_batch)
        compiled = reshift_compile(converted.graph, target=target, pipeline=pipeline, **options)
        module = compiled._module()
    except UnsupportedOpError as exc:
        return _fallback(gm, f"unsupported op(s) {_op_names(exc)}")
    except ReshiftError as exc:
        return _fallback(gm, f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    except Exception as exc:  # torch.export and TVM raise many kinds; eager is always correct
        return _fallback(gm, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")

    positions = converted.user_positions
    warned: list[bool] = []

    def run(*args: Any):
        users = [args[i] for i in positions]
        if torch.is_grad_enabled() and any(getattr(x, "requires_grad", False) for x in users):
            return gm.forward(*args)  # reshift is inference-only; keep autograd working
        try:
            outputs = module(*users)
        except InputError as exc:
            if not warned:
                warned.append(True)
                warnings.warn(
                    f"reshift: inputs outside the compiled shapes run eagerly ({exc})",
                    ReshiftFallbackWarning,
                    stacklevel=2,
                )
            return gm.forward(*args)
        return outputs if isinstance(outputs, tuple) else (outputs,)

    run.reshift_compiled = compiled  # for inspection and tests
    return run
