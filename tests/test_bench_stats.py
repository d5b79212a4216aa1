"""The statistics the benchmark tables report (benchmarks/common.py)."""
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import paired_ratio, paired_ratio_interval, ratio_text  # noqa: E402


def timings(ratios, seed=0):
    """Per-round times whose per-round ratio to the reference is ``ratios``, on a drifting
    machine (the reference's own time wanders by 30%)."""
    gen = random.Random(seed)
    ref = [1.0 + 0.3 * gen.random() for _ in ratios]
    return {"ours": [r * t for r, t in zip(ratios, ref, strict=True)], "ref": ref}


def test_paired_ratio_cancels_the_drift_of_the_machine():
    times = timings([0.9] * 12)
    assert abs(paired_ratio(times, "ours", "ref") - 0.9) < 1e-12
    low, high = paired_ratio_interval(times, "ours", "ref")
    assert abs(low - 0.9) < 1e-12 and abs(high - 0.9) < 1e-12
    assert ratio_text(times, "ours", "ref") == "0.90 (0.90-0.90)"


def test_interval_brackets_the_median_and_shrinks_with_more_rounds():
    gen = random.Random(1)
    few = [1.0 + gen.gauss(0, 0.08) for _ in range(12)]
    many = [1.0 + gen.gauss(0, 0.08) for _ in range(300)]
    widths = []
    for ratios in (few, many):
        times = timings(ratios)
        low, high = paired_ratio_interval(times, "ours", "ref")
        assert low <= statistics.median(ratios) <= high
        assert paired_ratio_interval(times, "ours", "ref") == (low, high)  # seeded
        widths.append(high - low)
    assert 0 < widths[1] < widths[0] / 2
    # a 95% interval of a 12-round median with 8% noise is several percent wide
    assert widths[0] > 0.03
