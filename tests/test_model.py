"""data.py, augment.py and model.py: loading, augmentation invariants, losses, and that training moves."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from userlens.augment import Substitutes, augment
from userlens.config import AugmentParams, ModelParams, PretrainParams
from userlens.data import MASK, N_SPECIAL, OOV, PAD, Batch, SequenceData, remap_unknown
from userlens.model import BarlowTwins, DualEncoder, UserEncoder, barlow_twins_loss

NO_AUGMENT = AugmentParams(item_mask_rate=0, segment_mask_prob=0, crop_prob=0, reorder_prob=0)
SMALL = ModelParams(d_model=32, n_layers=2, n_heads=4, dropout=0.1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is as fast, and immune to a busy machine (intra-op
    threads spin-wait and slow down many times over when the cores are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(small_sequences: Path) -> SequenceData:
    return SequenceData.load(small_sequences, max_length=64)


def random_batch(seed: int, B: int = 64, L: int = 30, n_items: int = 50) -> Batch:
    """Right-padded random histories with lengths 0..L (0 and 1 always present)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    lengths[:3] = torch.tensor([0, 1, L])
    padding = torch.arange(L)[None, :] >= lengths[:, None]
    has_rating = (torch.rand(B, L, generator=g) < 0.7) & ~padding
    return Batch(
        items=torch.randint(N_SPECIAL, n_items + N_SPECIAL, (B, L), generator=g).masked_fill(padding, PAD),
        ratings=torch.rand(B, L, generator=g) * has_rating,
        has_rating=has_rating,
        gaps=(torch.rand(B, L, generator=g) * 10).masked_fill(padding, 0.0),
        padding=padding,
    )


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------- Barlow Twins loss


def test_barlow_twins_loss_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(4, 2)), rng.normal(size=(4, 2))
    n1 = (z1 - z1.mean(0)) / np.sqrt(z1.var(0) + 1e-5)  # numpy var: biased, like BatchNorm
    n2 = (z2 - z2.mean(0)) / np.sqrt(z2.var(0) + 1e-5)
    c = np.array([[sum(n1[b, i] * n2[b, j] for b in range(4)) / 4 for j in range(2)] for i in range(2)])
    lambd = 0.3
    expected = (1 - c[0, 0]) ** 2 + (1 - c[1, 1]) ** 2 + lambd * (c[0, 1] ** 2 + c[1, 0] ** 2)
    got = barlow_twins_loss(torch.tensor(z1), torch.tensor(z2), lambd)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_barlow_twins_loss_optimum_and_lambda():
    # Standardised, decorrelated columns; identical views: C = I, loss ~ 0.
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]) * 3 + 7
    assert barlow_twins_loss(z, z, lambd=1.0).item() < 1e-8
    # Correlated views: the loss is on_diag + lambda * off_diag, linear in lambda.
    z2 = torch.tensor([[1.0, 2.0], [0.5, -1.0], [-2.0, 1.5], [0.1, 0.3]])
    l0, l1, l2 = (barlow_twins_loss(z, z2, lambd=x).item() for x in (0.0, 1.0, 2.0))
    assert l1 > l0 and l2 - l0 == pytest.approx(2 * (l1 - l0), rel=1e-5)
    # Scale- and shift-invariant per dimension (batch normalisation).
    assert barlow_twins_loss(z * 5 - 2, z2 * 2 + 3, 1.0).item() == pytest.approx(l1, rel=1e-4)


def test_barlow_twins_loss_runs_in_float32_under_bf16_inputs():
    z = torch.randn(32, 16).bfloat16()
    loss = barlow_twins_loss(z, z + 0.1 * torch.randn(32, 16).bfloat16(), 0.005)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ---------------------------------------------------------------------------------- augmentations


