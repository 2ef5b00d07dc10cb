"""The DVC remote on object storage: a real S3 API (moto's server on 127.0.0.1), real dvc, real git.

The server checks signatures (moto's IAM auth switched on after the setup), so a wrong key is
refused as a real S3 service would refuse it. Credentials reach dvc only through the environment
of the command (or .dvc/config.local), never through params.yaml.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
import requests
import yaml
from moto import server as moto_server

from conftest import make_project, run

pytestmark = pytest.mark.integration

BUCKET = "userlens-data"
PREFIX = "raw"  # the remote is s3://userlens-data/raw


@dataclass
class S3:
    endpoint: str
    key_id: str
    secret: str
    client: object  # boto3 S3 client with the valid key

    def env(self, **extra: str) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret, **extra}

    def keys(self) -> set[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/")
        return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


@pytest.fixture(scope="module")
def s3():
    """moto in server mode on a free loopback port, with an IAM user whose key may use S3."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    setup = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "setup",
             "aws_secret_access_key": "setup"}  # fmt: skip
    try:
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="userlens")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="userlens", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="userlens")["AccessKey"]
        boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)
        # From now on every request must be signed by a key that IAM knows.
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
        signed = {**setup, "aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}
        client = boto3.client("s3", **signed)
        yield S3(endpoint, key["AccessKeyId"], key["SecretAccessKey"], client)
    finally:
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"inf", timeout=10)
        server.stop()


@pytest.fixture(autouse=True)
def no_ambient_aws(monkeypatch, tmp_path):
    """No credentials from the machine: only what a test passes to the command counts."""
    import os

    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def dvc(project: Path, *args: str, env: dict | None = None) -> str:
    return run([sys.executable, "-m", "dvc", *args], project, env=env).stdout


def cli(project: Path, *args: str, env: dict | None = None, check: bool = True):
    return run([sys.executable, "-m", "userlens", "--project", str(project), *args], project, check=check, env=env)


def s3_project(root: Path, s3: S3) -> Path:
    """A project whose default DVC remote is the bucket: the README's commands, nothing else."""
    project = make_project(root)
    dvc(project, "remote", "remove", "local")
    dvc(project, "remote", "add", "-d", "storage", f"s3://{BUCKET}/{PREFIX}")
    dvc(project, "remote", "modify", "storage", "endpointurl", s3.endpoint)
    return project


CREDENTIAL_KEY = re.compile(r"access_key|secret|session_token|password|aws_", re.IGNORECASE)


def yaml_keys(tree) -> list[str]:
    if isinstance(tree, dict):
        return [str(key) for key in tree] + [k for value in tree.values() for k in yaml_keys(value)]
    return [k for value in tree for k in yaml_keys(value)] if isinstance(tree, list) else []


def raw_digest(project: Path) -> str:
    return yaml.safe_load((project / "data/raw/synthetic.dvc").read_text())["outs"][0]["md5"]


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def test_push_to_s3_then_clone_pull_and_run_the_data_stages(s3, tmp_path):
    project = s3_project(tmp_path / "project", s3)
    out = cli(project, "fetch", "--no-progress", env=s3.env()).stdout
    digest = raw_digest(project)
    assert digest in out and digest.endswith(".dir")

    # The version is in the bucket: the .dir listing and every file it names (DVC 3: files/md5/ab/cdef...).
    keys = s3.keys()
    listing_key = f"{PREFIX}/files/md5/{digest[:2]}/{digest[2:]}"
    assert listing_key in keys
    listing = json.loads(s3.client.get_object(Bucket=BUCKET, Key=listing_key)["Body"].read())
    assert {entry["relpath"] for entry in listing} == set(file_hashes(project / "data/raw/synthetic"))
    for entry in listing:
        assert f"{PREFIX}/files/md5/{entry['md5'][:2]}/{entry['md5'][2:]}" in keys, entry

    # What git holds: the remote's URL and endpoint, the .dvc file, and no credential anywhere.
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "raw v1"], project)
    tracked = run(["git", "ls-files"], project).stdout.split()
    assert "data/raw/synthetic.dvc" in tracked and "params.yaml" in tracked
    assert not any(name.startswith("data/raw/synthetic/") for name in tracked)
    assert f"s3://{BUCKET}/{PREFIX}" in run(["git", "show", "HEAD:.dvc/config"], project).stdout
    params_in_git = run(["git", "show", "HEAD:params.yaml"], project).stdout
    assert s3.key_id not in params_in_git and s3.secret not in params_in_git
    assert not [key for key in yaml_keys(yaml.safe_load(params_in_git)) if CREDENTIAL_KEY.search(key)]
    for secret in (s3.key_id, s3.secret):
        assert run(["git", "grep", "-qF", secret, "HEAD"], project, check=False).returncode == 1, "a key is in git"

    # A fresh clone has no data until it pulls it from the bucket, then runs the data stages.
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    assert not (clone / "data/raw/synthetic").exists()
    dvc(clone, "pull", "data/raw/synthetic.dvc", env=s3.env())
    assert raw_digest(clone) == digest
    assert file_hashes(clone / "data/raw/synthetic") == file_hashes(project / "data/raw/synthetic")
    dvc(clone, "repro", "sequences")  # ingest -> validate -> sequences, from the pulled snapshot
    for manifest in ("data/canonical/manifest.json", "data/sequences/manifest.json"):
        assert json.loads((clone / manifest).read_text())["raw_dvc_hash"] == digest, manifest
    assert json.loads((clone / "reports/validation.json").read_text())["raw_dvc_hash"] == digest
    assert json.loads((clone / "data/sequences/manifest.json").read_text())["n_users"] > 0


