"""Ablation sweeps: one entry point over a grid of config overrides and seeds, ending in one table and plots.

    python -m alignment.sweep config=ablation_apc.yaml                     # APC-DPO ablation, runs/ablation_apc/
    python -m alignment.sweep config=ablation_apc.yaml threads=4 threads_per_run=2
    python -m alignment.sweep config=ablation_apc.yaml launcher=submitit   # the same runs as submitit jobs

A sweep config names an entry point (`entry: alignment.dpo`), its config file (`base: apc.yaml`), the cells to run
and the seeds. Cells are every combination of `grid` (key -> list of values) plus every set listed under
`overrides` (for one-at-a-time ablations and for cells that change the method). Each cell runs once per seed as
its own run, a child process that goes through the entry point's own command line:

    python -m <entry> config=<base> <key>=<value> ... seed=<s> name=<run> runs_dir=runs/<sweep>

The run name is the overrides and the seed, `margin=0.4,seed=1`, so a rerun of the same config finds its runs.
Every key is checked against the entry point's config dataclass (the annotation of its `main(cfg)`) through
`alignment.config.load_config` before anything is written or launched: a typo exits 2 with one line naming it.

Crash safety comes from the run directories (alignment/runs.py): a run with a `DONE` marker is finished and is
skipped; a run directory without one is continued with `resume=true` when the entry point has a `resume` key
(else it is moved to `incomplete/` and started again). So a sweep killed at any point and run again does only what
was missing, and a rerun of a finished sweep launches nothing and only rewrites the table. A run whose resolved
config changed since it ran (its base config edited) is moved to `stale/` and run again. On Linux every child
asks the kernel to kill it when the sweep dies (PR_SET_PDEATHSIG), so a killed sweep leaves no run behind that a
rerun would race with. A file lock refuses a second sweep on the same directory.

Parallelism: at most `threads // threads_per_run` runs at once, each with OMP_NUM_THREADS = `threads_per_run`;
one progress bar counts runs. `launcher=submitit` sends the same commands through submitit (Slurm where `sbatch`
exists, else local processes), with the same cap on jobs in flight. Slurm jobs outlive a killed sweep: let them
end (or scancel them) before running it again.

The sweep links `runs/<sweep>/cache` to `runs/cache`, so its runs reuse the world, SFT policy and discriminators
that `python -m alignment.dpo config=apc.yaml` built instead of rebuilding them once per sweep.

Files in runs/<sweep>/: one directory per run, `logs/<run>.log` (the child's output), `sweep.yaml` (the resolved
sweep config), `plan.json` (every run's overrides, command and config fingerprint), and the table and plots that
alignment/sweep_report.py writes from the runs' results.json (runs.csv, summary.csv, summary.md, plots/).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from alignment.config import MISSING, ConfigError, find_config_file, load_config, run_cli, save_config
from alignment.sweep_report import aggregate, cli_value, dig

log = logging.getLogger(__name__)

SWEEP_KEYS = ("seed", "name", "runs_dir")  # set by the sweep for every run; `resume` too, when it applies
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
POLL_SECONDS = 0.2


@dataclass
class SubmititSettings:
    """How `launcher=submitit` submits (submitit.AutoExecutor)."""

    cluster: Literal["auto", "local", "debug", "slurm"] = "auto"  # auto: Slurm where sbatch exists, else local
    timeout_min: int = 1440  # per run; submitit's local executor kills a job after it (its own default is 2 min)
    parameters: dict[str, Any] = field(default_factory=dict)  # more AutoExecutor parameters: slurm_partition, mem_gb


@dataclass
class SweepConfig:
    """Run an entry point over a grid of config overrides and seeds; aggregate one table and plots."""

    name: str = MISSING  # the sweep: its runs go to <runs_dir>/<name>/<run>/
    entry: str = MISSING  # entry-point module, run as `python -m <entry>`: alignment.dpo, decoding.generate, ...
    base: str | None = None  # the entry point's config file (its config=), looked up like config=
    grid: dict[str, list[Any]] = field(default_factory=dict)  # key -> values; every combination is a cell
    overrides: list[dict[str, Any]] = field(default_factory=list)  # more cells, one set of key: value each
    seeds: list[int] = field(default_factory=lambda: [0])  # every cell runs once per seed
    metrics: list[str] = field(default_factory=list)  # dotted paths into results.json; {key}: the run's config value
    runs_dir: str = "runs"
    launcher: Literal["local", "submitit"] = "local"  # local child processes, or submitit jobs
    threads: int = 0  # CPU threads the whole sweep may use at once; 0 = all cores of this machine
    threads_per_run: int = 1  # OMP_NUM_THREADS of each run; runs at once = threads // threads_per_run
    submitit: SubmititSettings = field(default_factory=SubmititSettings)


# --- planning: cells, run names, validation against the entry point's schema -------------------------------------
@dataclass
class PlannedRun:
    """One (cell, seed): `args` is the entry point's command line after `python` (resume=true is added later)."""

    name: str
    cell: str  # the run name without the seed: runs of one cell differ only in seed
    seed: int
    overrides: dict[str, Any]  # flat dotted keys, as the sweep config gives them
    args: list[str]
    axes: dict[str, Any] = field(default_factory=dict)  # resolved value of every swept key in this run's config
    fingerprint: str = ""  # of the resolved config without name and runs_dir: an edited base config changes it