def check_invariants(view: Batch, original: Batch) -> None:
    L = view.items.shape[1]
    lengths = view.lengths
    assert torch.equal(view.padding, torch.arange(L)[None, :] >= lengths[:, None]), "padding is a right suffix"
    assert (view.items[view.padding] == PAD).all(), "padding stays padding"
    assert (view.items[~view.padding] != PAD).all(), "real positions are never padding tokens"
    assert not view.has_rating[view.padding].any() and (view.gaps[view.padding] == 0).all()
    orig = original.lengths
    assert (lengths <= orig).all()
    assert torch.equal(lengths == 0, orig == 0), "empty stays empty, non-empty stays non-empty"
    unmasked = ((view.items != MASK) & ~view.padding).sum(1)
    assert (unmasked[orig > 0] >= 1).all(), "every non-empty history keeps an unmasked event"
    masked = view.items == MASK
    assert not view.has_rating[masked].any() and (view.gaps[masked] == 0).all() and (view.ratings[masked] == 0).all()


@pytest.mark.parametrize(
    "params",
    [
        AugmentParams(),
        AugmentParams(
            item_mask_rate=0.9,
            segment_mask_prob=1.0,
            segment_mask_fraction=0.9,
            crop_prob=1.0,
            crop_min_fraction=0.1,
            reorder_prob=1.0,
            reorder_span=7,
        ),
    ],
)
def test_augment_invariants_over_many_seeds(params):
    for seed in range(40):
        batch = random_batch(seed)
        view = augment(batch, params, gen(seed))
        check_invariants(view, batch)


def test_augment_returns_a_new_batch_and_leaves_the_input_alone():
    batch = random_batch(1)
    copy = Batch(*(t.clone() for t in (batch.items, batch.ratings, batch.has_rating, batch.gaps, batch.padding)))
    v1, v2 = augment(batch, AugmentParams(), gen(0)), augment(batch, AugmentParams(), gen(1))
    assert not torch.equal(v1.items, v2.items)
    for name in ("items", "ratings", "has_rating", "gaps", "padding"):
        assert torch.equal(getattr(batch, name), getattr(copy, name))


def test_item_mask_rate_is_respected():
    batch = random_batch(2, B=256, L=200)
    batch = replace(batch, padding=torch.zeros_like(batch.padding))  # all full length
    batch = replace(batch, items=batch.items.clamp(min=N_SPECIAL))
    view = augment(batch, NO_AUGMENT.model_copy(update=dict(item_mask_rate=0.2)), gen(0))
    rate = (view.items == MASK).float().mean().item()
    assert rate == pytest.approx(0.2, abs=0.01)
    assert torch.equal(view.items != MASK, view.items == batch.items)


def test_segment_mask_is_one_contiguous_segment_of_the_right_length():
    batch = random_batch(3)
    params = NO_AUGMENT.model_copy(update=dict(segment_mask_prob=1.0, segment_mask_fraction=0.3))
    view = augment(batch, params, gen(0))
    for row in range(len(batch)):
        n = int(batch.lengths[row])
        where = (view.items[row] == MASK).nonzero().flatten().tolist()
        expected = min(int(np.floor(0.3 * n + 0.5)), max(n - 1, 0))
        assert len(where) == expected
        if where:
            assert where == list(range(where[0], where[0] + expected))


def test_crop_keeps_a_contiguous_window_of_at_least_the_minimum_fraction():
    params = NO_AUGMENT.model_copy(update=dict(crop_prob=1.0, crop_min_fraction=0.6))
    cropped_any = False
    for seed in range(20):
        batch = random_batch(seed)
        view = augment(batch, params, gen(seed))
        check_invariants(view, batch)
        for row in range(len(batch)):
            n, m = int(batch.lengths[row]), int(view.lengths[row])
            assert m >= int(np.ceil(0.6 * n - 1e-6))
            window = view.items[row, :m].tolist()
            original = batch.items[row, :n].tolist()
            assert any(original[s : s + m] == window for s in range(n - m + 1))
            cropped_any |= m < n
    assert cropped_any


def test_reorder_preserves_the_multiset_within_one_span():
    params = NO_AUGMENT.model_copy(update=dict(reorder_prob=1.0, reorder_span=4))
    batch = random_batch(4)
    view = augment(batch, params, gen(0))
    assert torch.equal(view.lengths, batch.lengths)
    assert torch.equal(view.items.sort(1).values, batch.items.sort(1).values)
    moved = (view.items != batch.items).nonzero()
    assert len(moved) > 0
    for row in moved[:, 0].unique():
        cols = moved[moved[:, 0] == row, 1]
        assert cols.max() - cols.min() < 4
    # The event moves as a whole: ratings and gaps follow their item.
    assert torch.equal(view.gaps.sort(1).values, batch.gaps.sort(1).values)


