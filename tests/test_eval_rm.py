"""Reward-model evaluation: worked numbers for every metric, and the protocol's wiring on hand-made scorers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rewards.persona_rm import PreferenceData
from rewards.rm_eval import (
    RMEvalSettings,
    accuracy,
    bayes_ceiling,
    correct,
    evaluate,
    expected_calibration_error,
    flip_rate,
    format_report,
    nll,
    normalized_gain,
    plot_accuracy_vs_k,
    true_preference,
)


# --- worked numbers -----------------------------------------------------------------------------------------------
def test_micro_and_macro_accuracy():
    # user a: 2 of 3 right, user b: 0 of 1 -> micro 2/4, macro (2/3 + 0) / 2 = 1/3
    result = accuracy(np.array([1.0, -1.0, 2.0, -3.0]), np.array(["a", "a", "a", "b"]), n_boot=200)
    assert result["micro"]["mean"] == pytest.approx(0.5)
    assert result["macro"]["mean"] == pytest.approx(1 / 3)
    assert result["micro"]["n"] == 2 and result["macro"]["n"] == 2  # resampled units are users


def test_a_tie_counts_as_an_error():
    assert correct(np.array([0.0, 1e-9, -1e-9])).tolist() == [0.0, 1.0, 0.0]


def test_normalized_gain():
    assert normalized_gain(0.75, 0.6, 0.9) == pytest.approx(0.5)  # (0.75 - 0.6) / (0.9 - 0.6)
    assert normalized_gain(0.6, 0.6, 0.9) == 0.0
    assert normalized_gain(0.55, 0.6, 0.9) == pytest.approx(-1 / 6)
    assert normalized_gain(0.7, 0.9, 0.9) is None  # no headroom


def test_flip_rate():
    # rows 1, 3 and 4 change sign; row 2 keeps it -> 3 / 4
    assert flip_rate(np.array([1.0, 2.0, -1.0, 3.0]), np.array([-1.0, 2.0, 1.0, -3.0])) == 0.75
    assert flip_rate(np.array([1.0, 0.0]), np.array([-1.0, -1.0])) == 0.5  # a zero margin has no sign to flip


def test_nll():
    assert nll(np.array([0.0])) == pytest.approx(math.log(2))
    assert nll(np.array([math.log(3), -math.log(3)])) == pytest.approx((-math.log(0.75) - math.log(0.25)) / 2)


def test_expected_calibration_error():
    # All four predictions at confidence 0.75 (margin ln 3), three right: perfectly calibrated.
    assert expected_calibration_error(np.log(3) * np.array([1.0, 1.0, 1.0, -1.0])) == pytest.approx(0.0)
    # Two at confidence 0.9 (ln 9), both right: |1 - 0.9| = 0.1; two at confidence 0.6 (ln 1.5), one right:
    # |0.5 - 0.6| = 0.1; each bin holds half the pairs -> ECE = 0.1.
    margins = np.array([math.log(9), math.log(9), math.log(1.5), -math.log(1.5)])
    assert expected_calibration_error(margins) == pytest.approx(0.1)
    # Overconfident: confidence 0.9 but half right -> 0.4
    assert expected_calibration_error(np.array([math.log(9), -math.log(9)])) == pytest.approx(0.4)


def test_bayes_ceiling_from_true_rewards():
    # beta (r+ - r-) = 1 * ln 3 and 2 ln 3 * (0 - 0.5) = -ln 3 -> P(chosen preferred) = 0.75 and 0.25; the Bayes
    # predictor is right 75% of the time either way.
    pairs = [{"chosen_reward": math.log(3), "rejected_reward": 0.0}, {"chosen_reward": 0.0, "rejected_reward": 0.5}]
    p = true_preference(pairs, [1.0, 2 * math.log(3)])
    assert p == pytest.approx([0.75, 0.25])
    assert bayes_ceiling(np.array([0.75, 0.25])) == pytest.approx(0.75)


# --- the protocol on hand-made scorers ----------------------------------------------------------------------------
def _data(n_users: int = 12, seed: int = 0) -> PreferenceData:
    """Users whose labels agree with the true reward 80% of the time: r(chosen) - r(rejected) = +-1, beta = ln 4."""
    rng = np.random.default_rng(seed)
    beta = math.log(4)  # reward margins are +-1: P(label agrees) = sigmoid(ln 4) = 0.8
    users, pairs = {}, {}
    for i in range(n_users):
        uid = f"u{i}"
        users[uid] = {"persona": f"p{i}", "split": "test" if i % 2 else "train", "temperature": beta}
        for part, n in (("context", 16), ("target", 10)):
            rows = []
            for j in range(n):
                agree = rng.random() < 0.8  # the label agrees with the true reward
                rows.append({"user_id": uid, "prompt_id": f"{part}{j}", "prompt": [], "chosen": f"y{j}a",
                             "rejected": f"y{j}b", "chosen_reward": 1.0 if agree else -1.0, "rejected_reward": 0.0})
            pairs[(uid, part)] = rows
    return PreferenceData(users, pairs, "synthetic")


class Oracle:
    """Knows the true reward: margin = r(chosen) - r(rejected); reads no shots."""

    uses_shots = False

    def margins(self, requests):
        return [np.array([p["chosen_reward"] - p["rejected_reward"] for p in r.targets]) for r in requests]


class Contrarian:
    """Reads the shots: follows the truth when most shots' labels agree with the true reward, else inverts it.
    With no shots it follows the truth. Flipping every context label must flip every prediction."""

    uses_shots = True

    def margins(self, requests):
        out = []
        for r in requests:
            signs = [np.sign(s["chosen_reward"] - s["rejected_reward"]) for s in r.shots]
            sign = np.sign(sum(signs)) or (signs[0] if signs else 1.0)  # a tied vote follows the first shot
            out.append(sign * np.array([p["chosen_reward"] - p["rejected_reward"] for p in r.targets]))
        return out


class Constant:
    uses_shots = False

    def margins(self, requests):
        return [np.full(len(r.targets), -0.5) for r in requests]


def test_protocol_numbers_on_hand_made_scorers(tmp_path):
    data = _data()
    settings = RMEvalSettings(ks=[0, 2, 8], k=8, seen_users=0, n_boot=200)
    results = evaluate({"population": Constant(), "oracle": Oracle(), "contrarian": Contrarian()}, data, settings)
    methods = results["methods"]
    truth = np.array([p["chosen_reward"] > 0 for u in data.user_ids("test") for p in data.pairs[(u, "target")]])
    ceiling = results["bayes_ceiling"]["unseen"]
    assert ceiling == pytest.approx(0.8)  # |beta * margin| = ln 4 on every pair
    assert methods["population"]["unseen"][8]["micro"]["mean"] == 0.0  # always prefers `rejected`
    assert methods["oracle"]["unseen"][8]["micro"]["mean"] == pytest.approx(truth.mean())
    assert methods["oracle"]["normalized_gain"][8] == pytest.approx(truth.mean() / ceiling)  # (acc - 0) / (ceil - 0)
    assert methods["population"]["normalized_gain"][0] == 0.0
    assert methods["contrarian"]["flip_rate"] == 1.0
    assert "flip_rate" not in methods["oracle"]  # reads no shots: nothing to flip
    diff = methods["oracle"]["vs_population"][2]
    assert diff["mean"] == pytest.approx(truth.mean()) and diff["n"] == 6  # paired over the 6 unseen users
    assert results["users"] == {"unseen": 6, "seen": 6} and results["pairs"]["unseen"] == 60
    text = format_report(results)
    assert "| contrarian |" in text and "Bayes ceiling on the evaluated pairs: unseen 80.0" in text
    png = plot_accuracy_vs_k(results, tmp_path / "acc.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_evaluation_needs_seen_and_unseen_users():
    data = _data()
    for u in data.users.values():
        u["split"] = "train"
    with pytest.raises(ValueError, match="unseen"):
        evaluate({"population": Constant()}, data, RMEvalSettings(n_boot=50))
