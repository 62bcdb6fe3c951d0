"""The GPT, bottom-up: norm -> MLP -> block -> GPT.

The attention and positional parts are components built from the spec (see
``gptkit/components``); this file wires them together. Shapes in comments use
B = batch, T = new tokens, C = d_model, V = vocabulary, H = heads, hd = head size.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptkit.components.attention import KVCache, supports_static_cache
from gptkit.components.base import mark_residual
from gptkit.memory import check_fits
from gptkit.spec.models import ModelSpec, estimate_parameters


def make_norm(kind: str, dim: int, bias: bool) -> nn.Module:
    # Pre-norm blocks normalise the input of each sublayer, which keeps the residual stream
    # un-normalised and lets deep stacks train without warmup tricks (GPT-2, Xiong et al. 2020).
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-5)
    return nn.LayerNorm(dim, bias=bias)


class MLP(nn.Module):
    """Position-wise feed-forward: C -> d_ff -> C. ``swiglu`` gates with a second projection."""

    def __init__(self, d_model: int, d_ff: int, activation: str, dropout: float, bias: bool):
        super().__init__()
        self.activation = activation
        gated = activation == "swiglu"
        self.in_proj = nn.Linear(d_model, d_ff * (2 if gated else 1), bias=bias)
        self.out_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.in_proj(x)  # (B, T, d_ff) or (B, T, 2 * d_ff)
        if self.activation == "swiglu":
            a, gate = h.chunk(2, dim=-1)
            h = F.silu(gate) * a
        elif self.activation == "gelu":
            h = F.gelu(h)
        elif self.activation == "gelu_tanh":  # GPT-2's approximation ("gelu_new")
            h = F.gelu(h, approximate="tanh")
        elif self.activation == "relu":
            h = F.relu(h)
        elif self.activation == "relu2":  # squared ReLU (So et al., 2021), used by speedruns
            h = F.relu(h).square()
        else:
            h = F.silu(h)
        return self.dropout(self.out_proj(h))


class Block(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, attention: nn.Module, mlp: MLP, norm: str, d_model: int, bias: bool):
        super().__init__()
        self.norm1 = make_norm(norm, d_model, bias)
        self.attn = attention
        self.norm2 = make_norm(norm, d_model, bias)
        self.mlp = mlp

    def forward(self, x, positions, past=None, key_mask=None):
        a, present = self.attn(self.norm1(x), positions, past, key_mask)
        x = x + a
        x = x + self.mlp(self.norm2(x))
        return x, present


class GPTOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, V), or (B, 1, V) with last_only
    loss: torch.Tensor | None
    past_key_values: list[KVCache] | None  # per layer, (B, H_kv, T_past + T, hd) each


def check_fits_memory(spec: ModelSpec) -> None:
    """Refuse a model whose fp32 weights alone would not fit in this machine's memory: a run's
    ``spec.yaml`` edited to ``vocab_size: 1000000000`` passes the spec's sanity bound but
    would end in an allocator's traceback here."""
    params = estimate_parameters(spec)
    check_fits(
        params * 4,
        f"the weights of this model (about {params:.3g} parameters: model.vocab_size "
        f"{spec.vocab_size:,}, d_model {spec.d_model:,}, n_layers {spec.n_layers})",
        "Check the spec's model sizes (a run's spec.yaml is the one it was trained with).",
    )


