"""loadtest.benchmarks.report's server-side percentiles from Prometheus histogram buckets."""

from __future__ import annotations

import math

import pytest

from loadtest.benchmarks.report import histogram_delta, histogram_quantile


def test_quantile_interpolates_within_the_bucket() -> None:
    buckets = {0.1: 10.0, 0.2: 30.0, 0.5: 40.0, math.inf: 40.0}
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.15)  # rank 20: halfway through (0.1, 0.2]
    assert histogram_quantile(buckets, 0.25) == pytest.approx(0.1)
    assert histogram_quantile(buckets, 0.99) == pytest.approx(0.2 + 0.3 * (39.6 - 30) / 10)


def test_quantile_in_the_overflow_bucket_is_the_largest_finite_bound() -> None:
    assert histogram_quantile({0.1: 1.0, 1.0: 2.0, math.inf: 10.0}, 0.99) == 1.0


def test_empty_histogram_has_no_quantile() -> None:
    assert histogram_quantile({}, 0.5) is None
    assert histogram_quantile({0.1: 0.0, math.inf: 0.0}, 0.5) is None


def test_delta_counts_only_what_happened_between_reads() -> None:
    before = {0.1: 5.0, 1.0: 7.0, math.inf: 7.0}
    after = {0.1: 5.0, 1.0: 17.0, math.inf: 17.0}
    delta = histogram_delta(before, after)
    assert delta == {0.1: 0.0, 1.0: 10.0, math.inf: 10.0}
    assert histogram_quantile(delta, 0.5) == pytest.approx(0.55)