def one_error_line(done) -> str:
    """A failure the user can act on: non-zero exit, no traceback, one `error:` line."""
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr + done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    return errors[0]


def test_bad_credentials_missing_credentials_and_an_unreachable_endpoint_are_one_clear_line(s3, tmp_path):
    project = s3_project(tmp_path / "project", s3)
    with socket.socket() as sock:  # a loopback port where nothing listens
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    dvc(project, "remote", "add", "offline", f"s3://{BUCKET}/{PREFIX}")
    dvc(project, "remote", "modify", "offline", "endpointurl", f"http://127.0.0.1:{closed}")
    before = s3.keys()

    done = cli(project, "fetch", "--no-progress", env=s3.env(AWS_SECRET_ACCESS_KEY="not-the-secret"), check=False)
    line = one_error_line(done)
    assert "DVC remote 'storage'" in line and "refused the credentials" in line and "AWS_SECRET_ACCESS_KEY" in line
    assert "not-the-secret" not in done.stderr + done.stdout
    # The snapshot stays versioned locally, so `dvc push` sends it once the key is fixed.
    assert "dvc push data/raw/synthetic.dvc" in line and (project / "data/raw/synthetic.dvc").exists()
    assert s3.keys() == before

    line = one_error_line(cli(project, "fetch", "--no-progress", check=False))
    assert "no credentials for DVC remote 'storage'" in line and "dvc remote modify --local storage" in line

    done = cli(project, "--set", "dvc.remote=offline", "fetch", "--no-progress",
               env=s3.env(AWS_MAX_ATTEMPTS="1"), check=False)  # fmt: skip
    line = one_error_line(done)
    assert f"cannot reach DVC remote 'offline' (s3://{BUCKET}/{PREFIX} at http://127.0.0.1:{closed})" in line
    assert "endpointurl" in line and s3.keys() == before

    line = one_error_line(cli(project, "--set", "dvc.remote=nosuch", "fetch", "--no-progress", check=False))
    assert "'nosuch'" in line and "configured: offline, storage" in line

    # A URL with a key in it is refused as dvc.remote, and the key is not echoed.
    url = f"s3://{s3.key_id}:{s3.secret}@{BUCKET}/{PREFIX}"
    done = cli(project, "--set", f"dvc.remote={url}", "fetch", "--no-progress", check=False)
    line = one_error_line(done)
    assert "dvc.remote must be the name of a DVC remote" in line
    assert s3.secret not in done.stderr + done.stdout and s3.key_id not in done.stderr + done.stdout

    # Fixed: the same project pushes.
    cli(project, "fetch", "--no-progress", env=s3.env())
    assert f"{PREFIX}/files/md5/{raw_digest(project)[:2]}/{raw_digest(project)[2:]}" in s3.keys()


def test_only_network_failures_are_retried(s3, tmp_path, monkeypatch):
    """The flow retries a retryable error: a refused key fails at once, an unreachable server is retried."""
    from userlens.versioning import RemoteError, add_and_push

    project = s3_project(tmp_path / "project", s3)
    (project / "data/raw/synthetic").mkdir(parents=True)
    (project / "data/raw/synthetic/interactions.csv").write_text("user_id,item_id,timestamp\n1,2,3\n")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(RemoteError, match="refused the credentials") as refused:
        add_and_push(project, project / "data/raw/synthetic")
    assert refused.value.retryable is False

    dvc(project, "remote", "modify", "storage", "endpointurl", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(RemoteError, match="cannot reach") as unreachable:
        add_and_push(project, project / "data/raw/synthetic")
    assert unreachable.value.retryable is True


def test_credentials_in_dvc_config_local_push_and_stay_out_of_git(s3, tmp_path):
    """`dvc remote modify --local` keeps the key in .dvc/config.local (ignored by git); a key put
    in the tracked .dvc/config still works but draws a warning that names the keys, not their values."""
    project = s3_project(tmp_path / "project", s3)
    dvc(project, "remote", "modify", "--local", "storage", "access_key_id", s3.key_id)
    dvc(project, "remote", "modify", "--local", "storage", "secret_access_key", s3.secret)
    done = cli(project, "fetch", "--no-progress")  # no AWS_* in the environment
    assert "tracked by git" not in done.stderr
    assert f"{PREFIX}/files/md5/{raw_digest(project)[:2]}/{raw_digest(project)[2:]}" in s3.keys()
    assert run(["git", "check-ignore", "-q", ".dvc/config.local"], project, check=False).returncode == 0
    assert s3.secret not in (project / ".dvc/config").read_text()

    dvc(project, "remote", "modify", "storage", "secret_access_key", s3.secret)  # into the tracked file
    done = cli(project, "fetch", "--no-progress")
    assert ".dvc/config (tracked by git) holds secret_access_key" in done.stderr
    assert s3.secret not in done.stderr + done.stdout