def test_substitution_swaps_items_for_items_of_the_same_primary_category(data):
    subs = Substitutes.from_item_categories(data.item_categories)
    primary = torch.where(data.item_categories.sum(1) > 0, data.item_categories.argmax(1), -1)
    params = NO_AUGMENT.model_copy(update=dict(substitute_rate=0.5))
    batch = data.batch(torch.arange(32))
    view = augment(batch, params, gen(0), subs)
    swapped = (view.items != batch.items) & ~batch.padding
    share = swapped.sum().item() / (~batch.padding).sum().item()
    assert 0.3 < share < 0.55  # about half; a swap may draw the same item back
    assert torch.equal(primary[view.items[swapped]], primary[batch.items[swapped]])
    for name in ("ratings", "has_rating", "gaps", "padding"):  # the event keeps its rating and time
        assert torch.equal(getattr(view, name), getattr(batch, name)), name
    with pytest.raises(ValueError, match="substitute_rate"):
        augment(batch, params, gen(0))


def test_zero_rates_leave_the_batch_unchanged():
    batch = random_batch(5)
    view = augment(batch, NO_AUGMENT, gen(0))
    for name in ("items", "ratings", "has_rating", "gaps", "padding"):
        assert torch.equal(getattr(view, name), getattr(batch, name)), name


def test_augment_is_deterministic_for_a_seeded_generator():
    batch = random_batch(6)
    a, b = augment(batch, AugmentParams(), gen(7)), augment(batch, AugmentParams(), gen(7))
    for name in ("items", "ratings", "has_rating", "gaps", "padding"):
        assert torch.equal(getattr(a, name), getattr(b, name))


# ---------------------------------------------------------------------------------- encoder


def encoder(pooling: str = "mean", n_items: int = 50, n_categories: int = 4, max_length: int = 30) -> UserEncoder:
    torch.manual_seed(0)
    table = torch.zeros(n_items + N_SPECIAL, n_categories)
    table[N_SPECIAL:] = (torch.rand(n_items, n_categories) < 0.4).float()
    return UserEncoder(SMALL.model_copy(update=dict(pooling=pooling)), n_items, n_categories, max_length, table)


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_encoder_shapes_and_no_nan_for_empty_and_length_one_rows(pooling):
    enc = encoder(pooling)
    batch = random_batch(0)  # rows 0 and 1: empty and length 1
    for train in (True, False):
        enc.train(train)
        out = enc(batch)
        assert out.shape == (len(batch), 32) and torch.isfinite(out).all()
    # An all-padding batch too.
    empty = Batch(
        torch.zeros(3, 5, dtype=torch.long),
        torch.zeros(3, 5),
        torch.zeros(3, 5, dtype=torch.bool),
        torch.zeros(3, 5),
        torch.ones(3, 5, dtype=torch.bool),
    )
    out = enc.eval()(empty)
    assert torch.isfinite(out).all() and torch.allclose(out[0], out[1])
    out.sum().backward()  # gradients flow even then


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_padding_positions_do_not_influence_the_embedding(pooling):
    enc = encoder(pooling, max_length=35).eval()
    batch = random_batch(1)
    noisy = replace(
        batch,
        items=torch.where(batch.padding, torch.randint(0, 53, batch.items.shape), batch.items),
        ratings=torch.where(batch.padding, torch.rand(batch.items.shape), batch.ratings),
        gaps=torch.where(batch.padding, torch.rand(batch.items.shape) * 9, batch.gaps),
        has_rating=batch.has_rating | batch.padding,
    )
    with torch.no_grad():
        assert torch.allclose(enc(batch), enc(noisy), atol=1e-5)
        # Nor do extra padding columns (a batch trimmed differently).
        pad = torch.nn.functional.pad
        wider = Batch(
            pad(batch.items, (0, 5)),
            pad(batch.ratings, (0, 5)),
            pad(batch.has_rating, (0, 5)),
            pad(batch.gaps, (0, 5)),
            pad(batch.padding, (0, 5), value=True),
        )
        assert torch.allclose(enc(batch), enc(wider), atol=1e-5)


