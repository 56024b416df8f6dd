"""alignment.runs: crash-safe writes, run directories, metadata, checkpoints and exact resume."""

import json
import os
import random
import subprocess
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from alignment import runs
from alignment.config import RunExistsError, load_config
from alignment.files import atomic_write_bytes, write_json
from alignment.runs import Run, git_state, seed_everything


@dataclass
class LoopConfig:
    seed: int = 0
    steps: int = 6
    save_every: int = 2
    lr: float = 0.05


def metrics(run: Run) -> list[dict]:
    return [json.loads(line) for line in run.path("metrics.jsonl").read_text().splitlines()]


# -- crash-safe writes -----------------------------------------------------------------------------


def test_serializer_failing_midway_leaves_old_file(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"ok": 1})
    # The encoder streams: '{"a": [1, 2, ' is written to the temp file before object() raises.
    with pytest.raises(TypeError):
        write_json(path, {"a": [1, 2, object()]})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert os.listdir(tmp_path) == ["results.json"]  # temp file removed


def test_crash_before_rename_leaves_old_file(tmp_path, monkeypatch):
    path = tmp_path / "blob.bin"
    atomic_write_bytes(path, b"old")

    def power_cut(fd):
        raise OSError("simulated crash after a partial write")

    monkeypatch.setattr(os, "fsync", power_cut)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["blob.bin"]


def test_seed_everything_repeats_all_three_generators():
    def draws():
        return random.random(), float(np.random.rand()), torch.rand(1).item()

    seed_everything(7)
    first = draws()
    seed_everything(7)
    assert draws() == first
    seed_everything(8)
    assert draws() != first


# -- run directories and metadata ------------------------------------------------------------------


def test_default_name_twice_gives_two_dirs(in_tmp, monkeypatch):
    monkeypatch.setattr(runs, "_timestamp", lambda: "20250102-030405")  # both starts within one second
    a, b = Run.start(LoopConfig(), "sft"), Run.start(LoopConfig(), "sft")
    assert (a.name, b.name) == ("sft-20250102-030405", "sft-20250102-030405-2")
    assert a.dir.parent == b.dir.parent == in_tmp / "runs"
    for run in (a, b):
        assert {"config.yaml", "meta.json"} <= set(os.listdir(run.dir))


def test_existing_name_is_refused_unless_resumed(in_tmp, caplog):
    Run.start(LoopConfig(), "sft", name="exp")
    with pytest.raises(RunExistsError, match="already exists.*pass resume=true to continue it or pick another name"):
        Run.start(LoopConfig(), "sft", name="exp")
    with pytest.raises(FileNotFoundError, match="cannot resume run 'nope'"):
        Run.start(LoopConfig(), "sft", name="nope", resume=True)
    with caplog.at_level("WARNING", logger="alignment.runs"):
        resumed = Run.start(LoopConfig(seed=1), "sft", name="exp", resume=True)
    assert "resuming exp with a changed config: seed" in caplog.text
    assert resumed.resumed and resumed.dir == in_tmp / "runs" / "exp"
    assert len(resumed.meta["resumes"]) == 1 and json.loads(resumed.path("meta.json").read_text())["resumes"]


def test_config_yaml_reloads_equal_and_meta_describes_the_run(in_tmp, monkeypatch):
    monkeypatch.setattr("sys.argv", ["python", "-m", "alignment.sft", "seed=3"])
    cfg = LoopConfig(seed=3, lr=1e-4)
    run = Run.start(cfg, "sft", name="m")
    assert load_config(LoopConfig, [f"config={run.path('config.yaml')}"]) == cfg
    meta = json.loads(run.path("meta.json").read_text())
    assert meta["seed"] == 3 and meta["kind"] == "sft" and meta["argv"][-1] == "seed=3"
    assert torch.__version__.startswith(meta["versions"]["torch"].split("+")[0])
    assert set(meta["versions"]) >= {"python", "torch", "transformers", "trl", "peft", "datasets", "numpy"}
    run.add_meta("pairs_sha256", "abc")
    assert json.loads(run.path("meta.json").read_text())["data"] == {"pairs_sha256": "abc"}


def test_git_sha_matches_the_checkout():
    here = runs.__file__
    try:
        command = ["git", "-C", os.path.dirname(here), "rev-parse", "HEAD"]
        expected = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("code is not in a git checkout here")
    sha, dirty = git_state()
    assert sha == expected and len(sha) == 40 and isinstance(dirty, bool)


