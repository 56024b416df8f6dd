"""alignment.config: precedence, one-line errors, help, lookup, round trip, hashing, run_cli."""

import hashlib
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Literal

import pytest

from alignment import config as config_module
from alignment.config import (
    MISSING,
    ConfigError,
    LoraConfig,
    ModelConfig,
    config_hash,
    config_help,
    load_config,
    run_cli,
    save_config,
    to_yaml,
)


@dataclass
class TrainConfig:
    """Train a thing on the tiny world."""

    output_dir: str = MISSING  # where the run writes
    seed: int = 0  # random seed
    beta: float = 0.1  # DPO temperature
    loss: Literal["dpo", "ipo"] = "dpo"  # which loss
    name: str | None = None
    weights: dict[str, float] = field(default_factory=dict)  # per-attribute weights
    steps: list[int] = field(default_factory=lambda: [1, 2])
    model: ModelConfig = field(default_factory=lambda: ModelConfig(preset="llama"))


def error_of(argv, schema=TrainConfig) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(schema, argv)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- precedence and values -------------------------------------------------------------------------


def test_defaults_then_yaml_then_cli(in_tmp):
    (in_tmp / "a.yaml").write_text("seed: 5\nbeta: 0.5\nmodel:\n  hidden_size: 16\n")
    cfg = load_config(TrainConfig, ["config=a.yaml", "beta=0.25", "output_dir=out"])
    assert (cfg.seed, cfg.beta, cfg.output_dir) == (5, 0.25, "out")  # yaml seed, cli beta
    assert cfg.model.hidden_size == 16 and cfg.model.preset == "llama"  # yaml nested, default sibling kept
    assert isinstance(cfg, TrainConfig) and isinstance(cfg.model, ModelConfig)


def test_cli_values_nested_lists_dicts_and_optional_sections():
    cfg = load_config(
        TrainConfig,
        ["output_dir=o", "steps=[3,4,5]", "weights.humour=2", "beta=1e-4", "model.lora.r=4",
         "model.lora.target_modules=[q_proj,k_proj]", "model.preset=null", "model.name_or_path=gpt2"],
    )
    assert cfg.steps == [3, 4, 5] and cfg.weights == {"humour": 2.0} and cfg.beta == 1e-4
    assert cfg.model.lora == LoraConfig(r=4, target_modules=["q_proj", "k_proj"])  # section created from null
    assert cfg.model.preset is None and cfg.model.name_or_path == "gpt2"


def test_string_fields_keep_what_was_typed():
    # YAML alone would turn 007 into 7 and yes into True ('True' after conversion to str).
    cfg = load_config(TrainConfig, ["output_dir=007", "name=yes"])
    assert (cfg.output_dir, cfg.name) == ("007", "yes")
    assert load_config(TrainConfig, ["output_dir=o", "name=null"]).name is None
    assert load_config(TrainConfig, ["output_dir='null'"]).output_dir == "null"  # quoted: a string


# -- one-line errors -------------------------------------------------------------------------------


def test_unknown_key_suggests_closest():
    assert error_of(["sede=1"]) == "sede: unknown key for TrainConfig; did you mean 'seed'?"


def test_nested_typo_names_dotted_path():
    expected = "model.hiden_size: unknown key for ModelConfig; did you mean 'model.hidden_size'?"
    assert error_of(["output_dir=o", "model.hiden_size=8"]) == expected
    expected = "model.lora.rr: unknown key for LoraConfig; did you mean 'model.lora.r'?"
    assert error_of(["output_dir=o", "model.lora.rr=8"]) == expected


def test_unknown_key_found_in_a_section_below():
    assert error_of(["hiden_size=8"]) == "hiden_size: unknown key for TrainConfig; did you mean 'model.hidden_size'?"
    assert error_of(["model.rr=8"]) == "model.rr: unknown key for ModelConfig; did you mean 'model.lora.r'?"


def test_unknown_key_without_close_match_lists_valid_keys():
    message = error_of(["zzzz=1"])
    assert message.startswith("zzzz: unknown key for TrainConfig; valid keys: output_dir, seed, beta")


