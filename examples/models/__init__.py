"""Reference models for reshift's tests and benchmarks, and a registry of them.

Every factory is seeded, returns an eval-mode float32 module and, where the net has BatchNorm,
non-trivial running statistics (``common.randomize_batchnorm``). ``MODELS[name]`` gives a
:class:`ModelSpec` with the factory, an ``example_inputs(batch)`` function and the comparison
tolerance. See ``NOTES_ops.md`` for the aten / ONNX op sets each model exports to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .common import image_inputs, randomize_batchnorm
from .gpt2 import gpt2_example_inputs, gpt2_small
from .minilm import minilm_encoder, minilm_example_inputs
from .mobileone import mobileone_s0, mobileone_to_deploy
from .repvgg import repvgg_a0, repvgg_grouped_stage, repvgg_to_deploy
from .resnet import resnet18
from .swin import swin_block, swin_example_inputs
from .vit import vit_s16


@dataclass(frozen=True)
class ModelSpec:
    """A named reference model: how to build it, feed it and how closely outputs must agree."""

    name: str
    build: Callable[[], nn.Module]
    example_inputs: Callable[[int], tuple[torch.Tensor, ...]]
    input_names: tuple[str, ...] = ("input",)
    rtol: float = 1e-4


def _image(batch: int) -> tuple[torch.Tensor, ...]:
    return image_inputs(batch, 224)


_SPECS = (
    ModelSpec("resnet18", resnet18, _image),
    ModelSpec("repvgg_a0_train", repvgg_a0, _image),
    ModelSpec("repvgg_a0_deploy", partial(repvgg_a0, deploy=True), _image),
    ModelSpec("repvgg_grouped_stage", repvgg_grouped_stage, _image),
    ModelSpec("mobileone_s0", mobileone_s0, _image),
    ModelSpec("vit_s16", vit_s16, _image),
    ModelSpec("swin_block", swin_block, swin_example_inputs),
    ModelSpec("minilm", minilm_encoder, minilm_example_inputs, ("input_ids", "attention_mask")),
    ModelSpec(  # the 2-D mask straight into BERT, as a plain torch.onnx.export of the encoder has it
        "minilm_builtin_mask",
        partial(minilm_encoder, builtin_mask=True),
        minilm_example_inputs,
        ("input_ids", "attention_mask"),
    ),
    ModelSpec("gpt2", gpt2_small, gpt2_example_inputs, ("input_ids",), rtol=1e-3),
)

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}


def _register_reparam_models() -> None:
    """Branch-merging reference nets (passes/branches.py): ACNet and DBB, training and merged forms."""
    from .acnet import acnet_small
    from .dbb import dbb_example_inputs, dbb_net

    def small_image(batch: int) -> tuple[torch.Tensor, ...]:
        return image_inputs(batch, 32)

    for spec in (
        ModelSpec("acnet_train", acnet_small, small_image),
        ModelSpec("acnet_deploy", partial(acnet_small, deploy=True), small_image),
        ModelSpec("dbb_train", dbb_net, dbb_example_inputs),
        ModelSpec("dbb_deploy", partial(dbb_net, deploy=True), dbb_example_inputs),
    ):
        MODELS[spec.name] = spec


_register_reparam_models()

__all__ = [
    "MODELS",
    "ModelSpec",
    "gpt2_example_inputs",
    "gpt2_small",
    "image_inputs",
    "minilm_encoder",
    "minilm_example_inputs",
    "mobileone_s0",
    "mobileone_to_deploy",
    "randomize_batchnorm",
    "repvgg_a0",
    "repvgg_grouped_stage",
    "repvgg_to_deploy",
    "resnet18",
    "swin_block",
    "swin_example_inputs",
    "vit_s16",
]


def _register_transformer_reparam_models() -> None:
    """RePaViT idle-channel FFN blocks and DeiT-S with a distillation head, training and deploy forms."""
    from .deit import deit_s_distilled
    from .repavit import repavit_block, repavit_example_inputs

    for spec in (
        ModelSpec("repavit_block_train", repavit_block, repavit_example_inputs),
        ModelSpec("repavit_block_deploy", partial(repavit_block, deploy=True), repavit_example_inputs),
        ModelSpec("deit_s_distilled_train", deit_s_distilled, _image),
        ModelSpec("deit_s_distilled_deploy", partial(deit_s_distilled, deploy=True), _image),
    ):
        MODELS[spec.name] = spec


_register_transformer_reparam_models()
