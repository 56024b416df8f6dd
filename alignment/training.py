"""Training utilities every trainer shares: encoded examples, padded batches, length-grouped batch order, the
warmup-cosine schedule, and where a finished run's model is.

Used by the SFT policy (`alignment.policy`), the guides and persona reward models (rewards/) and FSPO.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from alignment.sampling import encode_example


def encode(tokenizer, dialogues: list[dict], max_length: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Tokenized (prompt ids, response ids + EOS) pairs; examples longer than max_length are dropped and counted."""
    examples = [encode_example(tokenizer, d["prompt"], d["response"]) for d in dialogues]
    kept = [e for e in examples if len(e[0]) + len(e[1]) <= max_length]
    return kept, len(examples) - len(kept)


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids/attention_mask (B, T) and labels (B, T) with -100 on prompt and padding."""
    T = max(len(p) + len(r) for p, r in examples)
    ids = torch.full((len(examples), T), pad_id)
    labels = torch.full((len(examples), T), -100)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, (p, r) in enumerate(examples):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        labels[i, len(p):n] = torch.tensor(r)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_indices(lengths: Sequence[int], batch_size: int, step: int, seed: int, group: int = 8) -> list[int]:
    """The example indices of training batch `step`: random draws (with replacement), grouped by length.

    Every `group` consecutive steps share a pool of batch_size * group random examples, sorted by length and cut into
    `group` batches taken in a random order, so a batch pads to a length close to its examples' own (world dialogues
    are 35-140 tokens: random batches of 32 padded to ~130 for a mean of ~70, twice the compute). A pure function
    of (seed, step): a resumed run draws the same batches with no sampler state to checkpoint. `lengths`: one per
    example, best as a numpy array built once (a list is converted on every call).
    """
    rng = np.random.default_rng([seed, step // group])
    pool = rng.integers(len(lengths), size=batch_size * group)
    pool = pool[np.argsort(np.asarray(lengths)[pool], kind="stable")]  # no copy for an array
    batch = rng.permutation(group)[step % group]
    return pool[batch * batch_size:(batch + 1) * batch_size].tolist()


def lr_lambda(warmup: int, steps: int):
    """Linear warmup to 1, cosine decay to 0.1 at `steps`."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))
    return f


def final_model(run_dir: Path) -> Path:
    """The HF model directory of a finished training run's last checkpoint."""
    return Path(run_dir) / "ckpt" / (Path(run_dir) / "ckpt" / "latest").read_text().strip() / "model"
