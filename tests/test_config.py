import pytest

from userlens.config import Params, load_params
from userlens.errors import ConfigError


def test_repository_params_load(tmp_path):
    from conftest import REPO

    params = load_params(REPO / "params.yaml")
    assert params.data.source == "synthetic"
    assert params.validation.short_users in ("drop", "keep", "fail")


def test_bad_value_names_its_key(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  synthetic:\n    n_users: -3\nsequences:\n  holdout: sometimes\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    message = str(err.value)
    assert "data.synthetic.n_users" in message and "-3" in message
    assert "sequences.holdout" in message


def test_unknown_key_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("sequences:\n  max_lenght: 10\n")
    with pytest.raises(ConfigError, match="sequences.max_lenght"):
        load_params(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")


def test_overrides_are_validated():
    params = Params().with_overrides({"data.source": "movielens", "data.dataset": "ml-1m"})
    assert params.data.dataset == "ml-1m"
    with pytest.raises(ConfigError, match="not a MovieLens release"):
        Params().with_overrides({"data.source": "movielens"})
    with pytest.raises(ConfigError, match="unknown setting"):
        Params().with_overrides({"data.nope": 1})


def test_generic_needs_interactions_and_scale_is_ordered():
    with pytest.raises(ConfigError, match="data.interactions"):
        Params().with_overrides({"data.source": "generic"})
    with pytest.raises(ConfigError, match="min < max"):
        Params().with_overrides({"data.rating_scale": [5, 1]})


def test_section_hash_changes_only_with_its_section():
    base = Params()
    changed = base.with_overrides({"sequences.max_length": 7})
    assert base.section_hash("data") == changed.section_hash("data")
    assert base.section_hash("sequences") != changed.section_hash("sequences")
