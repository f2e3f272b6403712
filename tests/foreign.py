"""Foreign models for the conformance matrix (tests/test_foreign_models.py): torchvision, timm and
Hugging Face transformers, each built with random init from a small config (nothing is downloaded).

Not a test file. Importing it imports none of the three libraries: each case's ``build`` does, so
the matrix can skip a family whose package is missing (``pip install -e '.[models]'``).

The torchvision import shim that makes the three importable is tests/torchvision_shim.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["CASES", "Case", "hf_loss"]

Inputs = torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]


def hf_loss(output: Any) -> torch.Tensor:
    """A Hugging Face model's own loss (its inputs carry ``labels``)."""
    loss = output["loss"] if isinstance(output, Mapping) else output.loss
    if loss is None:
        raise ValueError("the model returned no loss: its example inputs need labels")
    return loss


@dataclass(frozen=True)
class Case:
    """One foreign model of the matrix.

    Attributes:
        name: ``family-prefix.model``, e.g. ``tv.resnet18``; the test id.
        family: The package it comes from: ``torchvision``, ``timm`` or ``transformers``.
        build: Builds the model with random init (seeded), in train mode.
        inputs: Builds one training batch (seeded): a tensor, or for Hugging Face models a dict of
            keyword tensors including ``labels``.
        notes: What the case exercises; known memfit failures, with the root cause.
        loss_fn: None for memfit's default (cross-entropy against class 0 on the logits), else
            output -> scalar loss (:func:`hf_loss` for Hugging Face models).
        refused: For a model memfit cannot capture, a regex of the clear error it must give
            (naming the construct); empty for the others.
    """

    name: str
    family: str
    build: Callable[[], nn.Module] = field(repr=False)
    inputs: Callable[[], Inputs] = field(repr=False)
    notes: str = ""
    loss_fn: Callable[[Any], torch.Tensor] | None = field(default=None, repr=False)
    refused: str = ""

    def make(self) -> tuple[nn.Module, Inputs]:
        """The model (seed 0) and its batch (seed 1)."""
        torch.manual_seed(0)
        model = self.build()
        model.train()
        torch.manual_seed(1)
        return model, self.inputs()


CASES: dict[str, Case] = {}


def _add(
    name: str,
    family: str,
    build: Callable[[], nn.Module],
    inputs: Callable[[], Inputs],
    notes: str = "",
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    refused: str = "",
) -> None:
    assert name not in CASES, name
    CASES[name] = Case(name, family, build, inputs, notes, loss_fn, refused)


def _images(size: int, batch: int = 8) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(batch, 3, size, size)


# ---- torchvision (weights=None: random init) ------------------------------------------------------
# ImageNet-stem CNNs at 64 px, batch 8: at 32 px the activations are a few percent of the peak and the
# feasible minimum reaches the unplanned peak, leaving nothing to plan.


def _tv(ctor: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models

        return getattr(torchvision.models, ctor)(weights=None, **kwargs)

    return build


def _tv_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10
    )


def _tv_swin(v2: bool = False) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision.models import swin_transformer as sw

        extra = {"block": sw.SwinTransformerBlockV2, "downsample_layer": sw.PatchMergingV2} if v2 else {}
        return sw.SwinTransformer(
            patch_size=[4, 4],
            embed_dim=32,
            depths=[2, 2],
            num_heads=[2, 4],
            window_size=[4, 4],
            num_classes=10,
            **extra,
        )

    return build