def test_wrong_type():
    assert error_of(["output_dir=o", "beta=abc"]) == "beta: expected float, got 'abc'"
    assert error_of(["output_dir=o", "seed=null"]) == "seed: expected int, got null"
    assert error_of(["output_dir=o", "steps=[1,x]"]) == "steps[1]: expected int, got 'x'"
    assert error_of(["output_dir=o", "weights.a=x"]) == "weights.a: expected float, got 'x'"
    assert error_of(["output_dir=o", "model=3"]) == "model: expected ModelConfig, got '3'"


def test_literal_lists_choices_and_suggests():
    expected = "loss: expected one of 'dpo', 'ipo', got 'dpoo'; did you mean 'dpo'?"
    assert error_of(["output_dir=o", "loss=dpoo"]) == expected


def test_missing_required():
    assert error_of([]) == "output_dir: missing required value"


def test_argument_without_equals():
    assert error_of(["seed"]) == "seed: expected key=value (e.g. seed=1 or config=file.yaml)"


def test_unknown_key_in_yaml_names_the_file(in_tmp):
    (in_tmp / "bad.yaml").write_text("output_dir: o\nsede: 1\n")
    assert error_of(["config=bad.yaml"]) == "bad.yaml: sede: unknown key for TrainConfig; did you mean 'seed'?"


def test_yaml_syntax_error_names_file_and_line(in_tmp):
    (in_tmp / "broken.yaml").write_text("seed: 1\nbeta: 0.1\n  model: x\n")
    expected = "config: broken.yaml: line 3: mapping values are not allowed in this context"
    assert error_of(["config=broken.yaml"]) == expected


def test_missing_config_file(in_tmp, monkeypatch):
    monkeypatch.setattr(config_module, "CONFIG_DIR", in_tmp / "configs")
    assert error_of(["config=foo.yaml"]) == "config: file not found: foo.yaml (looked in ., configs/)"


# -- config file lookup ----------------------------------------------------------------------------


def test_lookup_cwd_first_then_configs_dir(in_tmp, monkeypatch):
    configs = in_tmp / "repo" / "configs"
    configs.mkdir(parents=True)
    monkeypatch.setattr(config_module, "CONFIG_DIR", configs)
    (configs / "x.yaml").write_text("output_dir: o\nseed: 1\n")
    assert load_config(TrainConfig, ["config=x.yaml"]).seed == 1  # only in configs/
    (in_tmp / "x.yaml").write_text("output_dir: o\nseed: 2\n")
    assert load_config(TrainConfig, ["config=x.yaml"]).seed == 2  # the working directory wins
    assert load_config(TrainConfig, [f"config={configs / 'x.yaml'}"]).seed == 1  # absolute path
    monkeypatch.chdir(in_tmp / "repo")
    assert load_config(TrainConfig, ["config=configs/x.yaml"]).seed == 1
    monkeypatch.chdir(configs.parent.parent.parent)  # outside the repository: configs/x.yaml via the root
    assert load_config(TrainConfig, ["config=configs/x.yaml"]).seed == 1


# -- round trip and hash ---------------------------------------------------------------------------


@pytest.fixture
def tricky_config():
    """Values that YAML would misread unquoted, None, a Literal, nested sections and lists."""
    return TrainConfig(
        output_dir="007", seed=3, beta=1e-5, loss="ipo", name="yes", weights={"no": 2.5, "x y": -1.0},
        steps=[], model=ModelConfig(name_or_path="null", preset=None, dtype="bfloat16", lora=LoraConfig(r=2)),
    )


def test_round_trip_through_yaml(in_tmp, tricky_config):
    save_config(tricky_config, in_tmp / "c.yaml")
    assert load_config(TrainConfig, [f"config={in_tmp / 'c.yaml'}"]) == tricky_config
    assert to_yaml(tricky_config) == (in_tmp / "c.yaml").read_text()


def test_hash_is_short_stable_and_typed(tricky_config):
    assert len(config_hash(tricky_config)) == 12
    assert config_hash(tricky_config) == config_hash(TrainConfig(**vars(tricky_config)))
    assert config_hash(TrainConfig(output_dir="a", beta=1)) == config_hash(TrainConfig(output_dir="a", beta=1.0))
    assert config_hash(TrainConfig(output_dir="a")) != config_hash(TrainConfig(output_dir="b"))


def test_hash_worked_value():
    # sha256 of the canonical JSON: sorted keys, no spaces.
    canonical = '{"alpha":16,"dropout":0.0,"r":8,"target_modules":["q_proj","v_proj"]}'
    assert config_hash(LoraConfig()) == hashlib.sha256(canonical.encode()).hexdigest()[:12]
    assert config_hash({"b": 1, "a": [1, 2]}) == hashlib.sha256(b'{"a":[1,2],"b":1}').hexdigest()[:12]


