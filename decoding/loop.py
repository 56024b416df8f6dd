"""The one decode loop of offline decoding and the decode API: token selection, the running `Batch`, `generate`.

    tokens = generate(model, ids, mask, rule, max_new_tokens=64, eos_token_id=eos, pad_token_id=pad,
                      temperature=1.0, seeds=[...])   # (B, n) new tokens; `rule` from decoding.processors

One cached base forward per step, with an optional guidance rule (PAD, Drift, GenARM, ARGS) over the same rows.
Sampling inverts the CDF at one uniform per row and step, a pure function of the row's seed and step (splitmix64),
so a row's tokens do not depend on its batch, on when it joined one, or on any Python loop: the arms of
`python -m decoding.generate` share their random numbers, and the decode API (`decoding.scheduler`, which moves
rows in and out of one running `Batch` at every step) answers a seeded request the same in any company.
"""

from __future__ import annotations

from collections.abc import Generator

import torch

from alignment.sampling import render_prompt
from decoding.guides import Guide, left_pad
from decoding.personalization import RowGroupsRule

# --- token selection ---------------------------------------------------------------------------
GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64 (Steele et al. 2014)


def _int64(x: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    x %= 2**64
    return x - 2**64 if x >= 2**63 else x


def _shift_right(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """(B,) float64 in (0, 1): output number `counter` of splitmix64 seeded with `seed`, row by row; a pure
    function of (seed, counter), so a row's noise does not depend on its batch, on when it joined one, or on
    any Python loop. int64 arithmetic wraps, as splitmix64's 64-bit arithmetic does."""
    z = seeds.long() + (counters.long() + 1) * _int64(GOLDEN)
    z = (z ^ _shift_right(z, 30)) * _int64(MIX1)
    z = (z ^ _shift_right(z, 27)) * _int64(MIX2)
    z = z ^ _shift_right(z, 31)
    return (_shift_right(z, 11).double() + 0.5) * 2.0**-53


def seed_tensor(seeds: list[int], device=None) -> torch.Tensor:
    """Seeds (any integers; a request's are in [-2**63, 2**64)) as (B,) int64 with the same low 64 bits."""
    return torch.tensor([_int64(int(s)) for s in seeds], dtype=torch.long, device=device)


def nucleus(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-p (nucleus) support of (B, V) scores: -inf outside each row's smallest set of highest-probability tokens
    whose softmax mass reaches top_p (B,) in (0, 1]; the most likely token always stays. p = 1 keeps every token.

    A token is kept when the mass strictly above it is below p: sorted descending, cumsum(probs) - prob < p.
    """
    ordered, order = scores.sort(-1, descending=True)
    probs = ordered.softmax(-1)
    drop = (probs.cumsum(-1) - probs) >= top_p.to(scores.device, torch.float32).view(-1, 1)
    drop[:, 0] = False
    return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def pick_tokens(scores: torch.Tensor, temperature: float | torch.Tensor, noise: torch.Tensor | None = None,
                top_p: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) fp32 scores -> (B,) tokens: argmax where the temperature is 0, else a sample of softmax(scores / T)
    by inversion: the first token whose cumulative probability reaches u, with `noise` u (B,) in (0, 1), one
    uniform per row (`uniforms`; None: torch's global generator). `temperature` is a float or (B,) per row;
    `top_p` (B,) first restricts each sampled row to its nucleus of softmax(scores / T) (`nucleus`).

    A token of probability 0 (-inf) owns an empty interval of the cumulative sum, so it is never drawn; the sum
    is in float64, so a vocabulary of 10^5 tokens loses no tail mass to rounding.
    """
    t = torch.as_tensor(temperature, dtype=torch.float32, device=scores.device).expand(len(scores))
    greedy = scores.argmax(-1)
    if not bool((t > 0).any()):
        return greedy
    z = scores / t.clamp(min=1e-6).view(-1, 1)
    if top_p is not None:
        z = nucleus(z, top_p)
    cdf = z.softmax(-1).double().cumsum(-1)
    u = torch.rand(len(z), dtype=torch.float64, device=z.device) if noise is None else noise.to(z.device)
    sampled = torch.searchsorted(cdf, (u * cdf[:, -1]).view(-1, 1)).view(-1).clamp(max=z.shape[-1] - 1)
    return torch.where(t > 0, sampled, greedy)


# --- the running batch: one step of the one decode loop ---------------------------------------------------------
class Batch:
    """Rows decoding together: the base model's KV cache over their prompts (a `Guide`), the guidance rule over
    the same rows, per-row temperature, top-p, seed and step count, and one `tag` per row (the caller's handle).

    pick() -> (R,) tokens; advance(tokens, keep) moves rows `keep` (R,) bool on by their token and evicts the
    others; merge(other) appends a prefilled batch's rows. A rule that cannot drop rows (a decoding.processors rule
    built for a fixed batch) keeps finished rows in the batch reading pad instead (`done`), as offline decoding
    always did.
    """

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, rule=None, *, tags: list,
                 eos: int | list[int], temperature, seeds: list[int], top_p=None, min_new_tokens: int = 0,
                 pad_token_id: int = 0, chunk: int | None = None):
        R = len(input_ids)
        self.base = Guide(model, input_ids, attention_mask, chunk)
        self.rule, self.tags, self.pad = rule, tags, pad_token_id
        dev = self.base.device
        self.eos = torch.as_tensor([eos] if isinstance(eos, int) else list(eos), device=dev)
        self.temperature = torch.as_tensor(temperature, dtype=torch.float32, device=dev).expand(R).clone()
        self.top_p = None if top_p is None else torch.as_tensor(top_p, dtype=torch.float32, device=dev).expand(R)
        self.seeds, self.steps = seed_tensor(seeds, dev), torch.zeros(R, dtype=torch.long, device=dev)
        self.min_new = min_new_tokens  # EOS banned before this many tokens (offline benchmarks only)
        self.evicts = rule is None or hasattr(rule, "select")
        self.done = torch.zeros(R, dtype=torch.bool, device=dev)  # finished rows riding along (not `evicts`)

    @property
    def rows(self) -> int:
        return len(self.tags)

    def fill(self) -> bool:
        """One prefill chunk of every model whose prompt is not all cached; True once the batch can step."""
        done = self.base.fill()
        return (self.rule is None or not hasattr(self.rule, "fill") or self.rule.fill()) and done

    def pick(self) -> torch.Tensor:
        scores = self.base.logits
        if self.min_new and int(self.steps[0]) < self.min_new:  # offline batches: every row at the same step
            scores = scores.clone()
            scores[:, self.eos] = float("-inf")
        if self.rule is not None:
            scores = self.rule(scores)
        tokens = pick_tokens(scores, self.temperature, uniforms(self.seeds, self.steps), self.top_p)
        return tokens.masked_fill(self.done, self.pad)

    def advance(self, tokens: torch.Tensor, keep: torch.Tensor) -> None:
        """Rows `keep` read their token and stay; the others leave (or, if the rule cannot drop rows, read pad)."""
        self.steps += 1
        keep = keep.to(self.base.device)
        if not self.evicts:
            self.done |= ~keep
            tokens = tokens.masked_fill(self.done, self.pad)
        elif not bool(keep.all()):
            self.select(keep.nonzero().view(-1))
            tokens = tokens[keep]
        if self.rows:
            if self.rule is not None:
                self.rule.advance(tokens)
            self.base.advance(tokens)

    def select(self, idx: torch.Tensor) -> None:
        """Keep rows idx (n,) ascending; every cache drops the others' rows."""
        rows = self.rows
        self.base.select(idx)
        if self.rule is not None:
            self.rule.select(idx, rows)
        self.tags = [self.tags[i] for i in idx.tolist()]
        self.temperature, self.seeds, self.steps, self.done = (t.index_select(0, idx) for t in (
            self.temperature, self.seeds, self.steps, self.done))
        self.top_p = None if self.top_p is None else self.top_p.index_select(0, idx)

    def merge(self, other: Batch) -> None:
        """Append a prefilled batch's rows (the same model) after these; both must evict finished rows."""
        offset = self.rows
        self.base.merge(other.base)
        if other.rule is not None:
            self.rule = self.rule or RowGroupsRule(other.rule.g, [])
            self.rule.merge(other.rule, offset)
        if self.top_p is not None or other.top_p is not None:
            ones = lambda b: b.top_p if b.top_p is not None else torch.ones_like(b.temperature)  # noqa: E731
            self.top_p = torch.cat([ones(self), ones(other)])
        self.tags = self.tags + other.tags
        self.temperature, self.seeds, self.steps, self.done = (torch.cat([a, b]) for a, b in (
            (self.temperature, other.temperature), (self.seeds, other.seeds), (self.steps, other.steps),
            (self.done, other.done)))


@torch.inference_mode()
def decode_steps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, rule=None, *, max_new_tokens: int,
                 eos_token_id: int | list[int], pad_token_id: int, temperature: float | torch.Tensor = 0.0,
                 min_new_tokens: int = 0, seeds: list[int] | None = None,
                 top_p: torch.Tensor | None = None) -> Generator[torch.Tensor, torch.Tensor | None, None]:
    """Decode a left-padded batch with one cached base forward per step and an optional guidance rule, yielding
    the (B,) tokens of every step as soon as they are chosen (for streaming, and for benchmarks that interleave
    two decodings step by step).

    Args: input_ids, attention_mask (B, L) left-padded prompts; rule: a decoding.processors rule built for these
    B rows (None: plain decoding); eos_token_id one id or several; temperature 0 = greedy; min_new_tokens bans EOS
    before that many tokens (set it to max_new_tokens for fixed-length benchmarks); seeds: one per row for
    batch-independent sampling (else drawn from torch's generator); temperature and top_p may be (B,) tensors,
    one value per row (`pick_tokens`). Stops after max_new_tokens or when every row has finished.

    A row finishes at its EOS, or when the caller says so: `steps.send(rows)` with a (B,) bool tensor instead of
    `next(steps)` finishes those rows after the step just yielded (a stop string, a row's own token limit, a
    client gone) and returns the next step's tokens. A finished row leaves the batch (`Batch`,
    the step the decode API runs too: its caches and its guides' lose the row; a decoding.processors rule cannot
    drop rows, so under one it stays and its guides read pad) and yields pad from then on.
    """
    B, device = len(input_ids), model.device
    sampling = bool((torch.as_tensor(temperature) > 0).any())
    seeds = seeds if seeds is not None or not sampling else torch.randint(2**62, (B,)).tolist()
    batch = Batch(model, input_ids, attention_mask, rule, tags=list(range(B)), eos=eos_token_id,
                  temperature=torch.as_tensor(temperature, dtype=torch.float32).expand(B), top_p=top_p,
                  seeds=seeds or [0] * B, min_new_tokens=min_new_tokens, pad_token_id=pad_token_id)
    alive = torch.arange(B, device=device)  # the input row of each batch row
    for t in range(max_new_tokens):
        token = batch.pick()
        finished = batch.done | torch.isin(token, batch.eos)
        stop = yield torch.full((B,), pad_token_id, dtype=torch.long, device=device).index_copy(0, alive, token)
        if stop is not None:
            finished |= stop.to(device)[alive]
        if t + 1 == max_new_tokens or bool(finished.all()):  # one host sync per step; noise next to a forward
            return
        batch.advance(token, ~finished)
        alive = alive[~finished] if batch.evicts else alive


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, rule=None, **kw) -> torch.Tensor:
    """`decode_steps` to the end: (B, n) new tokens, n <= max_new_tokens, pad after a row's EOS."""
    return torch.stack(list(decode_steps(model, input_ids, attention_mask, rule, **kw)), dim=1)


def encode_prompts(tokenizer, messages: list[list[dict]], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Chat prompts (with the assistant header) as left-padded (B, L) ids and mask."""
    rows = tokenizer([render_prompt(tokenizer, m) for m in messages], add_special_tokens=False)["input_ids"]
    return left_pad(rows, tokenizer.pad_token_id, device)
