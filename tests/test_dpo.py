"""APC-DPO entry point: smoke run on a tiny world, pairs contract, and SIGKILL + resume reproducing the trajectory."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from alignment.dpo import DPOConfig, main
from alignment.policy import SFTConfig
from alignment.world import WorldSpec
from rewards.discriminators import DiscriminatorConfig

SMALL = WorldSpec(seed=5, characters=24, users=[4, 2, 2], train_pairs=2, context_pairs=2, target_pairs=2,
                  dialogues=400)


def tiny_config(runs_dir: Path, **kw) -> DPOConfig:
    return DPOConfig(
        runs_dir=str(runs_dir), world=SMALL,
        sft=SFTConfig(steps=40, batch_size=16, eval_samples=8, checkpoint_every=40, log_every=10),
        disc=DiscriminatorConfig(relevance_steps=20, nli_steps=20, train_examples=64, eval_examples=16,
                                 val_examples=16, natural_responses=16, seed_tries=1),
        train_queries=24, samples=4, margin=0.0, max_new_tokens=24, epochs=1, batch_size=4, eval_queries=16,
        checkpoint_every=2, log_every=1, **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("dpo") / "runs"


@pytest.mark.slow
def test_apc_dpo_runs_end_to_end_and_moves_the_policy(runs):
    run_dir = main(tiny_config(runs, name="smoke"))
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["rows"]) == {"Vanilla", "LCM", "RAG", "RAG+APC-DPO"}
    for row in results["rows"].values():
        assert row["oracle"]["lo"] <= row["oracle"]["mean"] <= row["oracle"]["hi"]
    assert "RAG+APC-DPO - RAG" in results["differences"]
    # where the time went, stage by stage, this invocation building every prerequisite
    stages = results["timings"]["seconds"]
    assert list(stages) == ["world", "sft", "discriminators", "sampling", "apc", "dpo", "evaluation"]
    assert all(seconds >= 0 for seconds in stages.values()) and stages["sft"] > 0 and not results["timings"]["resumed"]
    table = (run_dir / "results.md").read_text()
    # The tiny test policy writes almost no valid world sentence: the table says it is void first when it is.
    void = max(row["valid"] for row in results["rows"].values()) < 0.05
    assert table.startswith("**the APC table is void") if void else table.startswith("ΔAPC on")
    assert "ΔAPC on" in table and ("void" in results) == void
    pairs = [json.loads(line) for line in (run_dir / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    # votes of APC eq. 9: w12 - w21 equals the ΔAPC gap of the pair
    for p in pairs:
        assert p["votes"][0] - p["votes"][1] == pytest.approx(p["chosen_reward"] - p["rejected_reward"], abs=1e-4)
    # every trainable parameter moved away from the starting policy
    from safetensors.torch import load_file

    meta = json.loads((run_dir / "meta.json").read_text())
    base = load_file(str(Path(meta["data"]["policy"]) / "model.safetensors"))
    trained = load_file(str(run_dir / "ckpt" / (run_dir / "ckpt" / "latest").read_text().strip() / "model"
                            / "model.safetensors"))
    changed = [k for k in base if not torch.equal(base[k], trained[k])]
    assert len(changed) == len(base)


@pytest.mark.slow
def test_apc_weighted_loss_trains(runs):
    run_dir = main(tiny_config(runs, name="weighted", loss="apc_weighted"))
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_oracle_judge_ranks_pairs_by_the_true_apc(monkeypatch, tmp_path):
    """`reward=oracle`: build_pairs ranks the samples by the world's true ΔAPC (here four scripted samples per query:
    the true answer, chit-chat, a contradiction of another statement, a non-sentence)."""
    from alignment import language as lang
    from alignment import people, sampling
    from alignment.dpo import build_pairs, select_queries
    from alignment.world import load_world, world_artifact
    from rewards.apc_eval import OracleAPCScorer, oracle_apc

    world = load_world(world_artifact(SMALL, tmp_path))
    cfg = replace(tiny_config(tmp_path), train_queries=6, margin=0.5)
    queries = select_queries(world, cfg.characters, "train", cfg.train_queries, cfg.seed, with_off_topic=True)
    style = people.sample_style(np.random.default_rng(0))
    scripted = []
    for q, c in queries:  # an off-topic query (slot None) is answered with a true fact: ΔAPC 0
        answer = next(s for s in c["statements"] if s["slot"] == q["slot"] or q["slot"] is None)
        other = next(s for s in c["statements"] if s["slot"] not in (q["slot"], answer["slot"]))
        wrong = next(v for v in lang.slot_values(other["slot"]) if v != other["value"])
        scripted.append([lang.render_response((answer["slot"], answer["value"]), 0, style),
                         lang.render_response(None, 0, style),
                         lang.render_response((other["slot"], wrong), 0, style), "lyon in live i ."])
    monkeypatch.setattr(sampling, "sample_responses", lambda model, tok, prompts, **kw: scripted[:len(prompts)])
    oracle = OracleAPCScorer()
    pairs = build_pairs(cfg, world, None, None, oracle, oracle)
    assert len(pairs) == len(queries)
    for p, (q, c), samples in zip(pairs, queries, scripted, strict=True):
        assert (p["chosen"], p["rejected"]) == (samples[0], samples[2])  # the answer against the contradiction
        assert p["chosen_reward"] == oracle_apc(c, q["slot"], p["chosen"])[1] == (q["slot"] is not None)
        assert p["rejected_reward"] == oracle_apc(c, q["slot"], p["rejected"])[1] == -1.0


@pytest.mark.slow
def test_sigkill_then_resume_matches_the_uninterrupted_run(runs, tmp_path):
    """Kill a run with SIGKILL mid-training; `resume=true` continues from its last checkpoint (not step 0) and logs
    the same training loss as an uninterrupted run at every step, to 1e-4."""
    cfg = replace(tiny_config(runs), epochs=12)  # ~36 steps, so the kill lands mid-training
    # Both runs sample their pairs in a subprocess with the same thread count, so they sample the same pairs.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "alignment.dpo", f"runs_dir={runs}"] + overrides(cfg)
    subprocess.run(command + ["name=uninterrupted"], check=True, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    reference = runs / "uninterrupted"
    expected = {m["step"]: m["loss"] for m in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines())
                if "loss" in m}

    proc = subprocess.Popen(command + ["name=killed"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=tmp_path, env=env)
    metrics = runs / "killed" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (metrics.exists() and logged_steps(metrics) >= 10):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (runs / "killed" / "DONE").exists(), "the run finished before it could be killed"
    killed_at = logged_steps(metrics)

    assert (runs / "killed" / "pairs.jsonl").read_text() == (reference / "pairs.jsonl").read_text()
    resumed = main(replace(cfg, name="killed", resume=True))
    got = {m["step"]: m["loss"] for m in map(json.loads, (resumed / "metrics.jsonl").read_text().splitlines())
           if "loss" in m}
    assert got.keys() == expected.keys()
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-4), step
    meta = json.loads((resumed / "meta.json").read_text())
    assert meta["resumes"] and killed_at < max(expected)


# The dpo entry point with the reference-cache write stopped halfway: half the bytes in the temporary file, a marker
# file, then a wait for SIGKILL, so the test kills the process inside the write window every time.
KILLED_MID_WRITE = """
import os, sys, time
from alignment import dpo, files, runs
from alignment.config import run_cli

