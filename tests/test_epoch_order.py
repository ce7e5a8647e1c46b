"""The PPO epoch's order of sequences (vispo.train.update.epoch_order): whole groups shuffled,
so mini- and micro-batches cut along groups (the shared prefix runs a group's prompt once)."""

from __future__ import annotations

import torch

from vispo.train.update import epoch_order


def test_groups_are_shuffled_whole_and_keep_their_order():
    index = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    torch.manual_seed(3)
    place = torch.randperm(4)  # group g goes to place place[g]
    torch.manual_seed(3)
    order = epoch_order(index, 6)
    by_place = torch.argsort(place).tolist()  # the group at each place
    expected = [3 * g + j for g in by_place for j in range(3)]
    assert order.tolist() == expected
    assert sorted(order.tolist()) == list(range(12))
    # Every mini-batch of 6 (and micro-batch of 3) is whole groups.
    for part in order.split(3):
        assert len(set(index[part].tolist())) == 1


def test_one_mini_batch_keeps_the_batch_order():
    index = torch.tensor([0, 0, 1, 1])
    state = torch.get_rng_state()
    assert epoch_order(index, 4).tolist() == [0, 1, 2, 3]
    assert torch.equal(torch.get_rng_state(), state)  # and draws nothing


def test_scattered_rows_of_a_group_come_together_in_their_order():
    index = torch.tensor([5, 2, 5, 2, 7, 5])
    order = epoch_order(index, 2).tolist()
    groups = [index[i].item() for i in order]
    # Each prompt's rows are consecutive and ascending.
    runs = [g for k, g in enumerate(groups) if k == 0 or groups[k - 1] != g]
    assert sorted(runs) == [2, 5, 7]
    for g in (2, 5, 7):
        rows = [i for i in order if index[i] == g]
        assert rows == sorted(rows)
