"""IR graph -> trainable ``torch.nn.Module``: the recovery fine-tuning backend (``reshift.recover``).

:func:`to_torch` generates a :class:`GraphModule` from any ``reshift.ir.Graph`` whose ops all have a
torch implementation here: nothing is written per model. Each node runs through a table entry
(:data:`TORCH_OPS`, one :class:`TorchOp` per IR op), as ``codegen/tvm`` lowers through a table:

* a **stateless** op is a function of its input tensors and the node's attributes
  (``register_torch_op("relu", fn=lambda x: torch.relu(x))``), a translation of its numpy reference;
  float constants in the input slots named by ``params`` (a linear's ``weight`` and ``bias``, a
  layer norm's affine) become trainable parameters, every other constant a frozen buffer;
* a **stateful** op (every lossy quantizer: ``shift_linear``, ``bcq_linear``, ``ternary_linear``,
  ``int8_linear``, ``quantize_uniform``, ``log2_quant``, ``log2_matmul``) is a :class:`NodeModule` that
  takes over the constants and attributes it names in ``owned``, holds latent trainable state
  (DeepShift-PS exponents and signs, latent weights, LSQ scales), rounds in its forward with
  straight-through estimators (:mod:`.ste`), and writes its state back into the node
  (:meth:`NodeModule.write_back`), re-coded exactly: the module's forward equals
  ``reshift.ir.interpret`` of the written-back graph (within float32 summation order).

Extending it (a new op from another pass, e.g. binary Q/K codes or an expert mixture): declare the op in
``ir/ops.py`` as usual, then here either

    register_torch_op("my_op", fn=my_function, params=("weight",))

or subclass :class:`NodeModule` (``__init__(node, graph)`` reads the owned constants ``node.inputs[i].data``
and attributes; ``forward(*inputs, **attrs)`` gets the node's inputs in order, ``None`` for owned and
absent ones, and the resolved attributes; ``write_back(node, graph)`` sets the re-coded constants with
:meth:`NodeModule.set_input` and the attributes in ``node.attrs``), and register it with
``register_torch_op("my_op", module=MyModule)``; ``module`` may also be a function ``(node, graph) ->
NodeModule | None`` (``None``: run ``fn``). ``NodeModule.extra_loss()`` adds a term to the training loss
(a load-balancing loss, say); ``NodeModule.project()`` runs after every optimizer step (clamp latent
state to its range). An op with no entry is refused by :func:`to_torch` with a
``CodegenError`` naming the op and its nodes.
"""

from reshift.codegen.torch import ops_attention as _ops_attention  # noqa: F401  (binary_attention)
from reshift.codegen.torch import ops_lowbit as _ops_lowbit  # noqa: F401  (registers the quantizer ops)
from reshift.codegen.torch import ops_moe as _ops_moe  # noqa: F401  (moe_linear, ShiftAddViT's MoE)
from reshift.codegen.torch import ops_quant as _ops_quant  # noqa: F401
from reshift.codegen.torch import ops_std as _ops_std  # noqa: F401
from reshift.codegen.torch.module import GraphModule, to_torch
from reshift.codegen.torch.registry import TORCH_OPS, NodeModule, TorchOp, get_torch_op, register_torch_op

__all__ = ["TORCH_OPS", "GraphModule", "NodeModule", "TorchOp", "get_torch_op", "register_torch_op", "to_torch"]
