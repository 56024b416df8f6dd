"""Drift's attribute rewards and its few-shot weight fitting (Kim et al., Findings of EMNLP 2025, arXiv:2502.14289).

Drift models a user's implicit reward as a weighted sum of m interpretable attribute rewards, each a difference
of one small LM's log-probs under an attribute system prompt s_i and a neutral prompt s_0 ("differential
prompting", research/decoding.md §2.2):

    r_i(x, y) = log pi_s(y | s_i, x) - log pi_s(y | s_0, x)        (summed over the response tokens)

and fits the weights p from n = 50-100 of the user's labelled pairs without gradients (§2.3). With
Delta_j = r(x_j, y_w) - r(x_j, y_l) (m,) per pair:

    closed_form   p = a / ||a||_2,  a = mean_j Delta_j    the maximizer of the Bradley-Terry log-likelihood
                                                         linearized at p = 0 under ||p|| = 1
    sparse        p = S_lam(a) / ||S_lam(a)||_2            maximizer of p.a - lam ||p||_1 s.t. ||p||_2 <= 1, solved in
                                                         closed form by soft-thresholding (the third-party
                                                         reimplementation calls cvxpy for the same problem);
                                                         lam = sparsity * max_i |a_i|, so it is scale-free

No official code exists; the closed form matches the third-party `approximate` estimator. Attributes whose
weight is 0 drop out of decoding, which is what the sparse variant is for (each active attribute costs a guide
row per user).

`weight_recovery` is the check of the issue: cosine similarity between fitted and true weights, both centred on
their mean over the evaluated users (the population mean), so a direction every user shares does not count.
"""

from __future__ import annotations

import numpy as np
import torch


# --- attribute prompts ---------------------------------------------------------------------------------------------
def load_attribute_prompts(path: str) -> dict:
    """Drift's prompts from a JSON file {"neutral": s_0, "attributes": {name: s_i}} (a guides run's drift.json, or
    configs/real/drift_attributes.json for a pretrained chat model); `config=`-style lookup, so `real/x.json`
    finds configs/real/x.json."""
    import json

    from alignment.config import ConfigError, find_config_file

    prompts = json.loads(find_config_file(path).read_text())
    if not isinstance(prompts.get("neutral"), str) or not isinstance(prompts.get("attributes"), dict) \
            or not prompts["attributes"] or not all(isinstance(v, str) for v in prompts["attributes"].values()):
        raise ConfigError(f"{path}: expected {{\"neutral\": str, \"attributes\": {{name: str, ...}}}}")
    return {"neutral": prompts["neutral"], "attributes": dict(prompts["attributes"])}


@torch.inference_mode()
def attribute_rewards(model, tokenizer, pairs: list[dict], prompts: list[str], *, batch_size: int = 64,
                      max_length: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """r(x, y_w) and r(x, y_l), each (n, m): log-prob ratios of every pair's chosen and rejected response under
    attribute prompts[1:] against the neutral prompts[0], each appended to the pair's system turn.

    pairs: PreferencePair dicts (prompt messages, chosen, rejected). One scoring pass per (context, response):
    2 (1 + m) n sequences.
    """
    from alignment.logps import build_pair_batch, pair_logps
    from alignment.sampling import default_system, render_prompt, with_system_suffix

    default = default_system(tokenizer)
    logps = np.zeros((len(prompts), 2, len(pairs)))  # (1 + m, chosen/rejected, n)
    for c, suffix in enumerate(prompts):
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s:s + batch_size]
            texts = [render_prompt(tokenizer, with_system_suffix(p["prompt"], suffix, default)) for p in chunk]
            batch = build_pair_batch(tokenizer, texts, [p["chosen"] for p in chunk], [p["rejected"] for p in chunk],
                                     max_length)
            chosen, rejected = pair_logps(model, {k: v.to(model.device) for k, v in batch.items()})
            logps[c, 0, s:s + len(chunk)] = chosen.cpu().numpy()
            logps[c, 1, s:s + len(chunk)] = rejected.cpu().numpy()
    ratios = logps[1:] - logps[:1]  # (m, 2, n)
    return ratios[:, 0].T, ratios[:, 1].T


# --- weight fitting -------------------------------------------------------------------------------------------------
def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else np.zeros_like(v)


def fit_closed_form(deltas: np.ndarray, sparsity: float = 0.0) -> np.ndarray:
    """p = mean(Delta) / ||mean(Delta)||; deltas (n, m) -> p (m,). `sparsity` is ignored."""
    return _unit(deltas.mean(0))


def fit_sparse(deltas: np.ndarray, sparsity: float = 0.25) -> np.ndarray:
    """argmax p.a - lam ||p||_1 s.t. ||p|| <= 1, a = mean(Delta), lam = sparsity * max|a|: soft-threshold, normalize.

    Worked example: a = (3, -1, 0.5), sparsity 0.25 -> lam = 0.75 -> S(a) = (2.25, -0.25, 0) -> p = S / 2.264.
    """
    a = deltas.mean(0)
    lam = sparsity * np.abs(a).max(initial=0.0)
    return _unit(np.sign(a) * np.maximum(np.abs(a) - lam, 0.0))


FITTERS = {"closed_form": fit_closed_form, "sparse": fit_sparse}


def fit_weights(deltas: np.ndarray, method: str = "closed_form", sparsity: float = 0.25) -> np.ndarray:
    """Attribute weights p (m,) from per-pair reward differences `deltas` (n, m) (chosen minus rejected)."""
    if method not in FITTERS:
        raise ValueError(f"drift fit: unknown method {method!r} (known: {', '.join(FITTERS)})")
    if deltas.ndim != 2 or len(deltas) == 0:
        raise ValueError(f"drift fit: expected deltas (n >= 1, m), got shape {deltas.shape}")
    return FITTERS[method](deltas, sparsity)


# --- the check ------------------------------------------------------------------------------------------------------
def centred_cosines(fitted: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-user cosine of fitted (U, m) and true (U, m) weights, each centred on its mean over the U users."""
    f = fitted - fitted.mean(0, keepdims=True)
    t = true - true.mean(0, keepdims=True)
    denom = np.linalg.norm(f, axis=1) * np.linalg.norm(t, axis=1)
    return np.where(denom > 0, (f * t).sum(1) / np.where(denom > 0, denom, 1.0), 0.0)


def weight_recovery(deltas: list[np.ndarray], true: np.ndarray, counts: list[int], method: str,
                    sparsity: float) -> dict[int, np.ndarray]:
    """Centred cosines per user when each user's weights are fitted from the first n of its pairs, for n in counts.

    deltas: per user (N_u, m), N_u >= max(counts); true (U, m). Returns {n: (U,) cosines}.
    """
    out = {}
    for n in counts:
        fitted = np.stack([fit_weights(d[:n], method, sparsity) for d in deltas])
        out[n] = centred_cosines(fitted, true)
    return out
