"""A sweep's table and plots: every run's results.json -> runs.csv, summary.csv, summary.md and plots/<metric>.png.

Metrics are dotted paths into results.json (`differences.RAG+APC-DPO - RAG.oracle.mean`); `{key}` in a path is
replaced by the run's config value (`table.all.{method}.win_rate.mean`). A cell's interval is the 95% percentile
bootstrap across its seeds (alignment/stats.py); with two seeds it is their range. Used by alignment/sweep.py, which
plans and launches the runs.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import yaml

from alignment.files import atomic_write_text
from alignment.stats import bootstrap_ci, format_ci

log = logging.getLogger(__name__)


def cli_value(value: Any) -> str:
    """A value as typed after `key=` on the command line (YAML): true, null, 0.1, [10,25], text as it is."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return repr(value)


def dig(tree: Any, dotted: str) -> Any:
    """`tree["a"]["b"]` for `a.b`; None where the path stops (an optional section that is off)."""
    for part in dotted.split("."):
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


def metric_value(results: dict, path: str, config: dict) -> float:
    """The number at dotted `path` in `results`; `{key}` in the path is first replaced by `config`'s value.

    Keys of results.json may contain dots themselves, so each step takes the longest key that matches.
    Raises KeyError with a one-line reason.
    """
    def fill(match: re.Match) -> str:
        value = dig(config, match.group(1))
        if value is None:
            raise KeyError(f"{{{match.group(1)}}}: not in the run's config")
        return str(value)

    path = re.sub(r"\{([\w.]+)\}", fill, path)
    parts, node, i = path.split("."), results, 0
    while i < len(parts):
        if not isinstance(node, dict):
            raise KeyError(f"{'.'.join(parts[:i])} is not a mapping")
        for j in range(len(parts), i, -1):
            if ".".join(parts[i:j]) in node:
                node, i = node[".".join(parts[i:j])], j
                break
        else:
            raise KeyError(f"no {parts[i]!r} in {'.'.join(parts[:i]) or 'results.json'} (keys: "
                           f"{', '.join(map(str, list(node)[:10]))})")
    if isinstance(node, dict) and "mean" in node:
        raise KeyError(f"{path} is an interval; use {path}.mean")
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise KeyError(f"{path} is not a number")
    return float(node)


def collect(plan, metrics: list[str]) -> list[dict]:
    """One row per planned run: name, cell, seed, swept values, status and each metric (NaN where unavailable)."""
    rows, problems = [], {}
    for run in plan.runs:
        directory = plan.sweep_dir / run.name
        done = (directory / "DONE").is_file() and (directory / "results.json").is_file()
        row = {"run": run.name, "cell": run.cell, "seed": run.seed, **run.axes, "status": "done" if done else (
            "unfinished" if directory.exists() else "not started")}
        results = json.loads((directory / "results.json").read_text()) if done else {}
        config = yaml.safe_load((directory / "config.yaml").read_text()) if done else {}
        for metric in metrics:
            row[metric] = math.nan
            if done:
                try:
                    row[metric] = metric_value(results, metric, config or {})
                except KeyError as exc:
                    problems.setdefault(metric, []).append(f"{run.name}: {exc.args[0]}")
        rows.append(row)
    for metric, where in problems.items():
        log.warning("metric %s: missing in %d run(s); first: %s", metric, len(where), where[0])
    return rows


def summarize(rows: list[dict], axes: list[str], metrics: list[str]) -> list[dict]:
    """One entry per cell, in plan order: swept values, finished seeds, and per metric the mean with a 95%
    percentile-bootstrap interval across seeds (alignment.stats.bootstrap_ci; None when no seed has the metric).
    With 2 seeds that interval is the range of the two; it only narrows with more seeds."""
    out = []
    for cell in dict.fromkeys(row["cell"] for row in rows):
        members = [row for row in rows if row["cell"] == cell]
        stats = {}
        for metric in metrics:
            values = [row[metric] for row in members if not math.isnan(row[metric])]
            stats[metric] = bootstrap_ci(values, seed=0) if values else None
        out.append({"cell": cell, "axes": {key: members[0][key] for key in axes},
                    "seeds": sum(row["status"] == "done" for row in members), "stats": stats})
    return out


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if isinstance(v, float) and math.isnan(v) else _cell_text(v) for v in row] for row in rows])
    atomic_write_text(path, text.getvalue())


def _cell_text(value: Any) -> Any:
    return cli_value(value) if isinstance(value, (list, dict, bool)) or value is None else value


