"""Tests for rewards/apc.py: worked numbers, parity with a one-statement-at-a-time loop, behaviour.

Discriminators are tiny random BERT / Llama classifiers built from configs, or bag-of-words stubs whose logits the
test sets; the tokenizer is a word-level one built from the test's own texts. Nothing is downloaded.
"""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rewards import apc
from rewards.apc import (
    FORMATS,
    APCRequest,
    APCScorer,
    BiEncoderPruner,
    apc_delta,
    apc_nli_text,
    apc_relevance_text,
    apc_reward_fn,
    apc_terms,
    apc_value,
)
from rewards.packed import Packed, flat

CHARACTER = "ada"
STATEMENTS = ["ada lives in lyon .", "ada works as a baker .", "ada has a cat named tom .", "ada likes jazz .",
              "ada was born in nineteen ninety ."]
QUERY = "where do you live ?"
RESPONSES = ["i live in lyon .", "i live in paris , a big city with many people and cars .", "i like this weather .",
             "i bake bread every day and my cat tom sleeps ."]
NEUTRAL = "i like this weather ."
OTHER_QUERY = "what is your job ?"


# ----------------------------------------------------------------------------------------------------------------
# Tiny models and tokenizers.

def word_tokenizer():
    """A lowercase word-level BERT-style tokenizer ([CLS] a [SEP] b [SEP]) over every word the tests use."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    corpus = [*STATEMENTS, QUERY, OTHER_QUERY, *RESPONSES, "sunny rainy long " * 3,
              apc_nli_text(CHARACTER, "", "", ""), apc_relevance_text(CHARACTER, "", "")]
    words = sorted({w for text in corpus for w, _ in pre.pre_tokenize_str(text.lower())})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def tiny_bert(vocab_size, labels, seed):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256, num_labels=len(labels),
                        id2label=dict(enumerate(labels)), initializer_range=0.5)
    # initializer_range 0.5, not 0.02: at 0.02 the scores of different responses agree to 1e-4, too close for a
    # mixed-up response order or statement to show.
    return BertForSequenceClassification(config)


def tiny_llama(vocab_size, labels, seed):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         num_labels=len(labels), id2label=dict(enumerate(labels)), pad_token_id=0,
                         initializer_range=0.5)
    return LlamaForSequenceClassification(config)


class BagOfWords(nn.Module):
    """Stub classifier: logits = sum of a per-token row of `weight` over non-padding tokens."""

    def __init__(self, vocab_size, labels):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab_size, len(labels)))
        self.config = SimpleNamespace(id2label=dict(enumerate(labels)), pad_token_id=0)

    def forward(self, input_ids, attention_mask):
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(logits=(self.weight[input_ids] * attention_mask[..., None]).sum(1))


def count_rows(model):
    """Record the batch size of every forward of `model`; returns the list it appends to."""
    rows = []
    model.register_forward_pre_hook(lambda m, args, kwargs: rows.append(len(kwargs["input_ids"])), with_kwargs=True)
    return rows


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture
def bert_pair(tok):
    return tiny_bert(len(tok), ["no", "yes"], 0), tiny_bert(len(tok), ["contradicted", "neutral", "entailed"], 1)


def naive_apc(rel_model, nli_model, tok, statements, query, responses, formats):
    """One unbatched forward per statement and response, as the official score_APC does, with its formula."""
    rel_text, nli_text = formats

    def probs(model, text):
        args = text if isinstance(text, tuple) else (text,)
        return model(**tok(*args, return_tensors="pt")).logits[0].softmax(-1)

    totals = []
    with torch.no_grad():
        for r in responses:
            total = 0.0
            for s in statements:
                rel = probs(rel_model, rel_text(CHARACTER, s, query))  # [no, yes]
                nli = probs(nli_model, nli_text(CHARACTER, s, query, r))  # [contradicted, neutral, entailed]
                total += (rel[0] * (1 - nli[0]) + rel[1] * nli[2]).item()
            totals.append(total)
    return torch.tensor(totals)


# ----------------------------------------------------------------------------------------------------------------
# Worked numbers.

def test_apc_value_and_delta_worked_example():
    """Three statements, two responses.

    Response 0: p_rel = (.9, .2, .5), p_ent = (.8, .1, .3), p_con = (.1, .6, .2).
      per statement  .9*.8 + .1*.9 = .81;  .2*.1 + .8*.4 = .34;  .5*.3 + .5*.8 = .55   -> V_APC = 1.70
      active = .72 + .02 + .15 = .89;  passive = .1*.1 + .8*.6 + .5*.2 = .59           -> ΔAPC = 0.30
      check: ΔAPC = V_APC - Σ(1 - p_rel) = 1.70 - 1.40.
    Response 1 is neutral to everything (p_ent = p_con = 0): V_APC = Σ(1 - p_rel) = 1.40, ΔAPC = 0.
    """
    p_rel = torch.tensor([0.9, 0.2, 0.5])
    p_ent = torch.tensor([[0.8, 0.1, 0.3], [0.0, 0.0, 0.0]])
    p_con = torch.tensor([[0.1, 0.6, 0.2], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(apc_value(p_rel, p_ent, p_con), torch.tensor([1.70, 1.40]))
    torch.testing.assert_close(apc_delta(p_rel, p_ent, p_con), torch.tensor([0.30, 0.0]))
    active, passive = apc_terms(p_rel, p_ent, p_con)
    torch.testing.assert_close(active[0], torch.tensor([0.72, 0.02, 0.15]))
    torch.testing.assert_close(passive[0], torch.tensor([0.01, 0.48, 0.10]))


def test_apc_value_mask_drops_statements():
    """Masking statement 2 of the worked example leaves .81 + .55 = 1.36 and ΔAPC .72 - .01 + .15 - .10 = .76."""
    p_rel = torch.tensor([0.9, 0.2, 0.5])
    p_ent, p_con = torch.tensor([[0.8, 0.1, 0.3]]), torch.tensor([[0.1, 0.6, 0.2]])
    mask = torch.tensor([True, False, True])
    torch.testing.assert_close(apc_value(p_rel, p_ent, p_con, mask), torch.tensor([1.36]))
    torch.testing.assert_close(apc_delta(p_rel, p_ent, p_con, mask), torch.tensor([0.76]))


# ----------------------------------------------------------------------------------------------------------------
# Parity with the one-statement-at-a-time loop.

@pytest.mark.parametrize("arch", [tiny_bert, tiny_llama])
@pytest.mark.parametrize("fmt", ["apc", "pair"])
def test_batched_scorer_matches_statement_loop(tok, arch, fmt):
    rel, nli = arch(len(tok), ["no", "yes"], 0), arch(len(tok), ["contradicted", "neutral", "entailed"], 1)
    # batch_size 3 splits the 5 relevance and 20 NLI inputs into chunks with padding in most of them.
    scorer = APCScorer(rel, tok, nli, tok, batch_size=3, relevance_text=FORMATS[fmt][0], nli_text=FORMATS[fmt][1])
    scores = scorer.score(STATEMENTS, QUERY, RESPONSES, character=CHARACTER)
    expected = naive_apc(rel, nli, tok, STATEMENTS, QUERY, RESPONSES, FORMATS[fmt])
    torch.testing.assert_close(scores.v_apc, expected, atol=1e-5, rtol=0)
    assert expected.std() > 1e-3  # the random heads tell responses apart, so a mix-up would show
    torch.testing.assert_close(scores.delta, scores.v_apc - (1 - scores.p_rel).sum(), atol=1e-5, rtol=0)
    assert scores.p_ent.shape == scores.active.shape == scores.truncated.shape == (len(RESPONSES), len(STATEMENTS))


@pytest.mark.gpu
@pytest.mark.parametrize("arch", [tiny_bert, tiny_llama])
def test_scorer_on_cuda_matches_the_cpu_loop(tok, arch):
    rel = arch(len(tok), ["no", "yes"], 0).eval()  # eval: the loop below must not run dropout either
    nli = arch(len(tok), ["contradicted", "neutral", "entailed"], 1).eval()
    expected = naive_apc(rel, nli, tok, STATEMENTS, QUERY, RESPONSES, FORMATS["apc"])
    scorer = APCScorer(copy.deepcopy(rel).cuda(), tok, copy.deepcopy(nli).cuda(), tok, batch_size=3)
    scores = scorer.score(STATEMENTS, QUERY, RESPONSES, character=CHARACTER)
    torch.testing.assert_close(scores.v_apc.cpu(), expected, atol=1e-4, rtol=0)



def test_relevance_runs_once_per_query(tok, bert_pair):
    rel, nli = bert_pair
    rel_rows, nli_rows = count_rows(rel), count_rows(nli)
    scorer = APCScorer(rel, tok, nli, tok, batch_size=2)
    scorer.score(STATEMENTS, QUERY, RESPONSES, character=CHARACTER)
    assert (len(rel_rows), sum(rel_rows)) == (3, 5)  # ceil(5 / 2) forwards for 5 statements, not 5 * 4
    assert (len(nli_rows), sum(nli_rows)) == (10, 20)
    scorer.score(STATEMENTS, QUERY, ["i live in lyon !", "hello ."], character=CHARACTER)
    assert sum(rel_rows) == 5  # same query: relevance comes from the cache
    assert sum(nli_rows) == 30
    scorer.score(STATEMENTS, OTHER_QUERY, ["i bake bread ."], character=CHARACTER)
    assert sum(rel_rows) == 10
    only_relevance = scorer.score(STATEMENTS, "do you like jazz ?", [], character=CHARACTER)  # RAG-style use
    assert only_relevance.p_rel.shape == (5,) and only_relevance.v_apc.shape == (0,)
    assert sum(nli_rows) == 35 and sum(rel_rows) == 15  # 20 + 10 + 5 before: no NLI for no responses


def test_scores_survive_a_cache_smaller_than_one_call(tok, bert_pair, monkeypatch):
    rel, nli = bert_pair
    reference = APCScorer(rel, tok, nli, tok).score(STATEMENTS, QUERY, RESPONSES, CHARACTER)
    monkeypatch.setattr(apc, "CACHE_SIZE", 3)  # 5 relevance and 20 NLI keys per call: most are evicted mid-call
    small = APCScorer(rel, tok, nli, tok)
    for _ in range(2):  # second round: a mix of hits and misses
        torch.testing.assert_close(small.score(STATEMENTS, QUERY, RESPONSES, CHARACTER).v_apc, reference.v_apc)
    assert len(small.nli_cache) == 3


# ----------------------------------------------------------------------------------------------------------------
# Label contracts.

def permuted_head(model, labels, perm):
    """A copy of a BERT classifier whose outputs are reordered by `perm` and renamed `labels`."""
    other = copy.deepcopy(model)
    other.classifier.weight.data = model.classifier.weight.data[perm]
    other.classifier.bias.data = model.classifier.bias.data[perm]
    other.config.id2label = dict(enumerate(labels))
    return other


def test_swapped_label_order_is_remapped(tok, bert_pair):
    rel, nli = bert_pair
    reference = APCScorer(rel, tok, nli, tok).score(STATEMENTS, QUERY, RESPONSES, CHARACTER)
    rel_swapped = permuted_head(rel, ["RELEVANT", "irrelevant"], [1, 0])
    nli_swapped = permuted_head(nli, ["ENTAILMENT", "NEUTRAL", "CONTRADICTION"], [2, 1, 0])
    swapped = APCScorer(rel_swapped, tok, nli_swapped, tok).score(STATEMENTS, QUERY, RESPONSES, CHARACTER)
    torch.testing.assert_close(swapped.v_apc, reference.v_apc, atol=1e-6, rtol=0)
    torch.testing.assert_close(swapped.p_con, reference.p_con, atol=1e-6, rtol=0)


def test_generic_labels_are_rejected_unless_named(tok, bert_pair):
    rel, nli = bert_pair
    generic = permuted_head(nli, ["LABEL_0", "LABEL_1", "LABEL_2"], [0, 1, 2])
    with pytest.raises(ValueError, match=r"\['LABEL_0', 'LABEL_1', 'LABEL_2'\].*\['contradicted', 'neutral'"):
        APCScorer(rel, tok, generic, tok)
    named = APCScorer(rel, tok, generic, tok, nli_labels=["contradict", "neutral", "entailed"])
    reference = APCScorer(rel, tok, nli, tok)
    torch.testing.assert_close(named.score(STATEMENTS, QUERY, RESPONSES).v_apc,
                               reference.score(STATEMENTS, QUERY, RESPONSES).v_apc)
    with pytest.raises(ValueError, match="relevance model labels"):
        APCScorer(permuted_head(rel, ["yes", "yes"], [0, 1]), tok, nli, tok)
    with pytest.raises(ValueError, match="names 2 outputs but the model has 3"):
        APCScorer(rel, tok, nli, tok, nli_labels=["contradicted", "entailed"])


def test_llama_classifier_without_pad_id_is_rejected(tok):
    rel, nli = tiny_llama(len(tok), ["no", "yes"], 0), tiny_llama(len(tok), ["contradicted", "neutral", "entailed"], 1)
    nli.config.pad_token_id = None
    with pytest.raises(ValueError, match="nli model.config.pad_token_id is None"):
        APCScorer(rel, tok, nli, tok)


# ----------------------------------------------------------------------------------------------------------------
# ΔAPC baselines.

def test_delta_follows_entailment_and_contradiction(tok):
    """ΔAPC (eq. 6) with an NLI stub keyed on one response word: 'sunny' is entailed by every statement, 'rainy'
    contradicts every statement, 'weather' is neutral. Then ΔAPC = Σ p_rel, -Σ(1 - p_rel) and 0, and V_APC = S (all
    constraints met), 0 (none met) and Σ(1 - p_rel) (only the passive ones met)."""
    rel = BagOfWords(len(tok), ["no", "yes"])
    torch.manual_seed(0)
    rel.weight.data.normal_(std=0.1)  # some relevance strictly between 0 and 1 for every statement
    nli = BagOfWords(len(tok), ["contradicted", "neutral", "entailed"])
    rows = {"sunny": [-40.0, -40.0, 40.0], "rainy": [40.0, -40.0, -40.0], "weather": [-40.0, 40.0, -40.0]}
    for word, row in rows.items():  # logits ±40 make the probabilities 0 or 1 to float32 precision
        nli.weight.data[tok.convert_tokens_to_ids(word)] = torch.tensor(row)
    scores = APCScorer(rel, tok, nli, tok).score(STATEMENTS, QUERY, ["sunny .", "rainy .", NEUTRAL], CHARACTER)
    p_rel = scores.p_rel
    assert ((p_rel > 0.01) & (p_rel < 0.99)).all()
    torch.testing.assert_close(scores.delta, torch.stack([p_rel.sum(), -(1 - p_rel).sum(), torch.tensor(0.0)]))
    torch.testing.assert_close(scores.v_apc, torch.stack([torch.tensor(5.0), torch.tensor(0.0), (1 - p_rel).sum()]))


def test_neutral_response_text_baseline(tok, bert_pair):
    rel, nli = bert_pair
    scorer = APCScorer(rel, tok, nli, tok, neutral_response=NEUTRAL)
    scores = scorer.score(STATEMENTS, QUERY, RESPONSES, CHARACTER)
    assert scores.delta[RESPONSES.index(NEUTRAL)] == 0.0
    neutral_v = scores.v_apc[RESPONSES.index(NEUTRAL)]
    torch.testing.assert_close(scores.delta, scores.v_apc - neutral_v)
    assert scores.delta.abs().max() > 1e-3  # the baseline is a real subtraction, not a zeroing
    assert scores.v_apc.shape == (len(RESPONSES),)  # the baseline row is not returned


# ----------------------------------------------------------------------------------------------------------------
# Truncation.

def test_long_response_is_trimmed_not_the_template(tok, bert_pair):
    rel, nli = bert_pair
    seen = []
    nli.register_forward_pre_hook(lambda m, a, kw: seen.extend(kw["input_ids"].tolist()), with_kwargs=True)
    short = "i live in lyon ."
    long = "i live in lyon " + "long " * 200
    # The template with an empty response is ~70 tokens here; 90 leaves room for the short response only.
    scores = APCScorer(rel, tok, nli, tok, max_length=90).score(STATEMENTS[:1], QUERY, [short, long], CHARACTER)
    assert scores.truncated.tolist() == [[False], [True]]
    tail = tok(apc_nli_text(CHARACTER, "", "", "").split("Response:")[1])["input_ids"][1:]  # drop [CLS]
    trimmed = max(seen, key=len)
    assert len(trimmed) == 90 and trimmed[-len(tail):] == tail


# ----------------------------------------------------------------------------------------------------------------
# Pruned mode.

@pytest.fixture
def encoder(tok):
    from transformers import BertConfig, BertModel

    torch.manual_seed(2)
    return BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=256))


def test_pruned_with_all_statements_equals_exact(tok, bert_pair, encoder):
    rel, nli = bert_pair
    pruner = BiEncoderPruner(encoder, tok, top_m=len(STATEMENTS))
    scorer = APCScorer(rel, tok, nli, tok, pruner=pruner)
    pruned = scorer.score(STATEMENTS, QUERY, RESPONSES, CHARACTER)
    exact = scorer.score(STATEMENTS, QUERY, RESPONSES, CHARACTER, prune=False)
    assert pruned.kept.all()
    for name in ("v_apc", "delta", "p_rel", "p_ent", "p_con", "active", "passive"):
        torch.testing.assert_close(getattr(pruned, name), getattr(exact, name))


def test_pruned_statements_count_as_irrelevant_and_uncontradicted(tok, bert_pair, encoder):
    rel, nli = bert_pair
    nli_rows = count_rows(nli)
    scorer = APCScorer(rel, tok, nli, tok, pruner=BiEncoderPruner(encoder, tok, top_m=2))
    pruned = scorer.score(STATEMENTS, QUERY, RESPONSES, CHARACTER)
    assert sum(nli_rows) == 2 * len(RESPONSES)  # NLI runs for kept statements only: the saving

    emb = scorer.pruner.embed([QUERY, *STATEMENTS])
    assert set(pruned.kept.nonzero().flatten().tolist()) == set((emb[1:] @ emb[0]).topk(2).indices.tolist())
    exact = scorer.score(STATEMENTS, QUERY, RESPONSES, CHARACTER, prune=False)
    k = pruned.kept
    expected = apc_value(exact.p_rel * k, exact.p_ent * k, exact.p_con * k)  # pruned: p_rel = p_ent = p_con = 0
    torch.testing.assert_close(pruned.v_apc, expected)
    deviation = scorer.pruning_deviation(STATEMENTS, QUERY, RESPONSES, CHARACTER)
    torch.testing.assert_close(deviation["v_apc"], (pruned.v_apc - exact.v_apc).abs())
    torch.testing.assert_close(deviation["delta"], (pruned.delta - exact.delta).abs())
    assert deviation["v_apc"].min() > 0  # 3 of 5 statements dropped: the score does move


# ----------------------------------------------------------------------------------------------------------------
# TRL adapter.

def test_reward_fn_returns_floats_in_row_order(tok, bert_pair):
    rel, nli = bert_pair
    rel_rows = count_rows(rel)
    scorer = APCScorer(rel, tok, nli, tok)
    queries = [QUERY, OTHER_QUERY, QUERY, OTHER_QUERY, QUERY]
    completions = [RESPONSES[0], RESPONSES[3], [{"role": "assistant", "content": RESPONSES[1]}], RESPONSES[2],
                   RESPONSES[3]]
    rewards = apc_reward_fn(scorer)(prompts=queries, completions=completions, statements=[STATEMENTS] * 5,
                                    character=[CHARACTER] * 5, trainer_state=None)
    assert sum(rel_rows) == 2 * len(STATEMENTS)  # one relevance pass per distinct query, not per row
    assert all(type(r) is float for r in rewards)
    first = scorer.score(STATEMENTS, QUERY, [RESPONSES[0], RESPONSES[1], RESPONSES[3]], CHARACTER).delta
    second = scorer.score(STATEMENTS, OTHER_QUERY, [RESPONSES[3], RESPONSES[2]], CHARACTER).delta
    expected = [first[0], second[0], first[1], second[1], first[2]]
    assert rewards == pytest.approx([e.item() for e in expected], abs=1e-6)


def test_reward_fn_options_and_errors(tok, bert_pair):
    rel, nli = bert_pair
    scorer = APCScorer(rel, tok, nli, tok)
    prompts = [[{"role": "user", "content": QUERY}]]  # conversational prompt: the query is its last message
    v = apc_reward_fn(scorer, value="v_apc")(prompts, [RESPONSES[0]], statements=[STATEMENTS])
    assert v == pytest.approx([scorer.score(STATEMENTS, QUERY, RESPONSES[:1]).v_apc.item()], abs=1e-6)
    assert apc_reward_fn(scorer).__name__ == "apc_delta"
    with pytest.raises(ValueError, match="value must be one of"):
        apc_reward_fn(scorer, value="apc")
    with pytest.raises(KeyError, match="'statements' column"):
        apc_reward_fn(scorer)(prompts, [RESPONSES[0]], query=[QUERY])
    with pytest.raises(TypeError, match="statements must be a list of strings"):
        scorer.score_many([APCRequest("ada lives in lyon .", QUERY, RESPONSES)])


# ----------------------------------------------------------------------------------------------------------------
# Packed inputs: every block of a shared prefix in one forward.

def packed_relevance(character, statement, query):
    return Packed(f"{query} |", f" {statement} .")


def packed_nli(character, statement, query, response):
    return Packed(f"{response} |", f" {statement} .")


@pytest.fixture(scope="module")
def plain_tok():
    """The word tokenizer without [CLS]/[SEP] around an input, so a prefix and a block tokenize apart as together."""
    plain = word_tokenizer()
    plain.backend_tokenizer.post_processor = None
    return plain


def test_packed_scorer_matches_statement_loop(plain_tok):
    """Packed forwards give the numbers of one forward per (statement, response) text, and so does packed=False."""
    rel = tiny_llama(len(plain_tok), ["no", "yes"], 0)
    nli = tiny_llama(len(plain_tok), ["contradicted", "neutral", "entailed"], 1)
    formats = (packed_relevance, packed_nli)
    whole = (lambda *a: flat(packed_relevance(*a)), lambda *a: flat(packed_nli(*a)))
    expected = naive_apc(rel, nli, plain_tok, STATEMENTS, QUERY, RESPONSES, whole)
    assert expected.std() > 1e-3
    for packed in (True, False):
        scorer = APCScorer(rel, plain_tok, nli, plain_tok, relevance_text=formats[0], nli_text=formats[1],
                           packed=packed)
        torch.testing.assert_close(scorer.score(STATEMENTS, QUERY, RESPONSES, CHARACTER).v_apc, expected,
                                   atol=1e-5, rtol=0)


def test_packed_probs_split_sequences_and_batches(plain_tok):
    """A token budget smaller than a prefix's blocks splits them over sequences and batches: same probabilities,
    fewer tokens than one text per input."""
    nli = tiny_llama(len(plain_tok), ["contradicted", "neutral", "entailed"], 1)
    disc = apc.Discriminator(nli, plain_tok, apc.NLI_LABELS, "nli")
    items = [packed_nli(CHARACTER, s, QUERY, r) for r in RESPONSES for s in STATEMENTS]
    whole = disc.probs(disc.encode([flat(x) for x in items], truncate=False))
    rows = count_rows(nli.model)
    for budget in (8192, 24):
        packed, lengths = disc.packed_probs(items, tokens_per_sequence=budget, tokens_per_forward=budget)
        torch.testing.assert_close(packed, whole, atol=1e-5, rtol=0)
        assert lengths.tolist() == [len(plain_tok(flat(x))["input_ids"]) for x in items]
    assert rows[0] == len(RESPONSES) and len(rows) > 2  # one sequence per response; the small budget splits


def test_packed_inputs_refuse_what_they_cannot_read(tok, plain_tok):
    bert = tiny_bert(len(plain_tok), ["contradicted", "neutral", "entailed"], 1)
    with pytest.raises(ValueError, match="per-token `score` head"):
        apc.Discriminator(bert, plain_tok, apc.NLI_LABELS, "nli").packed_probs([packed_nli("", "a", "", "b")])
    llama = tiny_llama(len(tok), ["contradicted", "neutral", "entailed"], 1)
    with pytest.raises(ValueError, match="does not split .* pass packed=False"):  # [CLS] ... [SEP] around inputs
        apc.Discriminator(llama, tok, apc.NLI_LABELS, "nli").packed_probs([packed_nli("", "ada", "", "lyon")])
