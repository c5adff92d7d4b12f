"""The benchmark table: one row per figure, beside its baseline, the ratio and the target."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Row", "rate_row", "render", "time_row"]


@dataclass(frozen=True)
class Row:
    """One measured figure.

    ``ratio`` is always a cost ratio, olmstead's time over the baseline's time (for
    rates: the baseline's rate over olmstead's), so lower is better everywhere.
    """

    name: str
    figure: float
    baseline: float
    unit: str
    baseline_name: str
    #: what the target demands, in words, and whether it is met (None: no target)
    target: str
    met: bool | None
    higher_is_better: bool = False
    #: a footnote printed under the table
    note: str = ""

    @property
    def ratio(self) -> float:
        if self.higher_is_better:
            return self.baseline / self.figure if self.figure else float("inf")
        return self.figure / self.baseline if self.baseline else float("inf")


def rate_row(name: str, figure: float, baseline: float, baseline_name: str, target: float) -> Row:
    """An events-per-second row with a minimum rate as its target."""
    return Row(
        name,
        figure,
        baseline,
        "events/s",
        baseline_name,
        f">= {target:,.0f}/s",
        figure >= target,
        higher_is_better=True,
    )


def time_row(
    name: str,
    figure: float,
    baseline: float,
    baseline_name: str,
    target_ms: float | None,
    *,
    extra: Callable[[float, float], bool] | None = None,
    extra_words: str = "",
    unit: str = "ms",
    note: str = "",
) -> Row:
    """A time row (milliseconds); its target a maximum, plus an optional check on the ratio."""
    met: bool | None = None
    words = ""
    if target_ms is not None:
        met = figure <= target_ms
        words = f"<= {target_ms:g} {unit}"
    if extra is not None:
        met = (met is not False) and extra(figure, baseline)
        words = f"{words}, {extra_words}" if words else extra_words
    return Row(name, figure, baseline, unit, baseline_name, words, met, note=note)


def _number(value: float, unit: str) -> str:
    if unit == "events/s":
        return f"{value:,.0f}/s"
    if unit == "MB":
        return f"{value:,.1f} MB"
    if value >= 100:
        return f"{value:,.0f} {unit}"
    if value >= 1:
        return f"{value:.1f} {unit}"
    return f"{value:.3f} {unit}"


def render(rows: list[Row]) -> str:
    """A Markdown table: it reads in a terminal and pastes into the README unchanged."""
    header = ["benchmark", "olmstead", "baseline", "baseline is", "ratio", "target", "met"]
    lines = [
        [
            row.name,
            _number(row.figure, row.unit),
            _number(row.baseline, row.unit),
            row.baseline_name,
            f"{row.ratio:.2f}x",
            row.target or "-",
            "-" if row.met is None else ("yes" if row.met else "NO"),
        ]
        for row in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out.extend(fmt(line) for line in lines)
    notes = [f"- {row.name}: {row.note}" for row in rows if row.note]
    if notes:
        out += ["", *notes]
    return "\n".join(out)
