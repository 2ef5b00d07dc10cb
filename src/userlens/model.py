"""The models, in one file: the user encoder, Barlow Twins, and the dual-encoder baseline.

UserEncoder: each event = item embedding + projected item categories + projected rating
+ projected log time gap + learned position; a CLS token is prepended; pre-norm
Transformer blocks with a padding mask; pooling; LayerNorm; an output whitening (identity
until fitted) -> one vector per user. Bidirectional by default, with recency positions
(0 = most recent event). Causal (the dual encoder's user tower) uses positions counted from
the oldest kept event, so one pass yields the user after every prefix of the history.

The CLS token is always present, so attention always has a key to look at (rows that are
all padding give no NaN) and it doubles as the learned "empty user" embedding: a user with
no events gets the CLS output under every pooling mode.

BarlowTwins (Zbontar et al. 2021, after facebookresearch/barlowtwins): two augmented views
-> encoder -> projector MLP -> cross-correlation of the batch-normalised projections driven
towards the identity.

DualEncoder: the same encoder, causal, as user tower (SASRec-style: every prefix of a
history predicts the event after it), an item tower, and a next-item softmax over the batch's
distinct target items as negatives with an optional logQ correction (Yi et al. 2019).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from userlens.config import ModelParams
from userlens.data import N_SPECIAL, OOV, PAD, Batch, SequenceData, remap_unknown
from userlens.distributed import gather, own_rows


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(LN(x)), then x + MLP(LN(x)).

    `attend` [B, 1, T] (keys every query may see) or [B, T, T] (per query: causal)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        # Dropout acts on the residual branches only: on the attention weights it cost a third of a CPU step.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None])
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, D)))
        return x + self.drop(self.mlp(self.ln2(x)))


class UserEncoder(nn.Module):
    """Batch of histories -> user embeddings [B, d_model].

    `is_causal`, `output_mean` and `output_whitening` are buffers, so a saved encoder.pt
    carries them and every loader (registry, fine-tuning, refresh) rebuilds the same function.
    """

    item_categories: torch.Tensor  # buffer [n_items + 3, C]
    is_causal: torch.Tensor  # buffer, bool scalar
    output_mean: torch.Tensor  # buffer [d]: subtracted from the output (0 until fitted)
    output_whitening: torch.Tensor  # buffer [d, d]: applied after centring (identity until fitted)

    def __init__(
        self,
        params: ModelParams,
        n_items: int,
        n_categories: int,
        max_length: int,
        item_categories: torch.Tensor | None = None,
        causal: bool = False,
    ):
        super().__init__()
        d = params.d_model
        self.pooling, self.max_length, self.n_items = params.pooling, max_length, n_items
        if causal and params.pooling == "cls":
            raise ValueError("a causal encoder cannot pool on CLS: it sees no event (use mean or last)")
        if item_categories is None:
            item_categories = torch.zeros(n_items + N_SPECIAL, n_categories)
        assert item_categories.shape == (n_items + N_SPECIAL, n_categories), "item_categories: [n_items + 3, C]"
        self.register_buffer("item_categories", item_categories.float().clone())
        self.register_buffer("is_causal", torch.tensor(causal))
        self.register_buffer("output_mean", torch.zeros(d))
        self.register_buffer("output_whitening", torch.eye(d))
        self.item_emb = nn.Embedding(n_items + N_SPECIAL, d, padding_idx=PAD)
        self.category_proj = nn.Linear(n_categories, d, bias=False)
        self.rating_proj = nn.Linear(2, d, bias=False)  # (rating, has_rating)
        self.gap_proj = nn.Linear(1, d, bias=False)
        self.position_emb = nn.Embedding(max_length, d)  # recency (bidirectional) or from the oldest (causal)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.drop = nn.Dropout(params.dropout)
        self.blocks = nn.ModuleList(Block(d, params.n_heads, params.dropout) for _ in range(params.n_layers))
        self.ln_out = nn.LayerNorm(d)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.position_emb.weight, std=0.02)
        nn.init.normal_(self.cls, std=0.02)
        with torch.no_grad():  # unknown items contribute only their rating, gap and position
            self.item_emb.weight[PAD].zero_()
            self.item_emb.weight[OOV].zero_()

    @classmethod
    def for_data(cls, params: ModelParams, data: SequenceData, causal: bool = False) -> UserEncoder:
        """An encoder sized for `data` (vocabulary, categories, max_length) with its item table."""
        return cls(params, data.n_items, data.n_categories, data.max_length, data.item_categories, causal)

    @property
    def d_model(self) -> int:
        return self.cls.shape[-1]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Encoders saved before these buffers existed were bidirectional and unwhitened.
        defaults = {"is_causal": torch.tensor(False), "output_mean": torch.zeros(self.d_model),
                    "output_whitening": torch.eye(self.d_model)}  # fmt: skip
        for name, value in defaults.items():
            state_dict.setdefault(prefix + name, value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def event_states(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-event transformer outputs [B, L, D] (before pooling) and the real-event mask [B, L]:
        what a Perceiver resampler reads (userlens.llm.conditioning)."""
        x, real = self._states(batch)
        return x[:, 1:], real

    def _states(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformer outputs [B, 1 + L, D] (CLS first) and the real-event mask [B, L]."""
        items, real = batch.items, ~batch.padding
        B, L = items.shape
        if L > self.max_length:
            raise ValueError(f"batch has {L} positions, the encoder at most {self.max_length}")
        items = remap_unknown(items, self.n_items)  # ids beyond the trained vocabulary -> OOV
        causal = bool(self.is_causal)
        positions = torch.arange(L, device=items.device)
        if causal:
            position = positions.expand(B, L)
        else:
            position = (real.sum(1)[:, None] - 1 - positions).clamp(min=0)  # 0 = most recent
        rating = torch.stack([batch.ratings, batch.has_rating.to(batch.ratings.dtype)], dim=-1)
        x = (
            self.item_emb(items)
            + self.category_proj(self.item_categories[items])
            + self.rating_proj(rating)
            + self.gap_proj(batch.gaps[..., None])
            + self.position_emb(position)
        )
        x = x * real[..., None]  # padded positions carry nothing
        x = self.drop(torch.cat([self.cls.expand(B, 1, -1).to(x.dtype), x], dim=1))
        attend = torch.cat([torch.ones_like(real[:, :1]), real], dim=1)[:, None, :]  # CLS is always attended
        if causal:  # right padding: a real event never attends to a later (or padded) position
            attend = attend & torch.ones(L + 1, L + 1, dtype=torch.bool, device=items.device).tril()
        for block in self.blocks:
            x = block(x, attend)
        return x, real

    def _output(self, pooled: torch.Tensor) -> torch.Tensor:
        return (self.ln_out(pooled) - self.output_mean) @ self.output_whitening

    def forward(self, batch: Batch) -> torch.Tensor:
        x, real = self._states(batch)
        cls, events = x[:, 0], x[:, 1:]
        lengths = real.sum(1)
        B = len(lengths)
        if self.pooling == "cls":
            pooled = cls
        elif self.pooling == "mean":
            mean = (events * real[..., None]).sum(1) / lengths.clamp(min=1)[:, None]
            pooled = torch.where(lengths[:, None] > 0, mean, cls)
        else:  # "last": the most recent event
            last = events[torch.arange(B, device=events.device), (lengths - 1).clamp(min=0)]
            pooled = torch.where(lengths[:, None] > 0, last, cls)
        return self._output(pooled)

    def prefix_embeddings(self, batch: Batch) -> torch.Tensor:
        """[B, L, D]: position t holds the user after events 0..t, exactly what `forward` gives
        for the history cut after t (causal encoders only; rows past a history's end are junk)."""
        if not bool(self.is_causal):
            raise ValueError("prefix embeddings need a causal encoder")
        x, real = self._states(batch)
        events = x[:, 1:]
        if self.pooling == "last":
            return self._output(events)
        counts = torch.arange(1, events.shape[1] + 1, device=events.device, dtype=events.dtype)
        return self._output((events * real[..., None]).cumsum(1) / counts[None, :, None])

    @torch.no_grad()
    def fit_whitening(self, embeddings: torch.Tensor, shrinkage: float) -> None:
        """Centre and whiten the output on these users' raw embeddings (ZCA, eigenvalues shrunk
        towards their mean by `shrinkage`), so exported vectors are centred with an even
        spectrum: cosine and dot-product consumers then see taste, not one shared direction."""
        self.output_mean.zero_()
        self.output_whitening.copy_(torch.eye(self.d_model, device=self.output_whitening.device))
        x = embeddings.double()
        mean = x.mean(0)
        cov = torch.cov((x - mean).T, correction=0)
        values, vectors = torch.linalg.eigh(cov)
        values = values.clamp(min=0)
        values = (1 - shrinkage) * values + shrinkage * values.mean()
        scale = values.clamp(min=1e-12).rsqrt()
        self.output_mean.copy_(mean.to(self.output_mean.dtype))
        self.output_whitening.copy_((vectors * scale) @ vectors.T)


def off_diagonal(c: torch.Tensor) -> torch.Tensor:
    n = c.shape[0]
    return c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float, eps: float = 1e-5) -> torch.Tensor:
    """Σ_i (1 - C_ii)² + λ Σ_{i≠j} C_ij², C = cross-correlation of the batch-normalised z1, z2."""
    with torch.autocast(device_type=z1.device.type, enabled=False):
        z1, z2 = z1.float(), z2.float()
        z1 = (z1 - z1.mean(0)) / torch.sqrt(z1.var(0, unbiased=False) + eps)
        z2 = (z2 - z2.mean(0)) / torch.sqrt(z2.var(0, unbiased=False) + eps)
        c = z1.T @ z2 / z1.shape[0]
        on_diag = (1 - torch.diagonal(c)).pow(2).sum()
        off_diag = off_diagonal(c).pow(2).sum()
        return on_diag + lambd * off_diag


class BarlowTwins(nn.Module):
    """Encoder + projector; forward(view1, view2) -> Barlow Twins loss."""

    def __init__(self, encoder: UserEncoder, projector_widths: tuple[int, ...] | list[int], lambd: float):
        super().__init__()
        self.encoder, self.lambd = encoder, lambd
        sizes = [encoder.d_model, *projector_widths]
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 2):
            layers += [nn.Linear(sizes[i], sizes[i + 1], bias=False), nn.BatchNorm1d(sizes[i + 1]), nn.ReLU()]
        layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
        self.projector = nn.Sequential(*layers)

    def forward(self, view1: Batch, view2: Batch) -> torch.Tensor:
        """The loss of the whole batch. Under torchrun each process encodes its own rows and the
        projector, its BatchNorm and the cross-correlation see every process's (distributed.py)."""
        z1 = self.projector(gather(self.encoder(own_rows(view1))))
        z2 = self.projector(gather(self.encoder(own_rows(view2))))
        return barlow_twins_loss(z1, z2, self.lambd)


