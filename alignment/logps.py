"""Sequence log-probs of completions, and the padded pair batch they are computed on.

The batch layout is TRL 1.16's `DataCollatorForPreference` output, so that the same functions score batches
built here and batches from TRL's dataloader (the parity test in tests/test_losses.py does exactly that):

    input_ids, attention_mask, completion_mask: (2B, T) long, right-padded,
    rows [chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}], each row = prompt ids + completion ids,
    completion_mask = 1 on completion tokens (EOS included), 0 on prompt and padding.

Shift convention: the logits at position t predict the token at position t + 1, so a token at position t is
scored by logits[t - 1] and the token at position 0 is never scored. A completion token is scored when its own
position is 1 in completion_mask; completion_mask[:, 0] is ignored, and every row needs a prompt token before
its completion (build_pair_batch guarantees one).
"""

import logging

import torch

logger = logging.getLogger(__name__)


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, average: bool = False
) -> torch.Tensor:
    """Log-prob of the masked tokens of each sequence: sum_t mask[t] * log p(labels[t] | labels[<t]).

    Args:
        logits: (B, T, V) next-token logits; logits[:, t] is the distribution of labels[:, t + 1].
        labels: (B, T) token ids, aligned with the input ids (not pre-shifted). Positions with mask 0 may hold
            anything (-100, pad ids): they are never gathered.
        mask: (B, T) 1 where labels[:, t] counts, aligned with labels; mask[:, 0] is ignored (nothing predicts
            the first token).
        average: False sums over the scored tokens (DPO); True divides by their number (IPO, SimPO). A row with
            no scored token returns 0 in both modes.
    Returns: (B,) float32 log-probs, whatever the dtype of logits (upcast before the softmax: bf16 keeps 8
    mantissa bits, about 3 significant digits, too coarse for a logsumexp over a 32k-150k vocabulary).
    """
    if logits.dim() != 3 or logits.shape[:2] != labels.shape or labels.shape != mask.shape:
        raise ValueError(
            f"sequence_logps: expected logits (B, T, V), labels (B, T), mask (B, T), got "
            f"{tuple(logits.shape)}, {tuple(labels.shape)}, {tuple(mask.shape)}"
        )
    logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
    scored = mask[:, 1:].bool()  # (B, T-1)
    targets = labels[:, 1:].masked_fill(~scored, 0)  # (B, T-1); 0 keeps -100/pad out of gather's index range
    # log_softmax evaluated at the target only: logit - logsumexp, which skips a second (B, T-1, V) tensor
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    token_logps = (picked - logits.logsumexp(dim=-1)).masked_fill(~scored, 0.0)  # (B, T-1)
    total = token_logps.sum(dim=1)  # (B,)
    if average:
        total = total / scored.sum(dim=1).clamp(min=1)
    return total


def pair_logps(model, batch: dict[str, torch.Tensor], average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion log-probs of chosen and rejected rows with one forward pass over the (2B, T) batch.

    One pass rather than two halves the kernel launches and keeps both halves under the same dropout/
    batch-norm mode. Gradients flow when the caller has them enabled (policy) and not under torch.no_grad (ref).

    Args: model is any causal LM returning `.logits` (B, T, V); batch holds input_ids, attention_mask,
    completion_mask of shape (2B, T) in the layout of the module docstring; average as in sequence_logps.
    Returns: chosen (B,), rejected (B,) float32.
    """
    missing = {"input_ids", "attention_mask", "completion_mask"} - batch.keys()
    if missing:
        raise KeyError(f"pair_logps: batch lacks {sorted(missing)}; build it with build_pair_batch")
    input_ids = batch["input_ids"]  # (2B, T)
    if input_ids.shape[0] % 2:
        raise ValueError(f"pair_logps: batch has {input_ids.shape[0]} rows, expected 2B ([chosen..., rejected...])")
    # use_cache=False: no KV cache is needed for a single scoring pass, and building one costs memory
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"], use_cache=False).logits
    logps = sequence_logps(logits, input_ids, batch["completion_mask"], average=average)  # (2B,)
    chosen, rejected = logps.chunk(2)
    return chosen, rejected


def _join(prompt: list[int], completion: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Prompt + completion ids cut to max_length: the prompt keeps its end, the completion its start.

    The prompt keeps its last min(len, max_length - 1) tokens, which depends on the prompt only, so the chosen
    and rejected rows of a pair see the same context. The completion then keeps what fits, at least one token.
    """
    prompt = prompt[len(prompt) - min(len(prompt), max_length - 1) :]
    completion = completion[: max_length - len(prompt)]
    return prompt + completion, [0] * len(prompt) + [1] * len(completion)


def build_pair_batch(
    tokenizer, prompts: list[str], chosen: list[str], rejected: list[str], max_length: int
) -> dict[str, torch.Tensor]:
    """Tokenize preference pairs into the (2B, T) right-padded layout of the module docstring.

    Prompt and completions are tokenized separately and their ids concatenated, so no token ever merges
    across the boundary (a BPE tokenizer would otherwise move the prompt's last word into the completion).
    Text is tokenized as is, with add_special_tokens=False: render BOS and role markers into the prompt
    (chat templates do), which avoids the double-BOS bug. Completions get tokenizer.eos_token_id appended
    unless their ids already end with it; write them as they follow the prompt (e.g. with a leading space
    for BPE vocabularies).

    Truncation, when prompt + completion exceeds max_length (no row is ever dropped):
      * the prompt keeps its **end**, at most max_length - 1 tokens (the question sits at the end; the same
        cut for chosen and rejected);
      * the completion keeps its **start**, as many tokens as fit and at least 1, so every row has at least
        one scored token (the EOS is lost when a completion is cut).
    Truncated rows are counted in a log line. An empty prompt raises: nothing would predict the first
    completion token.

    Returns: dict of long tensors input_ids, attention_mask, completion_mask, each (2B, T) with
    T = the longest row (<= max_length).
    """
    if not len(prompts) == len(chosen) == len(rejected):
        raise ValueError(
            f"build_pair_batch: {len(prompts)} prompts, {len(chosen)} chosen, {len(rejected)} rejected; need equal"
        )
    if max_length < 2:
        raise ValueError(f"build_pair_batch: max_length={max_length}, need >= 2 (one prompt + one completion token)")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None or pad is None:
        raise ValueError(f"build_pair_batch: tokenizer needs eos and pad tokens, has eos={eos} pad={pad}")

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    prompt_ids = encode(prompts)
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"build_pair_batch: prompt {i} tokenizes to no tokens: {prompts[i]!r}")
    completions = [ids if ids[-1:] == [eos] else ids + [eos] for ids in encode(chosen) + encode(rejected)]
    rows = [_join(p, c, max_length) for p, c in zip(prompt_ids + prompt_ids, completions, strict=True)]
    n_cut = sum(len(p) + len(c) > max_length for p, c in zip(prompt_ids + prompt_ids, completions, strict=True))
    if n_cut:
        logger.info("build_pair_batch: truncated %d of %d rows to max_length=%d", n_cut, len(rows), max_length)

    width = max(len(ids) for ids, _ in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), pad, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        "completion_mask": torch.zeros((len(rows), width), dtype=torch.long),
    }
    for r, (ids, completion_mask) in enumerate(rows):  # right padding: row r fills columns [0, len(ids))
        batch["input_ids"][r, : len(ids)] = torch.tensor(ids)
        batch["attention_mask"][r, : len(ids)] = 1
        batch["completion_mask"][r, : len(ids)] = torch.tensor(completion_mask)
    return batch
