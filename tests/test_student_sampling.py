"""Hierarchical (phrase, region) pair sampling (student/sampling.py): properties over random matrices M."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from student.sampling import sample_pairs, water_fill

torch.set_num_threads(1)


@st.composite
def label_matrices(draw):
    """Random M for a batch: P phrases, each from an image with its own region count (prefix-valid)."""
    P = draw(st.integers(0, 7))
    R = draw(st.integers(1, 12))
    density = draw(st.sampled_from([0.0, 0.05, 0.2, 0.5, 0.9, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    align = torch.rand(P, R, generator=g) < density
    counts = torch.randint(0, R + 1, (P,), generator=g)
    valid = torch.arange(R)[None, :] < counts[:, None]
    k = draw(st.integers(1, 8))
    f = draw(st.sampled_from([0.1, 0.25, 0.5, 0.75, 1.0]))
    return align, valid, k, f, seed


def _run(align, valid, k, f, seed):
    phrase, region, label = sample_pairs(align, valid, k, f, torch.Generator().manual_seed(seed))
    pos = torch.zeros(align.shape[0], dtype=torch.long).index_add_(0, phrase, label.long())
    neg = torch.zeros(align.shape[0], dtype=torch.long).index_add_(0, phrase, (~label).long())
    return phrase, region, label, pos, neg


@settings(max_examples=300, deadline=None)
@given(label_matrices())
def test_pairs_are_valid_unique_and_labelled_by_m(case):
    align, valid, k, f, seed = case
    phrase, region, label, _, _ = _run(align, valid, k, f, seed)
    assert valid[phrase, region].all()
    assert torch.equal(label, align[phrase, region])
    flat = phrase * align.shape[1] + region
    assert len(torch.unique(flat)) == len(flat)                    # no pair twice


@settings(max_examples=300, deadline=None)
@given(label_matrices())
def test_positive_target_and_coverage(case):
    align, valid, k, f, seed = case
    _, _, _, pos, neg = _run(align, valid, k, f, seed)
    n_pos, n_neg = (align & valid).sum(1), (~align & valid).sum(1)
    budget = k * int(valid.any(1).sum())
    target = min(math.floor(f * budget + 0.5), int(n_pos.sum()))
    assert int(pos.sum()) == target
    # A phrase without a sampled positive still trains: it gets a negative when it has one.
    assert (neg[(pos == 0) & (n_neg > 0)] >= 1).all()
    # First level: every phrase with a positive region gets one before any phrase gets a second.
    if target >= int((n_pos > 0).sum()):
        assert (pos[n_pos > 0] >= 1).all()


@settings(max_examples=300, deadline=None)
@given(label_matrices())
def test_water_filling_balances_phrases(case):
    align, valid, k, f, seed = case
    _, _, _, pos, neg = _run(align, valid, k, f, seed)
    n_pos, n_neg = (align & valid).sum(1), (~align & valid).sum(1)
    total = pos + neg
    for i in range(len(pos)):
        if pos[i] < n_pos[i]:      # i could have taken another positive, so nobody got two more than i
            assert (pos <= pos[i] + 1).all()
        if neg[i] < n_neg[i]:      # likewise for the pair totals of phrases that received negatives
            assert (total[neg > 0] <= total[i] + 1).all()


@settings(max_examples=200, deadline=None)
@given(label_matrices())
def test_ratio_and_budget_are_reached_when_supply_allows(case):
    align, valid, k, f, seed = case
    _, _, _, pos, neg = _run(align, valid, k, f, seed)
    n_pos, n_neg = (align & valid).sum(1), (~align & valid).sum(1)
    budget = k * int(valid.any(1).sum())
    want_pos = math.floor(f * budget + 0.5)
    enough = (int(n_pos.sum()) >= want_pos and int(n_neg.sum()) >= budget - want_pos
              and bool((n_pos[valid.any(1)] > 0).all()))
    if enough and budget:
        assert int(pos.sum() + neg.sum()) == budget
        # The positive count is f * budget rounded to the nearest pair; 1e-9 absorbs float error at ties.
        assert abs(int(pos.sum()) - f * budget) <= 0.5 + 1e-9


@settings(max_examples=100, deadline=None)
@given(label_matrices())
def test_same_generator_state_same_pairs(case):
    align, valid, k, f, seed = case
    first = sample_pairs(align, valid, k, f, torch.Generator().manual_seed(seed))
    again = sample_pairs(align, valid, k, f, torch.Generator().manual_seed(seed))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 5)), min_size=1, max_size=8), st.data())
def test_water_fill_equals_handing_out_units_one_at_a_time(bins, data):
    capacity = torch.tensor([c for c, _ in bins])
    start = torch.tensor([s for _, s in bins])
    total = data.draw(st.integers(0, int(capacity.sum())))
    priority = torch.tensor(data.draw(st.permutations(range(len(bins)))))
    share = [0] * len(bins)
    for _ in range(total):
        open_bins = [i for i in range(len(bins)) if share[i] < capacity[i]]
        best = min(open_bins, key=lambda i: (int(start[i]) + share[i], int(priority[i])))
        share[best] += 1
    assert water_fill(capacity, start, total, priority).tolist() == share


def test_typical_batch_reaches_half_positives_and_covers_every_phrase():
    """A world-like batch: 64 images x 3 phrases, 36 regions, 0-3 positives per phrase (1 in 5 has none)."""
    g = torch.Generator().manual_seed(0)
    P, R = 192, 36
    align = torch.zeros(P, R, dtype=torch.bool)
    for p in range(P):
        n = 0 if p % 5 == 0 else int(torch.randint(1, 4, (1,), generator=g))
        align[p, torch.randperm(R, generator=g)[:n]] = True
    valid = torch.ones(P, R, dtype=torch.bool)
    phrase, _, label = sample_pairs(align, valid, 8, 0.5, g)
    n_pos, n_neg = int(label.sum()), int((~label).sum())
    assert n_pos == int(align.sum())               # positives are scarce: every one is used
    assert n_neg == n_pos                          # and negatives shrink to keep the batch at 50 %
    assert len(torch.unique(phrase)) == P          # every phrase contributes, including positive-free ones
    assert (~label[(phrase % 5) == 0]).all()
