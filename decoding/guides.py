"""Guide models that keep their own KV caches in lockstep with the tokens the base model emits.

A guide reads its own prompt rows (a preference-conditioned system turn, an attribute prompt, a reward model's
input format), left-padded and prefilled once; after that every step feeds it exactly the token the base emitted
for that row, one cached forward per step for all rows (research/decoding.md §7.1-7.3):

    guide = Guide(model, ids, mask)          # prefill: guide.logits is the (R, V) next-token logits
    guide.advance(tokens)                    # (R,) emitted tokens -> one forward of R x 1 tokens

Sequence reward models for ARGS-style candidate rescoring implement `CandidateReward`: `score(candidates)` gives
the reward of every prefix extended by each of its k candidates, and `advance(tokens)` commits the emitted ones.
`CachedSequenceReward` scores the k candidates of all rows in ONE forward over the shared prefix cache: the k
candidates sit at the same position, a 4D mask lets each see the prefix and itself only, and the cache keeps the
chosen candidate's keys and values afterwards, so committing costs no forward. That needs O(L + k) memory where
ARGS's official code replicates the cache k times (O(k L)) and copies it every token. `RecomputeReward` wraps any
`fn(input_ids, attention_mask) -> (R,)` (a persona RM, an API) with k full forwards per step: the reference the
cached path is tested against, and the fallback for models without a cache.

Rows are left-padded; positions count real tokens only (mask.cumsum - 1), so a row's logits do not depend on the
padding its batch happens to need. All calls run under inference mode; logits come back as float32.

`load_guide` reads a guide directory for a base's tokenizer and refuses, in one line, a guide whose vocabulary is
not the base's (a world guide beside a pretrained base): token ids would mean different things to the two, and
fitting the guide's embedding to the base's tokenizer would write garbage rows.

Continuous batching (decoding/scheduler.py) moves rows between batches: `select(keep)` keeps some rows of a
cache (index_select on the batch dim, then the leading columns no kept row attends to are dropped, so an evicted
row's memory goes), `merge(other)` appends another's rows after left-padding the narrower cache with masked
columns (no row is recomputed), and a `chunk` (rows x columns per `fill()`) prefills a long prompt over several
calls so that decoding steps can run between them. Row surgery is tested against a recompute from scratch.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids (R, T) of a left-padded (R, T) attention mask: 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(rows: list[list[int]], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as left-padded (R, T) input_ids and attention_mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"left_pad: row {i} is empty; every prompt needs at least one token")
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def select_rows(cache: DynamicCache, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Keep rows `keep` (n,) of a cache and its (R, T) mask, in that order, and drop the leading columns that no
    kept row attends to (a finished long row's width goes with it); the new (n, T') mask."""
    keep = keep.to(mask.device)
    mask = mask.index_select(0, keep)
    live = mask.any(0)
    first = int(live.int().argmax()) if bool(live.any()) else mask.shape[1]
    for layer in layers_of(cache):  # one copy of what stays
        layer.keys = layer.keys[:, :, first:].index_select(0, keep)
        layer.values = layer.values[:, :, first:].index_select(0, keep)
    return mask[:, first:]


def merge_rows(cache: DynamicCache, mask: torch.Tensor, other: DynamicCache, other_mask: torch.Tensor) -> torch.Tensor:
    """Append `other`'s rows to `cache` (in place), left-padding the narrower side's keys, values and mask with
    masked columns; the merged (R + R', max(T, T')) mask. Positions count real tokens, so nothing is recomputed."""
    width = max(mask.shape[1], other_mask.shape[1])
    for a, b in zip(layers_of(cache), layers_of(other), strict=True):
        for name in ("keys", "values"):
            x, y = getattr(a, name), getattr(b, name)
            out = x.new_empty((len(x) + len(y), x.shape[1], width, x.shape[3]))  # one copy of each side
            for rows, t in ((slice(0, len(x)), x), (slice(len(x), None), y.to(x.device))):
                out[rows, :, :width - t.shape[2]] = 0  # masked columns, but never NaN
                out[rows, :, width - t.shape[2]:] = t
            setattr(a, name, out)
    left = lambda m: F.pad(m, (width - m.shape[1], 0))  # noqa: E731
    return torch.cat([left(mask), left(other_mask.to(mask.device))])