def summary_markdown(title: str, summary: list[dict], axes: list[str], metrics: list[str]) -> str:
    """The table: one row per cell, swept values, seeds finished, each metric as mean [95% CI across seeds]."""
    lines = [f"# {title}", "", "mean [95% CI across seeds] (percentile bootstrap over seeds, alignment/stats.py; "
             "with 2 seeds the interval is the range of the two)", "",
             "| " + " | ".join([*axes, "seeds", *metrics]) + " |", "|---" * (len(axes) + 1 + len(metrics)) + "|"]
    for cell in summary:
        values = [_cell_text(cell["axes"][key]) for key in axes] + [cell["seeds"]]
        values += [format_ci(s) if s else "—" for s in (cell["stats"][m] for m in metrics)]
        lines.append("| " + " | ".join(map(str, values)) + " |")
    return "\n".join(lines) + "\n"


def series(summary: list[dict], axis: str, axes: list[str]) -> list[tuple[str, list[dict]]]:
    """Lines of the plot against `axis`: cells grouped by the values of the other swept keys, keeping groups in
    which `axis` takes two or more values (a one-at-a-time ablation gives one line through its base cell)."""
    others = [key for key in axes if key != axis]
    groups: dict[tuple, list[dict]] = {}
    for cell in summary:
        groups.setdefault(tuple(cli_value(cell["axes"][key]) for key in others), []).append(cell)
    lines = [(", ".join(f"{k}={v}" for k, v in zip(others, context, strict=True)), members)
             for context, members in groups.items()
             if len({cli_value(c["axes"][axis]) for c in members}) > 1]
    return lines or [("", summary)]


def plot_metric(summary: list[dict], axes: list[str], metric: str):
    """A matplotlib Figure (Agg canvas): one panel per swept key, mean and 95% CI across seeds of `metric`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib loads only when a sweep plots
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(axes), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, axis in zip(fig.subplots(1, len(axes), squeeze=False)[0], axes, strict=True):
        values = [cell["axes"][axis] for cell in summary]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        order = list(dict.fromkeys(cli_value(v) for v in values))  # categories keep their order in the plan
        lines = series(summary, axis, axes)
        for label, members in lines:
            points = sorted([(c["axes"][axis] if numeric else order.index(cli_value(c["axes"][axis])),
                              c["stats"][metric]) for c in members if c["stats"][metric] is not None],
                            key=lambda point: point[0])
            if not points:
                continue
            mean = [s["mean"] for _, s in points]
            err = [[max(s["mean"] - s["lo"], 0.0) for _, s in points],
                   [max(s["hi"] - s["mean"], 0.0) for _, s in points]]
            ax.errorbar([x for x, _ in points], mean, yerr=err, marker="o", capsize=3, label=label[:60] or None,
                        linestyle="-" if label else "none")  # no label: unrelated cells, not a line
        if not numeric:
            ax.set_xticks(range(len(order)), order, rotation=20)
        ax.set_xlabel(axis)
        ax.grid(alpha=0.3)
        if 1 < len(lines) <= 8:
            ax.legend(fontsize=6)
    fig.axes[0].set_ylabel(metric if len(metric) <= 40 else "…" + metric[-39:])
    fig.suptitle(f"{metric}\nmean and 95% CI across seeds", fontsize=9)
    return fig


def aggregate(plan, metrics: list[str], title: str) -> list[dict]:
    """Write runs.csv, summary.csv, summary.md and plots/<metric>.png into the sweep directory; returns the
    summary (one entry per cell)."""
    rows = collect(plan, metrics)
    axes = plan.axes
    write_csv(plan.sweep_dir / "runs.csv", ["run", "cell", "seed", *axes, "status", *metrics],
              [[row[k] for k in ["run", "cell", "seed", *axes, "status", *metrics]] for row in rows])
    summary = summarize(rows, axes, metrics)
    stat_columns = [f"{s}({m})" for m in metrics for s in ("mean", "ci_lo", "ci_hi", "n")]
    write_csv(plan.sweep_dir / "summary.csv", ["cell", *axes, "seeds", *stat_columns],
              [[c["cell"], *[c["axes"][k] for k in axes], c["seeds"],
                *[(c["stats"][m] or {}).get(s, math.nan) for m in metrics for s in ("mean", "lo", "hi", "n")]]
               for c in summary])
    atomic_write_text(plan.sweep_dir / "summary.md", summary_markdown(title, summary, axes, metrics))
    if axes:
        (plan.sweep_dir / "plots").mkdir(exist_ok=True)
        for metric in metrics:
            plot_metric(summary, axes, metric).savefig(plan.sweep_dir / "plots" / f"{plot_name(metric)}.png", dpi=110)
    return summary


def plot_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", metric, flags=re.ASCII).strip("_") or "metric"
