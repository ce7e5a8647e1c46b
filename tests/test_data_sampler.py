"""vispo.data.sampler: seeded per-epoch shuffling, exact resumption."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from vispo.data import PromptSampler


def _take(sampler: PromptSampler, k: int) -> list[list[int]]:
    return list(itertools.islice(sampler, k))


def test_each_epoch_is_a_permutation_cut_into_batches():
    sampler = PromptSampler(10, 3, seed=1, drop_last=False)
    assert len(sampler) == 4
    epoch0 = _take(sampler, 4)
    assert [len(b) for b in epoch0] == [3, 3, 3, 1]
    assert sorted(i for b in epoch0 for i in b) == list(range(10))
    epoch1 = _take(sampler, 4)
    assert sorted(i for b in epoch1 for i in b) == list(range(10))
    assert epoch0 != epoch1  # reshuffled
    assert sampler.state_dict()["epoch"] == 1 and sampler.state_dict()["position"] == 4


def test_drop_last_drops_the_short_batch_and_never_repeats_within_an_epoch():
    sampler = PromptSampler(10, 3, seed=1)
    assert len(sampler) == 3
    batches = _take(sampler, 3)
    flat = [i for b in batches for i in b]
    assert all(len(b) == 3 for b in batches) and len(set(flat)) == 9
    # The same seed gives the same order as drop_last=False up to the dropped tail.
    full = _take(PromptSampler(10, 3, seed=1, drop_last=False), 3)
    assert batches == full


def test_order_depends_only_on_seed_and_epoch():
    a = _take(PromptSampler(50, 5, seed=7), 25)
    b = _take(PromptSampler(50, 5, seed=7), 25)
    c = _take(PromptSampler(50, 5, seed=8), 25)
    assert a == b and a != c
    # Epoch 2 (batches 20..29) is the same whether reached by iterating or by jumping there.
    s = PromptSampler(50, 5, seed=7)
    s.load_state_dict({"epoch": 2, "position": 0})
    assert _take(s, 10) == _take(PromptSampler(50, 5, seed=7), 30)[20:30]
    # The documented contract: epoch e is permutation(default_rng([seed, e])).
    order = np.random.default_rng([7, 1]).permutation(50).tolist()
    assert [i for b in a[10:20] for i in b] == order


def test_no_shuffle_keeps_data_order():
    sampler = PromptSampler(5, 2, seed=0, drop_last=False, shuffle=False, epochs=2)
    assert list(sampler) == [[0, 1], [2, 3], [4], [0, 1], [2, 3], [4]]


@pytest.mark.parametrize("consumed", [0, 1, 6, 7, 8, 15, 23])
def test_resuming_from_a_saved_state_yields_exactly_the_remaining_batches(consumed):
    reference = _take(PromptSampler(23, 3, seed=42), 40)  # 7 batches/epoch, several epochs
    run = PromptSampler(23, 3, seed=42)
    assert _take(run, consumed) == reference[:consumed]
    state = json.loads(json.dumps(run.state_dict()))  # as a checkpoint would store it
    resumed = PromptSampler(23, 3, seed=42)
    resumed.load_state_dict(state)
    assert _take(resumed, 40 - consumed) == reference[consumed:]


def test_epochs_limit_stops_iteration():
    sampler = PromptSampler(7, 2, seed=3, epochs=3)
    batches = list(sampler)
    assert len(batches) == 3 * 3
    assert next(iter(sampler), None) is None


def test_state_from_another_data_order_is_refused():
    state = PromptSampler(23, 3, seed=42).state_dict()
    for kwargs in ({"n_items": 24}, {"batch_size": 4}, {"seed": 43}):
        args = {"n_items": 23, "batch_size": 3, "seed": 42} | kwargs
        with pytest.raises(ValueError, match=f"saved {next(iter(kwargs))}="):
            PromptSampler(**args).load_state_dict(state)
    with pytest.raises(ValueError, match="invalid epoch=0 position=9"):
        PromptSampler(23, 3, seed=42).load_state_dict({"epoch": 0, "position": 9})


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_items"):
        PromptSampler(0, 1, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        PromptSampler(4, 0, seed=0)
    with pytest.raises(ValueError, match="no batch would ever be produced"):
        PromptSampler(4, 5, seed=0)
    (only,) = _take(PromptSampler(4, 5, seed=0, drop_last=False, epochs=1), 5)
    assert sorted(only) == [0, 1, 2, 3]
