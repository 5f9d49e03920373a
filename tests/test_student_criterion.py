"""Pre-training losses on hand-made tensors (student/criterion.py), including empty masks and phrases."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from student.config import StudentConfig
from student.criterion import PretrainCriterion, build_criterion, item_count

torch.set_num_threads(1)


def _bce(logit: float, label: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(label * math.log(p) + (1 - label) * math.log(1 - p))


def _criterion(*losses):
    return PretrainCriterion(losses, {name: 1.0 for name in losses})


def test_mlm_is_the_mean_cross_entropy_of_masked_words_of_matched_pairs():
    labels = torch.tensor([[-100, 2, -100, 0], [-100, 1, 1, -100]])    # 2 masked in row 0, 2 in row 1
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.5, 0.5, 0.5], [0.0, 3.0, 0.0], [1.0, 1.0, -1.0]])
    batch = {"mlm_labels": labels, "itm_label": torch.tensor([1.0, 0.0])}   # row 1 is a swapped caption
    loss = _criterion("mlm").loss_mlm({"mlm_logits": logits}, batch)
    logp = logits.log_softmax(-1)
    expected = -(logp[0, 2] + logp[1, 0]) / 2                              # row 1's words do not count
    assert torch.allclose(loss, expected)


def test_mlm_without_masked_words_is_zero_and_keeps_gradients_finite():
    logits = torch.zeros(0, 5, requires_grad=True)
    batch = {"mlm_labels": torch.full((2, 3), -100), "itm_label": torch.ones(2)}
    loss = _criterion("mlm").loss_mlm({"mlm_logits": logits}, batch)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_mrc_is_kl_to_the_detector_distribution_over_masked_regions():
    target = torch.tensor([[[0, 0, 0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]])    # a class with no mass: 0 log 0
    logits = torch.tensor([[[9.0, 9.0, 9.0], [1.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])
    mask = torch.tensor([[False, True, True]])
    batch = {"mrc_targets": target, "mrc_mask": mask, "itm_label": torch.ones(1)}
    loss = _criterion("mrc").loss_mrc({"mrc_logits": logits}, batch)
    p = logits.softmax(-1)
    kl1 = 0.5 * math.log(0.5 / p[0, 1, 0]) + 0.5 * math.log(0.5 / p[0, 1, 1])
    kl2 = sum(t * math.log(t / (1 / 3)) for t in (0.2, 0.3, 0.5))
    assert loss.item() == pytest.approx((kl1 + kl2) / 2, rel=1e-5)


def test_mrc_with_zero_masked_regions_or_only_swapped_captions_is_zero_not_nan():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    target = torch.full((2, 3, 4), 0.25)
    crit = _criterion("mrc")
    none_masked = {"mrc_targets": target, "mrc_mask": torch.zeros(2, 3, dtype=torch.bool),
                   "itm_label": torch.ones(2)}
    only_swapped = {"mrc_targets": target, "mrc_mask": torch.ones(2, 3, dtype=torch.bool),
                    "itm_label": torch.zeros(2)}
    for batch in (none_masked, only_swapped):
        loss = crit.loss_mrc({"mrc_logits": logits}, batch)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_itm_is_binary_cross_entropy_with_matched_as_one():
    logits = torch.tensor([2.0, -1.0, 0.5])
    labels = torch.tensor([1.0, 0.0, 0.0])
    loss = _criterion("itm").loss_itm({"itm_logit": logits}, {"itm_label": labels})
    expected = (_bce(2.0, 1) + _bce(-1.0, 0) + _bce(0.5, 0)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_gnd_phrase_level_is_mean_bce_over_pairs():
    outputs = {"gnd_logits": torch.tensor([[1.5], [-0.5], [0.0]]),
               "gnd_logit_mask": torch.ones(3, 1, dtype=torch.bool)}
    loss = _criterion("gnd").loss_gnd(outputs, {"gnd_label": torch.tensor([1.0, 0.0, 1.0])})
    expected = (_bce(1.5, 1) + _bce(-0.5, 0) + _bce(0.0, 1)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_gnd_token_level_averages_each_pairs_wordpieces_first():
    # Pair 0's phrase has 3 wordpieces, pair 1's has 1: each pair weighs the same.
    outputs = {"gnd_logits": torch.tensor([[1.0, 2.0, -1.0], [0.5, 7.0, 7.0]]),
               "gnd_logit_mask": torch.tensor([[True, True, True], [True, False, False]])}
    loss = _criterion("gnd").loss_gnd(outputs, {"gnd_label": torch.tensor([1.0, 0.0])})
    pair0 = (_bce(1.0, 1) + _bce(2.0, 1) + _bce(-1.0, 1)) / 3
    assert loss.item() == pytest.approx((pair0 + _bce(0.5, 0)) / 2, rel=1e-6)


def test_gnd_with_zero_pairs_is_zero_and_differentiable():
    logits = torch.zeros(0, 1, requires_grad=True)
    outputs = {"gnd_logits": logits, "gnd_logit_mask": torch.zeros(0, 1, dtype=torch.bool)}
    loss = _criterion("gnd").loss_gnd(outputs, {"gnd_label": torch.zeros(0)})
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_forward_returns_every_term_and_the_weighted_total():
    config = StudentConfig.tiny()
    crit = build_criterion(config)
    assert crit.weight_dict == {"mlm": 1.0, "mrc": 1.0, "itm": 1.0, "gnd": 20.0}
    outputs = {"mlm_logits": torch.tensor([[0.0, 1.0]]), "mrc_logits": torch.zeros(1, 2, 2),
               "itm_logit": torch.tensor([0.3]), "gnd_logits": torch.tensor([[0.2]]),
               "gnd_logit_mask": torch.ones(1, 1, dtype=torch.bool)}
    batch = {"mlm_labels": torch.tensor([[-100, 1]]), "itm_label": torch.ones(1),
             "mrc_mask": torch.tensor([[False, True]]), "mrc_targets": torch.tensor([[[0, 0], [1.0, 0]]]),
             "gnd_label": torch.ones(1)}
    terms = crit(outputs, batch)
    assert set(terms) == {"mlm", "mrc", "itm", "gnd", "loss"}
    total = terms["mlm"] + terms["mrc"] + terms["itm"] + 20 * terms["gnd"]
    assert torch.allclose(terms["loss"], total)
    assert terms["mrc"].item() == pytest.approx(math.log(2), rel=1e-6)


def test_disabled_terms_are_neither_computed_nor_required():
    crit = build_criterion(StudentConfig.tiny(losses=("itm",), weight_itm=0.5))
    terms = crit({"itm_logit": torch.tensor([0.0])}, {"itm_label": torch.ones(1)})
    assert set(terms) == {"itm", "loss"}
    assert terms["loss"].item() == pytest.approx(0.5 * math.log(2))


def test_unknown_loss_names_are_rejected():
    with pytest.raises(ValueError, match="must come from"):
        PretrainCriterion(["mlm", "nsp"], {"mlm": 1.0, "nsp": 1.0})
    with pytest.raises(ValueError, match="unknown loss"):
        _criterion("mlm").get_loss("nsp", {}, {})


def _count_worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    try:
        local = [3, 0][rank]                       # rank 1 saw no masked region at all
        cpu = torch.device("cpu")
        counts = [item_count(local, cpu).item(), item_count(0, cpu).item()]
        (Path(tmp) / f"{rank}.json").write_text(json.dumps(counts))
    finally:
        torch.distributed.destroy_process_group()


def test_item_count_is_the_per_rank_mean_across_processes(tmp_path):
    mp.spawn(_count_worker, args=(str(tmp_path),), nprocs=2)
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    # (3 + 0) / 2 ranks: rank 1's empty batch still divides by the global mean, never by 0.
    assert results == [[1.5, 1.0], [1.5, 1.0]]
