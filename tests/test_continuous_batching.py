"""Continuous batching (decoding/scheduler.py): rows join and leave a running batch at every step, guides included.

Parity: a cache whose rows were selected, merged (left-padded) or prefilled in chunks gives the logits of a
recompute from scratch; a request that joins a running batch midway decodes the tokens it decodes alone, for every
method (PAD, GenARM, ARGS and Drift caches included), greedy and sampled. Behaviour, counted in steps: a finished
row leaves and a waiting one takes its place the next step; a cancelled stream frees its row; the rows x context
bound holds and a long request is not overtaken. Tiny random Llamas on the 47-token test vocabulary, fp32, CPU.
"""

import asyncio

import pytest
import torch
from transformers import LlamaForSequenceClassification

from decoding.guides import CachedSequenceReward, Guide, RecomputeReward, classifier_reward, left_pad, positions
from decoding.loop import Batch
from decoding.personalization import Guidance, build_rule, encode_rows, resolve
from decoding.scheduler import Engine, Job, Row
from tests.conftest import WORDS, build_tiny_tokenizer
from tests.test_serve import DRIFT, tiny_config, tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: a worker thread beside the test's

PAD, EOS = 0, 2
PERSONAS = {"none": {}, "prompt": {"persona": "i like cats ."}, "pad": {"persona": "i like cats ."},
            "genarm": {"persona": "i dislike rain ."}, "args": {"persona": "i like tea ."},
            "drift": {"attribute_weights": {"cats": 1.5, "rain": -1.0}, "strength": 2.0}}


@pytest.fixture(scope="module")
def guidance() -> Guidance:
    tok = build_tiny_tokenizer()
    torch.manual_seed(4)
    rm = LlamaForSequenceClassification(tiny_config(tok, num_labels=1)).eval()
    guides = {"pad": tiny_lm(tok, 2), "arm": tiny_lm(tok, 3), "rm": rm}
    return Guidance(tok, tiny_lm(tok, 1), guides, DRIFT, "pad", {"pad": 1.5, "drift": 1.0, "genarm": 2.0, "args": 3.0})


def random_rows(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 47, (n,), generator=g).tolist() for n in lengths]


def full_logits(model, rows):
    ids, mask = left_pad(rows, PAD)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[:, -1].float()


# --- cache surgery = recompute ----------------------------------------------------------------------------------
@torch.inference_mode()
@pytest.mark.parametrize("chunk", [None, 6])
def test_selected_merged_and_chunked_guide_caches_equal_a_full_recompute(guidance, chunk):
    model = guidance.guides["pad"]
    a, b = random_rows([5, 12, 3], 0), random_rows([9, 2], 1)
    guide, other = Guide(model, *left_pad(a, PAD)), Guide(model, *left_pad(b, PAD), chunk=chunk)
    while not other.fill():
        pass
    g = torch.Generator().manual_seed(2)
    for _ in range(3):  # the running rows are 3 tokens ahead when the others join
        tokens = torch.randint(4, 47, (3,), generator=g)
        guide.advance(tokens)
        a = [r + [t] for r, t in zip(a, tokens.tolist(), strict=True)]
    guide.merge(other)
    rows = a + b
    for step in range(4):
        torch.testing.assert_close(guide.logits, full_logits(model, rows), atol=1e-4, rtol=0)
        if step == 1:  # the longest row (12 + 3 tokens) leaves: its columns go too
            guide.select(torch.tensor([0, 2, 3, 4]))
            rows = [rows[i] for i in (0, 2, 3, 4)]
            assert guide.mask.shape[1] == max(len(r) for r in rows) == guide.cache.get_seq_length()
            assert guide.cache.layers[0].keys.shape[0] == 4
            torch.testing.assert_close(guide.logits, full_logits(model, rows), atol=1e-4, rtol=0)
        tokens = torch.randint(4, 47, (len(rows),), generator=g)
        guide.advance(tokens)
        rows = [r + [t] for r, t in zip(rows, tokens.tolist(), strict=True)]


