"""APC: the Active-Passive-Constraint persona-faithfulness score, batched.

Peng & Shang, "Quantifying and Optimizing Global Faithfulness in Persona-driven Role-playing", NeurIPS 2024,
arXiv:2405.07726. For persona statements s_1..s_S, a query q and a response r (eq. 3-5):

    V_APC(q, r) = sum_i  P_rel(s_i, q) * P_entail(s_i, q, r)  +  (1 - P_rel(s_i, q)) * (1 - P_contra(s_i, q, r))

A relevant statement must be entailed by the response (active constraint); an irrelevant one must only not be
contradicted (passive constraint). V_APC is the expected number of satisfied constraints, in [0, S]. ΔAPC (eq. 6)
subtracts what a response neutral to every statement scores (P_entail = P_contra = 0), Σ_i (1 - P_rel):

    ΔAPC = Σ_i P_rel * P_entail  -  Σ_i (1 - P_rel) * P_contra          (active reward - passive penalty)

P_rel comes from a relevance classifier with labels (no, yes) over (statement, query); P_entail and P_contra from an
NLI classifier with labels (contradicted, neutral, entailed) over (statement, query, response). Both are any pair of
Hugging Face sequence classifiers ("discriminators"); in the paper they are DeBERTa-v3-large students of GPT-4.

How this differs from the official code (KomeijiForce/Active_Passive_Constraint_Koishiday_2024, score.py), which runs
one unbatched forward per statement and recomputes relevance for every response (2*S*R forwards per query):
  - relevance is computed once per (character, statement, query) and cached, so all responses to a query, the
    neutral baseline and later calls reuse it; NLI runs over all (statement, response) pairs in length-sorted
    batches under torch.inference_mode();
  - label order is read from each model's config.id2label and checked, not assumed;
  - ΔAPC is implemented (the official repo has none), either as eq. 6 or against a real neutral response text;
  - formats that return `rewards.packed.Packed` inputs (a shared prefix, then a block: the world's query then a
    statement, a statement then a response) are read one sequence per prefix by decoder classifiers, with the
    numbers of separate forwards (bench/apc_score.py --format packed; fewer tokens and forwards, not less time
    on the world's tiny classifiers on a CPU);
  - inputs are capped at max_length tokens by trimming only the response, and trimmed pairs are flagged;
  - an optional pruned mode skips statements a bi-encoder finds far from the query (App. A suggests this).
    A pruned statement counts as irrelevant and not contradicted (P_rel = P_contra = 0): it adds exactly 1 to
    V_APC and 0 to ΔAPC without any classifier forward. `APCScorer.pruning_deviation` measures what that costs.

Usage:
    scorer = APCScorer(rel_model, rel_tok, nli_model, nli_tok, batch_size=64)
    scores = scorer.score(statements, query, responses, character="Alice")   # APCScores, see below
    reward = apc_reward_fn(scorer)   # TRL reward function: fn(prompts, completions, statements, query, ...)
"""

import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from inspect import signature

import torch
from torch import Tensor, nn

from rewards.packed import Packed, flat, pack, packable, packed_logits, tokenize_packed

RELEVANCE_LABELS = ("no", "yes")
NLI_LABELS = ("contradicted", "neutral", "entailed")

# Label names seen in the wild, after lowercasing and dropping non-letters (MNLI heads say "entailment" and
# "contradiction", the APC prompts say "contradict"/"contradicted"). Generic names (LABEL_0) are never guessed:
# the released APC checkpoints were trained without id2label, so they need an explicit `*_labels=` mapping.
_LABEL_SYNONYMS = {
    "no": "no", "irrelevant": "no", "notrelevant": "no", "unrelated": "no",
    "yes": "yes", "relevant": "yes",
    "contradicted": "contradicted", "contradiction": "contradicted", "contradict": "contradicted",
    "contradictory": "contradicted",
    "neutral": "neutral",
    "entailed": "entailed", "entailment": "entailed", "entail": "entailed", "entails": "entailed",
}

# One cache entry per (character, statement, query[, response]); 2**16 entries is ~100 queries of the paper's
# largest persona (MLK, 599 statements) and a few MB of Python objects.
CACHE_SIZE = 2**16


# ----------------------------------------------------------------------------------------------------------------
# Input formats. A format is a function of (character, statement, query[, response]) returning one string or a
# (text, text_pair) tuple for pair encoding. Discriminators must be scored with the format they were trained on.

