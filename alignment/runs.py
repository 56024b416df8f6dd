"""Self-describing, resumable run directories (crash-safe writes come from `alignment.files`).

Every entry point writes only under `runs/<name>/`:

    config.yaml      the resolved config; `config=runs/<name>/config.yaml` reproduces the run
    meta.json        git SHA + dirty flag, package versions, seed, host, start time, argv, `data` hashes,
                     `model_sources` (provenance of packaged pretrained models: package, version, sha256)
    metrics.jsonl    one JSON object per `run.log(step, ...)` call: {"step": 12, "loss": 0.69, ...}
    ckpt/step_000012/  model/ (safetensors), optimizer.pt, scheduler.pt, rng.safetensors, state.json
    ckpt/latest      the name of the newest complete checkpoint directory
    results.json     what `run.finish(results)` was given
    DONE             written last, so sweeps can tell finished runs from crashed ones

Typical use inside `main(cfg)`:

    run = Run.start(cfg, "sft", name=cfg.run_name, resume=cfg.resume)
    state = run.load_checkpoint(model, optimizer, scheduler) or {"step": 0}
    for step in range(state["step"] + 1, cfg.max_steps + 1):
        ...
        run.log(step, loss=loss.item())
        if step % cfg.save_every == 0:
            run.save_checkpoint(step, model, optimizer, scheduler, extra={"data": data_generator})
    run.finish({"final_loss": loss.item()})

Resuming replays the exact trajectory of an uninterrupted run: weights, optimizer and scheduler state,
the python/numpy/torch RNG states and any `torch.Generator` given in `extra` are restored, and metric
lines logged after the restored checkpoint are dropped (tests/test_runs.py checks losses to 1e-6).

Nothing here unpickles: weights and RNG states are safetensors, the rest JSON, and optimizer/scheduler
state dicts (nested dicts of tensors and numbers) go through `torch.save` and come back only through
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save, save_file, save_model

from alignment.config import RunExistsError, save_config, to_yaml
from alignment.files import atomic_replace_dir, atomic_write_bytes, atomic_write_text, write_json
from alignment.model_sources import named_sources

log = logging.getLogger(__name__)

# Packages whose versions go into meta.json; read from installed metadata, so trl's ~10 s import is not paid.
TRACKED_PACKAGES = ("torch", "transformers", "tokenizers", "trl", "peft", "datasets", "accelerate", "numpy")
CKPT_PATTERN = re.compile(r"^step_(\d+)$")


def seed_everything(seed: int) -> None:
    """Seed python `random`, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds all CUDA devices


# --------------------------------------------------------------------------------------------------
# Run metadata


def timed(run: Run | None, name: str):
    """`run.stage(name)`, or a block that times nothing when there is no run (library calls, tests)."""
    return run.stage(name) if run is not None else contextlib.nullcontext()


def git_state(where: Path | None = None) -> tuple[str | None, bool | None]:
    """(HEAD sha, dirty) of the checkout holding this code; (None, None) without git or outside a checkout."""
    where = where or Path(__file__).resolve().parent
    try:
        return _git(where, "rev-parse", "HEAD").strip(), bool(_git(where, "status", "--porcelain").strip())
    except (OSError, subprocess.SubprocessError):  # no git binary, not a checkout, or a hung filesystem
        return None, None


def _git(where: Path, *args: str) -> str:
    command = ["git", "-C", str(where), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=20, check=True).stdout


def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _timestamp() -> str:
    return f"{datetime.now():%Y%m%d-%H%M%S}"


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _invocation() -> dict[str, Any]:
    sha, dirty = git_state()
    return {"time": _now(), "argv": sys.argv[:], "git_sha": sha, "git_dirty": dirty, "hostname": socket.gethostname()}


# --------------------------------------------------------------------------------------------------
# RNG and optimizer state


def _rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON part: python + numpy states, tensor part: torch CPU + CUDA states)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    json_part = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return json_part, tensors


