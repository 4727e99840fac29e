"""The paper's findings in miniature: quantities over seeds, the verdict rule, tables, pictures.

`experiments.reproduce` measures each finding of k1.5 as one or more `Quantity`s, each a per-seed
value with the direction the paper claims. The rule, written before any run:
  - a quantity with a direction (+1: the paper says > 0, -1: < 0) *holds* when the 95%
    t-interval of its mean over seeds lies wholly on the paper's side of 0, *does not hold*
    when it lies wholly on the other side, and is *inconclusive* otherwise;
  - a guard (direction 0: "at no loss of ...") holds unless its interval lies wholly below 0,
    then it does not hold;
  - a finding holds when all its quantities hold, does not hold when any does not, and is
    inconclusive otherwise. One seed gives no interval: inconclusive.
Most quantities are paired differences (arm − reference on the same seed: the same SFT model,
problems and held-out set), so the interval is of the difference itself.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

# two-sided 97.5% Student t quantiles for 1..9 degrees of freedom; the normal one beyond
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262)
HOLDS, FAILS, OPEN = "holds", "does not hold", "inconclusive"


def interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Returns (mean, low, high): the t-based 95% interval of the mean over seeds (NaN bounds
    for fewer than two values)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), math.nan, math.nan
    q = _T975[len(x) - 2] if len(x) - 2 < len(_T975) else 1.96
    half = q * float(x.std(ddof=1)) / math.sqrt(len(x))
    return float(x.mean()), float(x.mean()) - half, float(x.mean()) + half


@dataclasses.dataclass(frozen=True)
class Quantity:
    """One measured quantity of a finding: a value per seed and the paper's direction."""

    label: str  # e.g. "RL − SFT held-out pass@1"
    per_seed: tuple[float, ...]
    direction: int  # +1: the paper says > 0; -1: < 0; 0: a guard, must not be below 0

    def __post_init__(self):
        if self.direction not in (-1, 0, 1):
            raise ValueError(f"direction={self.direction} must be -1, 0 or 1")

    def verdict(self) -> str:
        """Returns HOLDS, FAILS or OPEN by the module's rule."""
        _, lo, hi = interval(self.per_seed)
        if math.isnan(lo):
            return OPEN
        if self.direction == 0:
            return FAILS if hi < 0 else HOLDS
        lo, hi = (lo, hi) if self.direction > 0 else (-hi, -lo)
        return HOLDS if lo > 0 else FAILS if hi < 0 else OPEN


def verdict(quantities: Sequence[Quantity]) -> str:
    """Returns the finding's verdict from its quantities' (module docstring)."""
    each = [q.verdict() for q in quantities]
    if FAILS in each:
        return FAILS
    return HOLDS if each and all(v == HOLDS for v in each) else OPEN


@dataclasses.dataclass(frozen=True)
class Finding:
    """One finding of the paper as measured here."""

    key: str  # "F1"
    title: str  # "RL beats the SFT warm-up"
    paper: str  # one sentence of what the paper shows, with its place
    setup: str  # what differs between the arms; everything else is equal
    quantities: tuple[Quantity, ...]
    # arm -> per-seed values of the reported measure (a table beside the quantities)
    arms: Mapping[str, Sequence[float]] = dataclasses.field(default_factory=dict)
    arms_measure: str = ""  # what the arms' values are
    picture: str | None = None  # the PNG's file name, beside the report

    @property
    def verdict(self) -> str:
        return verdict(self.quantities)


DIRECTIONS = {1: "> 0", -1: "< 0", 0: "not below 0"}


