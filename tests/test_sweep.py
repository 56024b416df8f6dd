"""alignment.sweep: planning and validation, skip/resume after crashes (SIGKILL included), the thread budget, the
submitit launcher in its local mode, and tables and plots that agree with the runs' results.json.

Every sweep here runs tiny fake entry points written into tmp_path: a config dataclass and a `main(cfg)` that writes
results.json through alignment.runs.Run, launched like any entry point (`python -m fake_entry key=value ...`).
"""

import csv
import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import tqdm.auto

from alignment.config import load_config, run_cli
from alignment.stats import bootstrap_ci, format_ci
from alignment.sweep import SweepConfig, main, plan_sweep, run_name, run_state
from alignment.sweep_report import aggregate, metric_value, plot_metric

FAKE_ENTRY = '''
"""A fake entry point: results are a known function of its keys; it logs each invocation."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass
class FakeConfig:
    seed: int = 0
    name: str | None = None
    {resume_field}
    runs_dir: str = "runs"
    x: float = 1.0
    mode: Literal["a", "b"] = "a"
    hang: float = 0.0  # seconds to sleep before finishing, on a fresh start only
    fail: bool = False  # raise instead of finishing


def main(cfg: FakeConfig) -> Path:
    import torch

    from alignment.runs import Run

    resume = getattr(cfg, "resume", False)
    run = Run.start(cfg, "fake", runs_dir=cfg.runs_dir, name=cfg.name, resume=resume)
    start = time.time()
    with open(Path(cfg.runs_dir) / "invocations.jsonl", "a") as f:
        f.write(json.dumps({{"run": run.name, "resume": resume, "pid": os.getpid()}}) + "\\n")
    if cfg.fail:
        raise RuntimeError("asked to fail")
    if not resume:
        time.sleep(cfg.hang)
    b = cfg.mode == "b"
    run.finish({{"score": {{"value": 2 * cfg.x + 0.1 * cfg.seed ** 2 + b, "ci": {{"mean": 0.0}}}},
                "by.mode": {{cfg.mode: 10 * cfg.x + cfg.seed + 0.5 * b}}, "omp": os.environ.get("OMP_NUM_THREADS"),
                "torch_threads": torch.get_num_threads(), "interval": [start, time.time()]}})
    return run.dir


if __name__ == "__main__":
    from alignment.config import run_cli

    run_cli(FakeConfig, main)
'''