def layers_of(cache: DynamicCache) -> list:
    """The cache's layers, refused in one line unless each is a plain full-attention DynamicLayer (a sliding
    window's rows cannot be padded and merged this way)."""
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        raise NotImplementedError(f"rows of a cache with {sorted({type(x).__name__ for x in cache.layers})} layers "
                                  "cannot be selected or merged; only full-attention DynamicLayer caches can")
    return cache.layers


class Prompt:
    """A left-padded (R, T) prompt block fed to a model in column chunks: `next(budget)` gives the next columns'
    ids, the mask up to their end and their positions, about `budget` tokens (rows x columns) at a time (None:
    all that remain), or None once every column has been given."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.ids, self.mask, self.given = input_ids, attention_mask, 0

    @property
    def done(self) -> bool:
        return self.given >= self.mask.shape[1]

    def next(self, budget: int | None):
        if self.done:
            return None
        width = self.mask.shape[1] - self.given if budget is None else max(1, budget // len(self.mask))
        cols = slice(self.given, min(self.given + width, self.mask.shape[1]))
        self.given = cols.stop
        return self.ids[:, cols], self.mask[:, :cols.stop], positions(self.mask)[:, cols]


def vocabulary_mismatch(path, tokenizer) -> str | None:
    """Why the model directory `path` cannot guide a base that reads `tokenizer` (one line), or None."""
    import json
    from pathlib import Path

    from alignment.models import load_tokenizer, same_vocabulary

    path = Path(path)
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        theirs = load_tokenizer(path)
        if not same_vocabulary(theirs, tokenizer):
            return (f"{path}: its tokenizer ({len(theirs)} tokens) is not the base's ({len(tokenizer)} tokens); a "
                    "guide must share the base's vocabulary (train it from the base policy)")
        return None
    size = json.loads((path / "config.json").read_text()).get("vocab_size")
    if size is not None and size < len(tokenizer):
        return f"{path}: its vocabulary has {size} tokens, the base's tokenizer {len(tokenizer)}"
    return None


def load_guide(path, tokenizer, *, reward: bool = False, dtype: str = "float32", device: str = "auto"):
    """A causal-LM guide (or, `reward`, a one-output sequence classifier) from its HF directory, for a base that
    reads `tokenizer`; ConfigError (one line, exit 2 in entry points) when their vocabularies differ."""
    from alignment.config import ConfigError, ModelConfig
    from alignment.models import load_causal_lm, load_sequence_classifier

    why = vocabulary_mismatch(path, tokenizer)
    if why:
        raise ConfigError(f"guide {why}")
    cfg = ModelConfig(name_or_path=str(path), dtype=dtype, device=device)
    return load_sequence_classifier(cfg, tokenizer, ["reward"]) if reward else load_causal_lm(cfg, tokenizer)


class Guide:
    """A causal LM over its own prompt rows with its own DynamicCache; `logits` (R, V) fp32 is always the
    distribution of the next token after the prompt plus every token given to `advance` so far. With a `chunk`,
    the prompt is prefilled by `fill()` calls of about `chunk` tokens each (logits None until it is all in)."""

    @torch.inference_mode()
    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk: int | None = None):
        self.model, self.chunk = model, chunk
        self.prompt = Prompt(input_ids.to(model.device), attention_mask.to(model.device))
        self.mask = self.prompt.mask[:, :0]
        self.cache = DynamicCache(config=model.config)
        self.logits: torch.Tensor | None = None
        while chunk is None and not self.fill():
            pass

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def device(self) -> torch.device:
        """Where the guide's logits live; a rule keeps its per-row preference tensors there too."""
        return self.mask.device

    @torch.inference_mode()
    def fill(self) -> bool:
        """Prefill the prompt's next chunk (all of it without a chunk); True once the whole prompt is cached."""
        part = self.prompt.next(self.chunk)
        if part is not None:
            ids, self.mask, pos = part
            logits = self._forward(ids, pos)
            self.logits = logits if self.prompt.done else None
        return self.prompt.done

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # logits_to_keep=1: the LM head runs on the last position only (a V x d matmul per row, not per token).
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos, past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def advance(self, tokens: torch.Tensor) -> None:
        """Append one emitted token per row, (R,), and compute the next logits."""
        if tokens.shape != (self.rows,):
            raise ValueError(f"Guide.advance: expected ({self.rows},) tokens, got {tuple(tokens.shape)}")
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        self.logits = self._forward(tokens.view(-1, 1).to(self.mask.device), self.mask.sum(-1, keepdim=True) - 1)

    def select(self, keep: torch.Tensor) -> None:
        """Keep rows `keep` (n,) only, in that order; the others' cache memory is released."""
        self.mask = select_rows(self.cache, self.mask, keep)
        self.logits = self.logits.index_select(0, keep.to(self.logits.device))

    def merge(self, other: Guide) -> None:
        """Append the rows of another prefilled guide of the same model after these."""
        self.mask = merge_rows(self.cache, self.mask, other.cache, other.mask)
        self.logits = torch.cat([self.logits, other.logits.to(self.logits.device)])