# The APC paper's single-sequence templates, verbatim from the official prompt.py (the four-space line and the
# grammar are what the released checkpoints were trained on, so they are kept as is).
_APC_HEADER = "Character: {character}\n    \nPersona Statement: {statement}\n\nUser Utterance: {query}\n\n"
_APC_RELEVANCE_ASK = (
    'Does this user utterance should be responded by including the information in the given persona statement? '
    'Only answer "yes" or "no" without any explanation.'
)
_APC_NLI_ASK = (
    "For this response, is the given persona entailed, neutral, or contradict to it in natural language inference? "
    'Only answer "entailed", "neutral" or "contradict" without any explanation.'
)


def apc_relevance_text(character: str, statement: str, query: str) -> str:
    """The paper's relevance input (official `fill_in_query_discrimination_template`)."""
    return _APC_HEADER.format(character=character, statement=statement, query=query) + _APC_RELEVANCE_ASK


def apc_nli_text(character: str, statement: str, query: str, response: str) -> str:
    """The paper's NLI input for the DeBERTa students (official `fill_in_brief_nli_discrimination_template`)."""
    header = _APC_HEADER.format(character=character, statement=statement, query=query)
    return header + f"Response: {response}\n\n" + _APC_NLI_ASK


def pair_relevance_text(character: str, statement: str, query: str) -> tuple[str, str]:
    """Pair encoding (statement, query), as an MNLI-style cross-encoder expects; the character is not used."""
    return statement, query


def pair_nli_text(character: str, statement: str, query: str, response: str) -> tuple[str, str]:
    """Pair encoding (premise = statement, hypothesis = query + response)."""
    return statement, f"{query} {response}"


FORMATS = {
    "apc": (apc_relevance_text, apc_nli_text),
    "pair": (pair_relevance_text, pair_nli_text),
}


# ----------------------------------------------------------------------------------------------------------------
# The score itself: pure functions on probabilities.

def apc_terms(p_rel: Tensor, p_ent: Tensor, p_con: Tensor) -> tuple[Tensor, Tensor]:
    """Per-statement active reward and passive penalty.

    p_rel (S,) relevance P(yes); p_ent, p_con (R, S) NLI P(entailed), P(contradicted).
    Returns active = P_rel * P_entail (R, S) and passive = (1 - P_rel) * P_contra (R, S), so that a statement
    contributes active + (1 - P_rel) - passive to V_APC and active - passive to ΔAPC.
    """
    return p_rel * p_ent, (1 - p_rel) * p_con


def apc_value(p_rel: Tensor, p_ent: Tensor, p_con: Tensor, mask: Tensor | None = None) -> Tensor:
    """V_APC, arXiv:2405.07726 eq. 5: Σ_i P_rel,i * P_ent,ri + (1 - P_rel,i) * (1 - P_con,ri).

    p_rel (S,); p_ent, p_con (R, S); mask (S,) or (R, S) bool, False for padding statements, which add nothing.
    Returns (R,), in [0, S]. Worked example (tests/test_apc.py): p_rel = (.9, .2, .5), p_ent = (.8, .1, .3),
    p_con = (.1, .6, .2) gives .81 + .34 + .55 = 1.70.
    """
    per_statement = p_rel * p_ent + (1 - p_rel) * (1 - p_con)  # (R, S)
    if mask is not None:
        per_statement = per_statement * mask
    return per_statement.sum(-1)


def apc_delta(p_rel: Tensor, p_ent: Tensor, p_con: Tensor, mask: Tensor | None = None) -> Tensor:
    """ΔAPC, arXiv:2405.07726 eq. 6: V_APC - Σ_i (1 - P_rel,i) = Σ_i active_i - passive_i.

    The subtracted term is V_APC of a response that is neutral to every statement (P_ent = P_con = 0), so a
    neutral response scores 0, a faithful one > 0, a contradicting one < 0. Shapes as in `apc_value`; returns (R,).
    """
    active, passive = apc_terms(p_rel, p_ent, p_con)
    per_statement = active - passive  # (R, S)
    if mask is not None:
        per_statement = per_statement * mask
    return per_statement.sum(-1)


