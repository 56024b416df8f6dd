"""Smoke tests of the decoding entry points on a small world: `rewards.train kind=guides` trains the three guides
and `decoding.generate` writes its table for every method (tiny models, a few steps: checks plumbing, not quality).
"""

import json
from dataclasses import replace

import pytest

from alignment.policy import SFTConfig
from alignment.world import WorldSpec
from decoding.generate import DecodeConfig, DriftSettings
from rewards.guides import ARMSettings, GuidesConfig, PADGuideSettings, RMSettings

SMALL = WorldSpec(seed=3, characters=24, users=[20, 5, 10], train_pairs=8, context_pairs=4, target_pairs=6,
                  dialogues=300)


@pytest.fixture(scope="module")
def guides_cfg(tmp_path_factory):
    runs = str(tmp_path_factory.mktemp("runs"))
    sft = SFTConfig(steps=20, eval_samples=4, batch_size=8, checkpoint_every=20, max_new_tokens=16)
    return GuidesConfig(world=SMALL, sft=sft, runs_dir=runs, batch_size=8, eval_pairs=16, log_every=2,
                        pad=PADGuideSettings(steps=3, examples=300), arm=ARMSettings(steps=3), rm=RMSettings(steps=3))


@pytest.fixture(scope="module")
def guides_dir(guides_cfg):
    from rewards.guides import guides_artifact

    return guides_artifact(guides_cfg)


@pytest.mark.slow
def test_guides_run_saves_three_guides_and_the_drift_prompts(guides_dir):
    results = json.loads((guides_dir / "results.json").read_text())
    for name in ("pad", "arm", "rm"):
        assert (guides_dir / name / "config.json").is_file()
        assert results[name]["steps"] == 3
    assert 0.0 <= results["arm"]["test_target_accuracy"] <= 1.0
    prompts = json.loads((guides_dir / "drift.json").read_text())
    assert len(prompts["attributes"]) == 7 and prompts["neutral"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pad", "drift", "genarm", "args"])
def test_decode_writes_a_table_against_base_and_prompting(guides_cfg, guides_dir, method):
    from decoding.generate import main

    cfg = DecodeConfig(method=method, world=SMALL, guides=guides_cfg, guides_dir=str(guides_dir),
                       runs_dir=guides_cfg.runs_dir, users=3, prompts_per_user=2, max_new_tokens=12, batch_size=4,
                       temperature=1.0, drift=DriftSettings(pairs=6, pair_counts=[3, 6]))
    run = main(replace(cfg, name=f"decode-{method}"))
    results = json.loads((run / "results.json").read_text())
    arms = results["table"]["all"]
    assert set(arms) == {"base", "prompting", method}
    assert arms["base"]["win_rate"]["mean"] == 0.5  # the base against itself: all ties
    assert arms[method]["prompts"] == 6 and arms[method]["reward"]["n"] == 3
    assert (run / "results.md").read_text().startswith(f"# {method}")
    assert len((run / "samples.jsonl").read_text().splitlines()) == 6
    if method == "drift":
        assert set(results["drift"]["cosine"]["closed_form"]) == {"3", "6"}