@dataclass
class Plan:
    entry: str
    resumable: bool  # the entry point has a `resume` key
    sweep_dir: Path
    runs: list[PlannedRun]
    axes: list[str]  # swept keys whose resolved values differ between cells


def flatten(overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{lora: {r: 4}}` -> `{"lora.r": 4}`: one spelling per override (merging either gives the same config)."""
    flat = {}
    for key, value in overrides.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_name(overrides: dict[str, Any], seed: int | None) -> str:
    """`margin=0.4,loss=ipo,seed=1`: readable, and the same for the same overrides on every rerun.

    Characters that do not belong in a directory name become `_`; then, or past 120 characters, an 8-digit hash of
    the exact text keeps names of different cells apart. `seed=None` names the cell.
    """
    parts = [f"{key}={cli_value(value)}" for key, value in overrides.items()]
    text = ",".join(parts + ([] if seed is None else [f"seed={seed}"]))
    safe = re.sub(r"[^A-Za-z0-9_.+\-=,\[\]]", "_", text, flags=re.ASCII)
    if safe != text or len(safe) > 120:
        safe = f"{safe[:100]}~{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return safe or "base"


def cells(cfg: SweepConfig) -> list[tuple[dict[str, Any], str]]:
    """(flat overrides, where they come from) of every cell: the grid's product, then the listed sets."""
    for key, values in cfg.grid.items():
        if not values:
            raise ConfigError(f"grid.{key}: no values")
    found = [(flatten(dict(zip(cfg.grid, combo, strict=True))), "grid") for combo in itertools.product(
        *cfg.grid.values())] if cfg.grid else []
    found += [(flatten(overrides), f"overrides[{i}]") for i, overrides in enumerate(cfg.overrides)]
    return found or [({}, "base")]


def entry_schema(entry: str) -> type:
    """The config dataclass of `entry`: the annotation of its `main(cfg)` (imported, never run)."""
    try:
        found = importlib.util.find_spec(entry) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise ConfigError(f"entry: no module named {entry!r}")
    module = importlib.import_module(entry)
    main = getattr(module, "main", None)
    params = list(inspect.signature(main).parameters.values()) if callable(main) else []
    schema = params[0].annotation if params else None
    if isinstance(schema, str):  # `from __future__ import annotations`: the name of a class of the module
        schema = getattr(module, schema, None)
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        raise ConfigError(f"entry: {entry}.main(cfg) is not annotated with a config dataclass; the sweep needs one")
    missing = [key for key in SWEEP_KEYS if key not in {f.name for f in dataclasses.fields(schema)}]
    if missing:
        raise ConfigError(f"entry: {schema.__name__} of {entry} has no {', '.join(missing)} key; the sweep sets them")
    return schema


def plan_sweep(cfg: SweepConfig) -> Plan:
    """Every run of the sweep, each one's full config loaded through the entry point's schema. Writes nothing.

    Raises ConfigError (one line naming the key) for an unknown key, a wrong type or value, a key the sweep sets
    itself, duplicate cells or seeds, a missing base config, or a thread budget smaller than one run.
    """
    if not cfg.name or "/" in cfg.name or cfg.name in (".", "..", "cache"):
        raise ConfigError(f"name: {cfg.name!r} is not a directory name")
    if not cfg.seeds or len(set(cfg.seeds)) < len(cfg.seeds):
        raise ConfigError(f"seeds: expected distinct seeds, got {cfg.seeds}")
    if cfg.threads_per_run < 1 or cfg.threads_per_run > thread_budget(cfg):
        raise ConfigError(f"threads_per_run: {cfg.threads_per_run} does not fit the budget of {thread_budget(cfg)} "
                          "threads (threads=)")
    if cfg.launcher == "submitit" and importlib.util.find_spec("submitit") is None:
        raise ConfigError("launcher: submitit is not installed; pip install -e '.[sweep]'")
    schema = entry_schema(cfg.entry)
    resumable = "resume" in {f.name for f in dataclasses.fields(schema)}
    try:
        base = [f"config={find_config_file(cfg.base)}"] if cfg.base else []
    except ConfigError as exc:
        raise ConfigError(f"base: {str(exc).removeprefix('config: ')}") from None
    sweep_dir = Path(cfg.runs_dir).absolute() / cfg.name

    ordered, keys = cells(cfg), {}
    for overrides, origin in ordered:
        for key in overrides:
            if key.split(".")[0] in (*SWEEP_KEYS, "resume", "config"):
                raise ConfigError(f"{key}: set by the sweep for every run, not in {origin}; list seeds under `seeds`")
            keys.setdefault(key, None)
    runs, seen = [], {}
    for seed in cfg.seeds:  # seed-major: a sweep stopped early has every cell at its first seeds
        for i, (overrides, origin) in enumerate(ordered):
            name = run_name(overrides, seed)
            items = [f"{key}={cli_value(value)}" for key, value in overrides.items()]
            items += [f"seed={seed}", f"name={name}", f"runs_dir={sweep_dir}"]
            try:
                resolved = dataclasses.asdict(load_config(schema, base + items))
            except ConfigError as exc:
                raise ConfigError(f"{exc} ({origin})") from None
            # Two cells that resolve to one config (x: 1 and x: 1.0) would be one experiment run twice.
            same = json.dumps({**resolved, "name": None, "runs_dir": None}, sort_keys=True, default=str)
            for fingerprint in (same, name):
                if seen.setdefault(fingerprint, (i, origin))[0] != i:
                    raise ConfigError(f"{origin}: the same run as {seen[fingerprint][1]} ({name})")
            runs.append(PlannedRun(name, run_name(overrides, None), seed, overrides, ["-m", cfg.entry, *base, *items],
                                   {key: dig(resolved, key) for key in keys},
                                   hashlib.sha256(same.encode()).hexdigest()[:16]))
    axes = [key for key in keys if len({cli_value(run.axes[key]) for run in runs}) > 1]
    for run in runs:
        run.axes = {key: run.axes[key] for key in axes}
    return Plan(cfg.entry, resumable, sweep_dir, runs, axes)


def thread_budget(cfg: SweepConfig) -> int:
    return cfg.threads or os.cpu_count() or 1


# --- running: skip finished runs, resume unfinished ones, at most N at once ------------------------------------
RunState = Literal["new", "done", "resume", "restart"]


def run_state(directory: Path, resumable: bool) -> RunState:
    """done: DONE marker (Run.finish writes it last); resume: started, and the entry point can continue it;
    restart: started but cannot be continued (no `resume` key, or killed before its meta.json existed)."""
    if (directory / "DONE").is_file():
        return "done"
    if not directory.exists():
        return "new"
    return "resume" if resumable and (directory / "meta.json").is_file() else "restart"


def set_aside_stale(plan: Plan) -> None:
    """Move to stale/ every run whose resolved config changed since the last invocation planned it (its base config
    edited, say), so that it runs again: a finished run of another config must not enter the table. Compares with
    the fingerprints of the previous plan.json; code changes are not seen, only configs."""
    try:
        before = {r["name"]: r.get("fingerprint")
                  for r in json.loads((plan.sweep_dir / "plan.json").read_text())["runs"]}
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return
    for run in plan.runs:
        directory, old = plan.sweep_dir / run.name, before.get(run.name)
        if old and old != run.fingerprint and directory.exists():
            aside = plan.sweep_dir / "stale" / f"{run.name}-{datetime.now():%Y%m%d-%H%M%S-%f}"
            aside.parent.mkdir(exist_ok=True)
            directory.rename(aside)
            log.warning("%s: its config changed since it ran; moved to %s, running it again", run.name, aside)


class Handle(Protocol):
    def poll(self) -> int | None: ...  # exit status once finished, else None

    def stop(self) -> None: ...


def _die_with(parent: int) -> Callable[[], None] | None:
    """preexec_fn: the child gets SIGKILL when the sweep dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG).

    libc is looked up here, in the parent: the child between fork and exec must not import anything."""
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    kill = int(signal.SIGKILL)

    def arm() -> None:
        prctl(1, kill)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the sweep died between fork and prctl
            os._exit(1)

    return arm


def spawn(args: list[str], env: dict[str, str], log_path: str | os.PathLike) -> subprocess.Popen:
    """`python <args>` with `env` on top of this environment, output appended to `log_path`."""
    with open(log_path, "ab") as out:  # the child holds its own descriptor; ours can close
        return subprocess.Popen([sys.executable, *args], env={**os.environ, **env}, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with(os.getpid()) if sys.platform.startswith("linux") else None)


def run_child(args: list[str], env: dict[str, str], log_path: str) -> int:
    """What a submitit job executes: the run's command, to its end; returns its exit status."""
    return spawn(args, env, log_path).wait()


class LocalRun:
    """A run as a child process of the sweep."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.process = spawn(args, env, log_path)

    def poll(self) -> int | None:
        return self.process.poll()

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


class SubmititRun:
    """A run as a submitit job that executes `run_child`."""

    def __init__(self, job: Any):
        self.job = job

    def poll(self) -> int | None:
        if not self.job.done():
            return None
        try:
            return int(self.job.result())
        except Exception as exc:  # the job itself failed (timeout, node failure): the run counts as failed
            log.warning("job %s failed: %s", self.job.job_id, str(exc).strip().splitlines()[-1:])
            return 1

    def stop(self) -> None:
        self.job.cancel(check=False)


def local_launcher(cfg: SweepConfig, sweep_dir: Path) -> Callable[[list[str], dict[str, str], Path], Handle]:
    return LocalRun


def submitit_launcher(cfg: SweepConfig, sweep_dir: Path) -> Callable[[list[str], dict[str, str], Path], Handle]:
    """submitit.AutoExecutor: Slurm jobs with cpus_per_task = threads_per_run, or local processes. Creating it
    writes nothing, so a bad parameter still fails before the sweep starts."""
    import submitit

    try:
        executor = submitit.AutoExecutor(folder=sweep_dir / "submitit",
                                         cluster=None if cfg.submitit.cluster == "auto" else cfg.submitit.cluster)
        executor.update_parameters(name=cfg.name, timeout_min=cfg.submitit.timeout_min,
                                   cpus_per_task=cfg.threads_per_run, **cfg.submitit.parameters)
    except Exception as exc:  # submitit raises ValueError, AssertionError, RuntimeError for bad settings
        raise ConfigError(f"submitit: {str(exc).strip().splitlines()[0]}") from None
    return lambda args, env, log_path: SubmititRun(executor.submit(run_child, args, env, str(log_path)))


LAUNCHERS = {"local": local_launcher, "submitit": submitit_launcher}


def execute(plan: Plan, start: Callable[[list[str], dict[str, str], Path], Handle], slots: int,
            threads_per_run: int, desc: str) -> list[str]:
    """Run every unfinished run, at most `slots` at once, under one progress bar; returns the names that failed."""
    from tqdm.auto import tqdm

    env = {**dict.fromkeys(THREAD_VARIABLES, str(threads_per_run)), "TOKENIZERS_PARALLELISM": "false"}
    todo = []
    for run in plan.runs:
        directory = plan.sweep_dir / run.name
        state = run_state(directory, plan.resumable)
        if state == "restart":
            aside = plan.sweep_dir / "incomplete" / f"{run.name}-{datetime.now():%Y%m%d-%H%M%S-%f}"
            aside.parent.mkdir(exist_ok=True)
            directory.rename(aside)
            log.info("%s: unfinished and not resumable; moved to %s, starting again", run.name, aside)
        if state != "done":
            todo.append((run, state == "resume"))
    running: dict[str, Handle] = {}
    failed: list[str] = []
    bar = tqdm(total=len(plan.runs), initial=len(plan.runs) - len(todo), desc=desc, unit="run", dynamic_ncols=True)
    try:
        while todo or running:
            while todo and len(running) < slots:
                run, resume = todo.pop(0)
                args = run.args + (["resume=true"] if resume else [])
                log_path = plan.sweep_dir / "logs" / f"{run.name}.log"
                with open(log_path, "a") as out:
                    out.write(f"\n=== {datetime.now():%Y-%m-%d %H:%M:%S} python {' '.join(args)}\n")
                running[run.name] = start(args, env, log_path)
            time.sleep(POLL_SECONDS)
            for name, handle in list(running.items()):
                status = handle.poll()
                if status is None:
                    continue
                del running[name]
                if status != 0 or not (plan.sweep_dir / name / "DONE").is_file():
                    failed.append(name)
                    bar.set_postfix(failed=len(failed))
                bar.update(1)
    finally:  # interrupted: stop what runs; their directories resume on the next invocation
        for handle in running.values():
            handle.stop()
        bar.close()
    return failed


# --- entry point -------------------------------------------------------------------------------------------------
def main(cfg: SweepConfig) -> Path:
    from filelock import FileLock, Timeout

    from alignment.files import write_json

    # --- setup: the whole plan is validated (and the launcher built) before anything is written
    try:
        plan = plan_sweep(cfg)
        start = LAUNCHERS[cfg.launcher](cfg, plan.sweep_dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    sweep_dir = plan.sweep_dir
    (sweep_dir / "logs").mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(sweep_dir / ".sweep.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"error: another sweep is running in {sweep_dir}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        shared_cache = sweep_dir.parent / "cache"
        shared_cache.mkdir(exist_ok=True)
        if not (sweep_dir / "cache").is_symlink() and not (sweep_dir / "cache").exists():
            (sweep_dir / "cache").symlink_to(Path("..") / "cache", target_is_directory=True)
        save_config(cfg, sweep_dir / "sweep.yaml")
        set_aside_stale(plan)
        write_json(sweep_dir / "plan.json", {"entry": plan.entry, "axes": plan.axes, "runs": [
            {"name": r.name, "cell": r.cell, "seed": r.seed, "overrides": r.overrides, "command": ["python", *r.args],
             "fingerprint": r.fingerprint} for r in plan.runs]})

        # --- run what is missing
        slots = max(1, thread_budget(cfg) // cfg.threads_per_run)
        log.info("%s: %d runs (%d cells x %d seeds), %d at once with %d thread(s) each", cfg.name, len(plan.runs),
                 len(plan.runs) // len(cfg.seeds), len(cfg.seeds), slots, cfg.threads_per_run)
        try:
            failed = execute(plan, start, slots, cfg.threads_per_run, cfg.name)
        except KeyboardInterrupt:
            print(f"interrupted; rerun the same command to finish {sweep_dir}", file=sys.stderr)
            raise SystemExit(130) from None

        # --- aggregate whatever has finished
        aggregate(plan, cfg.metrics, f"{cfg.name}: {cfg.entry}" + (f" config={cfg.base}" if cfg.base else ""))
    finally:
        lock.release()
    print((sweep_dir / "summary.md").read_text())
    print(f"tables: {sweep_dir}/summary.md, summary.csv, runs.csv; plots: {sweep_dir}/plots/")
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}; logs in {sweep_dir}/logs/; "
              "rerun the same command to resume them", file=sys.stderr)
        raise SystemExit(1)
    return sweep_dir


if __name__ == "__main__":
    run_cli(SweepConfig, main)
