"""A record's statistics: SciPy's Welch test, one-sided, in bpb and nats; the maintainers' published p-values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from pgolf.submit.seeds import published_record
from pgolf.submit.stats import Sample, SeedScore, progression, readme_rule, summary


def sample(label: str, bpb: list[float], nats_per_bpb: float | None = 2.5) -> Sample:
    return Sample(label, tuple(SeedScore(seed, value, None if nats_per_bpb is None else value * nats_per_bpb, "test")
                               for seed, value in enumerate(bpb)), "test")


def test_the_p_value_of_a_worked_example():
    """Candidate 1, 2, 3 against baseline 4, 5, 6 (by hand):
    means 2 and 5, sample variances 1 and 1, standard error sqrt(1/3 + 1/3) = 0.81650,
    t = (2 - 5) / 0.81650 = -3.67423; Welch's df = (2/3)^2 / ((1/3)^2/2 + (1/3)^2/2) = 4.
    Student's t with 4 degrees of freedom has the closed form F(t) = 1/2 + (3/4) x (1 - x^2/3),
    x = t / sqrt(t^2 + 4) = -3.67423 / 4.18330 = -0.87831, so the one-sided p (the candidate's
    mean is lower) is F(t) = 0.5 + 0.75 * -0.87831 * (1 - 0.77143/3) = 0.5 - 0.48934 = 0.01066.
    """
    result = progression(sample("candidate", [1, 2, 3]), sample("baseline", [4, 5, 6]))
    assert result["t"] == pytest.approx(-3.67423, abs=1e-5) and result["df"] == pytest.approx(4.0)
    assert result["p"] == pytest.approx(0.01066, abs=1e-5)
    x = result["t"] / math.sqrt(result["t"] ** 2 + 4)
    assert result["p"] == pytest.approx(0.5 + 0.75 * x * (1 - x * x / 3), rel=1e-12)
    assert result["passes"] and result["improvement_bpb"] == pytest.approx(3.0)


def test_the_p_value_is_scipys_one_sided_welch_not_students():
    """Unequal sizes and spreads: Welch's p (SciPy) differs from Student's, and pgolf's is Welch's."""
    candidate, baseline = [1.0601, 1.0611, 1.0598, 1.0620, 1.0605], [1.0630, 1.0612, 1.0655]
    result = progression(sample("c", candidate), sample("b", baseline))
    welch = stats.ttest_ind(candidate, baseline, equal_var=False, alternative="less")
    student = stats.ttest_ind(candidate, baseline, equal_var=True, alternative="less")
    assert result["p"] == welch.pvalue and result["df"] == welch.df and result["t"] == welch.statistic
    assert abs(result["p"] - student.pvalue) > 1e-3
    worse = progression(sample("b", baseline), sample("c", candidate))  # the other way round: one-sided
    assert worse["p"] == pytest.approx(1 - result["p"]) and not worse["passes"]


@pytest.mark.parametrize("candidate, baseline, published_p", [("#1514", "#1493", 0.020), ("#1769", "#1736", 0.063)])
def test_the_maintainers_published_progression_p_values(candidate, baseline, published_p):
    """The final leaderboard's own p for these rows (README at HEAD: "p=0.020", "p=0.063"), from the carried seeds."""
    assert round(progression(published_record(candidate), published_record(baseline))["p"], 3) == published_p


def test_the_readme_rule_in_bpb_is_welchs_test_of_the_nat_margin():
    """With one tokenizer (one nats-per-bpb ratio), the test on bpb with the margin put in bpb is the test on val_loss."""
    candidate, baseline = sample("c", [1.0610, 1.0598, 1.0605]), sample("b", [1.0645, 1.0652, 1.0641, 1.0660])
    rule = readme_rule(candidate, baseline)
    direct = stats.ttest_ind(candidate.nats() + 0.005, baseline.nats(), equal_var=False, alternative="less")
    assert rule["p"] == pytest.approx(direct.pvalue, rel=1e-9) and rule["margin_bpb"] == pytest.approx(0.002)
    assert rule["improvement_nats"] == pytest.approx(2.5 * (np.mean(baseline.bpb()) - np.mean(candidate.bpb())))
    assert rule["passes"] == (rule["improvement_nats"] >= 0.005 and direct.pvalue < 0.01)


def test_the_readme_rule_needs_the_margin_and_the_significance():
    baseline = sample("b", [1.0700, 1.0702, 1.0698])
    significant_but_small = readme_rule(sample("c", [1.0690, 1.0691, 1.0689]), baseline)  # 0.0025 nats better
    assert significant_but_small["improvement_nats"] < 0.005 and not significant_but_small["passes"]
    large_but_noisy = readme_rule(sample("c", [1.0600, 1.0700, 1.0650]), baseline)  # 0.0125 nats, wide spread
    assert large_but_noisy["improvement_nats"] > 0.005 and large_but_noisy["p"] > 0.01 and not large_but_noisy["passes"]
    clear = readme_rule(sample("c", [1.0670, 1.0671, 1.0669]), baseline)
    assert clear["passes"] and clear["p"] < 0.01


def test_a_baseline_with_bpb_only_takes_the_candidates_ratio():
    rule = readme_rule(sample("c", [1.0670, 1.0671, 1.0669], 2.2), sample("b", [1.0700, 1.0702, 1.0698], None))
    assert rule["nats_per_bpb"] == pytest.approx(2.2) and rule["nats_per_bpb_of"] == "c"
    with pytest.raises(ValueError, match="neither c nor b gives val_loss per seed"):
        readme_rule(sample("c", [1.0670, 1.0671], None), sample("b", [1.0700, 1.0702], None))


def test_one_seed_is_refused_naming_the_sample():
    with pytest.raises(ValueError, match=r"#1851 \(.*\) has 1 seed: Welch's test needs at least 2"):
        progression(sample("c", [1.0, 1.1]), published_record("#1851"))


def test_summary_in_bpb_and_nats_with_the_sample_standard_deviation():
    total = summary(sample("c", [1.0, 1.2, 1.4], 2.0))
    assert total["n"] == 3 and total["bpb"]["mean"] == pytest.approx(1.2) and total["bpb"]["std"] == pytest.approx(0.2)
    assert total["nats"]["mean"] == pytest.approx(2.4) and total["nats"]["std"] == pytest.approx(0.4)
    assert summary(sample("c", [1.0, 1.2], None))["nats"] is None
    assert summary(sample("c", [1.0], 2.0))["bpb"]["std"] is None
