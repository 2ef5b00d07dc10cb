"""The models, in one file: the user encoder, Barlow Twins, and the dual-encoder baseline.

UserEncoder: each event = item embedding + projected item categories + projected rating
+ projected log time gap + learned recency position; a CLS token is prepended; pre-norm
Transformer blocks with a padding mask; pooling; LayerNorm -> one vector per user.

The CLS token is always present, so attention always has a key to look at (rows that are
all padding give no NaN) and it doubles as the learned "empty user" embedding: a user with
no events gets the CLS output under every pooling mode.

BarlowTwins (Zbontar et al. 2021, after facebookresearch/barlowtwins): two augmented views
-> encoder -> projector MLP -> cross-correlation of the batch-normalised projections driven
towards the identity.

DualEncoder: the same encoder as user tower, an item tower, and a next-item softmax over
in-batch negatives with an optional logQ correction (Yi et al. 2019).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from userlens.config import ModelParams
from userlens.data import N_SPECIAL, OOV, PAD, Batch, SequenceData, remap_unknown


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(LN(x)), then x + MLP(LN(x)); `attend` [B, T] masks keys."""

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
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None, None, :])
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, D)))
        return x + self.drop(self.mlp(self.ln2(x)))


class UserEncoder(nn.Module):
    """Batch of histories -> user embeddings [B, d_model]."""

    item_categories: torch.Tensor  # buffer [n_items + 3, C]

    def __init__(self, params: ModelParams, n_items: int, n_categories: int, max_length: int,
                 item_categories: torch.Tensor | None = None):
        super().__init__()
        d = params.d_model
        self.pooling, self.max_length, self.n_items = params.pooling, max_length, n_items
        if item_categories is None:
            item_categories = torch.zeros(n_items + N_SPECIAL, n_categories)
        assert item_categories.shape == (n_items + N_SPECIAL, n_categories), "item_categories: [n_items + 3, C]"
        self.register_buffer("item_categories", item_categories.float().clone())
        self.item_emb = nn.Embedding(n_items + N_SPECIAL, d, padding_idx=PAD)
        self.category_proj = nn.Linear(n_categories, d, bias=False)
        self.rating_proj = nn.Linear(2, d, bias=False)  # (rating, has_rating)
        self.gap_proj = nn.Linear(1, d, bias=False)
        self.position_emb = nn.Embedding(max_length, d)  # 0 = most recent event
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
    def for_data(cls, params: ModelParams, data: SequenceData) -> UserEncoder:
        """An encoder sized for `data` (vocabulary, categories, max_length) with its item table."""
        return cls(params, data.n_items, data.n_categories, data.max_length, data.item_categories)

    @property
    def d_model(self) -> int:
        return self.cls.shape[-1]

    def forward(self, batch: Batch) -> torch.Tensor:
        items, real = batch.items, ~batch.padding
        B, L = items.shape
        if L > self.max_length:
            raise ValueError(f"batch has {L} positions, the encoder at most {self.max_length}")
        items = remap_unknown(items, self.n_items)  # ids beyond the trained vocabulary -> OOV
        lengths = real.sum(1)
        recency = (lengths[:, None] - 1 - torch.arange(L, device=items.device)).clamp(min=0)
        rating = torch.stack([batch.ratings, batch.has_rating.to(batch.ratings.dtype)], dim=-1)
        x = (
            self.item_emb(items)
            + self.category_proj(self.item_categories[items])
            + self.rating_proj(rating)
            + self.gap_proj(batch.gaps[..., None])
            + self.position_emb(recency)
        )
        x = x * real[..., None]  # padded positions carry nothing
        x = self.drop(torch.cat([self.cls.expand(B, 1, -1).to(x.dtype), x], dim=1))
        attend = torch.cat([torch.ones_like(real[:, :1]), real], dim=1)  # CLS is always attended
        for block in self.blocks:
            x = block(x, attend)
        cls, events = x[:, 0], x[:, 1:]
        if self.pooling == "cls":
            pooled = cls
        elif self.pooling == "mean":
            mean = (events * real[..., None]).sum(1) / lengths.clamp(min=1)[:, None]
            pooled = torch.where(lengths[:, None] > 0, mean, cls)
        else:  # "last": the most recent event
            last = events[torch.arange(B, device=items.device), (lengths - 1).clamp(min=0)]
            pooled = torch.where(lengths[:, None] > 0, last, cls)
        return self.ln_out(pooled)


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
        z1 = self.projector(self.encoder(view1))
        z2 = self.projector(self.encoder(view2))
        return barlow_twins_loss(z1, z2, self.lambd)


class DualEncoder(nn.Module):
    """Two-tower next-item model: user tower = UserEncoder, item tower = item id + categories.

    Both towers' outputs are L2-normalised, so u·v is a cosine and `temperature` sets the
    logit scale. The in-batch softmax treats the other users' positives as negatives; with
    logq_correction, log q(item) (its share of `item_counts`) is subtracted from each logit,
    so popular items are not over-penalised for turning up as negatives more often.
    """

    log_q: torch.Tensor  # buffer [n_items + 3]

    def __init__(self, encoder: UserEncoder, n_items: int, n_categories: int, item_counts: torch.Tensor,
                 temperature: float, logq_correction: bool):
        super().__init__()
        assert n_items == encoder.n_items, "the towers share one vocabulary"
        d = encoder.d_model
        self.encoder, self.temperature, self.logq_correction = encoder, temperature, logq_correction
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

    def forward(self, batch: Batch, targets: torch.Tensor) -> torch.Tensor:
        keep = targets >= 0  # -1 = no target (empty history)
        u = self.user_vectors(batch)[keep]
        targets = targets[keep]
        v = self.item_vectors(targets)
        with torch.autocast(device_type=u.device.type, enabled=False):
            logits = u.float() @ v.float().T / self.temperature  # [B, B]: row = user, column = item
            if self.logq_correction:
                logits = logits - self.log_q[targets][None, :]
            # A user whose target is also another column's target: that column is no negative.
            same = (targets[:, None] == targets[None, :]) & ~torch.eye(len(targets), dtype=torch.bool, device=u.device)
            logits = logits.masked_fill(same, float("-inf"))
            return F.cross_entropy(logits, torch.arange(len(targets), device=u.device))