def test_empty_history_gets_the_learned_empty_embedding_under_every_pooling():
    for pooling in ("mean", "cls", "last"):
        enc = encoder(pooling).eval()
        batch = random_batch(2)
        out = enc(batch)
        assert batch.lengths[0] == 0
        assert torch.isfinite(out[0]).all()
        # The same vector for any empty user, whatever else is in the batch.
        other = enc(random_batch(3))
        assert torch.allclose(out[0], other[0], atol=1e-6)


def test_oov_token_and_unknown_ids_embed_alike():
    enc = encoder().eval()
    batch = random_batch(4, n_items=50)
    real = ~batch.padding
    as_oov = replace(batch, items=torch.where(real & (torch.arange(30) % 3 == 0), OOV, batch.items))
    beyond = replace(batch, items=torch.where(as_oov.items == OOV, 50 + N_SPECIAL + 17, as_oov.items))
    with torch.no_grad():
        a, b = enc(as_oov), enc(beyond)
    assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-6)
    assert torch.equal(remap_unknown(torch.tensor([0, 1, 2, 3, 52, 53, 99]), 50), torch.tensor([0, 1, 2, 3, 52, 2, 2]))


def test_encoder_runs_under_bf16_autocast_on_cpu():
    enc = encoder()
    batch = random_batch(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(batch)
        loss = barlow_twins_loss(out, out + 0.01, 0.005)
    loss.backward()
    assert torch.isfinite(out.float()).all() and torch.isfinite(loss)


def test_longer_batch_than_the_encoder_is_refused():
    with pytest.raises(ValueError, match="at most"):
        encoder(max_length=10)(random_batch(0, L=11))


# ---------------------------------------------------------------------------------- data


def test_sequence_data_load(small_sequences):
    seqs = pl.read_parquet(small_sequences / "sequences.parquet").sort("user_index")
    items = pl.read_parquet(small_sequences / "items.parquet").sort("item_index")
    manifest = json.loads((small_sequences / "manifest.json").read_text())
    low, high = manifest["rating_scale"]
    full = SequenceData.load(small_sequences, max_length=int(seqs["history_item_index"].list.len().max()))
    short = SequenceData.load(small_sequences, max_length=10)
    U, n_items, C = seqs.height, items.height, len(manifest["categories"])
    assert full.n_users == U and full.n_items == n_items and full.n_categories == C
    assert full.item_categories.shape == (n_items + 3, C) and (full.item_categories[:3] == 0).all()
    assert short.items.shape == (U, 10) and short.items.dtype == torch.long
    for name in ("ratings", "has_rating", "gaps"):
        assert getattr(short, name).shape == (U, 10)
    assert (full.ratings >= 0).all() and (full.ratings <= 1).all() and (full.gaps >= 0).all()
    assert full.item_counts.sum() == seqs["history_item_index"].list.len().sum()
    assert full.item_counts[:3].sum() == 0

    cat_lists = items["category_index"].to_list()
    for i in (0, 7, n_items - 1):
        assert full.item_categories[i + 3].nonzero().flatten().tolist() == sorted(cat_lists[i])
    for row in seqs.iter_rows(named=True):
        u = row["user_index"]
        hist, times, ratings = row["history_item_index"], row["history_timestamp"], row["history_rating"]
        n = len(hist)
        assert int(full.lengths[u]) == n and full.items[u, :n].tolist() == [h + 3 for h in hist]
        assert (full.items[u, n:] == PAD).all(), "right padding"
        assert full.gaps[u, 0] == 0
        expected_gaps = np.log1p(np.maximum(np.diff(times), 0))
        assert np.allclose(full.gaps[u, 1:n].numpy(), expected_gaps, rtol=1e-5)
        scaled = [0.0 if r is None else (r - low) / (high - low) for r in ratings]
        assert np.allclose(full.ratings[u, :n].numpy(), scaled)
        assert full.has_rating[u, :n].tolist() == [r is not None for r in ratings]
        # max_length 10 keeps the 10 most recent events, gaps measured from the true previous one
        k = min(n, 10)
        assert int(short.lengths[u]) == k and short.items[u, :k].tolist() == [h + 3 for h in hist[n - k :]]
        assert torch.allclose(short.gaps[u, :k], full.gaps[u, n - k : n])
        future = row["future_item_index"]
        assert int(full.next_item[u]) == (future[0] + 3 if future else -1)


def test_batch_trims_to_the_longest_history(data):
    users = torch.tensor([0, 5, 9])
    batch = data.batch(users)
    assert batch.items.shape[1] == int(data.lengths[users].max())
    assert torch.equal(batch.lengths, data.lengths[users])
    assert batch.to("cpu").items is not None


def test_vocabulary_maps_by_item_id_and_unknown_items_become_oov(small_sequences, data):
    vocab = data.item_ids[::2]  # half of the items: a model trained on an older catalogue
    mapped = SequenceData.load(small_sequences, max_length=64, vocabulary=vocab)
    assert mapped.n_items == len(vocab) and mapped.item_categories.shape == (len(vocab) + 3, data.n_categories)
    real = data.items >= N_SPECIAL
    original_index = data.items[real] - N_SPECIAL
    expect = torch.where(original_index % 2 == 0, original_index // 2 + N_SPECIAL, OOV)
    assert torch.equal(mapped.items[real], expect)
    assert torch.equal(mapped.item_categories[3:], data.item_categories[3::2])
    # A model trained on `vocab` embeds users of this data without index errors.
    enc = UserEncoder.for_data(SMALL, mapped).eval()
    assert torch.isfinite(enc(mapped.batch(range(16)))).all()


def write_sequences(folder: Path, histories: list[list[int]], rating_scale=None) -> Path:
    """A hand-made data/sequences/ folder (for cases the pipeline never produces)."""
    folder.mkdir(parents=True)
    pl.DataFrame(
        {
            "user_index": pl.Series(range(len(histories)), dtype=pl.Int32),
            "history_item_index": pl.Series(histories, dtype=pl.List(pl.Int32)),
            "history_timestamp": pl.Series(
                [[100 * (k + 1) for k in range(len(h))] for h in histories], dtype=pl.List(pl.Int64)
            ),
            "history_rating": pl.Series(
                [[None if k % 2 else 4.0 for k in range(len(h))] for h in histories], dtype=pl.List(pl.Float32)
            ),
            "future_item_index": pl.Series([[1] if h else [] for h in histories], dtype=pl.List(pl.Int32)),
            "future_timestamp": pl.Series([[10_000] if h else [] for h in histories], dtype=pl.List(pl.Int64)),
            "future_rating": pl.Series([[None] if h else [] for h in histories], dtype=pl.List(pl.Float32)),
        }
    ).write_parquet(folder / "sequences.parquet")
    pl.DataFrame(
        {
            "item_index": pl.Series([0, 1, 2], dtype=pl.Int32),
            "item_id": ["a", "b", "c"],
            "title": ["A", "B", "C"],
            "categories": [["x"], ["x", "y"], []],
            "category_index": pl.Series([[0], [0, 1], []], dtype=pl.List(pl.Int32)),
        }
    ).write_parquet(folder / "items.parquet")
    (folder / "manifest.json").write_text(json.dumps({"categories": ["x", "y"], "rating_scale": rating_scale}))
    return folder


def test_short_histories_are_well_defined(tmp_path):
    data = SequenceData.load(write_sequences(tmp_path / "seq", [[], [2], [0, 1, 2]]), max_length=5)
    assert data.lengths.tolist() == [0, 1, 3] and data.next_item.tolist() == [-1, 4, 4]
    assert (data.items[0] == PAD).all()
    # no declared scale: the observed range (a single value 4.0) maps rated events to 1
    assert data.ratings[2].tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert data.has_rating[2].tolist()[:3] == [True, False, True]
    assert data.item_categories.tolist()[3:] == [[1, 0], [1, 1], [0, 0]]
    enc = UserEncoder.for_data(SMALL, data)
    for mode in (True, False):
        out = enc.train(mode)(data.batch([0, 1, 2]))
        assert torch.isfinite(out).all()
    causal = UserEncoder.for_data(SMALL, data, causal=True)
    model = DualEncoder(causal, data.n_items, data.n_categories, data.item_counts, 0.1, True, max_pairs=64)
    assert torch.isfinite(model(data.batch([0, 1, 2])))  # one pair: prefix [0] -> 1, then [0, 1] -> 2
    assert model(data.batch([0, 1])).item() == 0.0  # no history with two events: nothing to predict


def test_causal_prefix_embeddings_equal_the_embeddings_of_cut_histories(data):
    """One causal pass gives, at position t, exactly the embedding of the history cut after t:
    so every (prefix, next item) pair of the dual encoder is the user as it will be served."""
    torch.manual_seed(0)
    users = torch.arange(6)
    for pooling in ("mean", "last"):
        enc = UserEncoder.for_data(SMALL.model_copy(update={"pooling": pooling}), data, causal=True).eval()
        batch = data.batch(users)
        prefixes = enc.prefix_embeddings(batch)
        for t in (0, 3, 7):
            cut = data.batch(users)
            cut.padding = cut.padding | (torch.arange(cut.items.shape[1])[None, :] > t)
            keep = cut.lengths > t
            np.testing.assert_allclose(enc(cut)[keep].detach(), prefixes[keep, t].detach(), atol=1e-5)
        full = enc(batch).detach()
        last = prefixes[torch.arange(len(users)), batch.lengths - 1].detach()
        np.testing.assert_allclose(full, last, atol=1e-5)
    with pytest.raises(ValueError, match="causal"):
        UserEncoder.for_data(SMALL, data).prefix_embeddings(data.batch(users))
    with pytest.raises(ValueError, match="CLS"):
        UserEncoder.for_data(SMALL.model_copy(update={"pooling": "cls"}), data, causal=True)


def test_causal_attention_never_sees_later_events(data):
    torch.manual_seed(0)
    enc = UserEncoder.for_data(SMALL, data, causal=True).eval()
    batch = data.batch(torch.arange(4))
    before = enc.prefix_embeddings(batch)[:, :3].detach()
    changed = data.batch(torch.arange(4))
    changed.items = changed.items.clone()
    changed.items[:, 5:] = torch.where(changed.padding[:, 5:], changed.items[:, 5:], 3)  # rewrite events 5..
    np.testing.assert_allclose(enc.prefix_embeddings(changed)[:, :3].detach(), before, atol=1e-6)
    assert not torch.allclose(enc(changed), enc(batch))


def test_output_whitening_is_part_of_the_saved_encoder(data):
    from userlens.geometry import geometry

    torch.manual_seed(0)
    enc = UserEncoder.for_data(SMALL, data).eval()
    users = torch.arange(data.n_users)
    with torch.no_grad():
        raw = enc(data.batch(users))
        enc.fit_whitening(raw, shrinkage=0.0)
        white = enc(data.batch(users)).numpy()
    # float32 rounding of an untrained encoder's tiny spread, amplified: unit variance to 1 %
    np.testing.assert_allclose(white.mean(axis=0), 0, atol=1e-2)
    np.testing.assert_allclose(np.cov(white.T, bias=True), np.eye(enc.d_model), atol=5e-2)
    shape = geometry(white)
    assert shape["effective_rank"] > 0.9 * enc.d_model and abs(shape["random_pair_cosine"]) < 0.1
    assert geometry(raw.numpy())["random_pair_cosine"] > 0.5  # what it fixes: one shared direction
    reloaded = UserEncoder.for_data(SMALL, data).eval()
    reloaded.load_state_dict(enc.state_dict())
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(data.batch(users)).numpy(), white, atol=1e-6)
    # an encoder.pt saved before the buffers existed still loads, as the raw bidirectional encoder
    old = {k: v for k, v in enc.state_dict().items() if k not in ("is_causal", "output_mean", "output_whitening")}
    legacy = UserEncoder.for_data(SMALL, data, causal=True).eval()
    legacy.load_state_dict(old)
    with torch.no_grad():
        assert not bool(legacy.is_causal)
        np.testing.assert_allclose(legacy(data.batch(users)).numpy(), raw.numpy(), atol=1e-6)


# ---------------------------------------------------------------------------------- training


def test_dual_encoder_loss_logq_and_training(data):
    batch = data.batch(torch.arange(64))
    torch.manual_seed(0)
    enc = UserEncoder.for_data(SMALL.model_copy(update=dict(dropout=0.0)), data, causal=True)
    model = DualEncoder(enc, data.n_items, data.n_categories, data.item_counts, temperature=0.1,
                        logq_correction=True, max_pairs=100_000)  # fmt: skip
    loss = model(batch)
    assert torch.isfinite(loss)
    model.logq_correction = False
    assert model(batch).item() != pytest.approx(loss.item())
    model.logq_correction = True
    assert model.item_embeddings().shape == (data.n_items + 3, 32)

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = model(batch)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model(batch).item() < 0.7 * first


def test_dual_encoder_samples_at_most_max_pairs(data, monkeypatch):
    """Every (prefix, next) pair of the batch, or max_pairs of them drawn with the generator."""
    import torch.nn.functional as F

    seen = []
    original = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda logits, target: seen.append(len(target)) or original(logits, target))
    batch = data.batch(torch.arange(16))
    enc = UserEncoder.for_data(SMALL, data, causal=True)
    pairs = int((batch.lengths - 1).clamp(min=0).sum())
    for cap, expected in ((100_000, pairs), (50, 50)):
        model = DualEncoder(enc, data.n_items, data.n_categories, data.item_counts, 0.1, True, max_pairs=cap)
        model(batch, gen(0))
        assert seen[-1] == expected
    with pytest.raises(AssertionError, match="causal"):
        DualEncoder(UserEncoder.for_data(SMALL, data), data.n_items, data.n_categories, data.item_counts, 0.1, True, 9)


