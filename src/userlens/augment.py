"""Stochastic views of a batch of histories for Barlow Twins: two calls, two views.

Applied in this order, each vectorised over the batch (one draw per user or per event):

1. crop: with prob crop_prob, keep one random contiguous window of at least
   ceil(crop_min_fraction * length) events, moved to start at position 0;
2. reorder: with prob reorder_prob, shuffle the events inside one random span of
   reorder_span consecutive positions (the whole span when the history is shorter);
3. segment mask: with prob segment_mask_prob, mask one contiguous segment of
   round(segment_mask_fraction * length) events (rounded half up, at most length - 1);
4. item mask: mask each event with prob item_mask_rate;
5. category-aware substitution: each unmasked event, with prob substitute_rate, gets a
   random item of the same primary category (its first category) instead, keeping its
   rating and time: the view keeps the user's taste but not the exact items (items without
   a category, or alone in theirs, stay as they are).

A masked event becomes the mask token with rating, has_rating and gap zeroed. Invariants:
padding stays padding (and right-aligned), an empty history stays empty, and every
non-empty history keeps at least one unmasked event (if the masks would cover all of one,
one random event of it is left unmasked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from userlens.config import AugmentParams
from userlens.data import MASK, PAD, Batch


@dataclass(frozen=True)
class Substitutes:
    """For each token id, the items of its primary category: order[start[t] : start[t] + size[t]]."""

    order: torch.Tensor  # token ids grouped by primary category
    start: torch.Tensor  # [n_tokens] first position of the token's group in `order`
    size: torch.Tensor  # [n_tokens] group size (0: no category)

    @classmethod
    def from_item_categories(cls, item_categories: torch.Tensor) -> Substitutes:
        """From the encoder's [n_tokens, C] multi-hot item table (special tokens have no category)."""
        has = item_categories.sum(1) > 0
        primary = torch.where(has, item_categories.argmax(1), -1)
        order = torch.argsort(primary, stable=True)
        order = order[primary[order] >= 0]
        counts = torch.bincount(primary[has], minlength=item_categories.shape[1])
        starts = torch.cumsum(counts, 0) - counts
        start = torch.where(has, starts[primary.clamp(min=0)], 0)
        size = torch.where(has, counts[primary.clamp(min=0)], 0)
        return cls(order, start, size)


def augment(batch: Batch, params: AugmentParams, generator: torch.Generator,
            substitutes: Substitutes | None = None) -> Batch:  # fmt: skip
    """A new, randomly augmented copy of `batch` (the input is not modified); `substitutes`
    is needed when params.substitute_rate > 0."""
    device = batch.items.device
    B, L = batch.items.shape
    pos = torch.arange(L, device=device)[None, :]

    def rand(*shape: int) -> torch.Tensor:  # drawn on the generator's device, used on the batch's
        return torch.rand(shape, generator=generator, device=generator.device).to(device)

    def randint(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:  # uniform in [low, high]
        return (low + (rand(B) * (high - low + 1)).long()).clamp(max=high)

    fields = [batch.items, batch.ratings, batch.has_rating, batch.gaps]
    lengths = batch.lengths

    # 1. Random contiguous crop, re-packed to position 0.
    shortest = torch.ceil(lengths * params.crop_min_fraction - 1e-6).long().clamp(min=1).minimum(lengths)
    crop = torch.where(rand(B) < params.crop_prob, randint(shortest, lengths), lengths)
    start = randint(torch.zeros_like(lengths), lengths - crop)
    index = (start[:, None] + pos).clamp(max=L - 1)
    fields = [f.gather(1, index) for f in fields]
    lengths = crop
    padding = pos >= lengths[:, None]

    # 2. Local reordering: events of one span get random sort keys inside the span.
    span = lengths.clamp(max=params.reorder_span)
    start = randint(torch.zeros_like(lengths), lengths - span)
    in_span = (rand(B) < params.reorder_prob)[:, None] & (pos >= start[:, None]) & (pos < (start + span)[:, None])
    keys = torch.where(in_span, start[:, None] + rand(B, L).double() * span[:, None], pos.double())
    order = torch.sort(keys, dim=1, stable=True).indices
    fields = [f.gather(1, order) for f in fields]

    # 3. + 4. Segment mask and item mask.
    segment = torch.floor(lengths * params.segment_mask_fraction + 0.5).long().minimum((lengths - 1).clamp(min=0))
    segment = torch.where(rand(B) < params.segment_mask_prob, segment, 0)
    start = randint(torch.zeros_like(lengths), lengths - segment)
    masked = (pos >= start[:, None]) & (pos < (start + segment)[:, None])
    masked |= rand(B, L) < params.item_mask_rate
    masked &= ~padding
    everything = masked.sum(1) == lengths
    spare = ((rand(B, L) + 1) * ~padding).argmax(1)  # a random real position
    masked &= ~(everything & (lengths > 0))[:, None] | (pos != spare[:, None])

    items, ratings, has_rating, gaps = fields
    if params.substitute_rate > 0:  # 5. same-category substitution of unmasked events
        if substitutes is None:
            raise ValueError("augment.substitute_rate > 0 needs the item categories (Substitutes)")
        size = substitutes.size.to(device)[items]
        swap = (rand(B, L) < params.substitute_rate) & ~masked & ~padding & (size > 1)
        pick = substitutes.start.to(device)[items] + (rand(B, L) * size).long().clamp(max=(size - 1).clamp(min=0))
        items = torch.where(swap, substitutes.order.to(device)[pick.clamp(max=len(substitutes.order) - 1)], items)
    blank = masked | padding
    return Batch(
        items=items.masked_fill(masked, MASK).masked_fill(padding, PAD),
        ratings=ratings.masked_fill(blank, 0.0),
        has_rating=has_rating & ~blank,
        gaps=gaps.masked_fill(blank, 0.0),
        padding=padding,
    )


def two_views(batch: Batch, params: AugmentParams, generator: torch.Generator,
              substitutes: Substitutes | None = None) -> tuple[Batch, Batch]:  # fmt: skip
    return augment(batch, params, generator, substitutes), augment(batch, params, generator, substitutes)