@dataclass
class APCScores:
    """Scores of R responses against one persona of S statements and one query.

    v_apc (R,) V_APC; delta (R,) ΔAPC; p_rel (S,); p_ent, p_con, active, passive (R, S); kept (S,) bool, False
    for statements pruned away (then p_rel = p_ent = p_con = 0: irrelevant and not contradicted); truncated (R, S)
    bool, True where the NLI input was cut to max_length.
    """

    v_apc: Tensor
    delta: Tensor
    p_rel: Tensor
    p_ent: Tensor
    p_con: Tensor
    active: Tensor
    passive: Tensor
    kept: Tensor
    truncated: Tensor


@dataclass
class APCRequest:
    """One query to score: the persona's statements, the query, the responses and the character's name."""

    statements: Sequence[str]
    query: str
    responses: Sequence[str]
    character: str = ""


# ----------------------------------------------------------------------------------------------------------------
# Label contracts.

def _label_key(name: str) -> str:
    return re.sub(r"[^a-z]", "", str(name).lower())


def label_indices(id2label: dict, expected: Sequence[str], what: str, names: Sequence[str] | None = None) -> list[int]:
    """Output index of each expected label, read from `names` if given, else from the model's id2label.

    Accepts any order and common synonyms (entailment, contradiction, relevant, ...), so a head ordered
    (entailment, neutral, contradiction) is remapped rather than misread. Raises ValueError naming both orders when
    the names are generic (LABEL_0), missing, duplicated or more than expected.
    """
    order = list(names) if names is not None else [id2label[i] for i in sorted(id2label)]
    if names is not None and len(names) != len(id2label):
        raise ValueError(f"{what}_labels {order} names {len(order)} outputs but the model has {len(id2label)}")
    canonical = [_LABEL_SYNONYMS.get(_label_key(n)) for n in order]
    if len(order) != len(expected) or sorted(map(str, canonical)) != sorted(expected):
        source = f"{what}_labels" if names is not None else "config.id2label"
        raise ValueError(
            f"{what} model labels {order} (from {source}) do not match the expected {list(expected)} in any order; "
            f"pass {what}_labels=[name of output 0, output 1, ...], e.g. {what}_labels={list(expected)}"
        )
    return [canonical.index(label) for label in expected]


# ----------------------------------------------------------------------------------------------------------------
# Batched classifier forward.

class _BoundedCache(OrderedDict):
    """A dict that forgets its least recently used entries beyond `maxsize` (see `_lookup` for reads)."""

    def __init__(self, maxsize: int):
        super().__init__()
        self.maxsize = maxsize

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.move_to_end(key)
        if len(self) > self.maxsize:
            self.popitem(last=False)


def _lookup(cache: _BoundedCache, keys: list) -> tuple[dict, list]:
    """Split keys into a dict of the cached ones (refreshed as recently used) and a deduplicated missing list.

    Callers read values from the returned dict, not the cache, so a call with more new keys than the cache holds
    cannot evict its own results before they are used.
    """
    found, missing = {}, []
    for key in dict.fromkeys(keys):
        if key in cache:
            found[key] = cache[key]
            cache.move_to_end(key)
        else:
            missing.append(key)
    return found, missing


def _pad(encodings: list[dict], pad_id: int, side: str) -> dict[str, Tensor]:
    """Pad token-id lists to one (B, T) batch; attention_mask is 0 on padding, other keys pad with 0."""
    width = max(len(e["input_ids"]) for e in encodings)
    batch = {}
    for key in encodings[0]:
        fill = pad_id if key == "input_ids" else 0
        rows = [[fill] * (width - len(e[key])) for e in encodings]
        rows = [r + e[key] if side == "left" else e[key] + r for r, e in zip(rows, encodings, strict=True)]
        batch[key] = torch.tensor(rows)
    return batch