@pytest.mark.parametrize("batch_size", [32, 256])
def test_barlow_twins_training_reduces_the_loss(data, batch_size):
    torch.manual_seed(0)
    params = PretrainParams()
    model = BarlowTwins(UserEncoder.for_data(SMALL, data), (128, 128), params.lambd)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = gen(0)
    users = torch.arange(min(batch_size, data.n_users))
    batch = data.batch(users)
    losses = []
    for _ in range(20):
        loss = model(augment(batch, AugmentParams(), g), augment(batch, AugmentParams(), g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5]), losses


def test_chunked_loading_and_streamed_export_match_a_full_load(small_sequences):
    from userlens.embeddings import embed_sequences, embed_users

    full = SequenceData.load(small_sequences, max_length=50)
    chunks = list(SequenceData.chunks(small_sequences, max_length=50, chunk_users=128))
    assert [c.n_users for c in chunks] == [128, 128, 128, 16]
    for name in ("items", "ratings", "has_rating", "gaps", "lengths", "next_item"):
        assert torch.equal(torch.cat([getattr(c, name) for c in chunks]), getattr(full, name)), name
    torch.manual_seed(0)
    encoder = UserEncoder.for_data(ModelParams(d_model=16, n_layers=1, n_heads=2), full).eval()
    streamed = np.concatenate(list(embed_sequences(encoder, small_sequences, 50, full.item_ids, chunk_users=128)))
    np.testing.assert_allclose(streamed, embed_users(encoder, full), rtol=1e-5, atol=1e-6)


