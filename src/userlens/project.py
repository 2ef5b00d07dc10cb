"""Where everything lives inside a userlens project folder (the one holding params.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from userlens.config import Params, load_params


@dataclass(frozen=True)
class Project:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    def load_params(self, params_file: str | Path | None = None, overrides: dict | None = None) -> Params:
        """params.yaml of the project (or `params_file`), with dotted `overrides` applied."""
        params = load_params(params_file or self.params_file)
        return params.with_overrides(overrides) if overrides else params

    def raw_dir(self, dataset: str) -> Path:
        return self.root / "data" / "raw" / dataset

    @property
    def canonical_dir(self) -> Path:
        return self.root / "data" / "canonical"

    @property
    def sequences_dir(self) -> Path:
        return self.root / "data" / "sequences"

    def model_dir(self, method: str) -> Path:
        return self.root / "data" / "models" / method

    def lifelong_dir(self, dataset: str) -> Path:
        """data/lifelong/<dataset>/: the event log, partitions and summaries (userlens.lifelong)."""
        return self.root / "data" / "lifelong" / dataset

    @property
    def embeddings_dir(self) -> Path:
        return self.root / "data" / "embeddings"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def validation_report(self) -> Path:
        return self.reports_dir / "validation.json"

    @property
    def data_docs_dir(self) -> Path:
        return self.reports_dir / "data_docs"

    @property
    def quarantine_dir(self) -> Path:
        return self.reports_dir / "quarantine"

    @property
    def data_summary(self) -> Path:
        return self.reports_dir / "data_summary.md"

    @property
    def registry_dir(self) -> Path:
        return self.root / "data" / "registry"

    @property
    def gate_report(self) -> Path:
        return self.reports_dir / "gate.json"

    @property
    def run_report(self) -> Path:
        return self.reports_dir / "run_report.md"

    @property
    def lock_file(self) -> Path:
        return self.root / "data" / ".userlens.lock"

    def relative(self, path: Path) -> str:
        try:
            return str(Path(path).resolve().relative_to(self.root))
        except ValueError:
            return str(path)