def _set_rng_state(json_part: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = json_part["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = json_part["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    elif cuda:
        log.warning("checkpoint has %d CUDA RNG states but %d devices are visible: CUDA RNG not restored",
                    len(cuda), torch.cuda.device_count() if torch.cuda.is_available() else 0)


def _split_extra(extra: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Generator]]:
    """Split `extra` into its JSON values and its torch.Generators; name the key that is neither."""
    values, generators = {}, {}
    for key, value in extra.items():
        if isinstance(value, torch.Generator):
            generators[key] = value
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"extra[{key!r}]: {type(value).__name__} is not JSON-serializable; "
                "pass numbers, strings, lists, dicts or a torch.Generator"
            ) from None
        values[key] = value
    return values, generators


# --------------------------------------------------------------------------------------------------
# Model weights


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "base_model")


def _save_weights(model: torch.nn.Module, directory: Path, tokenizer: Any = None) -> None:
    if hasattr(model, "save_pretrained"):
        # transformers 5 always writes safetensors; PEFT defaults to safe_serialization=True and saves the adapter.
        model.save_pretrained(directory)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        save_model(model, str(directory / "model.safetensors"))  # de-duplicates shared tensors
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def _load_weights(model: torch.nn.Module, directory: Path) -> None:
    if _is_peft(model):
        from peft import set_peft_model_state_dict

        for adapter in model.peft_config:  # PEFT writes the default adapter at the root, others in subfolders
            state = load_file(str(directory / ("" if adapter == "default" else adapter) / "adapter_model.safetensors"))
            result = set_peft_model_state_dict(model, state, adapter_name=adapter)
            if result.unexpected_keys:
                raise ValueError(f"{directory}: adapter weights not in the model: {result.unexpected_keys[:3]}")
        return
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights (lm_head = embed_tokens) are stored once: a missing key is fine iff it shares storage
    # with a loaded one.
    current = model.state_dict()
    loaded = {current[k].data_ptr() for k in state if k in current}
    missing = [k for k in missing if current[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise ValueError(f"{directory}: weights do not fit the model: missing {missing[:3]}, extra {unexpected[:3]}")


# --------------------------------------------------------------------------------------------------
# The run


class Run:
    """One directory under `runs/`; create with `Run.start`."""

    def __init__(self, directory: Path, cfg: Any, meta: dict[str, Any], resumed: bool):
        self.dir, self.cfg, self.meta, self.resumed = Path(directory), cfg, meta, resumed
        self.name = self.dir.name
        self.timings: dict[str, float] = {}  # stage -> wall seconds in this invocation (`stage`)

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r}{', resumed' if self.resumed else ''})"

    @classmethod
    def start(
        cls,
        cfg: Any,
        kind: str,
        *,
        runs_dir: str | os.PathLike = "runs",
        name: str | None = None,
        resume: bool = False,
    ) -> Run:
        """Create `runs_dir/<name>` (default `<kind>-<YYYYmmdd-HHMMSS>`), or reopen it with `resume=True`.

        Writes `config.yaml` (the resolved `cfg`) and `meta.json`. An explicit `name` that exists is
        refused unless `resume=True`; `resume=True` needs an existing `name`.
        """
        runs_dir = Path(runs_dir).absolute()  # stays valid if the caller changes directory later
        if resume and not name:
            raise ValueError("resume=true needs the name of the run to resume (name=<run name>)")
        if name is not None and (not name or name in (".", "..") or "/" in name or os.sep in name):
            raise ValueError(f"run name {name!r}: expected one directory name, without '/'")
        if resume:
            return cls._reopen(cfg, runs_dir / name)
        sources = named_sources(cfg)  # first: a missing model package fails before a directory is claimed
        directory = _claim_dir(runs_dir, name or f"{kind}-{_timestamp()}", suffix=name is None)
        meta = {
            "name": directory.name, "kind": kind, "seed": getattr(cfg, "seed", None),
            **_invocation(), "versions": _package_versions(), "data": {}, "resumes": [],
            "model_sources": sources,
        }
        run = cls(directory, cfg, meta, resumed=False)
        save_config(cfg, run.path("config.yaml"))
        write_json(run.path("meta.json"), meta)
        log.info("run: %s", directory)
        return run

    @classmethod
    def _reopen(cls, cfg: Any, directory: Path) -> Run:
        if not (directory / "meta.json").is_file():
            raise FileNotFoundError(f"cannot resume run {directory.name!r}: {directory}/meta.json does not exist")
        meta = json.loads((directory / "meta.json").read_text())
        meta.setdefault("resumes", []).append(_invocation())
        run = cls(directory, cfg, meta, resumed=True)
        for stale in directory.glob(".*.tmp"):  # a write the crash interrupted (`_atomic_open`): never renamed
            log.info("resume: removing %s, a write that did not finish", stale.name)
            stale.unlink()
        changed = _changed_keys(run.path("config.yaml"), cfg)
        if changed:
            log.warning("resuming %s with a changed config: %s", directory.name, ", ".join(changed))
        save_config(cfg, run.path("config.yaml"))  # the config of the latest invocation is the one that finishes
        write_json(run.path("meta.json"), meta)
        log.info("run: %s (resumed)", directory)
        return run

    def path(self, name: str) -> Path:
        """A file or folder inside the run directory."""
        return self.dir / name

    def cached_tensor(self, name: str, fingerprint: dict[str, Any], compute: Any) -> torch.Tensor:
        """`compute()` run once per run and kept as the file `name` (safetensors, written atomically), e.g. the
        reference log-probs. `fingerprint` (JSON values) names what the tensor depends on: a file with another
        fingerprint (resume=true after a config change, say loss sigmoid -> ipo, whose reference log-probs are
        length-averaged) or one that does not load (a write killed by an older version) is computed again, with
        one log line saying why."""
        path, stamp = self.path(name), json.dumps(fingerprint, sort_keys=True)
        if path.exists():
            try:
                with safe_open(str(path), "pt") as f:
                    if (f.metadata() or {}).get("fingerprint") == stamp:
                        return f.get_tensor("value")
                why = f"it was computed for another config ({stamp} now)"
            except (SafetensorError, OSError) as exc:
                why = f"it does not load: {exc}"
            log.warning("%s: computing it again, %s", name, why)
        value = compute()
        atomic_write_bytes(path, save({"value": value.contiguous()}, metadata={"fingerprint": stamp}))
        return value

    @contextlib.contextmanager
    def stage(self, name: str):
        """Time a block as stage `name` (wall seconds, added up over repeated entries) into `self.timings`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def timings_line(self) -> str:
        """'time: world 7s, sft 276s, ...; total 900s' for the stages timed so far."""
        parts = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in self.timings.items())
        return f"time: {parts}; total {sum(self.timings.values()):.0f}s"

    def add_meta(self, key: str, value: Any) -> None:
        """Record e.g. an input hash under meta.json's `data` dict (rewritten atomically)."""
        self.meta["data"][key] = value
        write_json(self.path("meta.json"), self.meta)

    def log(self, step: int, **metrics: Any) -> None:
        """Append `{"step": step, **metrics}` as one line of metrics.jsonl; tensors/numpy scalars become numbers."""
        record = {"step": int(step), **{k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}}
        # Opened per call: closing flushes each line, so a crash loses at most the line being written.
        with open(self.path("metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # -- checkpoints --------------------------------------------------------------------------------

    def save_checkpoint(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        extra: dict[str, Any] | None = None,
        *,
        keep: int | None = 2,
        tokenizer: Any = None,
    ) -> Path:
        """Write `ckpt/step_{step:06d}/` atomically, point `ckpt/latest` at it, keep the newest `keep` (None: all).

        `extra`: JSON values (e.g. data epoch/position) and `torch.Generator`s (their states are saved).
        `tokenizer`, if given, is saved beside the weights so `ckpt/step_*/model` loads as a HF model.
        """
        values, generators = _split_extra(extra or {})
        ckpt_dir = self.path("ckpt")
        ckpt_dir.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:06d}.tmp-", dir=ckpt_dir))
        try:
            _save_weights(model, tmp / "model", tokenizer)
            if optimizer is not None:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            if scheduler is not None:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            rng_json, rng_tensors = _rng_state()
            rng_tensors.update({f"generator.{k}": g.get_state() for k, g in generators.items()})
            save_file(rng_tensors, str(tmp / "rng.safetensors"))
            devices = {k: str(g.device) for k, g in generators.items()}
            write_json(tmp / "state.json", {"step": step, "extra": values, "generators": devices, "rng": rng_json})
            final = ckpt_dir / f"step_{step:06d}"
            atomic_replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(ckpt_dir / "latest", final.name + "\n")
        if keep is not None:
            for old in self._checkpoints()[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def _checkpoints(self) -> list[Path]:
        """Complete checkpoint directories, oldest first (temp ones are dot-prefixed and never match)."""
        ckpt_dir = self.path("ckpt")
        found = [p for p in ckpt_dir.iterdir() if CKPT_PATTERN.match(p.name)] if ckpt_dir.is_dir() else []
        return sorted(found, key=lambda p: int(CKPT_PATTERN.match(p.name).group(1)))

    def latest_checkpoint(self) -> Path | None:
        """The directory `ckpt/latest` names, else the highest-step one (a crash between rename and pointer)."""
        pointer = self.path("ckpt") / "latest"
        if pointer.is_file():
            target = self.path("ckpt") / pointer.read_text().strip()
            if target.is_dir():
                return target
        found = self._checkpoints()
        return found[-1] if found else None

    def load_checkpoint(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        *,
        generators: dict[str, torch.Generator] | None = None,
    ) -> dict[str, Any] | None:
        """Load the latest checkpoint into the given objects and restore RNG states.

        Returns `{**extra, "step": step}`, where each saved generator key holds a `torch.Generator` with its
        saved state (the one passed in `generators` under that key, restored in place, else a new one);
        None if there is no checkpoint. On a resumed run, metrics lines after `step` are dropped first.
        """
        directory = self.latest_checkpoint()
        if self.resumed:
            self._truncate_metrics(None if directory is None else _step_of(directory))
        if directory is None:
            return None
        state = json.loads((directory / "state.json").read_text())
        _load_weights(model, directory / "model")
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True, map_location="cpu"))
        if scheduler is not None:
            scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True, map_location="cpu"))
        tensors = load_file(str(directory / "rng.safetensors"))
        _set_rng_state(state["rng"], tensors)
        restored = {}
        for key, device in state["generators"].items():
            generator = (generators or {}).get(key) or torch.Generator(device=device)
            generator.set_state(tensors[f"generator.{key}"])
            restored[key] = generator
        log.info("resumed from %s", directory)
        return {**state["extra"], **restored, "step": state["step"]}

    def _truncate_metrics(self, step: int | None) -> None:
        """Keep the metrics lines with step <= `step` (None: none); a torn last line from a crash goes too."""
        path = self.path("metrics.jsonl")
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if step is not None and json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        atomic_write_text(path, "".join(kept))

    def finish(self, results: dict[str, Any] | None = None) -> None:
        """Write `results.json` (if given), then the `DONE` marker, last."""
        if results is not None:
            write_json(self.path("results.json"), results)
        self.meta["end_time"] = _now()
        self.meta["model_sources"] = named_sources(self.cfg)  # and any resolved since the start
        write_json(self.path("meta.json"), self.meta)
        atomic_write_text(self.path("DONE"), self.meta["end_time"] + "\n")


def _changed_keys(old_yaml: Path, cfg: Any) -> list[str]:
    """Dotted keys whose values differ between a saved config.yaml and `cfg`."""
    if not old_yaml.is_file():
        return []

    def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(tree, dict):
            return {prefix: tree}
        return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}.").items()}

    old, new = flat(yaml.safe_load(old_yaml.read_text()) or {}), flat(yaml.safe_load(to_yaml(cfg)) or {})
    return sorted(key.rstrip(".") for key in old.keys() | new.keys() if old.get(key) != new.get(key))


def _step_of(checkpoint: Path) -> int:
    return int(CKPT_PATTERN.match(checkpoint.name).group(1))


def _claim_dir(runs_dir: Path, name: str, suffix: bool) -> Path:
    """mkdir `runs_dir/name` (atomic, so two processes never share it); if taken, `name-2`, `name-3`, ..."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        candidate = runs_dir / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            if not suffix:
                raise RunExistsError(
                    f"run {name!r} already exists in {runs_dir}; pass resume=true to continue it or pick another name"
                ) from None
    raise RunExistsError(f"{runs_dir}: 999 runs named {name!r}-*; pick a name")