write = runs.atomic_write_bytes

def halfway(path, data):
    if str(path).endswith("ref_logps.safetensors"):
        with files._atomic_open(path, "wb") as f:
            f.write(data[:len(data) // 2])
            f.flush()
            open(os.environ["MARKER"], "w").close()
            time.sleep(600)
    return write(path, data)

runs.atomic_write_bytes = halfway
sys.argv = ["alignment.dpo", *sys.argv[1:]]
run_cli(dpo.DPOConfig, dpo.main)
"""


@pytest.mark.slow
def test_sigkill_during_the_reference_cache_write_then_resume_recomputes_it(runs, tmp_path):
    """A kill while ref_logps.safetensors is being written leaves no file under its name (only the temporary one),
    so `resume=true` computes the reference log-probs again and finishes; the cache it writes loads."""
    from safetensors import safe_open

    cfg = tiny_config(runs)
    marker = tmp_path / "writing"
    command = [sys.executable, "-c", KILLED_MID_WRITE, f"runs_dir={runs}", "name=killed-mid-write"] + overrides(cfg)
    proc = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "MARKER": str(marker)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = runs / "killed-mid-write"
    assert marker.exists(), "the run never reached the reference-cache write"
    assert not (run_dir / "ref_logps.safetensors").exists()
    assert [p.name for p in run_dir.glob(".ref_logps.safetensors.*.tmp")]  # the half-written temporary file

    resumed = main(replace(cfg, name="killed-mid-write", resume=True))
    assert (resumed / "DONE").exists()
    pairs = (resumed / "pairs.jsonl").read_text().splitlines()
    with safe_open(str(resumed / "ref_logps.safetensors"), "pt") as f:
        ref = f.get_tensor("value")
    assert ref.shape == (len(pairs), 2) and torch.isfinite(ref).all()
    assert not list(resumed.glob(".*.tmp"))  # resume removed the interrupted write


def logged_steps(path: Path) -> int:
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return max(steps, default=0)


def overrides(cfg: DPOConfig) -> list[str]:
    """The command-line form of the tiny config (what differs from the defaults)."""
    from alignment.config import to_yaml

    path = Path(cfg.runs_dir).parent / "tiny.yaml"
    path.write_text(to_yaml(replace(cfg, name=None, runs_dir=cfg.runs_dir)))
    return [f"config={path}"]
