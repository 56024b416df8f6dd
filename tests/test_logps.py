"""Sequence log-probs and the pair batch: worked numbers, behaviour, and padding/one-pass equivalence."""

import math

import pytest
import torch

from alignment.logps import build_pair_batch, pair_logps, sequence_logps

# Word-level vocabulary with fixed ids, so expected batches can be written out by hand.
WORDS = "<pad> </s> <unk> where do you live ? i in lyon paris".split()
ID = {w: i for i, w in enumerate(WORDS)}  # <pad>=0 </s>=1 where=3 ... ?=7 i=8 live=6 in=9 lyon=10 paris=11


@pytest.fixture(scope="module")
def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(vocab=ID, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=ID["<pad>"], eos_token_id=ID["</s>"],
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


# --- sequence_logps: worked numbers -------------------------------------------------------------------------


def test_sequence_logps_hand_computed():
    """V = 2, T = 3, labels [1, 1, 0].

    logits[0] = [0, 0]      -> p(label[1] = 1) = 1/2
    logits[1] = [ln 3, 0]   -> p(label[2] = 0) = 3 / (3 + 1) = 3/4
    logits[2] = [100, -100] -> predicts a position past the end: must be ignored.
    mask [0, 1, 1]: log(1/2) + log(3/4) = log(3/8); averaged over 2 tokens: log(3/8) / 2.
    mask [0, 0, 1]: log(3/4).  mask [1, 1, 1]: same as [0, 1, 1] (position 0 has no predictor).
    """
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [100.0, -100.0]]]).repeat(3, 1, 1)  # (3, 3, 2)
    labels = torch.tensor([[1, 1, 0]]).repeat(3, 1)
    mask = torch.tensor([[0, 1, 1], [0, 0, 1], [1, 1, 1]])
    got = sequence_logps(logits, labels, mask)
    want = torch.tensor([math.log(3 / 8), math.log(3 / 4), math.log(3 / 8)])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(sequence_logps(logits, labels, mask, average=True), want / torch.tensor([2, 1, 2]))


def test_masked_labels_may_be_minus_100_and_empty_rows_give_zero():
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[2, 3, -100, -100], [1, -100, -100, -100]])
    mask = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0]])
    got = sequence_logps(logits, labels, mask)
    torch.testing.assert_close(got[0], logits[0, 0].log_softmax(-1)[3])
    assert got[1] == 0 and sequence_logps(logits, labels, mask, average=True)[1] == 0


def test_average_is_sum_over_scored_token_count():
    torch.manual_seed(1)
    logits, labels = torch.randn(3, 6, 7), torch.randint(0, 7, (3, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [1, 0, 0, 0, 1, 1]])
    counts = mask[:, 1:].sum(1).float()  # [3, 5, 2]: position 0 never counts
    summed, averaged = sequence_logps(logits, labels, mask), sequence_logps(logits, labels, mask, average=True)
    torch.testing.assert_close(averaged * counts, summed)


def test_bf16_logits_are_upcast_to_float32():
    logits = torch.randn(2, 5, 11).to(torch.bfloat16)
    labels, mask = torch.randint(0, 11, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    got = sequence_logps(logits, labels, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, sequence_logps(logits.float(), labels, mask))


def test_sequence_logps_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="labels"):
        sequence_logps(torch.randn(2, 5, 3), torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4))


# --- build_pair_batch ----------------------------------------------------------------------------------------


def test_build_pair_batch_known_ids(word_tokenizer):
    """Rows [chosen0, chosen1, rejected0, rejected1]; EOS (1) appended once; right-padded with <pad> (0)."""
    batch = build_pair_batch(
        word_tokenizer,
        prompts=["where do you live ?", "where ?"],
        chosen=[" i live in lyon", "paris"],
        rejected=["i live in paris", "lyon </s>"],  # already ends with EOS: not doubled
        max_length=32,
    )
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask"}
    want_ids = [
        [3, 4, 5, 6, 7, 8, 6, 9, 10, 1],
        [3, 7, 11, 1, 0, 0, 0, 0, 0, 0],
        [3, 4, 5, 6, 7, 8, 6, 9, 11, 1],
        [3, 7, 10, 1, 0, 0, 0, 0, 0, 0],
    ]
    want_completion = [
        [0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 0, 0, 0, 0, 0, 0],
    ]
    assert batch["input_ids"].tolist() == want_ids
    assert batch["attention_mask"].tolist() == [[1] * 10, [1] * 4 + [0] * 6, [1] * 10, [1] * 4 + [0] * 6]
    assert batch["completion_mask"].tolist() == want_completion
    assert all(t.dtype == torch.long for t in batch.values())


