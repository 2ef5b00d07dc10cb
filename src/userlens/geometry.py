"""The geometry of a set of user embeddings: is it fit for serving by cosine?

Consumers of served vectors (similar-user search, retrieval, anything that takes a cosine)
need the users to differ in many directions, not along one shared one. Measured per method:

- effective_rank: exp of the entropy of the normalised singular values of the CENTRED
  embeddings (Roy & Vetterli 2007), from 1 (one direction) to the dimension (all equal);
- first_direction_share: the share of the total variance along the first principal direction;
- random_pair_cosine: the mean cosine of random pairs of distinct users, on the vectors AS
  SERVED (not centred): near 1 means every user looks alike to a cosine consumer;
- neighbour taste (`neighbour_taste`): for sampled users, how often their top-k cosine
  neighbours share their favourite history category, against random users.
"""

from __future__ import annotations

import numpy as np

PAIRS = 20_000  # random pairs for the mean cosine
QUERIES = 1_000  # users whose neighbours are checked
SAMPLE = 50_000  # users the spectrum is computed on (all of them up to this many)


def _singular_values(x: np.ndarray) -> np.ndarray:
    """Singular values of the centred [U, d] vectors, in float64."""
    x = np.asarray(x, dtype=np.float64)
    return np.linalg.svd(x - x.mean(axis=0, keepdims=True), compute_uv=False)


def _entropy_rank(singular: np.ndarray) -> float:
    p = singular / max(singular.sum(), 1e-12)
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def effective_rank(embeddings: np.ndarray) -> float:
    return _entropy_rank(_singular_values(embeddings))


def geometry(embeddings: np.ndarray, seed: int = 0) -> dict[str, float]:
    """effective_rank, first_direction_share, random_pair_cosine (and the dimension) of [U, d] vectors."""
    rng = np.random.default_rng(seed)
    x = np.asarray(embeddings, dtype=np.float64)
    if len(x) > SAMPLE:
        x = x[np.sort(rng.choice(len(x), SAMPLE, replace=False))]
    singular = _singular_values(x)
    variances = singular**2
    first, second = rng.integers(0, len(x), size=(2, PAIRS))
    distinct = first != second
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    cosines = (unit[first[distinct]] * unit[second[distinct]]).sum(axis=1)
    return {
        "dim": int(x.shape[1]),
        "effective_rank": _entropy_rank(singular),
        "first_direction_share": float(variances[0] / max(variances.sum(), 1e-300)),
        "random_pair_cosine": float(cosines.mean()) if cosines.size else float("nan"),
    }


def neighbour_taste(embeddings: np.ndarray, favourite: np.ndarray, k: int = 10, seed: int = 0) -> dict[str, float]:
    """How often a user's k nearest neighbours by cosine share their favourite category, vs random users.

    `favourite`: [U] the majority category of each user's HISTORY (-1 = none; such users are
    neither queries nor counted as neighbours that match). Returns neighbour_same_favourite,
    random_same_favourite (the share among all other users, the chance level) and their ratio."""
    favourite = np.asarray(favourite)
    x = np.asarray(embeddings, dtype=np.float32)
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(favourite >= 0)
    if candidates.size <= k:
        return {
            "k": k,
            "neighbour_same_favourite": float("nan"),
            "random_same_favourite": float("nan"),
            "lift": float("nan"),
        }
    queries = np.sort(rng.choice(candidates, min(QUERIES, candidates.size), replace=False))
    same_neighbour, same_random = [], []
    counts = np.bincount(favourite[candidates])
    for start in range(0, queries.size, 256):
        block = queries[start : start + 256]
        scores = unit[block] @ unit.T
        scores[np.arange(block.size), block] = -np.inf  # never your own neighbour
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        same_neighbour.append((favourite[top] == favourite[block][:, None]).mean(axis=1))
        # Chance: the share of the other labelled users with the same favourite.
        same_random.append((counts[favourite[block]] - 1) / (candidates.size - 1))
    neighbour = float(np.concatenate(same_neighbour).mean())
    chance = float(np.concatenate(same_random).mean())
    return {"k": k, "neighbour_same_favourite": neighbour, "random_same_favourite": chance,
            "lift": neighbour / chance if chance > 0 else float("nan")}  # fmt: skip