class GPT(nn.Module):
    """A decoder-only transformer assembled from a resolved ``ModelSpec``.

    ``spec.vocab_size`` must be set (the trainer fills it from the tokenizer).
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if spec.vocab_size is None:
            raise ValueError("ModelSpec.vocab_size must be set before building the model")
        check_fits_memory(spec)
        self.spec = spec
        C, V = spec.d_model, spec.vocab_size
        self.tok_emb = nn.Embedding(V, C)
        self.positional = spec.positional.build(spec)
        self.drop = nn.Dropout(spec.dropout)
        self.blocks = nn.ModuleList(
            Block(
                spec.attention.build(spec, positional=self.positional),
                MLP(C, spec.hidden_dim, spec.activation, spec.dropout, spec.bias),
                spec.norm,
                C,
                spec.bias,
            )
            for _ in range(spec.n_layers)
        )
        self.norm_f = make_norm(spec.norm, C, spec.bias)
        self.lm_head = nn.Linear(C, V, bias=False)
        if spec.tie_embeddings:
            # The input and output embeddings share one matrix (Press & Wolf, 2017): fewer
            # parameters, and it usually helps small models.
            self.lm_head.weight = self.tok_emb.weight
        # Components (attention, positional) initialise themselves; the GPT initialises only
        # the modules it built, so a plugin's identity-initialised layer stays as it made it.
        for module in (self.tok_emb, self.lm_head, *(b.mlp for b in self.blocks)):
            module.apply(self._init_weights)
        for block in self.blocks:
            mark_residual(block.mlp.out_proj)
        # GPT-2: scale the init of the projections that write into the residual stream by
        # 1/sqrt(2 * n_layers), so its variance does not grow with depth. Components opt in
        # with mark_residual (no guessing from parameter names).
        for module in self.modules():
            if getattr(module, "gptkit_residual", False):
                nn.init.normal_(module.weight, mean=0.0, std=0.02 / math.sqrt(2 * spec.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def static_cache(self) -> bool:
        """Whether every attention layer and the positional scheme take a static KV cache
        (``StaticKV``); if not, decoding and export use the concatenating cache instead."""
        return getattr(self.positional, "static_cache", False) and all(
            supports_static_cache(block.attn) for block in self.blocks
        )

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, by default without position/token tables (nanoGPT's convention)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for p in self.positional.parameters())
            if not self.spec.tie_embeddings:
                n -= self.tok_emb.weight.numel()
        return n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        past_key_values: list[KVCache] | None = None,
        key_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> GPTOutput:
        """idx: (B, T) token ids; targets: (B, T) next-token ids (-1 = ignore).

        With ``past_key_values`` (one (keys, values) per layer) the T tokens continue a cached
        sequence; ``positions`` default to T_past .. T_past + T - 1. ``key_mask`` (B, T_past + T)
        marks real tokens (False for left padding). With ``StaticKV`` pasts (a preallocated
        cache, see ``components/attention.py``) give ``positions``; the returned
        ``past_key_values`` are then the new tokens' keys and values only.
        """
        B, T = idx.shape
        T_past = past_key_values[0][0].size(2) if past_key_values else 0
        if positions is None:
            positions = torch.arange(T_past, T_past + T, device=idx.device).expand(B, T)
        x = self.tok_emb(idx)  # (B, T, C)
        if self.spec.scale_embeddings:
            x = x * math.sqrt(self.spec.d_model)
        pos_emb = self.positional.embed(positions)
        if pos_emb is not None:
            x = x + pos_emb
        x = self.drop(x)
        presents = []
        for i, block in enumerate(self.blocks):
            past = past_key_values[i] if past_key_values else None
            x, present = block(x, positions, past, key_mask)
            presents.append(present)
        x = self.norm_f(x)
        if targets is not None:
            logits = self.lm_head(x)  # (B, T, V)
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
            )
            return GPTOutput(logits, loss, presents)
        if last_only:
            x = x[:, -1:, :]  # generation only needs the next-token distribution
        return GPTOutput(self.lm_head(x), None, presents)


def build_model(spec, vocab_size: int | None = None) -> GPT:
    """Build a GPT from an ``ExperimentSpec`` or ``ModelSpec`` (``vocab_size`` fills a gap)."""
    model_spec: ModelSpec = getattr(spec, "model", spec)
    if vocab_size is not None and model_spec.vocab_size is None:
        model_spec = model_spec.model_copy(update={"vocab_size": vocab_size})
    return GPT(model_spec)
