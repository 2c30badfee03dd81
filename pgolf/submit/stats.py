"""The statistics a record needs: per-seed scores, their mean and spread, and the two tests against a baseline.

The challenge's README asks a new record to "beat the existing SOTA by at least 0.005 nats"
and to "provide enough run logs to show at p < 0.01 that they achieved the required
0.005-nat improvement"; the maintainers' final leaderboard took each row that beat the row
before it at a one-sided p < 0.25 (PR #1902), by Welch's test on the per-seed bpb (their
published p = 0.020 for #1514 over #1493 and p = 0.063 for #1769 over #1736 are what
:func:`progression` gives on those records' seeds: tests/submit/test_seeds.py). Both tests
here are ``scipy.stats.ttest_ind(equal_var=False, alternative="less")`` on the per-seed bpb;
the README's margin, in nats per token, enters as bpb through the candidate's own ratio of
``val_loss`` to ``val_bpb`` (ln 2 times its validation bytes per token, the same for every
seed), which makes the test the same as one on ``val_loss`` when both sides share a
tokenizer and keeps it defined when a baseline published only bpb. Standard deviations are
the sample's (n - 1), the one the t-test uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

README_MARGIN_NATS = 0.005
README_ALPHA = 0.01
PROGRESSION_ALPHA = 0.25
README_RULE = ("beat the existing SOTA by at least 0.005 nats, shown at p < 0.01 (one-sided Welch t-test "
               "of the per-seed scores, shifted by the margin)")
PROGRESSION_RULE = "beat the previous leaderboard row at one-sided Welch p < 0.25 on the per-seed bpb"


@dataclass(frozen=True)
class SeedScore:
    """One seed's submission score, as read from a run's log or metrics, or a record's files."""

    seed: int
    val_bpb: float
    val_loss: float | None  # nats per token; some published records give only bpb
    source: str  # the file the figures were read from


@dataclass(frozen=True)
class Sample:
    """The per-seed scores of one system: a set of runs, a records folder or a published record."""

    label: str
    scores: tuple[SeedScore, ...]
    source: str

    def __post_init__(self) -> None:
        if not self.scores:
            raise ValueError(f"{self.label} ({self.source}): no seed scores")

    def bpb(self) -> np.ndarray:
        return np.array([score.val_bpb for score in self.scores])  # [n]

    def nats(self) -> np.ndarray | None:
        """Each seed's val_loss, or None when any is missing."""
        losses = [score.val_loss for score in self.scores]
        return None if any(loss is None for loss in losses) else np.array(losses)  # [n]

    def nats_per_bpb(self) -> float | None:
        """val_loss / val_bpb: ln 2 times the validation bytes per token (one tokenizer: one value)."""
        nats = self.nats()
        return None if nats is None else float(np.mean(nats / self.bpb()))


def spread(values: np.ndarray) -> dict[str, float | None]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if values.size > 1 else None}


def summary(sample: Sample) -> dict[str, Any]:
    """n, and the mean and sample standard deviation in bpb and (when every seed has it) in nats per token."""
    nats = sample.nats()
    return {"n": len(sample.scores), "bpb": spread(sample.bpb()), "nats": None if nats is None else spread(nats)}


def welch_less(candidate: np.ndarray, baseline: np.ndarray) -> tuple[float, float, float]:
    """t, degrees of freedom and one-sided p of Welch's test that the candidate's mean is below the baseline's."""
    result = stats.ttest_ind(candidate, baseline, equal_var=False, alternative="less")
    return float(result.statistic), float(result.df), float(result.pvalue)


def _two_each(candidate: Sample, baseline: Sample) -> None:
    for sample in (candidate, baseline):
        if len(sample.scores) < 2:
            raise ValueError(f"{sample.label} ({sample.source}) has {len(sample.scores)} seed: Welch's test needs at "
                             "least 2 on each side")
    if np.ptp(candidate.bpb()) == 0 and np.ptp(baseline.bpb()) == 0:
        raise ValueError(f"{candidate.label} and {baseline.label}: every seed scores the same on both sides, so "
                         "the t statistic is undefined")