def test_git_missing_gives_null(in_tmp, monkeypatch):
    monkeypatch.setenv("PATH", str(in_tmp))  # no git binary on PATH
    assert git_state() == (None, None)
    meta = json.loads(Run.start(LoopConfig(), "sft").path("meta.json").read_text())
    assert meta["git_sha"] is None and meta["git_dirty"] is None


def test_log_appends_numbers_and_finish_marks_done(in_tmp):
    run = Run.start(LoopConfig(), "sft")
    run.log(1, loss=torch.tensor(0.5), acc=np.float32(0.25), note="x")
    run.log(2, loss=0.25)
    assert metrics(run) == [{"step": 1, "loss": 0.5, "acc": 0.25, "note": "x"}, {"step": 2, "loss": 0.25}]
    assert not run.path("DONE").exists()
    run.finish({"win_rate": 0.6})
    assert json.loads(run.path("results.json").read_text()) == {"win_rate": 0.6} and run.path("DONE").is_file()


# -- checkpoints -----------------------------------------------------------------------------------


def test_keeps_last_n_checkpoints_and_points_latest_at_newest(in_tmp):
    run, model = Run.start(LoopConfig(), "sft"), nn.Linear(2, 2)
    for step in range(1, 5):
        run.save_checkpoint(step, model, keep=2)
    assert sorted(os.listdir(run.path("ckpt"))) == ["latest", "step_000003", "step_000004"]
    assert run.path("ckpt/latest").read_text().strip() == "step_000004"
    run.save_checkpoint(5, model, keep=None)
    assert len([p for p in os.listdir(run.path("ckpt")) if p.startswith("step_")]) == 3


def test_no_checkpoint_loads_none(in_tmp):
    assert Run.start(LoopConfig(), "sft").load_checkpoint(nn.Linear(2, 2)) is None


def test_extra_must_be_json_or_generators(in_tmp):
    run = Run.start(LoopConfig(), "sft")
    with pytest.raises(TypeError, match=r"extra\['order'\]: Tensor is not JSON-serializable"):
        run.save_checkpoint(1, nn.Linear(2, 2), extra={"order": torch.arange(3)})
    assert not run.path("ckpt").exists() or not [p for p in os.listdir(run.path("ckpt")) if p != "latest"]


def test_optimizer_state_loads_with_weights_only(in_tmp, monkeypatch):
    run, model = Run.start(LoopConfig(), "sft"), nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    run.save_checkpoint(1, model, optimizer)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw.get("weights_only")) or real_load(*a, **kw))
    fresh = torch.optim.AdamW(model.parameters())
    run.load_checkpoint(model, fresh)
    assert calls == [True]
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state[model.weight]["exp_avg"])


@pytest.mark.parametrize("tied", [False, True])
def test_hf_model_checkpoint_round_trip(in_tmp, tiny_tokenizer, tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    run = Run.start(LoopConfig(), "sft")
    run.save_checkpoint(3, model, tokenizer=tiny_tokenizer)
    assert (run.path("ckpt/step_000003/model") / "tokenizer.json").is_file()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert run.load_checkpoint(model) == {"step": 3}
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


def test_lora_checkpoint_restores_adapter(in_tmp, tiny_tokenizer, tiny_model_config):
    from alignment.config import LoraConfig
    from alignment.models import load_causal_lm

    tiny_model_config.lora = LoraConfig(r=2)
    model = load_causal_lm(tiny_model_config, tiny_tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    run = Run.start(LoopConfig(), "sft")
    run.save_checkpoint(1, model)
    assert (run.path("ckpt/step_000001/model") / "adapter_model.safetensors").is_file()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.zero_()
    run.load_checkpoint(model)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


# -- resume reproduces the uninterrupted trajectory ------------------------------------------------


class Crash(Exception):
    pass


def train(run: Run, cfg: LoopConfig, crash_after: int | None = None) -> nn.Module:
    """AdamW + LambdaLR on a dropout MLP; batches drawn by a seeded generator; python/numpy noise in the loss.

    Every RNG the loop touches (torch global: init and dropout; the data generator; python; numpy)
    changes the losses, so a resume that forgot any of them would not match.
    """
    seed_everything(cfg.seed)
    data = torch.Generator().manual_seed(1234)
    x = torch.randn(32, 4, generator=data)
    y = x.sum(dim=1, keepdim=True)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))
    state = run.load_checkpoint(model, optimizer, scheduler, generators={"data": data}) or {"step": 0, "epoch": 0}
    assert state.get("data", data) is data  # restored in place
    model.train()
    for step in range(state["step"] + 1, cfg.steps + 1):
        idx = torch.randint(0, 32, (8,), generator=data)
        noise = 0.01 * random.random() + 0.01 * float(np.random.rand())
        loss = nn.functional.mse_loss(model(x[idx]), y[idx]) + noise
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        run.log(step, loss=loss)
        if step == crash_after:
            raise Crash
        if step % cfg.save_every == 0:
            run.save_checkpoint(step, model, optimizer, scheduler, extra={"data": data, "epoch": state["epoch"]})
    return model