def _cell(mean: float, lo: float, hi: float) -> str:
    if math.isnan(lo):
        return f"{mean:+.3f} (one seed)"
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def markdown(findings: Sequence[Finding], seeds: Sequence[int], *, header: str) -> str:
    """Returns the report: a summary table, then each finding with its tables and picture."""
    lines = [header, "", "| finding | verdict | first quantity: mean [95% interval over seeds] |"]
    lines.append("|---|---|---|")
    for f in findings:
        q = f.quantities[0]
        lines.append(
            f"| {f.key} {f.title} | **{f.verdict}** | {q.label}: {_cell(*interval(q.per_seed))} |"
        )
    seed_cols = " | ".join(f"seed {s}" for s in seeds)
    for f in findings:
        lines += ["", f"## {f.key}: {f.title} — **{f.verdict}**", "", f"Paper: {f.paper}", ""]
        lines += [f"Setup: {f.setup}", ""]
        lines += [f"| quantity | {seed_cols} | mean [95% interval] | paper | verdict |"]
        lines.append("|---|" + "---|" * len(seeds) + "---|---|---|")
        for q in f.quantities:
            cells = " | ".join(f"{v:+.3f}" for v in q.per_seed)
            lines.append(
                f"| {q.label} | {cells} | {_cell(*interval(q.per_seed))} | "
                f"{DIRECTIONS[q.direction]} | {q.verdict()} |"
            )
        if f.arms:
            lines += ["", f"| arm ({f.arms_measure}) | {seed_cols} | mean [95% interval] |"]
            lines.append("|---|" + "---|" * len(seeds) + "---|")
            for arm, values in f.arms.items():
                m, lo, hi = interval(values)
                cells = " | ".join(f"{v:.3f}" for v in values)
                bounds = "" if math.isnan(lo) else f" [{lo:.3f}, {hi:.3f}]"
                lines.append(f"| {arm} | {cells} | {m:.3f}{bounds} |")
        if f.picture:
            lines += ["", f"![{f.key}]({f.picture})"]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------- pictures


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(5.5, 3.5))


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return os.path.basename(path)


def plot_arms(path: str, arms: Mapping[str, Sequence[float]], *, title: str, ylabel: str) -> str:
    """Writes a bar per arm (mean over seeds, 95% interval) with each seed's value as a dot."""
    plt, fig, ax = _figure()
    for i, (name, values) in enumerate(arms.items()):
        m, lo, hi = interval(values)
        err = None if math.isnan(lo) else [[m - lo], [hi - m]]
        ax.bar(i, m, yerr=err, capsize=4, alpha=0.6)
        ax.plot([i] * len(values), values, "k.", ms=6)
    ax.set_xticks(range(len(arms)), list(arms), rotation=15, fontsize=8)
    ax.set(title=title, ylabel=ylabel)
    return _save(plt, fig, path)


def plot_curves(
    path: str,
    curves: Mapping[str, tuple[Sequence[float], Sequence[Sequence[float]]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    right: Mapping[str, tuple[Sequence[float], Sequence[Sequence[float]]]] | None = None,
    right_label: str = "",
) -> str:
    """Writes lines of the mean over seeds: curves[name] = (x, per-seed y rows); `right`:
    more curves on a second y axis (dashed)."""
    plt, fig, ax = _figure()
    for name, (x, ys) in curves.items():
        ax.plot(x, np.mean(np.asarray(ys, np.float64), axis=0), marker=".", label=name)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    handles, labels = ax.get_legend_handles_labels()
    if right:
        ax2 = ax.twinx()
        for name, (x, ys) in right.items():
            ax2.plot(x, np.mean(np.asarray(ys, np.float64), axis=0), "--", label=name)
        ax2.set_ylabel(right_label)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=7)
    return _save(plt, fig, path)


def plot_points(
    path: str, points: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str
) -> str:
    """Writes accuracy against mean response tokens (k1.5 Fig. 7): points[name] = (tokens per
    seed, pass@1 per seed); the mean with each seed faint."""
    plt, fig, ax = _figure()
    for name, (tokens, acc) in points.items():
        (line,) = ax.plot([np.mean(tokens)], [np.mean(acc)], "o", ms=8, label=name)
        ax.plot(tokens, acc, ".", color=line.get_color(), alpha=0.4)
    ax.set(title=title, xlabel="mean response tokens", ylabel="held-out pass@1")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def thirds_change(values: Sequence[float]) -> float:
    """Returns mean(last third) − mean(first third) of a per-iteration series (NaN ignored)."""
    x = np.asarray(values, np.float64)
    k = max(len(x) // 3, 1)
    return float(np.nanmean(x[-k:]) - np.nanmean(x[:k]))
