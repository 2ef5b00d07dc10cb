"""Raw-data versioning with DVC: `dvc add` a snapshot folder, push it to the remote, read its hash.

DVC is driven through its CLI (the stable interface) with the interpreter running userlens,
so the dvc that is used is the one pinned with the project.

The remote is DVC's business: `dvc.remote` in params.yaml only *names* one (null = the default
remote), and its URL, endpoint and credentials live in DVC's config (`dvc remote add` /
`dvc remote modify`; secrets with `--local`, in the untracked .dvc/config.local) or in the
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...). A failed push is one
line that names the remote, says what is wrong (no credentials, rejected credentials, no
bucket, unreachable endpoint) and how to fix it; the snapshot stays versioned locally.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from userlens.errors import ConfigError, UserlensError

log = logging.getLogger(__name__)

# Keys of DVC remotes (S3, Azure, SSH, WebDAV, HTTP, Google Drive) whose values are secrets.
SECRET_KEYS = ("access_key_id", "secret_access_key", "session_token", "password", "account_key", "sas_token",
               "connection_string", "client_secret", "gdrive_client_secret")  # fmt: skip
PUSH_HELP = "README, Object storage (S3)"


class DvcError(UserlensError):
    """A dvc command failed (not a DVC project, remote unreachable, ...)."""

    retryable = True

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output  # dvc's stderr + stdout


class RemoteError(DvcError):
    """`dvc push` failed; retryable only where the remote may come back (network), not for credentials."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def dvc(root: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    cmd = [sys.executable, "-m", "dvc", *args]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        output = done.stderr + done.stdout
        detail = _detail(output, last=3)
        raise DvcError(f"`dvc {' '.join(args)}` failed in {root}: {detail or 'no output'}", output)
    return done.stdout


def _detail(output: str, last: int) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip() and "dvc.org/support" not in line]
    return " ".join(lines[-last:])


def require_dvc_repo(root: Path) -> None:
    if not (root / ".dvc").is_dir():
        raise UserlensError(
            f"{root} is not a DVC project (no .dvc folder): run `git init && dvc init` there, "
            "or run userlens from the userlens repository"
        )


def check_remote_name(remote: str | None) -> None:
    """`dvc.remote` names a DVC remote; a URL there (which may carry credentials) is refused unechoed."""
    if remote is not None and (not remote.strip() or re.search(r"[:/\\@]", remote)):
        raise ConfigError(
            "dvc.remote must be the name of a DVC remote (see `dvc remote list`), not a URL or a path: add the "
            "remote with `dvc remote add -d storage s3://bucket/path` and keep credentials out of params.yaml "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or `dvc remote modify --local storage access_key_id ...`)"
        )


def committed_secrets(root: Path) -> list[str]:
    """Secret-looking keys in .dvc/config, the DVC config that git tracks (.dvc/config.local is ignored)."""
    config = root / ".dvc" / "config"
    if not config.exists():
        return []
    pattern = re.compile(rf"^\s*({'|'.join(SECRET_KEYS)})\s*=", re.MULTILINE)
    return sorted(set(pattern.findall(config.read_text(errors="replace"))))


def add_and_push(root: Path, target: Path, remote: str | None = None, push: bool = True) -> str:
    """Version `target` with DVC and push it; returns the DVC hash of the new version.

    A failed push raises RemoteError after `dvc add` has run: the new version is then recorded in
    `<target>.dvc` and DVC's local cache, and `dvc push <target>.dvc` (or running again) sends it.
    """
    require_dvc_repo(root)
    check_remote_name(remote)
    rel = os.path.relpath(target, root)
    log.info("dvc add %s", rel)
    dvc(root, "add", rel)
    if push:
        if secrets := committed_secrets(root):
            log.warning(
                ".dvc/config (tracked by git) holds %s: move them to .dvc/config.local with "
                "`dvc remote modify --local <remote> <key> <value>` (and rotate them if they were committed)",
                ", ".join(secrets),
            )
        log.info("dvc push %s.dvc", rel)
        try:
            dvc(root, "push", f"{rel}.dvc", *(["--remote", remote] if remote else []))
        except DvcError as exc:
            raise push_error(root, rel, remote, exc.output) from None
    return dvc_hash(target)