def test_resume_reproduces_uninterrupted_run(in_tmp):
    cfg = LoopConfig()
    full = Run.start(cfg, "sft", name="full")
    reference = train(full, cfg)

    crashed = Run.start(cfg, "sft", name="crashy")
    with pytest.raises(Crash):
        train(crashed, cfg, crash_after=5)  # checkpoints at 2 and 4; step 5 logged, then lost
    with open(crashed.path("metrics.jsonl"), "a") as f:
        f.write('{"step": 6, "lo')  # and a torn line from the moment of the crash
    resumed_run = Run.start(cfg, "sft", name="crashy", resume=True)
    resumed = train(resumed_run, cfg)

    expected, got = metrics(full), metrics(resumed_run)
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5, 6]
    assert all(abs(a["loss"] - b["loss"]) <= 1e-6 for a, b in zip(expected, got, strict=True))
    final = zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in final)


def test_resume_without_rng_restore_diverges(in_tmp, monkeypatch):
    """Negative control: the trajectory test above can fail; skipping the RNG restore changes step 5."""
    cfg = LoopConfig()
    full = Run.start(cfg, "sft", name="full")
    train(full, cfg)
    crashed = Run.start(cfg, "sft", name="crashy")
    with pytest.raises(Crash):
        train(crashed, cfg, crash_after=4)
    monkeypatch.setattr(runs, "_set_rng_state", lambda *args: None)
    resumed_run = Run.start(cfg, "sft", name="crashy", resume=True)
    train(resumed_run, cfg)
    assert abs(metrics(full)[4]["loss"] - metrics(resumed_run)[4]["loss"]) > 1e-6


def test_cached_tensor_is_computed_once_and_again_when_its_inputs_change(in_tmp, caplog):
    run = Run.start(LoopConfig(), "t")
    calls = []

    def compute(value):
        calls.append(value)
        return torch.full((3, 2), float(value))

    first = run.cached_tensor("ref.safetensors", {"length_averaged": False}, lambda: compute(1))
    again = run.cached_tensor("ref.safetensors", {"length_averaged": False}, lambda: compute(2))
    assert calls == [1] and torch.equal(first, again)  # read back, not recomputed
    with caplog.at_level("WARNING", logger="alignment.runs"):
        changed = run.cached_tensor("ref.safetensors", {"length_averaged": True}, lambda: compute(3))
    assert calls == [1, 3] and changed[0, 0] == 3.0 and "computed for another config" in caplog.text


def test_cached_tensor_left_truncated_is_computed_again(in_tmp, caplog):
    run = Run.start(LoopConfig(), "t")
    run.cached_tensor("ref.safetensors", {"k": 1}, lambda: torch.ones(4))
    data = run.path("ref.safetensors").read_bytes()
    run.path("ref.safetensors").write_bytes(data[: len(data) // 2])  # what an in-place write killed mid-way leaves
    with caplog.at_level("WARNING", logger="alignment.runs"):
        value = run.cached_tensor("ref.safetensors", {"k": 1}, lambda: torch.zeros(4))
    assert torch.equal(value, torch.zeros(4)) and "does not load" in caplog.text
    assert torch.equal(run.cached_tensor("ref.safetensors", {"k": 1}, lambda: torch.ones(4)), torch.zeros(4))


def test_stages_add_up_their_wall_time_even_when_a_block_fails(in_tmp, monkeypatch):
    clock = iter([0.0, 2.0, 10.0, 13.5, 20.0, 21.0])  # three blocks of 2, 3.5 and 1 seconds
    monkeypatch.setattr(runs.time, "perf_counter", lambda: next(clock))
    run = Run.start(LoopConfig(), "timed")
    with run.stage("sft"):
        pass
    with pytest.raises(RuntimeError), run.stage("dpo"):
        raise RuntimeError("a crash still counts its time")
    with run.stage("sft"):
        pass
    assert run.timings == {"sft": 3.0, "dpo": 3.5}
    assert run.timings_line() == "time: sft 3s, dpo 4s; total 6s"
    with runs.timed(None, "nothing"):  # library calls without a run time nothing
        pass
