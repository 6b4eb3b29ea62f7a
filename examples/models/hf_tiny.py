"""Tiny, randomly initialized Hugging Face ``transformers`` models for coverage runs and tests.

Each builder makes one architecture from a small config (hidden 16-64, 1-2 layers per stage, 1-4
heads, vocab 99, 8 tokens, 32x32 or 64x64 images, 400-sample waveforms, 16x32 log-mel features)
with a fixed seed and no download, and returns ``(model, inputs(batch, seed))``: text, vision,
audio, decoder and state-space (Mamba) families. Builds are cached per process (:func:`build`),
never on disk.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

VOCAB = 99
SEQ = 8
IMAGE = 32

TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
DECODER = dict(TEXT, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
VISION = dict(image_size=IMAGE, num_channels=3)
# Deep conv stacks lose their signal at transformers' default initializer_range (0.02): MobileNetV2,
# MobileViT and LeViT outputs were below 1e-8. Their ranges below keep the outputs at 1e-2..1 while
# eager fp32 stays within 1e-6 of fp64 (at 0.5 MobileNetV2 is chaotic: fp32 is 4% off fp64).


def _ids(batch: int, seed: int = 0) -> tuple[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(1, VOCAB, (batch, SEQ), generator=generator),)


def _pixels(batch: int, seed: int = 0, size: int = IMAGE) -> tuple[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, size, size, generator=generator),)


def _text(model_cls: str, config_cls: str, **config) -> Callable:
    """A builder of ``transformers.<model_cls>(<config_cls>(**config))`` fed token ids."""

    def make() -> tuple[torch.nn.Module, Callable]:
        import transformers

        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))
        return model, _ids

    return make


def _vision(model_cls: str, config_cls: str, size: int = IMAGE, **config) -> Callable:
    """A builder of ``transformers.<model_cls>(<config_cls>(**config))`` fed ``[B, 3, size, size]`` pixels."""

    def make() -> tuple[torch.nn.Module, Callable]:
        import transformers

        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))
        return model, functools.partial(_pixels, size=size)

    return make


def _waveform(batch: int, seed: int = 0) -> tuple[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 400, generator=generator),)


def _mel(batch: int, seed: int = 0) -> tuple[torch.Tensor]:
    """Whisper's log-mel features ``[B, mel bins, 2 * max_source_positions]``."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, 32, generator=generator),)


def _audio(model_cls: str, config_cls: str, **config) -> Callable:
    """A builder of an audio model fed ``[B, 400]`` raw waveforms."""

    def make() -> tuple[torch.nn.Module, Callable]:
        import transformers

        return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)), _waveform

    return make


def _whisper_encoder(**config) -> Callable:
    """A builder of Whisper's audio encoder (``WhisperEncoder``, no decoder) fed log-mel features."""

    def make() -> tuple[torch.nn.Module, Callable]:
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        return WhisperEncoder(WhisperConfig(**config)), _mel

    return make


VIT = dict(VISION, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8)
STAGES = dict(depths=[1, 1], hidden_sizes=[16, 32], num_channels=3)

ARCHITECTURES: dict[str, Callable] = {
    "bert": _text("BertModel", "BertConfig", **TEXT),
    "distilbert": _text(
        "DistilBertModel", "DistilBertConfig", vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64
    ),
    "roberta": _text("RobertaModel", "RobertaConfig", **TEXT, pad_token_id=1),
    "vit": _vision("ViTModel", "ViTConfig", **VIT),
    "deit": _vision("DeiTModel", "DeiTConfig", **VIT),
    "dinov2": _vision("Dinov2Model", "Dinov2Config", **VIT),
    "clip_vision": _vision("CLIPVisionModel", "CLIPVisionConfig", **VIT),
    "swin": _vision(
        "SwinModel", "SwinConfig", **VISION, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4
    ),
    "convnext": _vision("ConvNextModel", "ConvNextConfig", num_stages=2, **STAGES),
    "resnet": _vision("ResNetModel", "ResNetConfig", embedding_size=16, **STAGES),
    "regnet": _vision("RegNetModel", "RegNetConfig", embedding_size=16, groups_width=8, **STAGES),
    "mobilenet_v2": _vision(
        "MobileNetV2Model", "MobileNetV2Config", image_size=IMAGE, depth_multiplier=0.35, initializer_range=0.2
    ),
    "mobilevit": _vision(
        "MobileViTModel",
        "MobileViTConfig",
        size=64,
        image_size=64,
        hidden_sizes=[32, 32, 32],
        neck_hidden_sizes=[8, 8, 16, 16, 16, 16, 32],
        num_attention_heads=2,
        initializer_range=0.3,
    ),
    "levit": _vision(
        "LevitModel",
        "LevitConfig",
        size=64,
        image_size=64,
        hidden_sizes=[32, 48, 64],
        num_attention_heads=[2, 2, 2],
        depths=[1, 1, 1],
        key_dim=[8, 8, 8],
        initializer_range=0.15,
    ),
    "segformer": _vision(
        "SegformerForSemanticSegmentation",
        "SegformerConfig",
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[16, 32],
        num_attention_heads=[1, 2],
        decoder_hidden_size=32,
        num_labels=3,
        initializer_range=0.1,
    ),
    "t5_encoder": _text(
        "T5EncoderModel", "T5Config", vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2
    ),
    "gpt2": _text(
        "GPT2LMHeadModel",
        "GPT2Config",
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "llama": _text("LlamaForCausalLM", "LlamaConfig", **DECODER),
    "qwen2": _text("Qwen2ForCausalLM", "Qwen2Config", **DECODER),
    "mistral": _text("MistralForCausalLM", "MistralConfig", **DECODER),
    "phi3": _text("Phi3ForCausalLM", "Phi3Config", **DECODER, bos_token_id=1, eos_token_id=2),
    "gemma": _text("GemmaForCausalLM", "GemmaConfig", **DECODER, head_dim=16),
    "opt": _text(
        "OPTForCausalLM",
        "OPTConfig",
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        ffn_dim=64,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    ),
    "mamba": _text(
        "MambaForCausalLM", "MambaConfig", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8
    ),
    # beyond the list: more text, audio and decoder families
    "albert": _text("AlbertModel", "AlbertConfig", **TEXT, embedding_size=16),
    "electra": _text("ElectraModel", "ElectraConfig", **TEXT, embedding_size=16),
    "gpt_neox": _text("GPTNeoXForCausalLM", "GPTNeoXConfig", **DECODER),
    "wav2vec2": _audio(
        "Wav2Vec2Model",
        "Wav2Vec2Config",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_kernel=(10, 3),
        conv_stride=(5, 2),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
    ),
    "whisper_encoder": _whisper_encoder(
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        num_mel_bins=16,
        max_source_positions=16,
    ),
}


@functools.cache
def build(name: str) -> tuple[torch.nn.Module, Callable[[int], tuple[torch.Tensor, ...]]]:
    """``(model in eval mode, inputs(batch))`` for one architecture, seeded, cached per process."""
    torch.manual_seed(0)
    model, inputs = ARCHITECTURES[name]()
    return model.eval(), inputs
