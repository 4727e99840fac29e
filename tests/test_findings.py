"""k15jax.run.findings: the interval over seeds, the verdict rule written before the runs, and
the report's tables and pictures."""

import math

import pytest

from k15jax.run import findings
from k15jax.run.findings import FAILS, HOLDS, OPEN, Quantity


def test_interval_is_the_t_interval_of_the_mean():
    # hand-worked: mean 1, sample sd 1, n=3, t(0.975, 2 d.o.f.) = 4.303 -> 1 -/+ 4.303/sqrt(3)
    m, lo, hi = findings.interval([0.0, 1.0, 2.0])
    assert m == 1.0 and math.isclose(hi - m, 4.303 / math.sqrt(3), rel_tol=1e-9)
    assert math.isclose(m - lo, hi - m)
    m, lo, hi = findings.interval([0.25])
    assert m == 0.25 and math.isnan(lo) and math.isnan(hi)  # one seed has no interval


@pytest.mark.parametrize(
    "values, direction, expected",
    [
        # mean 0.1, sd 0.01: interval [0.075, 0.125], wholly above 0
        ((0.09, 0.10, 0.11), 1, HOLDS),
        ((0.09, 0.10, 0.11), -1, FAILS),  # the paper said < 0 and it is wholly above
        ((-0.09, -0.10, -0.11), -1, HOLDS),
        ((-0.05, 0.10, 0.20), 1, OPEN),  # straddles 0
        ((-0.05, 0.10, 0.20), -1, OPEN),
        ((-0.05, 0.01, 0.02), 0, HOLDS),  # a guard: no loss beyond the noise
        ((-0.09, -0.10, -0.11), 0, FAILS),  # a guard wholly below 0: a loss
        ((0.3,), 1, OPEN),  # one seed: no interval
    ],
)
def test_quantity_verdict_follows_the_written_rule(values, direction, expected):
    assert Quantity("q", values, direction).verdict() == expected


def test_a_finding_holds_only_when_every_quantity_holds():
    up = Quantity("up", (0.09, 0.10, 0.11), 1)
    unclear = Quantity("unclear", (-0.05, 0.10, 0.20), 1)
    down = Quantity("down", (-0.09, -0.10, -0.11), 1)
    assert findings.verdict([up, up]) == HOLDS
    assert findings.verdict([up, unclear]) == OPEN
    assert findings.verdict([up, unclear, down]) == FAILS
    assert findings.verdict([]) == OPEN
    with pytest.raises(ValueError, match="direction=2"):
        Quantity("bad", (1.0,), 2)


def test_thirds_change_compares_the_last_third_with_the_first():
    assert findings.thirds_change([1, 1, 5, 5, 3, 3]) == pytest.approx(2.0)
    assert findings.thirds_change([1.0, float("nan"), 2.0]) == pytest.approx(1.0)


def test_report_gives_each_seed_the_interval_and_the_verdicts(tmp_path):
    f1 = findings.Finding(
        key="F1",
        title="RL beats the SFT warm-up",
        paper="RL raises pass@1 over the warm-up (k1.5 Tables 2-3).",
        setup="the same SFT model, RL or not",
        quantities=(Quantity("RL − SFT", (0.09, 0.10, 0.11), 1),),
        arms={"SFT": (0.3, 0.31, 0.29), "RL": (0.39, 0.41, 0.4)},
        arms_measure="held-out pass@1",
        picture=findings.plot_arms(
            str(tmp_path / "f1.png"), {"SFT": (0.3, 0.31, 0.29), "RL": (0.39, 0.41, 0.4)},
            title="F1", ylabel="pass@1",
        ),
    )  # fmt: skip
    f2 = findings.Finding(
        key="F2",
        title="longer",
        paper="p",
        setup="s",
        quantities=(Quantity("Δ length", (-1.0, -1.1, -0.9), 1),),
    )
    text = findings.markdown([f1, f2], [0, 1, 2], header="# Reproduction")
    assert "| F1 RL beats the SFT warm-up | **holds** |" in text
    assert "| F2 longer | **does not hold** |" in text
    assert "| RL − SFT | +0.090 | +0.100 | +0.110 | +0.100 [+0.075, +0.125] | > 0 | holds |" in text
    assert "| RL | 0.390 | 0.410 | 0.400 | 0.400 [0.375, 0.425] |" in text
    assert "![F1](f1.png)" in text
    assert (tmp_path / "f1.png").stat().st_size > 1000
    curves = findings.plot_curves(
        str(tmp_path / "c.png"), {"a": ([0, 1], [[0, 1], [1, 2]])}, title="t", xlabel="x",
        ylabel="y", right={"b": ([0, 1], [[5, 6]])}, right_label="z",
    )  # fmt: skip
    pts = findings.plot_points(str(tmp_path / "p.png"), {"m": ([100, 110], [0.4, 0.5])}, title="t")
    assert curves == "c.png" and pts == "p.png" and (tmp_path / "p.png").exists()
