import numpy as np

from alignment.training import batch_indices


def test_batches_are_a_function_of_seed_and_step():
    lengths = list(np.random.default_rng(0).integers(10, 140, size=500))
    first = [batch_indices(lengths, 32, step, seed=0) for step in range(24)]
    assert first == [batch_indices(lengths, 32, step, seed=0) for step in range(24)]  # what resume relies on
    assert first[5] == batch_indices(lengths, 32, 5, seed=0)  # no state carried from earlier steps
    assert first != [batch_indices(lengths, 32, step, seed=1) for step in range(24)]
    assert all(len(b) == 32 and all(0 <= i < 500 for i in b) for b in first)


def test_grouped_batches_pad_less_and_cover_the_data():
    rng = np.random.default_rng(1)
    lengths = rng.integers(10, 140, size=2000)
    batches = [batch_indices(list(lengths), 32, step, seed=0, group=8) for step in range(400)]
    grouped = np.mean([lengths[b].max() for b in batches])
    random = np.mean([lengths[rng.integers(2000, size=32)].max() for _ in range(400)])
    assert grouped < 0.8 * random, (grouped, random)
    # Grouping reorders draws within a pool but draws uniformly: every example tends to be seen, lengths unbiased.
    seen = np.concatenate(batches)
    assert len(set(seen.tolist())) > 0.99 * 2000 and abs(lengths[seen].mean() - lengths.mean()) < 2
    # Within each pool of `group` steps, batch order is shuffled, not sorted by length.
    pool_maxes = [[lengths[batches[8 * p + k]].max() for k in range(8)] for p in range(50)]
    assert sum(m != sorted(m) for m in pool_maxes) > 40
