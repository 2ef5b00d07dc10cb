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
`tune_encoder` trains the encoder too, and `lora.rank` > 0 adds LoRA adapters (peft) to the
LM's attention, trained with them (B starts at 0: still the LM at first). Serving needs no
encoder: the latents of every user are computed once per trained version and served from
Feast (`user_context`), and the model is then built with `encoder=None` and fed the latents.
The LM is deliberately not a registered submodule: `state_dict()` and `parameters()` hold
what userlens trains and the encoder, never the LM's base weights, which come from the
model file.
"""

from __future__ import annotations

import contextlib
import inspect
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
        # A copy, not an expand: a view of a parameter made under no_grad still claims to need
        # gradients without having a graph, which trips torch's FLOP counter (module tracker).
        x = self.latents.unsqueeze(0).repeat(B, 1, 1)
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

    def __init__(
        self, lm: nn.Module, encoder: UserEncoder | None, settings: UserLLMParams, user_dim: int | None = None
    ):
        """`encoder` None (serving from stored latents): `user_dim` gives the latents' width."""
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
        if encoder is not None:
            for weight in encoder.parameters():
                weight.requires_grad_(settings.tune_encoder)
        elif user_dim is None:
            raise ValueError("without an encoder, user_dim must give the latents' width")
        d_user, d_lm = encoder.d_model if encoder is not None else int(user_dim), int(lm.config.hidden_size)
        self.lora = self._add_lora(lm, settings) if settings.lora.rank else nn.ModuleList()
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

    @staticmethod
    def _add_lora(lm: nn.Module, settings: UserLLMParams) -> nn.ModuleList:
        """LoRA adapters (peft) in the LM's target modules; B starts at 0, so the LM is unchanged
        until they train. Returned as a module list so that they train and save with the new
        parts (the LM itself is not a submodule)."""
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        lora = settings.lora
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.targets), lora_dropout=0.0)
        try:
            inject_adapter_in_model(config, lm)
        except ValueError as exc:  # peft: no target module found
            raise ConfigError(f"user_llm.lora.targets {list(lora.targets)}: {exc}") from exc
        adapted = [module for module in lm.modules() if isinstance(module, LoraLayer)]
        for module in adapted:
            for weight in (*module.lora_A.parameters(), *module.lora_B.parameters()):
                weight.requires_grad_(True)
        return nn.ModuleList(nn.ModuleList([m.lora_A, m.lora_B]) for m in adapted)

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def to(self, *args: Any, **kwargs: Any) -> UserConditionedLM:
        self.lm.to(*args, **kwargs)
        return super().to(*args, **kwargs)

    def train(self, mode: bool = True) -> UserConditionedLM:
        """Frozen parts stay in eval mode: a frozen encoder's dropout would only blur the user."""
        super().train(mode)
        if self.encoder is not None and not self.settings.tune_encoder:
            self.encoder.eval()
        return self

    def user_latents(self, batch: Batch) -> torch.Tensor:
        """[B, k, d_user]: the resampler's latents, or the pooled embedding as one latent."""
        if self.encoder is None:
            raise ValueError("this model was built without an encoder: pass the users' latents")
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
        latents: torch.Tensor | None = None,
    ):
        """The LM's output on `input_ids` (right-padded) conditioned on `batch`'s users, or on
        their stored `latents` [B, k, d_user] (both None: the plain LM). Soft prompts add k
        positions after the first token (labels -100 there, and logits at them in the output)."""
        if latents is None and batch is not None:
            latents = self.user_latents(batch)
        embeds, attention_mask, labels = self._inputs(input_ids, attention_mask, labels, latents)
        with self._cross_attending(latents if self.projector is None else None):
            return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        latents: torch.Tensor,
        max_new_tokens: int,
        no_repeat_ngram_size: int = 0,
    ) -> torch.Tensor:
        """Greedy continuation of prompts for users with these latents: the new tokens only. The
        prompts must not be padded (e.g. one at a time): the soft prompt goes after token 0.
        `no_repeat_ngram_size` > 0 forbids repeated n-grams (greedy small models loop)."""
        embeds, attention_mask, _ = self._inputs(input_ids, attention_mask, None, latents)
        with self._cross_attending(latents if self.projector is None else None):
            return self.lm.generate(inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=self.lm.generation_config.pad_token_id,
                                    no_repeat_ngram_size=no_repeat_ngram_size)  # fmt: skip

    @torch.no_grad()
    def answer_logprobs(
        self, prompt_ids: torch.Tensor, answers: torch.Tensor, answer_mask: torch.Tensor, latents: torch.Tensor | None
    ) -> torch.Tensor:
        """[n] mean log-probability per token of each of n right-padded `answers` [n, A] after one
        unpadded prompt [1, P] (for one user's `latents` [1, k, d], or None: the plain LM). The
        prompt runs once and its key/value cache is shared by the n answers: a question with 20
        candidate answers costs one prompt, not 20."""
        n = len(answers)
        embeds, mask, _ = self._inputs(prompt_ids, torch.ones_like(prompt_ids), None, latents)
        cross = self.projector is None and latents is not None
        with self._cross_attending(latents if cross else None):
            prompt = self.lm(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
        # transformers 5 renames past_key_values to cache (the old name warns until 5.40)
        name = "cache" if "cache" in inspect.signature(type(self.lm).forward).parameters else "past_key_values"
        cache = prompt.cache if getattr(prompt, "cache", None) is not None else prompt.past_key_values
        cache.batch_repeat_interleave(n)
        with self._cross_attending(latents.expand(n, -1, -1) if cross else None):
            rest = self.lm(input_ids=answers, attention_mask=torch.cat([mask.expand(n, -1), answer_mask], dim=1),
                           **{name: cache}).logits.float()  # fmt: skip
        logits = torch.cat([prompt.logits[:, -1:].float().expand(n, -1, -1), rest[:, :-1]], dim=1)
        picked = logits.log_softmax(-1).gather(-1, answers[..., None]).squeeze(-1) * answer_mask
        return picked.sum(1) / answer_mask.sum(1).clamp(min=1)

    def _inputs(self, input_ids, attention_mask, labels, latents):
        """Input embeddings, mask and labels, with the soft prompt inserted after the first token."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        if latents is None or self.projector is None:
            return embeds, attention_mask, labels
        prompt = self.projector(latents.to(self.projector[0].weight.dtype)).to(embeds.dtype)
        embeds = torch.cat([embeds[:, :1], prompt, embeds[:, 1:]], dim=1)
        ones = attention_mask.new_ones(prompt.shape[:2])
        attention_mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
        if labels is not None:
            labels = torch.cat([labels[:, :1], labels.new_full(prompt.shape[:2], -100), labels[:, 1:]], dim=1)
        return embeds, attention_mask, labels