class DualEncoder(nn.Module):
    """Two-tower next-item model: user tower = a causal UserEncoder, item tower = item id + categories.

    Trained on every (prefix, next event) pair of the batch's histories at once: the causal
    encoder gives the user after each prefix in one pass (SASRec-style), so a batch of B users
    yields up to B * (L - 1) pairs instead of B. The negatives of a pair are the batch's other
    distinct target items (a sampled softmax); with logq_correction, log q(item) (its share of
    `item_counts`) is subtracted from each logit, so popular items, which turn up as negatives
    more often, are not over-penalised (Yi et al. 2019). Both towers are L2-normalised, so u·v
    is a cosine and `temperature` sets the logit scale.
    """

    log_q: torch.Tensor  # buffer [n_items + 3]

    def __init__(
        self,
        encoder: UserEncoder,
        n_items: int,
        n_categories: int,
        item_counts: torch.Tensor,
        temperature: float,
        logq_correction: bool,
        max_pairs: int,
    ):
        super().__init__()
        assert n_items == encoder.n_items, "the towers share one vocabulary"
        assert bool(encoder.is_causal), "the dual encoder trains on prefixes: its user tower must be causal"
        d = encoder.d_model
        self.encoder, self.temperature, self.logq_correction = encoder, temperature, logq_correction
        self.max_pairs = max_pairs
        # The item tower's own id table; categories come from the encoder's item table.
        self.item_emb = nn.Embedding(n_items + N_SPECIAL, d, padding_idx=PAD)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        self.category_proj = nn.Linear(n_categories, d, bias=False)
        self.ln = nn.LayerNorm(d)
        counts = item_counts.float().clamp(min=1.0)  # every item gets a non-zero probability
        self.register_buffer("log_q", torch.log(counts / counts.sum()))

    def item_vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        categories = self.encoder.item_categories[tokens]
        return F.normalize(self.ln(self.item_emb(tokens) + self.category_proj(categories)), dim=-1)

    def item_embeddings(self) -> torch.Tensor:
        """[n_items + 3, d] for every token id (rank with u·v; ignore ids 0-2)."""
        return self.item_vectors(torch.arange(self.item_emb.num_embeddings, device=self.log_q.device))

    def user_vectors(self, batch: Batch) -> torch.Tensor:
        return F.normalize(self.encoder(batch), dim=-1)

    def forward(self, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sampled-softmax loss of next-event prediction over the batch's (prefix, next) pairs;
        at most `max_pairs` of them, drawn uniformly with `generator` when there are more. Under
        torchrun each process encodes its own rows; pairs and negatives span every process's."""
        states = F.normalize(gather(self.encoder.prefix_embeddings(own_rows(batch))), dim=-1)  # [B, L, D]
        lengths = batch.lengths
        positions = torch.arange(batch.items.shape[1], device=lengths.device)
        rows, cols = (positions[None, :] + 1 < lengths[:, None]).nonzero(as_tuple=True)  # prefix 0..t -> t + 1
        if len(rows) > self.max_pairs:
            pick = torch.randperm(len(rows), generator=generator, device=generator.device if generator else "cpu")
            pick = pick[: self.max_pairs].to(rows.device)
            rows, cols = rows[pick], cols[pick]
        if not len(rows):  # no history has two events: nothing to predict
            return states.sum() * 0.0
        targets = batch.items[rows, cols + 1]
        candidates, column = torch.unique(targets, return_inverse=True)  # each distinct item once
        u, v = states[rows, cols], self.item_vectors(candidates)
        with torch.autocast(device_type=u.device.type, enabled=False):
            logits = u.float() @ v.float().T / self.temperature  # [pairs, distinct items]
            if self.logq_correction:
                logits = logits - self.log_q[candidates][None, :]
            return F.cross_entropy(logits, column)