class Discriminator:
    """A Hugging Face sequence classifier + tokenizer that returns probabilities in a fixed label order."""

    def __init__(self, model: nn.Module, tokenizer, expected: Sequence[str], what: str,
                 labels: Sequence[str] | None = None, batch_size: int = 64, max_length: int | None = 512):
        if tokenizer.pad_token_id is None:
            raise ValueError(f"{what} tokenizer has no pad token; set tokenizer.pad_token before scoring in batches")
        if getattr(model.config, "pad_token_id", 0) is None:
            # Decoder classifiers (LlamaForSequenceClassification) pool the last token that is not
            # config.pad_token_id and refuse batches without one. That id must be the tokenizer's pad id, or a
            # padding position gets pooled; encoders (BERT, DeBERTa) pool [CLS] and do not care.
            raise ValueError(f"{what} model.config.pad_token_id is None; set it to tokenizer.pad_token_id")
        self.what = what
        self.packable = packable(model)  # a decoder classifier: Packed inputs can share one forward per prefix
        self.model = model.eval()  # from_config models start in train mode; dropout would make scores random
        self.tokenizer = tokenizer
        self.index = label_indices(model.config.id2label, expected, what, labels)
        self.batch_size, self.max_length = batch_size, max_length
        self.accepts = set(signature(model.forward).parameters)  # drop token_type_ids for models without them

    def encode(self, inputs: Sequence[str | tuple[str, str]], truncate: bool) -> list[dict[str, list[int]]]:
        """Tokenize strings or (text, text_pair) tuples into one dict of id lists per input, unpadded."""
        if not inputs:
            return []
        pairs = [isinstance(x, tuple) for x in inputs]
        if any(pairs) and not all(pairs):
            raise ValueError("a format must return only strings or only (text, text_pair) tuples")
        firsts = [x[0] if p else x for x, p in zip(inputs, pairs, strict=True)]
        kwargs = {"text_pair": [x[1] for x in inputs]} if all(pairs) else {}
        if truncate and self.max_length is not None:
            kwargs |= {"truncation": True, "max_length": self.max_length}
        enc = self.tokenizer(firsts, **kwargs)
        keys = [k for k in enc.keys() if k in self.accepts]
        return [{k: enc[k][i] for k in keys} for i in range(len(inputs))]

    @torch.inference_mode()
    def probs(self, encodings: list[dict[str, list[int]]]) -> Tensor:
        """Class probabilities (N, C) in the expected label order, from length-sorted chunks of batch_size."""
        out = torch.empty(len(encodings), len(self.index))
        # Longest first: similar lengths share a chunk, so padding stays small, and a too-long input fails at once.
        order = sorted(range(len(encodings)), key=lambda i: -len(encodings[i]["input_ids"]))
        device = next(self.model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            batch = _pad([encodings[i] for i in rows], self.tokenizer.pad_token_id, self.tokenizer.padding_side)
            logits = self.model(**{k: v.to(device) for k, v in batch.items()}).logits  # (B, C)
            out[rows] = logits.float().softmax(-1)[:, self.index].cpu()
        return out

    @torch.inference_mode()
    def packed_probs(self, items: Sequence[Packed], tokens_per_sequence: int = 160,
                     tokens_per_forward: int = 8192) -> tuple[Tensor, Tensor]:
        """Class probabilities (N, C) of prefix + block for each item, the blocks of a prefix in sequences of at
        most `tokens_per_sequence` tokens (`packed_logits`; attention over a sequence grows with its square: 160 was
        the fastest of 48-512 for the world's classifiers on a CPU, docs/experiments/apc_discriminators.md), and each
        item's length in tokens (N,), prefix + block. The same numbers as classifying each prefix + block text on
        its own (tests/test_apc.py), with each prefix computed once per sequence; sequences go in length-sorted
        batches of about `tokens_per_forward` tokens."""
        prefix_of, prefix_ids, block_ids = tokenize_packed(self.tokenizer, items, self.what)
        lengths = torch.tensor([len(prefix_ids[k]) + len(b) for k, b in zip(prefix_of, block_ids, strict=True)],
                               dtype=torch.long)
        sequences = pack(range(len(items)), prefix_of, prefix_ids, block_ids, tokens_per_sequence)
        out = torch.empty(len(items), len(self.index))
        start = 0
        while start < len(sequences):
            width = len(sequences[start][0]) + sum(len(b) for _, b in sequences[start][1])  # longest first
            rows = sequences[start:start + max(1, tokens_per_forward // width)]
            start += len(rows)
            logits, owners = packed_logits(self.model, rows, self.tokenizer.pad_token_id)
            out[owners] = logits.float().softmax(-1)[:, self.index].cpu()
        return out, lengths


# ----------------------------------------------------------------------------------------------------------------
# Optional pruning with a bi-encoder.

class BiEncoderPruner:
    """Keeps the top_m statements closest to the query by cosine of mean-pooled encoder embeddings.

    Any `AutoModel` encoder and its tokenizer (e.g. sentence-transformers/all-MiniLM-L6-v2). Statement embeddings
    are cached per text, so a persona is embedded once and each new query costs one short forward.
    """

    def __init__(self, model: nn.Module, tokenizer, top_m: int, batch_size: int = 64, max_length: int = 512):
        if top_m < 1:
            raise ValueError(f"top_m must be >= 1, got {top_m}")
        self.model, self.tokenizer, self.top_m = model.eval(), tokenizer, top_m
        self.batch_size, self.max_length = batch_size, max_length
        self.cache = _BoundedCache(CACHE_SIZE)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> Tensor:
        """Unit-norm mean-pooled embeddings (N, H) of the last hidden state, padding excluded."""
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        device = next(self.model.parameters()).device
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            batch = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt").to(device)
            hidden = self.model(**batch).last_hidden_state.float()  # (B, T, H)
            mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, H)
            for text, vec in zip(chunk, nn.functional.normalize(pooled, dim=-1).cpu(), strict=True):
                self.cache[text] = vec
        return torch.stack([self.cache[t] for t in texts])

    def keep(self, statements: Sequence[str], query: str) -> Tensor:
        """(S,) bool: True for the top_m statements by cosine similarity to the query."""
        emb = self.embed([query, *statements])  # (1 + S, H)
        sims = emb[1:] @ emb[0]  # (S,)
        kept = torch.zeros(len(statements), dtype=torch.bool)
        kept[sims.topk(min(self.top_m, len(statements))).indices] = True
        return kept


# ----------------------------------------------------------------------------------------------------------------
# The scorer.

class APCScorer:
    """Batched, cached APC over a relevance and an NLI sequence classifier.

    relevance_model / nli_model: any `AutoModelForSequenceClassification` with 2 labels (no, yes) and 3 labels
    (contradicted, neutral, entailed) in any order, read from config.id2label, or named by `relevance_labels` /
    `nli_labels` (one name per output index) for heads without names. The models are put in eval mode; they are
    assumed frozen (the caches would go stale otherwise: call `clear_cache()` after changing them).

    relevance_text / nli_text: input formats (see FORMATS); the default is the paper's template.
    neutral_response: None for ΔAPC as in eq. 6 (an ideal neutral response, P_ent = P_con = 0); a string to
        subtract V_APC of that actual response instead, scored by the same NLI model.
    max_length: token cap per input; NLI inputs over it lose the end of the response, not the template.
    pruner: a BiEncoderPruner; then only its top_m statements per query go through the classifiers.
    packed: formats that return `Packed` inputs are read one forward per prefix (`Discriminator.packed_probs`) by
        decoder classifiers; False (and any encoder) reads each prefix + block as one text, with the same numbers.
    """

    def __init__(self, relevance_model: nn.Module, relevance_tokenizer, nli_model: nn.Module, nli_tokenizer, *,
                 batch_size: int = 64, device: str | torch.device | None = None,
                 relevance_labels: Sequence[str] | None = None, nli_labels: Sequence[str] | None = None,
                 relevance_text: Callable = apc_relevance_text, nli_text: Callable = apc_nli_text,
                 neutral_response: str | None = None, max_length: int | None = 512,
                 pruner: BiEncoderPruner | None = None, packed: bool = True):
        if device is not None:
            relevance_model, nli_model = relevance_model.to(device), nli_model.to(device)
        self.relevance = Discriminator(relevance_model, relevance_tokenizer, RELEVANCE_LABELS, "relevance",
                                       relevance_labels, batch_size, max_length)
        self.nli = Discriminator(nli_model, nli_tokenizer, NLI_LABELS, "nli", nli_labels, batch_size, max_length)
        self.relevance_text, self.nli_text = relevance_text, nli_text
        self.neutral_response, self.max_length, self.pruner = neutral_response, max_length, pruner
        self.packed = packed
        self.clear_cache()

    def clear_cache(self) -> None:
        """Forget cached relevance P(yes) and NLI (P_ent, P_con, truncated) values."""
        self.relevance_cache = _BoundedCache(CACHE_SIZE)  # (character, statement, query) -> P(yes)
        self.nli_cache = _BoundedCache(CACHE_SIZE)  # (character, statement, query, response) -> (ent, con, cut)

    def score(self, statements: Sequence[str], query: str, responses: Sequence[str], character: str = "",
              prune: bool = True) -> APCScores:
        """APC of each response to `query` against all `statements`; see APCScores for the fields."""
        return self.score_many([APCRequest(statements, query, responses, character)], prune)[0]

    def score_many(self, requests: Sequence[APCRequest], prune: bool = True) -> list[APCScores]:
        """Score several queries at once: all their uncached inputs share one batched pass per classifier."""
        for r in requests:
            for name in ("statements", "responses"):
                if isinstance(value := getattr(r, name), str):
                    raise TypeError(f"{name} must be a list of strings, got the string {value[:60]!r}")
        kept = [self._keep(r, prune) for r in requests]
        rel = self._relevance([(r.character, s, r.query) for r, k in zip(requests, kept, strict=True)
                               for s, keep in zip(r.statements, k.tolist(), strict=True) if keep])
        nli = self._nli([(r.character, s, r.query, resp) for r, k in zip(requests, kept, strict=True)
                         for resp in self._responses(r)
                         for s, keep in zip(r.statements, k.tolist(), strict=True) if keep])
        return [self._assemble(r, k, rel, nli) for r, k in zip(requests, kept, strict=True)]

    def pruning_deviation(self, statements: Sequence[str], query: str, responses: Sequence[str],
                          character: str = "") -> dict[str, Tensor]:
        """|pruned - exact| of V_APC and ΔAPC per response (R,), plus the kept mask (S,).

        Pruned statements count as irrelevant and not contradicted (P_rel = P_con = 0), i.e. each adds exactly 1
        to V_APC and 0 to ΔAPC; the deviation is therefore Σ_pruned P_rel + passive - active for V_APC and
        Σ_pruned passive - active for ΔAPC: what a contradiction or an answer hidden in a pruned statement costs.
        """
        pruned = self.score(statements, query, responses, character, prune=True)
        exact = self.score(statements, query, responses, character, prune=False)
        return {"v_apc": (pruned.v_apc - exact.v_apc).abs(), "delta": (pruned.delta - exact.delta).abs(),
                "kept": pruned.kept}

    def _keep(self, request: APCRequest, prune: bool) -> Tensor:
        if prune and self.pruner is not None:
            return self.pruner.keep(request.statements, request.query)
        return torch.ones(len(request.statements), dtype=torch.bool)

    def _responses(self, request: APCRequest) -> list[str]:
        """The responses, plus the neutral baseline response as a last row when ΔAPC uses one."""
        extra = [] if self.neutral_response is None else [self.neutral_response]
        return [*request.responses, *extra]

    def _relevance(self, keys: list[tuple[str, str, str]]) -> dict[tuple, float]:
        """P(yes) for each (character, statement, query) key: cached, or from one batched pass over the rest."""
        found, missing = _lookup(self.relevance_cache, keys)
        texts = [self.relevance_text(*k) for k in missing]
        if self.packed and self.relevance.packable and texts and isinstance(texts[0], Packed):
            probs = self.relevance.packed_probs(texts)[0]  # positions stay within prefix + one block
        else:  # statement + query over max_length is out of the discriminators' range anyway; cut the tail
            probs = self.relevance.probs(self.relevance.encode([flat(t) for t in texts], truncate=True))
        for key, p in zip(missing, probs[:, 1].tolist(), strict=True):
            found[key] = self.relevance_cache[key] = p
        return found

    def _nli(self, keys: list[tuple[str, str, str, str]]) -> dict[tuple, tuple[float, float, bool]]:
        """(P_ent, P_con, truncated) for each (character, statement, query, response) key, over-long ones trimmed."""
        found, missing = _lookup(self.nli_cache, keys)
        texts = [self.nli_text(*k) for k in missing]
        if self.packed and self.nli.packable and texts and isinstance(texts[0], Packed):
            probs, lengths = self.nli.packed_probs(texts)
            cut = [self.max_length is not None and n > self.max_length for n in lengths.tolist()]
            if over := [i for i, c in enumerate(cut) if c]:  # rare: those go one by one, response trimmed
                trimmed = [self._trimmed(missing[i], lengths[i].item() - self.max_length) for i in over]
                probs[over] = self.nli.probs(trimmed)
        else:
            encodings = self.nli.encode([flat(t) for t in texts], truncate=False)
            cut = [self.max_length is not None and len(e["input_ids"]) > self.max_length for e in encodings]
            for i in [i for i, c in enumerate(cut) if c]:
                encodings[i] = self._trimmed(missing[i], len(encodings[i]["input_ids"]) - self.max_length)
            probs = self.nli.probs(encodings)  # (N, 3): contradicted, neutral, entailed
        for key, (con, _, ent), c in zip(missing, probs.tolist(), cut, strict=True):
            found[key] = self.nli_cache[key] = (ent, con, c)
        return found

    def _trimmed(self, key: tuple[str, str, str, str], overflow: int) -> dict[str, list[int]]:
        """Encode an NLI input with `overflow` tokens dropped from the end of the response, template kept."""
        character, statement, query, response = key
        tok = self.nli.tokenizer
        ids = tok(response, add_special_tokens=False)["input_ids"]
        response = tok.decode(ids[:max(len(ids) - overflow, 0)], skip_special_tokens=True)
        # Re-tokenizing decoded text can shift a token or two; truncate=True still enforces the cap exactly.
        return self.nli.encode([flat(self.nli_text(character, statement, query, response))], truncate=True)[0]

    def _assemble(self, request: APCRequest, kept: Tensor, rel: dict, nli: dict) -> APCScores:
        """Gather probabilities into tensors; pruned statements get P_rel = P_ent = P_con = 0."""
        c, q, statements = request.character, request.query, request.statements
        p_rel = torch.tensor([rel[(c, s, q)] if k else 0.0 for s, k in zip(statements, kept.tolist(), strict=True)])
        rows = [[nli[(c, s, q, r)] if k else (0.0, 0.0, False)
                 for s, k in zip(statements, kept.tolist(), strict=True)] for r in self._responses(request)]
        nli = torch.tensor(rows).reshape(len(rows), len(statements), 3)  # (R', S, [ent, con, cut])
        p_ent, p_con, cut = nli[..., 0], nli[..., 1], nli[..., 2].bool()
        v_apc = apc_value(p_rel, p_ent, p_con)  # (R',)
        delta = apc_delta(p_rel, p_ent, p_con) if self.neutral_response is None else v_apc - v_apc[-1]
        active, passive = apc_terms(p_rel, p_ent, p_con)
        n = len(request.responses)  # drop the neutral baseline row, if any
        return APCScores(v_apc[:n], delta[:n], p_rel, p_ent[:n], p_con[:n], active[:n], passive[:n], kept, cut[:n])


# ----------------------------------------------------------------------------------------------------------------
# TRL reward-function adapter.

REWARD_VALUES = {"delta": lambda s: s.delta, "v_apc": lambda s: s.v_apc}


def _text(message) -> str:
    """A completion or prompt as plain text: a string, or the last message of a conversation."""
    return message if isinstance(message, str) else message[-1]["content"]


def apc_reward_fn(scorer: APCScorer, value: str = "delta") -> Callable[..., list[float]]:
    """A reward function with TRL's signature, fn(prompts, completions, **columns) -> list[float].

    Dataset columns used per row: `statements` (list[str], required), `query` (str; defaults to the prompt's text,
    i.e. its last message) and `character` (str, optional). Rows sharing (character, query, statements), e.g. the
    num_generations completions of one GRPO prompt, are scored together, so relevance runs once per query.
    value: "delta" (ΔAPC, the paper's reported number) or "v_apc".
    """
    if value not in REWARD_VALUES:
        raise ValueError(f"value must be one of {list(REWARD_VALUES)}, got {value!r}")
    pick = REWARD_VALUES[value]

    def reward(prompts: list, completions: list, **columns) -> list[float]:
        if "statements" not in columns:
            raise KeyError(f"apc reward needs a 'statements' column (list[str] per row); got {sorted(columns)}")
        queries = columns.get("query") or [_text(p) for p in prompts]
        characters = columns.get("character") or [""] * len(completions)
        groups: dict[tuple, list[int]] = {}
        for i, key in enumerate(zip(characters, queries, map(tuple, columns["statements"]), strict=True)):
            groups.setdefault(key, []).append(i)
        requests = [APCRequest(list(s), q, [_text(completions[i]) for i in rows], c)
                    for (c, q, s), rows in groups.items()]
        rewards = [0.0] * len(completions)
        for rows, scores in zip(groups.values(), scorer.score_many(requests), strict=True):
            for i, r in zip(rows, pick(scores).tolist(), strict=True):
                rewards[i] = r
        return rewards

    reward.__name__ = f"apc_{value}"  # TRL logs each reward under its function's name
    return reward