def write_entry(directory: Path, module: str, resumable: bool = True) -> None:
    field = 'resume: bool = False  # continue the run `name`' if resumable else ""
    (directory / f"{module}.py").write_text(FAKE_ENTRY.format(resume_field=field))


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """tmp_path as the working directory (children import the fake entry points from it) and on sys.path."""
    write_entry(tmp_path, "fake_entry")
    write_entry(tmp_path, "fake_oneshot", resumable=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in ("fake_entry", "fake_oneshot"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield tmp_path
    for module in ("fake_entry", "fake_oneshot"):
        sys.modules.pop(module, None)


def write_sweep(directory: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def invocations(sweep_dir: Path) -> list[dict]:
    path = sweep_dir / "invocations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


# -- planning and validation -------------------------------------------------------------------------------------


def test_run_names_are_readable_stable_and_distinct():
    assert run_name({"margin": 0.4, "loss": "ipo"}, 1) == "margin=0.4,loss=ipo,seed=1"
    assert run_name({"pad.w": 1.5, "drift.pair_counts": [10, 25]}, 0) == "pad.w=1.5,drift.pair_counts=[10,25],seed=0"
    assert run_name({}, 3) == "seed=3"
    a, b = run_name({"policy": "a/b"}, 0), run_name({"policy": "a_b"}, 0)
    assert "/" not in a and a != b and a == run_name({"policy": "a/b"}, 0)
    assert len(run_name({"k": "x" * 500}, 0)) < 120


def test_plan_crosses_grid_adds_listed_cells_and_resolves_swept_values(fake):
    cfg = SweepConfig(name="p", entry="fake_entry", grid={"x": [1, 2], "mode": ["a", "b"]},
                      overrides=[{"x": 5, "hang": 0.5}], seeds=[0, 1])
    plan = plan_sweep(cfg)
    assert [r.name for r in plan.runs[:5]] == ["x=1,mode=a,seed=0", "x=1,mode=b,seed=0", "x=2,mode=a,seed=0",
                                               "x=2,mode=b,seed=0", "x=5,hang=0.5,seed=0"]
    assert len(plan.runs) == 10 and plan.resumable and plan.axes == ["x", "mode", "hang"]
    assert plan.runs[4].axes == {"x": 5.0, "mode": "a", "hang": 0.5}  # mode from the schema's default
    assert plan.runs[0].args[:2] == ["-m", "fake_entry"]
    assert "name=x=1,mode=a,seed=0" in plan.runs[0].args and "seed=0" in plan.runs[0].args
    assert not (fake / "runs").exists()


@pytest.mark.parametrize("body, expected", [
    ("grid: {mdoe: [a, b]}", "mdoe: unknown key for FakeConfig; did you mean 'mode'? (grid)"),
    ("overrides: [{x: oops}]", "x: expected float, got 'oops' (overrides[0])"),
    ("overrides: [{mode: c}]", "mode: expected one of 'a', 'b', got 'c'"),
    ("overrides: [{seed: 3}]", "seed: set by the sweep"),
    ("overrides: [{x: 1}, {x: 1.0}]", "overrides[1]: the same run as overrides[0]"),
    ("base: nowhere.yaml", "base: file not found: nowhere.yaml"),
    ("entry: no_such_entry", "entry: no module named 'no_such_entry'"),
    ("entry: json", "entry: json.main(cfg) is not annotated with a config dataclass"),
])
def test_bad_sweep_config_exits_2_with_one_line_and_writes_nothing(fake, capsys, body, expected):
    entry = "" if body.startswith("entry:") else "entry: fake_entry\n"
    path = write_sweep(fake, f"name: bad\nseeds: [0, 1]\n{entry}{body}\n")
    with pytest.raises(SystemExit) as info:
        run_cli(SweepConfig, main, [f"config={path}"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    assert not (fake / "runs").exists()


def test_shipped_ablation_configs_validate_against_their_entry_points(tmp_path):
    plans = {}
    for name in ("ablation_apc", "ablation_decoding", "ablation_fspo"):
        path = Path(__file__).resolve().parent.parent / "configs" / f"{name}.yaml"
        header = path.read_text().split("\nname:")[0]
        assert header.startswith("#") and "runtime" in header.lower(), f"{name}: opening comment with its runtime"
        cfg = load_config(SweepConfig, [f"config={path}", f"runs_dir={tmp_path}"])
        plans[name] = plan_sweep(cfg)
        assert cfg.metrics and cfg.name == name
    apc = plans["ablation_apc"]
    assert len(apc.runs) >= 8 and len({r.seed for r in apc.runs}) >= 2
    assert apc.axes == ["samples", "margin", "loss", "rag_k"]
    assert {"pad.w", "pad.top_k", "drift.beta"} <= set(plans["ablation_decoding"].axes)
    assert plans["ablation_fspo"].axes == ["k_max"]
    assert not any(tmp_path.iterdir())


def test_run_state_done_resume_restart(tmp_path):
    run = tmp_path / "r"
    assert run_state(run, True) == "new"
    run.mkdir()
    assert run_state(run, True) == "restart"  # killed before meta.json: nothing to resume
    (run / "meta.json").write_text("{}")
    assert (run_state(run, True), run_state(run, False)) == ("resume", "restart")
    (run / "DONE").write_text("")
    assert run_state(run, False) == "done"


# -- results.json -> table and plots -----------------------------------------------------------------------------


def test_metric_paths_follow_keys_with_dots_and_fill_config_values():
    results = {"rows": {"RAG+APC-DPO": {"oracle": {"mean": 0.25, "lo": 0.1}}}, "by.mode": {"b": 3},
               "differences": {"RAG+APC-DPO - RAG": {"oracle": {"mean": -0.5}}}}
    assert metric_value(results, "rows.RAG+APC-DPO.oracle.mean", {}) == 0.25
    assert metric_value(results, "differences.RAG+APC-DPO - RAG.oracle.mean", {}) == -0.5
    assert metric_value(results, "by.mode.{mode}", {"mode": "b"}) == 3.0
    with pytest.raises(KeyError, match="use rows.RAG\\+APC-DPO.oracle.mean"):
        metric_value(results, "rows.RAG+APC-DPO.oracle", {})
    with pytest.raises(KeyError, match="no 'evaluator' in rows.RAG\\+APC-DPO"):
        metric_value(results, "rows.RAG+APC-DPO.evaluator.mean", {})


def expected_cells(plan, metric: str) -> dict[str, dict]:
    """Straight from the runs' files: per cell, the metric's values across finished seeds and their CI."""
    import yaml

    values: dict[str, list[float]] = {}
    for run in plan.runs:
        directory = plan.sweep_dir / run.name
        if (directory / "DONE").exists():
            results = json.loads((directory / "results.json").read_text())
            mode = yaml.safe_load((directory / "config.yaml").read_text())["mode"]
            value = results["score"]["value"] if metric == "score.value" else results["by.mode"][mode]
            values.setdefault(run.cell, []).append(value)
    return {cell: bootstrap_ci(v, seed=0) for cell, v in values.items()}


def test_table_and_plots_agree_with_results_json(fake):
    import fake_entry

    metrics = ["score.value", "by.mode.{mode}"]
    cfg = SweepConfig(name="agg", entry="fake_entry", grid={"x": [1, 2], "mode": ["a", "b"]},
                      overrides=[{"x": 3, "hang": 0.5}], seeds=[0, 1, 2], metrics=metrics)
    plan = plan_sweep(cfg)
    for run in plan.runs:  # the entry point's own main writes each run, in-process (no hang: just planned)
        fake_entry.main(load_config(fake_entry.FakeConfig, [a for a in run.args[2:] if not a.startswith("hang")]))
    (plan.sweep_dir / "x=2,mode=b,seed=2" / "DONE").unlink()  # one run unfinished: that cell has two seeds
    aggregate(plan, metrics, "agg")

    table = (plan.sweep_dir / "summary.md").read_text().splitlines()
    header = [c.strip() for c in table[4].strip("|").split("|")]
    summary = {row["cell"]: row for row in read_csv(plan.sweep_dir / "summary.csv")}
    for metric in metrics:
        expected = expected_cells(plan, metric)
        assert len(expected) == 5
        for cell, ci in expected.items():
            row = summary[cell]
            got = [float(row[f"{s}({metric})"]) for s in ("mean", "ci_lo", "ci_hi")]
            assert got == pytest.approx([ci["mean"], ci["lo"], ci["hi"]])
            assert int(row[f"n({metric})"]) == ci["n"] == (2 if cell == "x=2,mode=b" else 3)
            line = next(line for line in table if line.startswith(f"| {row['x']} | {row['mode']} | {row['hang']} |"))
            assert [c.strip() for c in line.strip("|").split("|")][header.index(metric)] == format_ci(ci)
        # the plot: every error bar is one cell's mean and interval, at that cell's value of the panel's key
        fig = plot_metric(aggregate(plan, metrics, "agg"), plan.axes, metric)
        by_stats = {tuple(round(ci[k], 9) for k in ("mean", "lo", "hi")): cell for cell, ci in expected.items()}
        for ax, axis, points in zip(fig.axes, plan.axes, (4, 4, 5), strict=True):
            plotted = []
            for container in ax.containers:
                line, _, (bars,) = container.lines
                for (x, y), segment in zip(line.get_xydata(), bars.get_segments(), strict=True):
                    cell = by_stats[(round(y, 9), round(segment[0][1], 9), round(segment[1][1], 9))]
                    if axis != "mode":
                        assert x == next(r.axes[axis] for r in plan.runs if r.cell == cell)
                    plotted.append(cell)
            assert len(plotted) == len(set(plotted)) == points, (axis, plotted)
        png = plan.sweep_dir / "plots" / f"{metric.replace('{', '_').replace('}', '')}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = {row["run"]: row for row in read_csv(plan.sweep_dir / "runs.csv")}
    assert runs["x=2,mode=b,seed=2"]["status"] == "unfinished" and runs["x=2,mode=b,seed=2"]["score.value"] == ""
    assert float(runs["x=3,hang=0.5,seed=2"]["score.value"]) == pytest.approx(2 * 3 + 0.1 * 4)


# -- running: parallel within the budget, skip, resume, crash ----------------------------------------------------


def test_sweep_runs_every_cell_within_the_thread_budget_and_a_rerun_does_nothing(fake, capsys, monkeypatch):
    # the progress bar is checked below: shown even where TQDM_DISABLE is set (tqdm reads it once, at import)
    monkeypatch.setattr(tqdm.auto, "tqdm", functools.partial(tqdm.auto.tqdm, disable=False))
    write_sweep(fake, """\
        name: s
        entry: fake_entry
        grid: {x: [1, 2, 3]}
        metrics: [score.value]
        threads: 2
        threads_per_run: 1
    """)
    sweep_dir = run_cli(SweepConfig, main, ["config=sweep.yaml"])
    names = ["x=1,seed=0", "x=2,seed=0", "x=3,seed=0"]
    assert all((sweep_dir / n / "DONE").exists() for n in names)
    results = [json.loads((sweep_dir / n / "results.json").read_text()) for n in names]
    assert {(r["omp"], r["torch_threads"]) for r in results} == {("1", 1)}
    events = sorted([(r["interval"][0], 1) for r in results] + [(r["interval"][1], -1) for r in results])
    running = [sum(step for _, step in events[: i + 1]) for i in range(len(events))]
    assert max(running) <= 2  # threads=2 // threads_per_run=1 runs at once
    assert "3/3" in capsys.readouterr().err  # one progress bar, counting runs
    summary = {row["cell"]: float(row["mean(score.value)"]) for row in read_csv(sweep_dir / "summary.csv")}
    assert summary == pytest.approx({"x=1": 2.0, "x=2": 4.0, "x=3": 6.0})

    before = invocations(sweep_dir)
    (sweep_dir / "summary.md").unlink()
    assert run_cli(SweepConfig, main, ["config=sweep.yaml"]) == sweep_dir
    assert invocations(sweep_dir) == before and len(before) == 3  # nothing launched
    assert (sweep_dir / "summary.md").exists()  # but the table is written again


def test_a_run_whose_base_config_changed_runs_again_and_the_old_one_is_set_aside(fake):
    (fake / "base.yaml").write_text("mode: a\n")
    write_sweep(fake, """\
        name: c
        entry: fake_entry
        base: base.yaml
        grid: {x: [1, 2]}
        metrics: [score.value]
        threads: 2
    """)
    sweep_dir = run_cli(SweepConfig, main, ["config=sweep.yaml"])
    assert len(invocations(sweep_dir)) == 2
    (fake / "base.yaml").write_text("mode: b\n")  # the experiment changed; the run names did not
    run_cli(SweepConfig, main, ["config=sweep.yaml"])
    assert len(invocations(sweep_dir)) == 4  # both ran again
    summary = {row["cell"]: float(row["mean(score.value)"]) for row in read_csv(sweep_dir / "summary.csv")}
    assert summary == pytest.approx({"x=1": 3.0, "x=2": 5.0})  # mode b adds 1: no finished mode-a run reused
    assert sorted(p.name.split("-")[0] for p in (sweep_dir / "stale").iterdir()) == ["x=1,seed=0", "x=2,seed=0"]
    run_cli(SweepConfig, main, ["config=sweep.yaml"])
    assert len(invocations(sweep_dir)) == 4  # unchanged since: nothing runs


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a killed orphan stays a zombie until init reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="children die with the sweep through prctl")
def test_sweep_killed_midway_then_rerun_completes_only_what_was_missing(fake):
    write_sweep(fake, """\
        name: k
        entry: fake_entry
        overrides: [{x: 1}, {x: 2, hang: 300}, {x: 3}]
        metrics: [score.value]
        threads: 1
    """)
    sweep_dir = fake / "runs" / "k"
    with open(fake / "sweep.log", "w") as log:
        sweep = subprocess.Popen([sys.executable, "-m", "alignment.sweep", "config=sweep.yaml"], stdout=log,
                                 stderr=subprocess.STDOUT)
    try:  # one run at a time: x=1 finishes, x=2 hangs, x=3 has not started
        wait_for(lambda: any(i["run"] == "x=2,hang=300,seed=0" for i in invocations(sweep_dir)), 90, "x=2 to start")
    finally:
        sweep.send_signal(signal.SIGKILL)
        sweep.wait()
    hung = next(i["pid"] for i in invocations(sweep_dir) if i["run"] == "x=2,hang=300,seed=0")
    wait_for(lambda: not alive(hung), 10, "the killed sweep's child to die with it")
    assert (sweep_dir / "x=1,seed=0" / "DONE").exists() and not (sweep_dir / "x=3,seed=0").exists()

    run_cli(SweepConfig, main, ["config=sweep.yaml", "threads=2"])  # the rerun, in this process
    calls = [(i["run"], i["resume"]) for i in invocations(sweep_dir)]
    assert sorted(calls) == sorted([("x=1,seed=0", False), ("x=2,hang=300,seed=0", False),
                                    ("x=2,hang=300,seed=0", True), ("x=3,seed=0", False)])
    assert all((sweep_dir / n / "DONE").exists() for n in ("x=1,seed=0", "x=2,hang=300,seed=0", "x=3,seed=0"))
    assert [row["seeds"] for row in read_csv(sweep_dir / "summary.csv")] == ["1", "1", "1"]


def test_unresumable_leftover_is_restarted_and_a_failed_run_is_reported(fake, capsys):
    cfg = SweepConfig(name="o", entry="fake_oneshot", overrides=[{"x": 1}, {"x": 2, "fail": True}],
                      metrics=["score.value"], threads=2)
    leftover = fake / "runs" / "o" / "x=1,seed=0"
    leftover.mkdir(parents=True)
    (leftover / "meta.json").write_text("{}")
    with pytest.raises(SystemExit) as info:
        main(cfg)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "1 run(s) failed: x=2,fail=true,seed=0" in err
    assert (leftover / "DONE").exists()
    assert [p.name.startswith("x=1,seed=0-") for p in (fake / "runs" / "o" / "incomplete").iterdir()] == [True]
    assert "RuntimeError: asked to fail" in (fake / "runs" / "o" / "logs" / "x=2,fail=true,seed=0.log").read_text()


def test_submitit_local_executor_runs_the_same_sweep(fake):
    pytest.importorskip("submitit")
    cfg = SweepConfig(name="sub", entry="fake_entry", grid={"x": [1, 2]}, metrics=["score.value"], threads=2,
                      launcher="submitit")
    cfg.submitit.cluster = "local"
    sweep_dir = main(cfg)
    assert all((sweep_dir / n / "DONE").exists() for n in ("x=1,seed=0", "x=2,seed=0"))
    assert list((sweep_dir / "submitit").glob("*_result.pkl"))  # went through submitit jobs
    assert {json.loads((sweep_dir / n / "results.json").read_text())["omp"] for n in ("x=1,seed=0", "x=2,seed=0")} \
        == {"1"}
    assert main(cfg) == sweep_dir and len(invocations(sweep_dir)) == 2  # rerun: nothing submitted
    assert os.environ["OMP_NUM_THREADS"] == "1"