@torch.inference_mode()
def test_merged_and_selected_reward_cache_scores_candidates_as_k_separate_forwards(guidance):
    rm = guidance.guides["rm"]
    a, b = random_rows([7, 3], 3), random_rows([10], 4)
    cached = CachedSequenceReward(rm, *left_pad(a, PAD))
    joining = CachedSequenceReward(rm, *left_pad(b, PAD), chunk=4)
    while not joining.fill():
        pass
    cached.advance(torch.tensor([5, 6]))
    cached.merge(joining)
    rows = [a[0] + [5], a[1] + [6], b[0]]
    g = torch.Generator().manual_seed(5)
    for step in range(4):
        candidates = torch.randint(4, 47, (len(rows), 4), generator=g)
        reference = RecomputeReward(classifier_reward(rm), *left_pad(rows, PAD))
        torch.testing.assert_close(cached.score(candidates), reference.score(candidates), atol=1e-5, rtol=0)
        tokens = candidates[:, step % 4]
        if step == 1:  # row 0 leaves between score and advance, as a finished row does
            cached.select(torch.tensor([1, 2]))
            rows, tokens = rows[1:], tokens[1:]
        cached.advance(tokens)
        rows = [r + [t] for r, t in zip(rows, tokens.tolist(), strict=True)]


# --- a request joining midway = the request alone, every method ------------------------------------------------
def rows_for(guidance, methods, seed=0):
    out = []
    for i, m in enumerate(methods):
        p = resolve({"method": m, **PERSONAS[m]}, None, guidance)
        prompt = [{"role": "user", "content": " ".join(WORDS[(3 * i + seed) % 30:(3 * i + seed) % 30 + 2 + 2 * i])}]
        out.append((p, encode_rows(guidance, prompt, p)))
    return out


def batch_of(guidance, rows, temperature, chunk=None):
    ids, mask = left_pad([t.base for _, t in rows], PAD)
    batch = Batch(guidance.base, ids, mask, build_rule(guidance, rows, chunk=chunk), tags=list(range(len(rows))),
                  eos=EOS, temperature=[temperature] * len(rows), seeds=[10 + i for i in range(len(rows))],
                  pad_token_id=PAD, chunk=chunk)
    while not batch.fill():
        pass
    return batch


def decode(batch, lengths: dict, joins: dict | None = None) -> dict:
    """Step until every row is done; lengths: tag -> tokens it takes; joins: step -> a Batch merged before it."""
    out, step = {t: [] for t in batch.tags}, 0
    while batch.rows or joins:
        if joins and step in joins:
            joining = joins.pop(step)
            out.update({t: [] for t in joining.tags})
            batch.merge(joining) if batch.rows else (batch := joining)
        tokens = batch.pick()
        for tag, t in zip(batch.tags, tokens.tolist(), strict=True):
            out[tag].append(t)
        batch.advance(tokens, torch.tensor([len(out[tag]) < lengths[tag] for tag in batch.tags]))
        step += 1
    return out


@torch.inference_mode()
@pytest.mark.parametrize("method", list(PERSONAS))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_request_joining_a_running_batch_decodes_what_it_decodes_alone(guidance, method, temperature):
    running = rows_for(guidance, ["drift", "pad", "none", "args", "genarm", "prompt"])
    me = rows_for(guidance, [method], seed=7)
    me_alone = decode(batch_of(guidance, me, temperature), {0: 10})[0]
    others_alone = decode(batch_of(guidance, running, temperature), {i: 4 + 2 * i for i in range(6)})
    joining = batch_of(guidance, me, temperature, chunk=5)  # chunked prefill of every model's prompt
    joining.tags = ["me"]
    got = decode(batch_of(guidance, running, temperature), {**{i: 4 + 2 * i for i in range(6)}, "me": 10},
                 joins={3: joining})
    assert got["me"] == me_alone and len(me_alone) == 10
    assert all(got[i] == others_alone[i] for i in range(6))  # the rows it joined were not disturbed either


# --- the engine, counted in steps -------------------------------------------------------------------------------
def make_row(guidance, method, max_tokens, words=3, seed=0):
    p = resolve({"method": method, **PERSONAS[method]}, None, guidance)
    return Row(p, encode_rows(guidance, " ".join(WORDS[seed:seed + words]), p), max_tokens, temperature=0.0)


