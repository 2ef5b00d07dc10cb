"""Fine-tuning's head starts as the linear probe (LP-FT): the same predictions before any step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from userlens.finetune import _probe_head


@pytest.mark.parametrize("present", [(0, 2), (0, 1, 3)])  # binary (one sklearn weight vector) and multiclass
def test_probe_head_predicts_as_the_logistic_regression_and_never_an_absent_class(present):
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=3.0, size=(4, 5))
    y = np.repeat(np.array(present), 30)
    x = (centres[y] + rng.normal(size=(y.size, 5))).astype(np.float32)
    test = (centres[rng.integers(0, 4, 200)] + rng.normal(size=(200, 5))).astype(np.float32)

    head = _probe_head(x, y, n_classes=4)
    with torch.no_grad():
        predicted = head(torch.from_numpy(test)).argmax(dim=1).numpy()
    expected = LogisticRegression(C=1.0, max_iter=1000).fit(x, y).predict(test)
    np.testing.assert_array_equal(predicted, expected)
    assert set(predicted) <= set(present)


def test_probe_head_with_one_class_predicts_it():
    head = _probe_head(np.ones((4, 3), np.float32), np.array([2, 2, 2, 2]), n_classes=3)
    with torch.no_grad():
        assert head(torch.randn(5, 3)).argmax(dim=1).tolist() == [2] * 5
