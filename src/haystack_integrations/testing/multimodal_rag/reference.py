"""Straightforward reference implementations that tests compare the fast kernels with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _float64(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # torch tensor
        array = array.detach().to("cpu").double().numpy()
    return np.asarray(array, dtype=np.float64)


def maxsim_reference(query: Any, pages: Sequence[Any]) -> np.ndarray:
    """
    MaxSim one page at a time in float64: for each page, the sum over query vectors of the best dot product.

    :param query: `(Lq, d)` array or tensor.
    :param pages: Each `(Lp_i, d)`.
    :returns: `float64` array of shape `(len(pages),)`.
    """
    q = _float64(query)
    return np.array([(q @ _float64(p).T).max(axis=1).sum() for p in pages], dtype=np.float64)