@pytest.mark.parametrize("max_length", range(2, 13))
def test_truncation_keeps_prompt_end_and_at_least_one_target(word_tokenizer, max_length):
    """Prompt (5 ids) + completions (5 and 3 ids with EOS): every cut keeps the rules of build_pair_batch."""
    prompt, chosen, rejected = "where do you live ?", "i live in lyon", "paris"
    batch = build_pair_batch(word_tokenizer, [prompt], [chosen], [rejected], max_length=max_length)
    full_prompt = [3, 4, 5, 6, 7]
    for row, full_completion in zip(range(2), ([8, 6, 9, 10, 1], [11, 1]), strict=True):
        n = int(batch["attention_mask"][row].sum())
        ids, cmask = batch["input_ids"][row, :n].tolist(), batch["completion_mask"][row, :n].tolist()
        kept_prompt, kept_completion = ids[: cmask.index(1)], ids[cmask.index(1) :]
        assert n <= max_length
        assert sum(cmask[1:]) >= 1  # at least one scored completion token
        assert kept_prompt == full_prompt[len(full_prompt) - len(kept_prompt) :]  # a suffix of the prompt
        assert kept_completion == full_completion[: len(kept_completion)]  # a prefix of the completion
        assert len(kept_prompt) == min(5, max_length - 1)  # same context for chosen and rejected
    if max_length >= 10:
        assert batch["input_ids"].shape == (2, 10)  # nothing cut


def test_build_pair_batch_bad_input(word_tokenizer):
    with pytest.raises(ValueError, match="prompt 1"):
        build_pair_batch(word_tokenizer, ["where ?", ""], ["lyon", "lyon"], ["paris", "paris"], max_length=8)
    with pytest.raises(ValueError, match="2 prompts, 1 chosen"):
        build_pair_batch(word_tokenizer, ["where ?", "where ?"], ["lyon"], ["paris", "paris"], max_length=8)
    with pytest.raises(ValueError, match="max_length=1"):
        build_pair_batch(word_tokenizer, ["where ?"], ["lyon"], ["paris"], max_length=1)


# --- pair_logps ----------------------------------------------------------------------------------------------


def _row_logp_by_hand(model, ids: list[int], completion_start: int) -> float:
    """Unpadded forward of one row; sum over completion positions t of log softmax(logits[t - 1])[ids[t]]."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]  # (T, V)
    return sum(logits[t - 1].log_softmax(-1)[ids[t]].item() for t in range(completion_start, len(ids)))


def test_pair_logps_equals_separate_unpadded_forwards(word_tokenizer, tiny_llama):
    """One padded (2B, T) pass gives the same numbers as one forward per unpadded row."""
    prompts = ["where do you live ?", "where ?", "do you live in lyon ?"]
    chosen = ["i live in lyon", "paris", "i do"]
    rejected = ["paris", "i live in paris in paris", "lyon"]
    batch = build_pair_batch(word_tokenizer, prompts, chosen, rejected, max_length=32)
    with torch.no_grad():
        got_chosen, got_rejected = pair_logps(tiny_llama, batch)
        avg_chosen, _ = pair_logps(tiny_llama, batch, average=True)
    want = []
    for row in range(6):
        n = int(batch["attention_mask"][row].sum())
        ids, cmask = batch["input_ids"][row, :n].tolist(), batch["completion_mask"][row, :n].tolist()
        want.append(_row_logp_by_hand(tiny_llama, ids, cmask.index(1)))
    torch.testing.assert_close(got_chosen, torch.tensor(want[:3]), atol=1e-5, rtol=0)
    torch.testing.assert_close(got_rejected, torch.tensor(want[3:]), atol=1e-5, rtol=0)
    lengths = batch["completion_mask"][:3].sum(1).float()  # [5, 2, 3]
    torch.testing.assert_close(avg_chosen * lengths, got_chosen)


def test_pair_logps_carries_gradients_to_the_policy(word_tokenizer, tiny_llama):
    batch = build_pair_batch(word_tokenizer, ["where ?"], ["lyon"], ["paris"], max_length=8)
    chosen, rejected = pair_logps(tiny_llama, batch)
    (chosen - rejected).sum().backward()
    grad = tiny_llama.lm_head.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    tiny_llama.zero_grad(set_to_none=True)


def test_pair_logps_rejects_incomplete_batch(tiny_llama):
    with pytest.raises(KeyError, match="completion_mask"):
        pair_logps(tiny_llama, {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3)})


@pytest.mark.gpu
def test_pair_logps_on_cuda_match_the_cpu_and_bf16_stays_close(word_tokenizer, tiny_llama):
    import copy

    batch = build_pair_batch(word_tokenizer, ["where do you live ?", "where ?"], ["i live in lyon", "paris"],
                             ["paris", "i live in paris"], max_length=16)
    with torch.no_grad():
        want = torch.stack(pair_logps(tiny_llama, batch))
        gpu = copy.deepcopy(tiny_llama).cuda()
        on_gpu = {k: v.cuda() for k, v in batch.items()}
        got = torch.stack(pair_logps(gpu, on_gpu))
        bf16 = torch.stack(pair_logps(gpu.to(torch.bfloat16), on_gpu))
    assert got.dtype == bf16.dtype == torch.float32  # log-probs are upcast before the log-softmax
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=0)
    torch.testing.assert_close(bf16.cpu(), want, atol=0.1, rtol=0.02)  # bf16 weights: ~3 significant digits