class CandidateReward(Protocol):
    """A sequence reward over a growing prefix per row, asked about k one-token extensions at a time."""

    def score(self, candidates: torch.Tensor) -> torch.Tensor:
        """(R, k) candidate token ids -> (R, k) reward of each row's prefix + that candidate."""
        ...

    def advance(self, tokens: torch.Tensor) -> None:
        """Commit one emitted token per row, (R,)."""
        ...


def score_head(model) -> torch.nn.Module:
    """The classification head of a decoder sequence classifier (`score` in Llama/Qwen/Mistral/GPT-2 families)."""
    head = getattr(model, "score", None)
    if head is None:
        raise ValueError(f"{type(model).__name__}: no `score` head; wrap the reward model in RecomputeReward instead")
    return head


class CachedSequenceReward:
    """A decoder sequence classifier (one output: the reward) scored at k candidates per row in one masked
    forward over its own prefix cache; `CandidateReward`. `chunk`, `fill`, `select`, `merge` as Guide's."""

    @torch.inference_mode()
    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk: int | None = None):
        self.backbone, self.head, self.chunk = model.base_model, score_head(model), chunk
        self.prompt = Prompt(input_ids.to(model.device), attention_mask.to(model.device))
        self.mask = self.prompt.mask[:, :0]
        self.cache = DynamicCache(config=model.config)
        self.candidates: torch.Tensor | None = None  # (R, k) of the last `score`, whose keys/values are cached
        while chunk is None and not self.fill():
            pass

    @torch.inference_mode()
    def fill(self) -> bool:
        part = self.prompt.next(self.chunk)
        if part is not None:
            ids, self.mask, pos = part
            self.backbone(input_ids=ids, attention_mask=self.mask, position_ids=pos, past_key_values=self.cache,
                          use_cache=True)
        return self.prompt.done

    def select(self, keep: torch.Tensor) -> None:
        """Keep rows `keep` (n,), in that order (the candidates of a `score` too)."""
        self.mask = select_rows(self.cache, self.mask, keep)
        if self.candidates is not None:
            self.candidates = self.candidates.index_select(0, keep.to(self.candidates.device))

    def merge(self, other: CachedSequenceReward) -> None:
        if self.candidates is not None or other.candidates is not None:
            raise RuntimeError("CachedSequenceReward.merge: between score and advance; merge after advance")
        self.mask = merge_rows(self.cache, self.mask, other.cache, other.mask)

    @torch.inference_mode()
    def score(self, candidates: torch.Tensor) -> torch.Tensor:
        self._drop_candidates()
        R, k = candidates.shape
        prefix = self.mask.bool()[:, None, :].expand(R, k, -1)  # (R, k, L): every candidate sees the prefix
        own = torch.eye(k, dtype=torch.bool, device=prefix.device).expand(R, k, k)  # ... and itself only
        mask4d = torch.cat([prefix, own], dim=-1)[:, None]  # (R, 1, k, L + k), True = attend
        pos = self.mask.sum(-1, keepdim=True).expand(R, k)  # all k at the next position
        h = self.backbone(input_ids=candidates.to(self.mask.device), attention_mask=mask4d, position_ids=pos,
                          past_key_values=self.cache, use_cache=True).last_hidden_state  # (R, k, d)
        self.candidates = candidates.to(self.mask.device)
        return self.head(h)[..., 0].float()

    @torch.inference_mode()
    def advance(self, tokens: torch.Tensor) -> None:
        tokens = tokens.to(self.mask.device).view(-1)
        hit = self.candidates == tokens[:, None] if self.candidates is not None else None
        if hit is not None and bool(hit.any(-1).all()):
            # Every row emitted one of its candidates: keep that candidate's keys/values (computed with the right
            # position and mask) and drop the other k - 1; no forward needed.
            self._keep_candidate(hit.int().argmax(-1))
        else:  # e.g. finished rows receive the pad token: recompute exactly
            self._drop_candidates()
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
            self.backbone(input_ids=tokens[:, None], attention_mask=self.mask,
                          position_ids=self.mask.sum(-1, keepdim=True) - 1, past_key_values=self.cache, use_cache=True)
            return
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)

    def _drop_candidates(self) -> None:
        if self.candidates is not None:
            self.cache.crop(-self.candidates.shape[1])
            self.candidates = None

    def _keep_candidate(self, chosen: torch.Tensor) -> None:
        """Cache layout per layer (R, heads, L + k, d) -> (R, heads, L + 1, d) with column L = candidate `chosen`."""
        L, rows = self.mask.shape[1], torch.arange(len(chosen), device=chosen.device)
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name)
                picked = t[rows, :, L + chosen]  # (R, heads, d)
                setattr(layer, name, torch.cat([t[:, :, :L], picked[:, :, None]], dim=2))
        self.candidates = None


