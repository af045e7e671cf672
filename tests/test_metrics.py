import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from common.metrics import accuracy, macro_f1


def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    for trial in range(20):
        y_true = rng.integers(0, 7, size=50)
        y_pred = np.where(rng.random(50) < 0.5, y_true, rng.integers(0, 9, size=50))
        assert accuracy(y_true, y_pred) == accuracy_score(y_true, y_pred)
        assert abs(macro_f1(y_true, y_pred) - f1_score(y_true, y_pred, average="macro")) < 1e-12
