"""A folder of immutable Parquet parts listed by manifest.json: append-only storage.

The event log, the closed partitions and the summaries are all kept this way: a write adds a
new part file, then replaces manifest.json atomically. The manifest is the commit point: a part
it does not list (a crash between the two writes) is ignored and overwritten by the next
append, so a reader always sees whole appends.

Compaction keeps the number of files bounded (one append per refresh adds up): once more than
COMPACT_AT files are listed, `compact` writes their rows, in order, into one file, switches the
manifest to it, then deletes the old files. Rows are never changed, and positions stay
logical: a compacted file counts as the appends it merged, so `read(after=n)` means the same
before and after (it must not fall inside a merged range: compact only what every reader has
read, see EventLog).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from userlens.io import read_json, utc_now, write_json_atomic, write_parquet_atomic

MANIFEST = "manifest.json"
COMPACT_AT = 32  # files listed before `compact` merges them into one


class PartStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @property
    def manifest(self) -> dict[str, Any]:
        path = self.folder / MANIFEST
        return read_json(path) if path.exists() else {"parts": []}

    def parts(self) -> list[dict[str, Any]]:
        return self.manifest["parts"]

    @property
    def appends(self) -> int:
        """How many appends the store holds (a compacted file counts as those it merged)."""
        return sum(p.get("appends", 1) for p in self.parts())

    def scan(self, after: int = 0) -> pl.LazyFrame | None:
        """The appends after the first `after` ones, lazily (None when there are none)."""
        files, seen = [], 0
        for part in self.parts():
            if seen >= after:
                files.append(self.folder / part["file"])
            elif seen + part.get("appends", 1) > after:
                raise ValueError(f"{self.folder}: position {after} lies inside the compacted {part['file']}")
            seen += part.get("appends", 1)
        return pl.scan_parquet(files) if files else None

    def read(self, after: int = 0, schema: dict | None = None) -> pl.DataFrame:
        """The parts after the first `after`, in order; empty with `schema` when there are none."""
        lazy = self.scan(after)
        return lazy.collect() if lazy is not None else pl.DataFrame(schema=schema)

    def write_file(self, name: str, frame: pl.DataFrame) -> None:
        """A file beside the parts (not itself a part), atomically: a manifest field names it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(self.folder / name, frame)

    def commit(self, frame: pl.DataFrame | None, **fields: Any) -> dict[str, Any]:
        """Append `frame` as the next part (when given and not empty) and set manifest `fields`;
        returns the new manifest."""
        manifest = self.manifest
        parts = list(manifest["parts"])
        if frame is not None and frame.height:
            name = f"part-{self.appends + 1:06d}.parquet"
            self.write_file(name, frame)
            parts.append({"file": name, "rows": frame.height, "written_at": utc_now()})
        manifest = {**manifest, **fields, "parts": parts, "rows": sum(p["rows"] for p in parts)}
        write_json_atomic(self.folder / MANIFEST, manifest)
        return manifest

    def compact(self, at: int = COMPACT_AT) -> bool:
        """Merge every listed file into one when more than `at` are listed; True when it did."""
        parts = self.parts()
        if len(parts) <= at:
            return False
        appends = self.appends
        name = f"compact-{appends:06d}.parquet"
        self.write_file(name, self.read())
        merged = {"file": name, "rows": sum(p["rows"] for p in parts), "appends": appends, "written_at": utc_now()}
        write_json_atomic(self.folder / MANIFEST, {**self.manifest, "parts": [merged]})
        for part in parts:
            if part["file"] != name:
                (self.folder / part["file"]).unlink(missing_ok=True)
        return True
