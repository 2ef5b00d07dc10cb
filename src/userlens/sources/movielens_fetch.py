"""The official MovieLens releases: found in a local folder, or downloaded from GroupLens.

`snapshot` copies the files the reader (movielens.py) needs, plus README, from a local folder,
or downloads the official zip (md5-checked) when allowed, into a snapshot folder.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from http.client import HTTPException
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from userlens.errors import DataError, DownloadError
from userlens.io import atomic_dir
from userlens.sources.movielens import RELEASES, Release, alternatives, release_of, require_files

log = logging.getLogger(__name__)


def find_local(dataset: str, data_dir: str | Path | None) -> Path | None:
    """The release folder in `data_dir` (the folder itself or its parent), or None."""
    release = release_of(dataset)
    if data_dir is None:
        return None
    base = Path(data_dir).expanduser()
    key = release.files[0]
    others = {f for name, r in RELEASES.items() if name != dataset for f in r.folders}
    if (base / key).is_file() and base.name not in others:
        return base
    for folder in release.folders:
        if (base / folder / key).is_file():
            return base / folder
    return None


def download(
    dataset: str,
    dest_dir: Path,
    *,
    url: str | None = None,
    expected_md5: str | None = None,
    timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """Download the official zip, verify its md5 and extract the release's files into dest_dir.

    Only the files the reader needs and the README are extracted, into
    dest_dir/<release folder>, which is returned. A failure leaves dest_dir as it was.
    """
    release = release_of(dataset)
    url = url or release.url
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dataset}.zip.part-", dir=dest_dir)
    tmp = Path(tmp_name)
    try:
        with open(fd, "wb") as out:
            got = _fetch(url, out, dataset, timeout, progress)
        expected = (expected_md5 or release.md5 or _published_md5(url, dataset, timeout)).lower()
        if got != expected:
            raise DataError(
                f"{url}: checksum mismatch: expected md5 {expected}, got {got}; the download is "
                "corrupt or the file changed upstream, so nothing was kept."
            )
        return _extract(tmp, dest_dir, dataset, url)
    finally:
        tmp.unlink(missing_ok=True)


def _fetch(url: str, out: BinaryIO, dataset: str, timeout: float, progress: bool) -> str:
    """Stream `url` into `out`; return the md5 of what was written."""
    digest, size = hashlib.md5(), 0
    log.info("downloading %s", url)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "userlens"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], disable=not progress) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    size += len(block)
                    bar.update(len(block))
            if total is not None and size != total:
                raise DownloadError(
                    f"downloading {dataset} failed: {url} ended after {size} of {total} bytes. " + alternatives(dataset)
                )
    except (OSError, HTTPException, ValueError) as exc:
        raise DownloadError(
            f"downloading {dataset} failed: could not fetch {url} ({exc}). {alternatives(dataset)}"
        ) from None
    return digest.hexdigest()


def _published_md5(url: str, dataset: str, timeout: float) -> str:
    md5_url = f"{url}.md5"
    try:
        request = urllib.request.Request(md5_url, headers={"User-Agent": "userlens"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read(4096).decode("ascii", "replace")
    except (OSError, HTTPException, ValueError) as exc:
        raise DownloadError(
            f"downloading {dataset} failed: could not fetch its checksum {md5_url} ({exc}). " + alternatives(dataset)
        ) from None
    found = re.search(r"\b[0-9a-fA-F]{32}\b", text)
    if not found:
        raise DataError(f"{md5_url}: no md5 checksum in it (got {text[:80]!r}); cannot verify the download")
    return found.group(0)


def _extract(archive: Path, dest_dir: Path, dataset: str, url: str) -> Path:
    release = release_of(dataset)
    try:
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if not n.startswith("__MACOSX/") and not n.endswith("/")]
            keys = sorted((n for n in names if n.rsplit("/", 1)[-1] == release.files[0]), key=len)
            if not keys:
                raise DataError(f"{url}: the archive holds no {release.files[0]}; it is not the {dataset} release")
            root = keys[0][: -len(release.files[0])]
            members = {n[len(root) :]: n for n in names if n.startswith(root) and "/" not in n[len(root) :]}
            missing = [f for f in release.files if f not in members]
            if missing:
                raise DataError(f"{url}: the archive lacks {', '.join(missing)} in {root or 'its top level'}")
            wanted = [f for f in members if f in release.files or f.startswith("README")]
            target = dest_dir / (root.rstrip("/").rsplit("/", 1)[-1] or release.folders[0])
            with atomic_dir(target) as staging:
                for name in wanted:
                    with zf.open(members[name]) as src, open(staging / name, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{url}: the download is not a valid zip archive ({exc})") from None
    log.info("extracted %s into %s", ", ".join(sorted(wanted)), target)
    return target


def snapshot(dataset: str, data_dir: str | Path | None, dest: Path, *, allow_download: bool) -> dict:
    """Put the release's official files (data the reader needs, plus README) into `dest`."""
    release = release_of(dataset)
    local = find_local(dataset, data_dir)
    if local is None and data_dir is not None:
        log.warning(
            "no %s release in %s (looked for %s there or in %s/)",
            dataset,
            data_dir,
            release.files[0],
            "/, ".join(release.folders),
        )
    if local is not None:
        require_files(local, release)
        with atomic_dir(Path(dest)) as staging:
            files = _copy_release(local, staging, release, shutil.copyfile)
        return {"origin": f"local:{local}", "files": files}
    if not allow_download:
        where = f"none found in {data_dir}" if data_dir is not None else "no data folder given"
        raise DataError(
            f"MovieLens {dataset}: no local copy ({where}) and downloading is off (data.download: false). "
            f"{alternatives(dataset)}"
        )
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dataset}-download-", dir=dest.parent))
    try:
        folder = download(dataset, scratch)
        with atomic_dir(dest) as staging:
            files = _copy_release(folder, staging, release, shutil.move)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"origin": f"download:{release.url}", "files": files}


def _copy_release(src: Path, dest: Path, release: Release, transfer: Callable) -> list[str]:
    names = [*release.files, *sorted(p.name for p in src.glob("README*") if p.is_file())]
    for name in names:
        transfer(str(src / name), str(dest / name))
    log.info("snapshot of %s: %s", src, ", ".join(names))
    return names
