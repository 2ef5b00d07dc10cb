"""A folder of immutable Parquet parts listed by manifest.json: append-only storage.

The event log, the closed partitions and the summaries are all kept this way: a write adds a
new part file, then replaces manifest.json atomically. The manifest is the commit point: a part
it does not list (a crash between the two writes) is ignored and overwritten by the next
append, so a reader always sees whole appends and nothing already written is ever rewritten.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from userlens.io import atomic_file, read_json, utc_now, write_json_atomic

MANIFEST = "manifest.json"


class PartStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @property
    def manifest(self) -> dict[str, Any]:
        path = self.folder / MANIFEST
        return read_json(path) if path.exists() else {"parts": []}

    def parts(self) -> list[dict[str, Any]]:
        return self.manifest["parts"]

    def scan(self, after: int = 0) -> pl.LazyFrame | None:
        """The parts after the first `after` ones, lazily (None when there are none)."""
        files = [self.folder / p["file"] for p in self.parts()[after:]]
        return pl.scan_parquet(files) if files else None

    def read(self, after: int = 0, schema: dict | None = None) -> pl.DataFrame:
        """The parts after the first `after`, in order; empty with `schema` when there are none."""
        lazy = self.scan(after)
        return lazy.collect() if lazy is not None else pl.DataFrame(schema=schema)

    def write_file(self, name: str, frame: pl.DataFrame) -> None:
        """A file beside the parts (not itself a part), atomically: a manifest field names it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.folder / name) as tmp:
            frame.write_parquet(tmp)

    def commit(self, frame: pl.DataFrame | None, **fields: Any) -> dict[str, Any]:
        """Append `frame` as the next part (when given and not empty) and set manifest `fields`;
        returns the new manifest."""
        manifest = self.manifest
        parts = list(manifest["parts"])
        if frame is not None and frame.height:
            name = f"part-{len(parts) + 1:06d}.parquet"
            self.write_file(name, frame)
            parts.append({"file": name, "rows": frame.height, "written_at": utc_now()})
        manifest = {**manifest, **fields, "parts": parts, "rows": sum(p["rows"] for p in parts)}
        write_json_atomic(self.folder / MANIFEST, manifest)
        return manifest