def run(engine, specs, during=None):
    """Submit Jobs (rows, stream) in order, start the engine, collect every job's events until its end or error;
    `during(jobs, events)` is awaited beside them."""
    async def main():
        jobs = [Job(rows, stream) for rows, stream in specs]
        events = {id(j): [] for j in jobs}
        for j in jobs:
            engine.submit(j)
        engine.start()

        async def listen(job):
            while True:
                event = await job.events.get()
                events[id(job)].append(event)
                if event[0] in ("end", "error"):
                    return

        try:
            await asyncio.gather(*[listen(j) for j in jobs], *([during(jobs, events)] if during else []))
        finally:
            engine.stop()
        return jobs, [events[id(j)] for j in jobs]
    return asyncio.run(main())


def test_a_row_that_finishes_leaves_and_a_waiting_one_takes_its_place_the_next_step(guidance):
    engine = Engine(guidance, max_batch_size=2, eos_ids=[EOS])
    rows = [make_row(guidance, "pad", 3), make_row(guidance, "drift", 20, seed=4), make_row(guidance, "genarm", 3, 8)]
    ended, finish = {}, engine._finish

    def recording(row, reason, decoded=False):  # the step (0-based) at which a row's reply ends
        ended[id(row)] = engine.stats["steps"]
        return finish(row, reason, decoded)

    engine._finish = recording
    run(engine, [([r], False) for r in rows])
    assert [len(r.ids) for r in rows] == [3, 20, 3]  # EOS's logit is 0: never the argmax
    # steps 0-2: rows 1 and 2; row 1 ends at step 2 and row 3 (waiting: 2 rows at most) joins for steps 3-5
    assert [ended[id(r)] for r in rows] == [2, 19, 5]
    assert engine.stats["steps"] == 20 and engine.stats["row_steps"] == 2 * 3 + 2 * 3 + 14
    assert engine.stats["admissions"] == 2 and engine.stats["running_rows"] == 0


def test_cancelling_a_stream_frees_its_row_at_the_next_step(guidance):
    engine = Engine(guidance, max_batch_size=4, eos_ids=[EOS])

    async def cancel_after_first_delta(jobs, events):
        while not any(e[0] == "delta" for e in events[id(jobs[0])]):
            await asyncio.sleep(0.001)
        jobs[0].cancel("disconnected")

    specs = [([make_row(guidance, "drift", 40)], True), ([make_row(guidance, "pad", 30, seed=5)], False)]
    jobs, _ = run(engine, specs, during=cancel_after_first_delta)
    assert jobs[0].rows[0].finish_reason == "cancelled" and len(jobs[0].rows[0].ids) < 40
    assert engine.stats["cancelled_rows"] == 1 and engine.stats["running_rows"] == 0
    assert engine.stats["steps"] == 30  # the other row ran on alone
    assert engine.stats["row_steps"] < 30 + 40 - 10  # the cancelled row stopped costing a row after its cancel


def test_rows_times_context_bound_the_batch_and_a_long_request_is_not_overtaken(guidance):
    first, long, later = (make_row(guidance, "none", n, words=w, seed=s) for n, w, s in ((6, 2, 0), (20, 4, 9),
                                                                                        (6, 2, 3)))
    bound = long.context + first.context - 1  # first + later fit together (2 x 8), either beside long does not
    engine = Engine(guidance, max_batch_size=8, max_batch_tokens=bound, eos_ids=[EOS])
    first_step, take = {}, engine._take

    def recording(row, token):
        first_step.setdefault(id(row), engine.stats["steps"])
        return take(row, token)

    engine._take = recording
    run(engine, [([first], False), ([long], False), ([later], False)])
    # long waits for room; later, which would fit beside first, waits behind long (first come, first served)
    assert [first_step[id(r)] for r in (first, long, later)] == [0, 6, 6 + 20]
    assert engine.stats["max_batch_rows"] == 1

    async def too_big():
        return Job([make_row(guidance, "none", bound)])
    with pytest.raises(ValueError, match="exceed the batch bounds"):
        engine.submit(asyncio.run(too_big()))
