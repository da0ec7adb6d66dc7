"""scikit-learn's bundled digits (1797 8x8 images, 10 classes): the data of the tiny presets. Nothing is downloaded."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

DIGITS_SPLIT_SEED = 0  # the train/test split is fixed, whatever a run's seed
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digits_split(test_size: float = 0.2, limit: Optional[int] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): images as float32 [N, 1, 8, 8] in [0, 1], labels int64; a fixed
    stratified split. ``limit`` keeps the first ``limit`` rows of each side (for smoke tests)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_size, stratify=data.target,
                                           random_state=DIGITS_SPLIT_SEED)
    if limit:
        idx_train, idx_test = idx_train[:limit], idx_test[:limit]
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]