def readme_rule(candidate: Sample, baseline: Sample) -> dict[str, Any]:
    """The README's record rule: at least 0.005 nats better, at one-sided p < 0.01."""
    _two_each(candidate, baseline)
    ratio, ratio_from = candidate.nats_per_bpb(), candidate.label
    if ratio is None:  # a published candidate with bpb only: the baseline's tokenizer stands in
        ratio, ratio_from = baseline.nats_per_bpb(), baseline.label
    if ratio is None:
        raise ValueError(f"neither {candidate.label} nor {baseline.label} gives val_loss per seed: the 0.005-nat "
                         "margin cannot be put in bpb")
    margin_bpb = README_MARGIN_NATS / ratio
    t, df, p = welch_less(candidate.bpb() + margin_bpb, baseline.bpb())
    gain_bpb = float(np.mean(baseline.bpb()) - np.mean(candidate.bpb()))
    return {"rule": README_RULE, "margin_nats": README_MARGIN_NATS, "margin_bpb": margin_bpb, "nats_per_bpb": ratio,
            "nats_per_bpb_of": ratio_from,
            "improvement_bpb": gain_bpb, "improvement_nats": gain_bpb * ratio, "t": t, "df": df, "p": p,
            "alpha": README_ALPHA, "passes": gain_bpb * ratio >= README_MARGIN_NATS and p < README_ALPHA}


def progression(candidate: Sample, baseline: Sample) -> dict[str, Any]:
    """The maintainers' leaderboard test: better than the previous row at one-sided Welch p < 0.25 (bpb)."""
    _two_each(candidate, baseline)
    t, df, p = welch_less(candidate.bpb(), baseline.bpb())
    return {"rule": PROGRESSION_RULE, "improvement_bpb": float(np.mean(baseline.bpb()) - np.mean(candidate.bpb())),
            "t": t, "df": df, "p": p, "alpha": PROGRESSION_ALPHA, "passes": p < PROGRESSION_ALPHA}


def comparison(candidate: Sample, baseline: Sample) -> dict[str, Any]:
    """Both tests of ``candidate`` against one baseline, with the baseline's seeds and summary."""
    return {"label": baseline.label, "source": baseline.source, "seeds": score_rows(baseline),
            "summary": summary(baseline), "readme_rule": readme_rule(candidate, baseline),
            "progression": progression(candidate, baseline)}


def score_rows(sample: Sample) -> list[dict[str, Any]]:
    return [{"seed": s.seed, "val_bpb": s.val_bpb, "val_loss": s.val_loss, "source": s.source} for s in sample.scores]


def _number(value: float | None, digits: int = 8) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def seeds_table(report: dict[str, Any]) -> str:
    """The per-seed table with its mean and standard deviation, and the runs that did not finish."""
    runs, total = report["runs"], report["summary"]
    lines = ["| Seed | val_bpb | val_loss (nats) | Steps | Artifact bytes | Total bytes | Log |", "|-|-|-|-|-|-|-|"]
    lines += [f"| {r['seed']} | {_number(r['val_bpb'])} | {_number(r['val_loss'])} | {r.get('steps', '–')} | "
              f"{r.get('artifact_bytes', '–')} | {r.get('total_bytes', '–')} | `{r['source']}` |" for r in runs]
    nats = total["nats"] or {"mean": None, "std": None}
    lines += ["", f"Mean val_bpb **{_number(total['bpb']['mean'])}** (std {_number(total['bpb']['std'])}), "
                  f"mean val_loss {_number(nats['mean'])} nats (std {_number(nats['std'])}) over {total['n']} seeds; "
                  "sample standard deviations (n - 1)."]
    if report["unfinished"]:
        lines += ["", "Runs that did not finish (disclosed, not in the statistics):", ""]
        lines += [f"- `{u['folder']}` (seed {u['seed']}): {u['reason']}" for u in report["unfinished"]]
    return "\n".join(lines) + "\n"


def tests_section(report: dict[str, Any], level: str = "##") -> str:
    """Both tests against each baseline, one table per baseline."""
    lines = []
    for base in report["baselines"]:
        rule, step = base["readme_rule"], base["progression"]
        lines += [f"{level} Against {base['label']} (`{base['source']}`)", "",
                  f"Baseline: {base['summary']['n']} seeds, mean val_bpb {_number(base['summary']['bpb']['mean'])}.",
                  "", "| Test | Improvement | t | df | one-sided p | Passes |", "|-|-|-|-|-|-|",
                  f"| README: ≥ {rule['margin_nats']} nats at p < {rule['alpha']} | {rule['improvement_nats']:.5f} "
                  f"nats ({rule['improvement_bpb']:.5f} bpb) | {rule['t']:.3f} | {rule['df']:.2f} | {rule['p']:.4g} | "
                  f"{'yes' if rule['passes'] else 'no'} |",
                  f"| Progression: Welch p < {step['alpha']} | {step['improvement_bpb']:.5f} bpb | {step['t']:.3f} | "
                  f"{step['df']:.2f} | {step['p']:.4g} | {'yes' if step['passes'] else 'no'} |", ""]
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: the per-seed table, the summary and each baseline's two tests."""
    return f"# {report['label']}: {report['summary']['n']} seeds\n\n{seeds_table(report)}\n{tests_section(report)}"