_add(
    "tv.resnet18",
    "torchvision",
    _tv("resnet18", num_classes=10),
    _images(64),
    "plain CNN: BatchNorm, ReLU(inplace) after BN",
)
_add("tv.resnet50", "torchvision", _tv("resnet50", num_classes=10), _images(64), "bottleneck blocks")
_add(
    "tv.densenet121",
    "torchvision",
    _tv("densenet121", num_classes=10),
    _images(64),
    "concatenations; the slowest case (~45 s)",
)
_add("tv.mobilenet_v2", "torchvision", _tv("mobilenet_v2", num_classes=10), _images(64), "ReLU6(inplace) after BN")
_add(
    "tv.mobilenet_v3_small",
    "torchvision",
    _tv("mobilenet_v3_small", num_classes=10),
    _images(64),
    "Hardswish(inplace) right after a Linear/conv (no BN between): selective checkpointing keeps the "
    "conv output, the in-place op mutates it (known failure: SAC cache entry mutated)",
)
_add(
    "tv.efficientnet_b0",
    "torchvision",
    _tv("efficientnet_b0", num_classes=10),
    _images(64),
    "squeeze-excitation conv -> SiLU(inplace); stochastic depth (p=0.2 at the default)",
)
_add(
    "tv.convnext_tiny",
    "torchvision",
    _tv("convnext_tiny", num_classes=10),
    _images(64),
    "LayerNorm on permuted (non-contiguous) tensors: CPU kernels copy them (known under-estimate ~6%)",
)
_add("tv.regnet_y_400mf", "torchvision", _tv("regnet_y_400mf", num_classes=10), _images(64), "grouped convs, SE")
_add(
    "tv.shufflenet_v2_x0_5",
    "torchvision",
    _tv("shufflenet_v2_x0_5", num_classes=10),
    _images(64),
    "channel shuffle (view/transpose), chunk",
)
_add(
    "tv.squeezenet1_1",
    "torchvision",
    _tv("squeezenet1_1", num_classes=10),
    _images(64),
    "conv -> ReLU(inplace) with no BN between (known failure: SAC cache entry mutated)",
)
_add("tv.mnasnet0_5", "torchvision", _tv("mnasnet0_5", num_classes=10), _images(64), "inverted residuals")
_add(
    "tv.inception_v3",
    "torchvision",
    _tv("inception_v3", num_classes=10, aux_logits=False, init_weights=False),
    _images(80),
    "multi-branch concatenations; 75 px is its smallest input, 80 px used",
)
_add(
    "tv.googlenet",
    "torchvision",
    _tv("googlenet", num_classes=10, aux_logits=False, init_weights=False),
    _images(64),
    "inception blocks, transform_input",
)
_add(
    "tv.vit_small",
    "torchvision",
    _tv_vit,
    _images(32),
    "torchvision VisionTransformer (vit_b_16 layout, small dims): nn.MultiheadAttention, class token",
)
_add("tv.swin_small", "torchvision", _tv_swin(), _images(32), "shifted windows (roll, masks), relative position bias")
_add("tv.swin_v2_small", "torchvision", _tv_swin(v2=True), _images(32), "Swin V2 blocks: cosine attention, log-CPB MLP")


# ---- timm (pretrained=False: random init) ---------------------------------------------------------


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)

    return build


def _timm_mixer() -> nn.Module:
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=64)


