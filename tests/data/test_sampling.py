"""PK sampler, process slices and evaluation padding, against slow obvious references."""

from __future__ import annotations

import numpy as np
import pytest

from facenet_jax.data import sampling


def _identities(counts):
    """Identity i owns a contiguous block of counts[i] dataset indices."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return [np.arange(s, s + c) for s, c in zip(starts, counts, strict=True)]


def test_group_by_label_matches_a_loop():
    labels = np.array([3, 1, 3, -1, 2, 1, 3])
    expected = {}
    for i, lab in enumerate(labels):
        if lab != sampling.IGNORE_LABEL:
            expected.setdefault(int(lab), []).append(i)
    got = sampling.group_by_label(labels)
    assert {k: v.tolist() for k, v in got.items()} == expected
    assert sorted(sampling.group_by_label(labels, min_count=2)) == [1, 3]


@pytest.mark.parametrize("replace", [True, False])
def test_pk_batch_composition(replace):
    ids = _identities([2, 3, 5, 8, 8, 1, 9, 4])
    owner = {int(i): n for n, idx in enumerate(ids) for i in idx}
    p, k = 3, 4
    for step in range(20):
        batch = sampling.pk_batch_indices(ids, p=p, k=k, seed=1, step=step, replace=replace)
        assert batch.shape == (p * k,)
        rows = [[owner[int(i)] for i in batch[r * k : (r + 1) * k]] for r in range(p)]
        assert all(len(set(r)) == 1 for r in rows), "each block of K rows is one identity"
        chosen = [r[0] for r in rows]
        assert len(set(chosen)) == p
        assert 5 not in chosen, "an identity with one image never forms triplets"
        for c, r in zip(chosen, range(p), strict=True):
            block = batch[r * k : (r + 1) * k]
            if len(ids[c]) >= k:
                assert len(set(block.tolist())) == k, "no repeats when K images exist"
            else:
                assert replace, "replace=False never draws identities with fewer than K"
                assert set(block.tolist()) == set(ids[c].tolist()), "every image taken once"


def test_pk_is_a_pure_function_of_seed_and_step():
    ids = _identities([6] * 10)
    run = [sampling.pk_batch_indices(ids, p=4, k=3, seed=7, step=s) for s in range(10)]
    resumed = [sampling.pk_batch_indices(ids, p=4, k=3, seed=7, step=s) for s in range(5, 10)]
    for a, b in zip(run[5:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(run[0], r) for r in run[1:]), "steps must differ"
    other = sampling.pk_batch_indices(ids, p=4, k=3, seed=8, step=0)
    assert not np.array_equal(run[0], other)


def test_pk_errors_name_the_fields():
    ids = _identities([4, 4, 1])
    with pytest.raises(ValueError, match="K"):
        sampling.pk_batch_indices(ids, p=2, k=1, seed=0, step=0)
    with pytest.raises(ValueError, match="identities_per_batch"):
        sampling.pk_batch_indices(ids, p=3, k=2, seed=0, step=0)
    with pytest.raises(ValueError, match="identities_per_batch"):
        sampling.pk_batch_indices(ids, p=1, k=5, seed=0, step=0, replace=False)


@pytest.mark.parametrize("g", [1, 2, 4])
def test_group_batches_draw_p_over_g_identities_from_each_of_g_groups(g):
    """Reference: split the rows into G blocks of P / G identities; each block one group, the
    G groups distinct, every identity drawable; over many steps every able group is drawn."""
    counts = [3, 5, 2, 4, 6, 1, 3, 3, 4, 5, 2, 2, 2, 3, 4, 5]
    ids = _identities(counts)
    groups = np.repeat(np.arange(4), 4)  # Identity 5 (one image) never draws.
    owner = {int(i): n for n, idx in enumerate(ids) for i in idx}
    p, k, per = 4, 3, 4 // g
    seen = set()
    for step in range(60):
        batch = sampling.pk_batch_indices(
            ids, p=p, k=k, seed=2, step=step, identity_groups=groups, groups_per_batch=g
        )
        chosen = [owner[int(batch[r * k])] for r in range(p)]
        assert all(
            owner[int(i)] == c for r, c in enumerate(chosen) for i in batch[r * k : (r + 1) * k]
        )
        assert len(set(chosen)) == p and 5 not in chosen
        blocks = [groups[chosen[b * per : (b + 1) * per]] for b in range(g)]
        assert all(len(set(b.tolist())) == 1 for b in blocks), "a block of P / G is one group"
        assert len({int(b[0]) for b in blocks}) == g, "the G groups are distinct"
        seen |= {int(b[0]) for b in blocks}
    able = {0, 1, 2, 3} if per <= 3 else {0, 2, 3}  # Group 1 has 3 drawable identities.
    assert seen == able


def test_group_batches_off_draws_the_batches_of_before():
    """G = 0 ignores the groups argument: the same batches as without it."""
    ids = _identities([6] * 10)
    for step in range(5):
        np.testing.assert_array_equal(
            sampling.pk_batch_indices(ids, p=4, k=3, seed=7, step=step),
            sampling.pk_batch_indices(
                ids, p=4, k=3, seed=7, step=step, identity_groups=np.arange(10) % 2
            ),
        )


def test_group_batch_errors_name_the_field():
    ids = _identities([4] * 6)
    groups = np.array([0, 0, 0, 0, 1, 2])
    with pytest.raises(ValueError, match="not divisible by config.data.groups_per_batch"):
        sampling.pk_batch_indices(
            ids, p=3, k=2, seed=0, step=0, identity_groups=groups, groups_per_batch=2
        )
    with pytest.raises(ValueError, match=r"groups_per_batch \(G\) = 2 .*1: 1"):
        sampling.pk_batch_indices(
            ids, p=4, k=2, seed=0, step=0, identity_groups=groups, groups_per_batch=2
        )
    assert (
        len(
            sampling.pk_batch_indices(
                ids, p=4, k=2, seed=0, step=0, identity_groups=groups, groups_per_batch=1
            )
        )
        == 8
    )


@pytest.mark.parametrize("count", [1, 2, 3, 4, 6, 12])
def test_process_slices_partition_the_global_batch(count):
    rows = np.arange(12)
    parts = [rows[sampling.process_slice(12, i, count)] for i in range(count)]
    np.testing.assert_array_equal(np.concatenate(parts), rows)
    assert len({len(p) for p in parts}) == 1


def test_process_slice_rejects_uneven_batches():
    with pytest.raises(ValueError, match="not divisible"):
        sampling.process_slice(10, 0, 4)


@pytest.mark.parametrize("n, batch_size", [(0, 4), (1, 4), (8, 4), (9, 4), (10, 3), (5, 100)])
def test_eval_batches_visit_every_item_once(n, batch_size):
    batches = list(sampling.eval_batch_indices(n, batch_size))
    assert len(batches) == -(-n // batch_size)
    seen = []
    for idx, valid in batches:
        assert idx.shape == valid.shape == (batch_size,)
        seen.extend(idx[valid].tolist())
        assert (idx[~valid] == 0).all()
        assert valid.tolist() == sorted(valid.tolist(), reverse=True), "padding only at the end"
    assert seen == list(range(n))


@pytest.mark.parametrize("turns", [1, 2, 4])
def test_turned_numbering_is_undone_by_divmod_and_is_one_to_one(turns):
    index, turn = np.meshgrid(np.arange(50), np.arange(turns), indexing="ij")
    entries = sampling.turned(index, turn, turns)
    assert len(np.unique(entries)) == entries.size  # No two (index, turn) share a number.
    back_index, back_turn = np.divmod(entries, turns)
    np.testing.assert_array_equal(back_index, index)
    np.testing.assert_array_equal(back_turn, turn)
    assert sampling.turned(7, 3, 4) == 31
