"""GPT-2 style decoder-only transformer.

Token + learned position embeddings, ``n_layer`` pre-LayerNorm blocks (causal
self-attention with a fused qkv projection, then a 4x GELU MLP), a final
LayerNorm and an LM head whose weight *is* the token-embedding weight.

The model is ``torch.fx.symbolic_trace``-able: sequence length is read from
the input's shape, and the ``T <= block_size`` check lives in
:func:`checked_seq_len`, which is registered with ``torch.fx.wrap`` so tracing
records it as a single graph node (the check still runs, and raises
``ValueError``, when the traced module is called).
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from ._options import check_positive_int, check_probability
from .registry import register_model

__all__ = ["GPT", "MLP", "Block", "CausalSelfAttention", "GPTConfig", "checked_seq_len", "gpt", "gpt2"]


def checked_seq_len(idx: Tensor, block_size: int) -> int:
    """Return the sequence length of ``idx`` after validating its shape.

    Registered with ``torch.fx.wrap``: under ``symbolic_trace`` it becomes one
    ``call_function`` node instead of being traced through, so the check is
    kept in (and enforced by) the traced graph.

    Args:
        idx: Token ids of shape [B, T].
        block_size: Maximum supported sequence length.

    Returns:
        ``T``.

    Raises:
        ValueError: If ``idx`` is not 2-D or ``T > block_size``.
    """
    if idx.dim() != 2:
        raise ValueError(f"expected token ids of shape [B, T], got shape {tuple(idx.shape)}")
    seq_len = idx.size(1)
    if seq_len > block_size:
        raise ValueError(f"sequence length {seq_len} exceeds block_size {block_size}")
    return seq_len


torch.fx.wrap("checked_seq_len")


class GPTConfig:
    """Validated hyper-parameters of a :class:`GPT`."""

    def __init__(
        self,
        *,
        n_layer: int,
        n_embd: int,
        n_head: int,
        block_size: int,
        vocab_size: int,
        dropout: float,
    ) -> None:
        """Validate and store the options.

        Args:
            n_layer: Number of transformer blocks.
            n_embd: Embedding / residual width.
            n_head: Attention heads; must divide ``n_embd``.
            block_size: Maximum sequence length (size of the position table).
            vocab_size: Number of token ids.
            dropout: Dropout probability (embeddings, attention weights,
                attention output projection, MLP output).

        Raises:
            ValueError: If an int option is not a positive int, ``n_embd`` is
                not divisible by ``n_head``, or ``dropout`` is not in [0, 1).
        """
        self.n_layer = check_positive_int("n_layer", n_layer)
        self.n_embd = check_positive_int("n_embd", n_embd)
        self.n_head = check_positive_int("n_head", n_head)
        self.block_size = check_positive_int("block_size", block_size)
        self.vocab_size = check_positive_int("vocab_size", vocab_size)
        self.dropout = check_probability("dropout", dropout)
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"GPTConfig({fields})"


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention via ``F.scaled_dot_product_attention``."""

    def __init__(self, config: GPTConfig) -> None:
        """Build the layer.

        Args:
            config: Model hyper-parameters.
        """
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over ``x`` of shape [B, T, C]; returns [B, T, C].

        Note: the attention-weight dropout probability is chosen from
        ``self.training`` in Python, so a graph traced with
        ``symbolic_trace`` keeps the mode it was traced in for that op.
        """
        # [B, T, 3C] -> [B, T, 3, H, D] -> [3, B, H, T, D]; no Python-side sizes needed.
        qkv = self.c_attn(x).unflatten(-1, (3, self.n_head, self.head_dim)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).flatten(2)  # [B, T, C]
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Linear(C, 4C) -> GELU -> Linear(4C, C) -> dropout."""

    def __init__(self, config: GPTConfig) -> None:
        """Build the layer.

        Args:
            config: Model hyper-parameters.
        """
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the MLP to ``x`` of shape [B, T, C]."""
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig) -> None:
        """Build the block.

        Args:
            config: Model hyper-parameters.
        """
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``x`` of shape [B, T, C]."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 style language model: token ids [B, T] -> logits [B, T, vocab_size]."""

    def __init__(self, config: GPTConfig) -> None:
        """Build the model and initialise weights with N(0, 0.02).

        Args:
            config: Model hyper-parameters.
        """
        super().__init__()
        self.config = config
        self.block_size = config.block_size
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one shared Parameter

        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, idx: Tensor) -> Tensor:
        """Compute next-token logits.

        Args:
            idx: LongTensor of token ids, shape [B, T] with ``T <= block_size``.

        Returns:
            Logits of shape [B, T, vocab_size].

        Raises:
            ValueError: If ``idx`` is not 2-D or ``T > block_size`` (also in the
                ``symbolic_trace``-d module, via :func:`checked_seq_len`).
        """
        seq_len = checked_seq_len(idx, self.block_size)
        pos = torch.arange(seq_len, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _build(n_layer: int, n_embd: int, n_head: int, block_size: int, vocab_size: int, dropout: float) -> GPT:
    return GPT(
        GPTConfig(
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            block_size=block_size,
            vocab_size=vocab_size,
            dropout=dropout,
        )
    )


@register_model
def gpt(
    *,
    n_layer: int = 4,
    n_embd: int = 256,
    n_head: int = 4,
    block_size: int = 256,
    vocab_size: int = 8192,
    dropout: float = 0.1,
) -> GPT:
    """A configurable GPT (small by default: 4 layers, width 256, 4 heads).

    Args:
        n_layer: Number of transformer blocks.
        n_embd: Embedding / residual width.
        n_head: Attention heads; must divide ``n_embd``.
        block_size: Maximum sequence length.
        vocab_size: Number of token ids.
        dropout: Dropout probability.

    Returns:
        The model.

    Raises:
        ValueError: On an invalid option.
    """
    return _build(n_layer, n_embd, n_head, block_size, vocab_size, dropout)


@register_model
def gpt2(
    *,
    n_layer: int = 12,
    n_embd: int = 768,
    n_head: int = 12,
    block_size: int = 1024,
    vocab_size: int = 50257,
    dropout: float = 0.1,
) -> GPT:
    """GPT-2 small (124M): 12 layers, width 768, 12 heads, 1024 positions, 50257 tokens.

    With tied embeddings the model has 124,439,808 parameters.

    Args:
        n_layer: Number of transformer blocks.
        n_embd: Embedding / residual width.
        n_head: Attention heads; must divide ``n_embd``.
        block_size: Maximum sequence length.
        vocab_size: Number of token ids.
        dropout: Dropout probability.

    Returns:
        The model.

    Raises:
        ValueError: On an invalid option.
    """
    return _build(n_layer, n_embd, n_head, block_size, vocab_size, dropout)
