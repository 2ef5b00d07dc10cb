"""Raw-data versioning with DVC: `dvc add` a snapshot folder, push it to the remote, read its hash.

DVC is driven through its CLI (the stable interface) with the interpreter running userlens,
so the dvc that is used is the one pinned with the project.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml

from userlens.errors import UserlensError

log = logging.getLogger(__name__)


class DvcError(UserlensError):
    """A dvc command failed (not a DVC project, remote unreachable, ...)."""

    retryable = True


def dvc(root: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    cmd = [sys.executable, "-m", "dvc", *args]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        detail = [
            line.strip()
            for line in (done.stderr + done.stdout).splitlines()
            if line.strip() and "dvc.org/support" not in line
        ]
        raise DvcError(f"`dvc {' '.join(args)}` failed in {root}: {' '.join(detail[-3:]) or 'no output'}")
    return done.stdout


def require_dvc_repo(root: Path) -> None:
    if not (root / ".dvc").is_dir():
        raise UserlensError(
            f"{root} is not a DVC project (no .dvc folder): run `git init && dvc init` there, "
            "or run userlens from the userlens repository"
        )


def add_and_push(root: Path, target: Path, remote: str | None = None, push: bool = True) -> str:
    """Version `target` with DVC and push it; returns the DVC hash of the new version."""
    require_dvc_repo(root)
    rel = os.path.relpath(target, root)
    log.info("dvc add %s", rel)
    dvc(root, "add", rel)
    if push:
        log.info("dvc push %s.dvc", rel)
        dvc(root, "push", f"{rel}.dvc", *(["--remote", remote] if remote else []))
    return dvc_hash(target)


def dvc_hash(target: Path) -> str:
    """The hash recorded in `<target>.dvc`, checked against the folder so a stale file is refused."""
    dvc_file = target.with_name(target.name + ".dvc")
    if not dvc_file.exists():
        raise UserlensError(
            f"{target} is not versioned by DVC (no {dvc_file.name}): run `userlens fetch` "
            f"(or `dvc add {target}`) first"
        )
    out = yaml.safe_load(dvc_file.read_text())["outs"][0]
    if target.is_dir():
        files = [p for p in target.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        if (out.get("nfiles"), out.get("size")) != (len(files), size):
            raise UserlensError(
                f"{target} changed since it was versioned ({dvc_file.name} records {out.get('nfiles')} files, "
                f"{out.get('size')} bytes; found {len(files)} files, {size} bytes): run `userlens fetch` "
                f"or `dvc add {target}`"
            )
    return out["md5"]