_add(
    "timm.efficientnet_b0",
    "timm",
    _timm("efficientnet_b0"),
    _images(64),
    "BatchNormAct2d: bumps num_batches_tracked in Python (fx traces through it); SE conv -> ReLU/SiLU(inplace)",
)
_add(
    "timm.convnext_atto",
    "timm",
    _timm("convnext_atto"),
    _images(64),
    "LayerNorm2d on permuted tensors (known under-estimate ~25%: hidden kernel copies)",
)
_add(
    "timm.vit_tiny",
    "timm",
    _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2),
    _images(32),
    "forward(x, attn_mask=None, is_causal=False): defaulted args become fx placeholders (known arity error)",
)
_add(
    "timm.deit_tiny",
    "timm",
    _timm("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2),
    _images(32),
    "distillation token and head; same defaulted-args arity as vit_tiny",
)
_add(
    "timm.mobilevit_xxs",
    "timm",
    _timm("mobilevit_xxs"),
    _images(64),
    "shape-dependent Python in MobileVitBlock (`if new_h != H`): fx cannot trace it (known)",
)
_add("timm.levit_128s", "timm", _timm("levit_128s", img_size=64), _images(64), "attention with conv/BN projections")
_add(
    "timm.ghostnet_100",
    "timm",
    _timm("ghostnet_100"),
    _images(64),
    "SE conv_reduce -> ReLU(inplace) (known SAC mutation); BatchNormAct",
)
_add("timm.poolformer_s12", "timm", _timm("poolformer_s12"), _images(64), "GroupNorm, avg-pool token mixer")
_add("timm.regnetx_002", "timm", _timm("regnetx_002"), _images(64), "BatchNormAct2d (num_batches_tracked in Python)")
_add("timm.resnet18d", "timm", _timm("resnet18d"), _images(64), "deep stem, avg-pool downsample")
_add("timm.fastvit_t8", "timm", _timm("fastvit_t8"), _images(64), "reparameterizable blocks, ConvNormAct")
_add("timm.mlp_mixer", "timm", _timm_mixer, _images(32), "token/channel MLPs (transposes)")


# ---- Hugging Face transformers (random init from tiny configs) ------------------------------------
# Inputs are keyword tensors with labels, so the model computes its own loss (hf_loss). use_cache=False
# (a Cache object in the output is not a tensor) and no LayerDrop/SpecAugment (random control flow
# would make the peak and the step seed-dependent). Text: batch 4 x 32 tokens, vocab 256, width 64,
# 2 layers, 2 heads.

VOCAB, BATCH, SEQ = 256, 4, 32


def _hf(cls: str, config: str, **cfg: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        return getattr(transformers, cls)(getattr(transformers, config)(**cfg))

    return build


def _tokens(
    *, labels: str = "tokens", num_labels: int = 10, decoder: bool = False
) -> Callable[[], dict[str, torch.Tensor]]:
    def make() -> dict[str, torch.Tensor]:
        ids = torch.randint(0, VOCAB, (BATCH, SEQ))
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        mask[1, SEQ - 6 :] = 0  # one padded sequence
        batch = {"input_ids": ids, "attention_mask": mask}
        if decoder:  # encoder-decoder: the model shifts labels right into decoder_input_ids
            batch["labels"] = torch.randint(0, VOCAB, (BATCH, SEQ // 2))
        elif labels == "tokens":  # causal LM: the model shifts them itself
            batch["labels"] = ids.clone()
        else:
            batch["labels"] = torch.randint(0, num_labels, (BATCH,))
        return batch

    return make


_LLAMA_LIKE = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
    "use_cache": False,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 0,
}

_add(
    "hf.gpt2",
    "transformers",
    _hf(
        "GPT2LMHeadModel",
        "GPT2Config",
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=2,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    ),
    _tokens(),
    "causal LM, Conv1D layers, tied embeddings, dropout",
    hf_loss,
)
_add(
    "hf.bert",
    "transformers",
    _hf(
        "BertForSequenceClassification",
        "BertConfig",
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=10,
    ),
    _tokens(labels="class"),
    "encoder, padding mask, position_ids/token_type_ids buffers",
    hf_loss,
)
_add(
    "hf.distilbert",
    "transformers",
    _hf(
        "DistilBertForSequenceClassification",
        "DistilBertConfig",
        vocab_size=VOCAB,
        dim=64,
        n_layers=2,
        n_heads=2,
        hidden_dim=128,
        max_position_embeddings=64,
        num_labels=10,
    ),
    _tokens(labels="class"),
    "encoder without token types",
    hf_loss,
)
_add(
    "hf.t5",
    "transformers",
    _hf(
        "T5ForConditionalGeneration",
        "T5Config",
        vocab_size=VOCAB,
        d_model=64,
        d_kv=32,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
        use_cache=False,
    ),
    _tokens(decoder=True),
    "encoder-decoder, relative position bias, labels -> decoder_input_ids",
    hf_loss,
)
_add(
    "hf.llama",
    "transformers",
    _hf("LlamaForCausalLM", "LlamaConfig", **_LLAMA_LIKE),
    _tokens(),
    "RoPE (inv_freq buffer), GQA, RMSNorm, SwiGLU",
    hf_loss,
)
_add(
    "hf.mistral",
    "transformers",
    _hf("MistralForCausalLM", "MistralConfig", **_LLAMA_LIKE, sliding_window=8),
    _tokens(),
    "sliding-window mask",
    hf_loss,
)
_add(
    "hf.qwen2",
    "transformers",
    _hf("Qwen2ForCausalLM", "Qwen2Config", **_LLAMA_LIKE),
    _tokens(),
    "qkv bias, RoPE",
    hf_loss,
)
_add(
    "hf.vit",
    "transformers",
    _hf(
        "ViTForImageClassification",
        "ViTConfig",
        image_size=32,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        num_labels=10,
    ),
    lambda: {"pixel_values": torch.randn(8, 3, 32, 32), "labels": torch.randint(0, 10, (8,))},
    "pixel_values input, dtype check in the embeddings",
    hf_loss,
)
_add(
    "hf.whisper",
    "transformers",
    _hf(
        "WhisperForConditionalGeneration",
        "WhisperConfig",
        vocab_size=VOCAB,
        num_mel_bins=16,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=16,
        max_target_positions=32,
        pad_token_id=0,
        decoder_start_token_id=1,
        bos_token_id=1,
        eos_token_id=2,
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
        use_cache=False,
    ),
    # input_features: (batch, num_mel_bins, 2 * max_source_positions), checked by the encoder
    lambda: {"input_features": torch.randn(BATCH, 16, 32), "labels": torch.randint(3, VOCAB, (BATCH, 8))},
    "audio encoder (conv1d) + decoder, sequence-length check on input_features",
    hf_loss,
)
_add(
    "hf.wav2vec2",
    "transformers",
    _hf(
        "Wav2Vec2ForCTC",
        "Wav2Vec2Config",
        vocab_size=32,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        conv_dim=(32, 32),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        mask_time_prob=0.0,
        mask_feature_prob=0.0,
        layerdrop=0.0,
        ctc_zero_infinity=True,
        ctc_loss_reduction="mean",
    ),
    # 3200 samples -> 319 frames; 8 CTC targets, none the blank (pad_token_id=0)
    lambda: {"input_values": torch.randn(BATCH, 3200), "labels": torch.randint(1, 32, (BATCH, 8))},
    "conv feature encoder, grouped positional conv (weight norm), CTC loss",
    hf_loss,
    refused=r"(?s)Wav2Vec2ForCTC: Python control flow .* depends on tensor values"
    r".*labels\.max\(\) >= self\.config\.vocab_size",
)