class RecomputeReward:
    """Any `fn(input_ids, attention_mask) -> (R,)` sequence reward as a `CandidateReward`, by k full forwards of
    the left-padded prefix + candidate per step: O(k L) work per token, no cache."""

    def __init__(self, fn, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.fn, self.ids, self.mask = fn, input_ids, attention_mask

    @torch.inference_mode()
    def score(self, candidates: torch.Tensor) -> torch.Tensor:
        ones = self.mask.new_ones(len(self.mask), 1)
        cols = [self.fn(torch.cat([self.ids, candidates[:, j:j + 1].to(self.ids.device)], 1),
                        torch.cat([self.mask, ones], 1)) for j in range(candidates.shape[1])]
        return torch.stack(cols, dim=1).float()

    def advance(self, tokens: torch.Tensor) -> None:
        self.ids = torch.cat([self.ids, tokens.view(-1, 1).to(self.ids.device)], 1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.mask), 1)], 1)


def classifier_reward(model):
    """`fn(input_ids, attention_mask) -> (R,)` of a sequence classifier read at the last position (left padding),
    with the same position ids as the cached path; for RecomputeReward."""
    def fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = model.base_model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             position_ids=positions(mask).to(model.device)).last_hidden_state
        return score_head(model)(h[:, -1])[:, 0]
    return fn