def test_length_bucketed_inference_gives_the_same_vectors_in_the_same_order(small_sequences, monkeypatch):
    """Batches cut from users sorted by length: each batch is padded only to its own longest user,
    and the vectors come back in user order, equal to mixed batches' up to float rounding."""
    from userlens import embeddings

    data = SequenceData.load(small_sequences, max_length=50)
    torch.manual_seed(0)
    encoder = UserEncoder.for_data(ModelParams(d_model=16, n_layers=1, n_heads=2), data).eval()
    users = np.random.default_rng(0).permutation(data.n_users)[:300]
    mixed = np.concatenate(list(embeddings.embed_batches(encoder, data, users, batch_size=32, by_length=False)))
    widths = []
    batch = data.batch
    monkeypatch.setattr(data, "batch", lambda u: widths.append(int(data.lengths[u].max()) - int(data.lengths[u].min()))
                        or batch(u))  # fmt: skip
    bucketed = np.concatenate(list(embeddings.embed_batches(encoder, data, users, batch_size=32)))
    np.testing.assert_allclose(bucketed, mixed, rtol=1e-5, atol=1e-5)
    spread = data.lengths[users].max() - data.lengths[users].min()
    assert spread > 10 and np.mean(widths) < spread / 4  # sorted batches: users of about one length
