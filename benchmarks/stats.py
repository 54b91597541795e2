"""The one percentile function of the benchmarks' reports (numpy's, with the method named)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def percentile(values: Sequence[float], q: float, method: str = "nearest") -> float:
    """The `q` quantile (q in [0, 1]) of `values` by numpy's `method`; NaN when there are none.

    "nearest" is the observed value at rank round(q * (n - 1)), ties to even: what bench_server,
    gpu_check and soak report. "linear" interpolates between neighbouring ranks: what simulate
    reports. RESULTS.md's tables were computed each way, so each caller keeps its method.
    (np.quantile, not np.percentile(100 * q): (100 * q) / 100 is not always q, and ties then break
    the other way.)"""
    return float(np.quantile(values, q, method=method)) if len(values) else float("nan")