def push_error(root: Path, rel: str, remote: str | None, output: str) -> RemoteError:
    """One line for a failed `dvc push`: which remote, what went wrong, how to fix it."""
    text = output.lower()
    name = remote or _config(root, "core.remote")
    where = _describe(root, name)
    kept = (
        f"the new version stays in {rel}.dvc and the local DVC cache: `dvc push {rel}.dvc` sends it once "
        "fixed (or set dvc.push: false to skip pushing)"
    )
    cause = _cause(output)
    if "no remote specified" in text:
        return RemoteError(
            f"no DVC remote to push {rel} to: add one with `dvc remote add -d storage s3://bucket/path` "
            f"({PUSH_HELP}), or set dvc.push: false to skip pushing",
            retryable=False,
        )
    if re.search(r"remote '.*' doesn't exist", text):
        known = ", ".join(sorted(line.split()[0] for line in _remotes(root))) or "none"
        return RemoteError(
            f"DVC remote {name!r} (dvc.remote) is not configured here (configured: {known}): add it with "
            f"`dvc remote add {name} s3://bucket/path`, or set dvc.remote to one of those",
            retryable=False,
        )
    if "missing dependencies" in text or "dvc[" in text:
        return RemoteError(f"cannot push to {where}: {cause} (run `pip install dvc-s3` for S3); {kept}", False)
    if any(s in text for s in ("unable to locate credentials", "nocredentials", "partial credentials")):
        return RemoteError(
            f"no credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or "
            f"`dvc remote modify --local {name or 'storage'} access_key_id ...` and `... secret_access_key ...` "
            f"(never in params.yaml); {kept}",
            retryable=False,
        )
    if any(s in text for s in ("invalidaccesskeyid", "signaturedoesnotmatch", "accessdenied", "access denied",
                               "forbidden", "(403)", "expiredtoken", "invalidtoken")):  # fmt: skip
        return RemoteError(
            f"{where} refused the credentials ({cause}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or "
            f"AWS_PROFILE, or .dvc/config.local) and the key's access to the bucket; {kept}",
            retryable=False,
        )
    if "nosuchbucket" in text or "bucket does not exist" in text:
        return RemoteError(f"{where}: the bucket does not exist ({cause}): create it, or fix the URL; {kept}", False)
    if any(s in text for s in ("could not connect", "connect timeout", "connection refused", "timed out",
                               "name or service not known", "name resolution", "cannot connect")):  # fmt: skip
        return RemoteError(
            f"cannot reach {where}: {cause}: check that the server is up and the endpoint "
            f"(`dvc remote modify {name or 'storage'} endpointurl http://host:9000` for S3-compatible storage); {kept}",
            retryable=True,
        )
    return RemoteError(f"`dvc push` to {where} failed: {cause}; {kept}", retryable=True)


def _cause(output: str) -> str:
    """DVC's own last words, without its prefixes."""
    detail = _detail(output, last=1) or "no output"
    for prefix in ("ERROR:", "unexpected error -", "failed to push data to the cloud -"):
        detail = detail.strip().removeprefix(prefix).strip()
    return detail


def _config(root: Path, key: str) -> str | None:
    try:
        return dvc(root, "config", key).strip() or None
    except DvcError:
        return None


def _remotes(root: Path) -> list[str]:
    try:
        return [line for line in dvc(root, "remote", "list").splitlines() if line.strip()]
    except DvcError:
        return []


def _describe(root: Path, name: str | None) -> str:
    if not name:
        return "the default DVC remote"
    url, endpoint = _config(root, f"remote.{name}.url"), _config(root, f"remote.{name}.endpointurl")
    return f"DVC remote {name!r}" + (f" ({url}" + (f" at {endpoint}" if endpoint else "") + ")" if url else "")


def dvc_hash(target: Path) -> str:
    """The hash recorded in `<target>.dvc`, checked against the folder so a stale file is refused."""
    dvc_file = target.with_name(target.name + ".dvc")
    if not dvc_file.exists():
        raise UserlensError(
            f"{target} is not versioned by DVC (no {dvc_file.name}): run `userlens fetch` (or `dvc add {target}`) first"
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
