"""User embeddings that condition a causal language model (after User-LLM, arXiv 2402.13598).

The userlens user encoder reads a user's history. Its per-event outputs are compressed by a
Perceiver resampler (k learned latent queries attending to the events and to themselves, after
Flamingo) into k latents; with `perceiver` off, the single latent is the encoder's pooled
embedding (k = 1, the simplest case). The latents condition a frozen LM in one of two ways:

- soft prompt: a projector (two-layer MLP, as LLaRA's) maps each latent to a vector of the
  LM's input-embedding space; the k vectors go in right after the text's first token (not
  before it: small LMs use the first position as an attention sink, and read little there);
- cross-attention: a gated cross-attention block (attention to the latents, then a feed-forward
  layer, each behind a tanh gate that starts at 0) runs before every n-th decoder layer, so
  the untrained model computes exactly what the LM alone does.

Only the new parts train by default (resampler, projector, cross-attention blocks and gates);
`tune_encoder` trains the encoder too. The LM is deliberately not a registered submodule:
`state_dict()` and `parameters()` hold what userlens trains and the encoder, never the LM's
weights, which come from the model file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from userlens.config import UserLLMParams
from userlens.data import Batch
from userlens.errors import ConfigError
from userlens.model import UserEncoder


class PerceiverResampler(nn.Module):
    """[B, L, d] per-event states (+ mask of real events) -> [B, k, d] latents."""

    def __init__(self, dim: int, k: int, layers: int = 2, heads: int = 4):
        super().__init__()
        heads = heads if dim % heads == 0 else 1
        self.latents = nn.Parameter(torch.randn(k, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm_media": nn.LayerNorm(dim),
                    "norm_latents": nn.LayerNorm(dim),
                    "attend": nn.MultiheadAttention(dim, heads, batch_first=True),
                    "feed": nn.Sequential(
                        nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
                    ),
                }
            )  # fmt: skip
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, states: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        B, k = len(states), len(self.latents)
        x = self.latents.expand(B, -1, -1)
        latent_keys = torch.ones(B, k, dtype=torch.bool, device=states.device)
        ignore = ~torch.cat([real, latent_keys], dim=1)  # the latents always attend to themselves
        for block in self.blocks:
            query = block["norm_latents"](x)
            keys = torch.cat([block["norm_media"](states), query], dim=1)  # Flamingo: media and latents
            x = x + block["attend"](query, keys, keys, key_padding_mask=ignore, need_weights=False)[0]
            x = x + block["feed"](x)
        return self.norm(x)


class GatedCrossAttention(nn.Module):
    """x -> x + tanh(a) * attend(x, latents); x -> x + tanh(b) * feed(x), with a = b = 0 at first."""

    def __init__(self, dim: int, latent_dim: int, heads: int = 4):
        super().__init__()
        heads = heads if dim % heads == 0 else 1
        self.norm = nn.LayerNorm(dim)
        self.attend = nn.MultiheadAttention(dim, heads, kdim=latent_dim, vdim=latent_dim, batch_first=True)
        self.feed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.attend_gate = nn.Parameter(torch.zeros(1))
        self.feed_gate = nn.Parameter(torch.zeros(1))

    def forward(self, hidden: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = hidden.float()
        latents = latents.float()
        x = x + torch.tanh(self.attend_gate) * self.attend(self.norm(x), latents, latents, need_weights=False)[0]
        x = x + torch.tanh(self.feed_gate) * self.feed(x)
        return x.to(hidden.dtype)


class _CrossAttendingLayer(nn.Module):
    """An LM decoder layer with a gated cross-attention block in front of it."""

    def __init__(self, layer: nn.Module, block: GatedCrossAttention):
        super().__init__()
        self.layer = layer
        object.__setattr__(self, "block", block)  # registered in UserConditionedLM, not in the LM
        self.latents: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self.latents is not None:
            hidden_states = self.block(hidden_states, self.latents)
        return self.layer(hidden_states, *args, **kwargs)


class UserConditionedLM(nn.Module):
    """A frozen causal LM (transformers) conditioned on a userlens user encoder's view of a user."""

    def __init__(self, lm: nn.Module, encoder: UserEncoder, settings: UserLLMParams):
        super().__init__()
        if settings.mode not in ("soft_prompt", "cross_attention"):
            raise ConfigError(f"user_llm.mode {settings.mode!r}: expected soft_prompt or cross_attention")
        if not settings.perceiver and settings.latents != 1:
            raise ConfigError("without the Perceiver the only latent is the pooled embedding: set user_llm.latents 1")
        object.__setattr__(self, "lm", lm)  # not a submodule: see the module docstring
        for weight in lm.parameters():
            weight.requires_grad_(False)
        self.settings = settings
        self.encoder = encoder
        for weight in encoder.parameters():
            weight.requires_grad_(settings.tune_encoder)
        d_user, d_lm = encoder.d_model, int(lm.config.hidden_size)
        self.resampler = None
        if settings.perceiver:
            self.resampler = PerceiverResampler(d_user, settings.latents, settings.perceiver_layers)
        self.blocks = nn.ModuleList()
        self.projector: nn.Module | None = None
        if settings.mode == "soft_prompt":
            self.projector = nn.Sequential(nn.Linear(d_user, d_lm), nn.GELU(), nn.Linear(d_lm, d_lm))
        else:
            layers = lm.model.layers
            if settings.cross_attention_every > len(layers):
                raise ConfigError(f"user_llm.cross_attention_every {settings.cross_attention_every}: the language "
                                 f"model has only {len(layers)} layers")  # fmt: skip
            for index in range(settings.cross_attention_every - 1, len(layers), settings.cross_attention_every):
                block = GatedCrossAttention(d_lm, d_user)
                self.blocks.append(block)
                layers[index] = _CrossAttendingLayer(layers[index], block)

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def to(self, *args: Any, **kwargs: Any) -> UserConditionedLM:
        self.lm.to(*args, **kwargs)
        return super().to(*args, **kwargs)

    def train(self, mode: bool = True) -> UserConditionedLM:
        """Frozen parts stay in eval mode: a frozen encoder's dropout would only blur the user."""
        super().train(mode)
        if not self.settings.tune_encoder:
            self.encoder.eval()
        return self

    def user_latents(self, batch: Batch) -> torch.Tensor:
        """[B, k, d_user]: the resampler's latents, or the pooled embedding as one latent."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.settings.tune_encoder):
            if self.resampler is None:
                return self.encoder(batch)[:, None]
            states, real = self.encoder.event_states(batch)
        return self.resampler(states, real)

    @contextlib.contextmanager
    def _cross_attending(self, latents: torch.Tensor | None) -> Iterator[None]:
        layers = self.lm.model.layers if len(self.blocks) else []
        wrapped = [layer for layer in layers if isinstance(layer, _CrossAttendingLayer)]
        for layer in wrapped:
            layer.latents = latents
        try:
            yield
        finally:
            for layer in wrapped:
                layer.latents = None

    def forward(
        self,
        batch: Batch | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ):
        """The LM's output on `input_ids` (right-padded) conditioned on `batch`'s users (None: the
        plain LM). Soft prompts add k positions after the first token (labels -100 there);
        `text_logits` drops them again."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        latents = self.user_latents(batch) if batch is not None else None
        if latents is not None and self.projector is not None:
            prompt = self.projector(latents).to(embeds.dtype)
            embeds = torch.cat([embeds[:, :1], prompt, embeds[:, 1:]], dim=1)
            ones = attention_mask.new_ones(prompt.shape[:2])
            attention_mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
            if labels is not None:
                labels = torch.cat([labels[:, :1], labels.new_full(prompt.shape[:2], -100), labels[:, 1:]], dim=1)
        with self._cross_attending(latents if self.projector is None else None):
            return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)

    def text_logits(self, logits: torch.Tensor, batch: Batch | None) -> torch.Tensor:
        """The logits at the text's own positions (without the soft prompt's)."""
        if batch is None or self.projector is None:
            return logits
        return torch.cat([logits[:, :1], logits[:, 1 + self.settings.latents :]], dim=1)