def test_hash_equal_across_processes():
    code = "from alignment.config import ModelConfig, config_hash; print(config_hash(ModelConfig(preset='llama')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == config_hash(ModelConfig(preset="llama"))


# -- help and run_cli ------------------------------------------------------------------------------


def test_help_lists_fields_defaults_and_docs(capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(TrainConfig, lambda cfg: pytest.fail("main must not run"), ["help"])
    assert info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    row = {line.split()[0]: line.split() for line in lines if line.startswith("  ")}
    assert row["output_dir"] == ["output_dir", "str", "???", "where", "the", "run", "writes"]
    assert row["seed"][:3] == ["seed", "int", "0"] and row["seed"][3:] == ["random", "seed"]
    assert row["loss"][:3] == ["loss", "{dpo,ipo}", "dpo"]
    assert row["model.preset"][:5] == ["model.preset", "str", "|", "None", "llama"]
    assert row["model.lora"][:6] == ["model.lora", "LoraConfig", "|", "None", "null", "attach"]
    assert row["model.lora.target_modules"][:3] == ["model.lora.target_modules", "list[str]", "[q_proj,v_proj]"]
    assert "Train a thing on the tiny world." in lines


def test_help_without_source_still_lists_fields():
    # Classes from `python -c` or exec have no source to read comments from: fields show without docs.
    namespace = {}
    exec("from dataclasses import dataclass\n@dataclass\nclass NoSource:\n    seed: int = 3  # hidden\n", namespace)
    text = config_help(namespace["NoSource"], prog="prog")
    assert text.splitlines()[0] == "usage: prog [config=FILE.yaml] [key=value ...]"
    assert text.splitlines()[-1].split() == ["seed", "int", "3"]


def test_run_cli_calls_main_with_loaded_config():
    assert run_cli(TrainConfig, lambda cfg: (cfg.output_dir, cfg.seed), ["output_dir=o", "seed=4"]) == ("o", 4)


def test_run_cli_error_exits_2_with_one_line_and_writes_nothing(tmp_path):
    script = textwrap.dedent(
        """
        import os
        from dataclasses import dataclass
        from alignment.config import run_cli

        @dataclass
        class Tiny:
            seed: int = 0

        def main(cfg):
            os.makedirs("runs/tiny")

        run_cli(Tiny, main)
        """
    )
    result = subprocess.run([sys.executable, "-c", script, "sede=1"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: sede: unknown key for Tiny; did you mean 'seed'?"]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "runs").exists()
    ok = subprocess.run([sys.executable, "-c", script, "seed=1"], cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0 and (tmp_path / "runs" / "tiny").is_dir()  # the same script does write when valid


def test_run_cli_existing_run_name_exits_2_with_one_line(tmp_path):
    script = textwrap.dedent(
        """
        from dataclasses import dataclass
        from alignment.config import run_cli
        from alignment.runs import Run

        @dataclass
        class Tiny:
            seed: int = 0
            name: str = "taken"
            resume: bool = False

        run_cli(Tiny, lambda cfg: Run.start(cfg, "tiny", runs_dir="runs", name=cfg.name, resume=cfg.resume))
        """
    )
    first = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    again = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    lines = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "already exists" in lines[0] and "resume=true" in lines[0]


@pytest.mark.parametrize("entry, argv, schema", [
    ("alignment.evaluate", ["kind=rm", "help"], "EvalRMConfig"),
    ("alignment.evaluate", ["help"], "EvaluateConfig"),  # apc when no kind is given
    ("rewards.train", ["config=persona_rm_controversial.yaml", "help"], "PersonaRMConfig"),
    ("rewards.train", ["config=guides.yaml", "help"], "GuidesConfig"),
])
def test_entry_points_dispatch_on_kind(entry, argv, schema):
    result = subprocess.run([sys.executable, "-m", entry, *argv], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"{schema} fields" in result.stdout


def test_unknown_kind_of_evaluate_is_one_line_exit_2():
    result = subprocess.run([sys.executable, "-m", "alignment.evaluate", "kind=rms"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: kind: unknown kind 'rms' (valid kinds: apc, rm); did you mean 'rm'?"]
