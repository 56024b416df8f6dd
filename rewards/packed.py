"""Shared-prefix packing of classifier inputs: many inputs that begin alike, read in one forward.

An input is `Packed(prefix, block)`, its text prefix + block. APC checks every statement of a character against
the same query (relevance) and every response against the same statement (NLI); written with the shared part
first, those inputs share a prefix, and a decoder classifier reads them as one sequence: the prefix once, then
each block attending to the prefix and to itself only (a block-diagonal 4D attention mask) at the positions it
would have after the prefix alone, read at its last token by the per-token `score` head. The numbers are those
of separate forwards (tests/test_apc.py) for len(prefix) + n * len(block) tokens instead of
n * (len(prefix) + len(block)). `rewards/apc.py` scores with it, `rewards/discriminators.py` trains with it;
encoders (BERT, DeBERTa) cannot be read this way and keep one text per input.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Packed:
    """An input written as a prefix that many inputs share and a block of its own: the classifier's text is
    prefix + block. A format that returns these lets a decoder classifier read every block of one prefix in a
    single forward (`rewards.apc.Discriminator.packed_probs`): relevance reads a query's S statements as blocks
    after the query, one sequence per query instead of S."""

    prefix: str
    block: str


def flat(text) -> str:
    """The whole text of a Packed input; other inputs as they are."""
    return text.prefix + text.block if isinstance(text, Packed) else text


def packed_batch(rows: list[tuple[list[int], list[tuple[int, list[int]]]]], width: int, pad_id: int):
    """Tensors of a batch of packed sequences (prefix ids, [(item index, block ids), ...]), right-padded to `width`:
    input_ids (B, T); an additive 4D mask (B, 1, T, T) in which the prefix is causal, each block sees the prefix and
    its own earlier tokens, and padding sees only itself; position_ids continuing from the prefix in every block;
    the (row, position) read for each block (its last token) and the item index it belongs to."""
    ids = torch.full((len(rows), width), pad_id)
    allowed = torch.zeros(len(rows), width, width, dtype=torch.bool)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    reads, owners = [], []
    for r, (prefix, blocks) in enumerate(rows):
        n = len(prefix)
        ids[r, :n], positions[r, :n] = torch.tensor(prefix), torch.arange(n)
        allowed[r, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        at = n
        for item, block in blocks:
            m = len(block)
            ids[r, at:at + m], positions[r, at:at + m] = torch.tensor(block), torch.arange(n, n + m)
            allowed[r, at:at + m, :n] = True
            allowed[r, at:at + m, at:at + m] = torch.ones(m, m, dtype=torch.bool).tril()
            reads.append((r, at + m - 1))
            owners.append(item)
            at += m
        allowed[r, at:, :].fill_(False)
        allowed[r, torch.arange(at, width), torch.arange(at, width)] = True  # padding attends to itself
    mask = torch.zeros(len(rows), 1, width, width).masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
    return ids, mask, positions, torch.tensor(reads), torch.tensor(owners)


def tokenize_packed(tokenizer, items: Sequence[Packed], what: str = "classifier"):
    """(prefix index of each item, ids of each distinct prefix, block ids of each item), checking on the first item
    that the tokenizer splits a text at the block: a tokenizer that adds tokens around an input ([CLS] .. [SEP])
    would give packed numbers that differ from the whole text's."""
    prefixes: dict[str, int] = {}
    prefix_of = [prefixes.setdefault(x.prefix, len(prefixes)) for x in items]
    prefix_ids = tokenizer(list(prefixes))["input_ids"] if items else []
    block_ids = tokenizer([x.block for x in items], add_special_tokens=False)["input_ids"] if items else []
    if items and (whole := tokenizer(flat(items[0]))["input_ids"]) != prefix_ids[0] + block_ids[0]:
        raise ValueError(f"the {what} tokenizer does not split {flat(items[0])[:60]!r} at the block ({len(whole)} "
                         f"tokens whole, {len(prefix_ids[0])} + {len(block_ids[0])} apart): it adds tokens around an "
                         "input, so packed scores would differ; pass packed=False")
    return prefix_of, prefix_ids, block_ids


def pack(items: Sequence[int], prefix_of: Sequence[int], prefix_ids: Sequence[list[int]],
         block_ids: Sequence[list[int]], budget: int) -> list[tuple[list[int], list[tuple[int, list[int]]]]]:
    """Packed sequences (prefix ids, [(item, block ids), ...]) of `items`: the items of one prefix share a sequence
    up to `budget` tokens; longest first."""
    groups: dict[int, list[int]] = {}
    for i in items:
        groups.setdefault(prefix_of[i], []).append(i)
    sequences = []
    for k, members in groups.items():
        part, size = [], len(prefix_ids[k])
        for i in members:
            if part and size + len(block_ids[i]) > budget:
                sequences.append((prefix_ids[k], part))
                part, size = [], len(prefix_ids[k])
            part.append((i, block_ids[i]))
            size += len(block_ids[i])
        sequences.append((prefix_ids[k], part))
    return sorted(sequences, key=lambda seq: -(len(seq[0]) + sum(len(b) for _, b in seq[1])))


def packable(model: nn.Module) -> bool:
    """Whether `packed_logits` can read `model`: a decoder classifier whose body returns per-token states and whose
    `score` head maps each (LlamaForSequenceClassification and kin; not encoders with a pooler)."""
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return body is not None and isinstance(getattr(model, "score", None), nn.Module)


def packed_logits(model: nn.Module, rows: list, pad_id: int) -> tuple[Tensor, Tensor]:
    """Logits (n, C) at the last token of every block of a batch of packed sequences (`pack`), and the item of each.

    Each block attends to its prefix and to itself only (a block-diagonal 4D mask, `packed_batch`) at the positions
    it would have after the prefix alone. Needs a decoder classifier with a per-token `score` head
    (LlamaForSequenceClassification and kin); gradients flow when called outside inference mode (training).
    """
    if not packable(model):
        raise ValueError(f"{type(model).__name__} has no per-token `score` head: packed inputs need a decoder "
                         "classifier (e.g. LlamaForSequenceClassification); use a format without Packed")
    body = getattr(model, model.base_model_prefix)
    width = max(len(prefix) + sum(len(b) for _, b in blocks) for prefix, blocks in rows)
    ids, mask, positions, reads, owners = packed_batch(rows, width, pad_id)
    weight = next(model.parameters())
    hidden = body(input_ids=ids.to(weight.device), attention_mask=mask.to(weight.device, weight.dtype),
                  position_ids=positions.to(weight.device)).last_hidden_state
    return model.score(hidden[reads[:, 0].to(weight.device), reads[:, 1].to(weight.device)]), owners
