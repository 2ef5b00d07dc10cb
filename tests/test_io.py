import os
from pathlib import Path

import pytest

from userlens.errors import DataError, DownloadError, ValidationFailed
from userlens.io import atomic_dir, write_json_atomic
from userlens.versioning import DvcError


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as staging:
        (staging / "a.txt").write_text("v1")
    assert (target / "a.txt").read_text() == "v1"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as staging:
            (staging / "a.txt").write_text("half-written v2")
            raise RuntimeError("crash")
    assert (target / "a.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left behind


def test_crash_between_the_two_renames_is_repaired(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as staging:
        (staging / "a.txt").write_text("v1")
    os.replace(target, tmp_path / ".out.old")  # the first rename happened, the second did not
    with atomic_dir(target) as staging:
        (staging / "a.txt").write_text("v2")
    assert (target / "a.txt").read_text() == "v2"
    assert not (tmp_path / ".out.old").exists()


def test_write_json_atomic_leaves_no_temp_files(tmp_path):
    write_json_atomic(tmp_path / "x.json", {"b": 1, "a": Path("p")})
    assert (tmp_path / "x.json").read_text() == '{\n  "a": "p",\n  "b": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_only_transient_errors_are_retryable():
    assert DownloadError("x").retryable and DvcError("x").retryable
    assert not DataError("x").retryable and not ValidationFailed("x").retryable
    assert ValidationFailed("x").exit_code == 3 and DataError("x").exit_code == 2
