"""Hungarian matcher and set criterion on hand-made cases, and a real tiny MDETR fitting one batch."""

import math

import pytest
import torch

from teacher.criterion import CriterionConfig, SetCriterion
from teacher.matcher import HungarianMatcher, box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou
from teacher.mdetr import build_mdetr

torch.set_num_threads(1)


def _logits_pointing_at(positions: list[int], num_positions: int, strength: float = 8.0) -> torch.Tensor:
    logits = torch.zeros(len(positions), num_positions)
    logits[torch.arange(len(positions)), torch.tensor(positions)] = strength
    return logits


def _pos_map(rows: list[list[int]], num_positions: int) -> torch.Tensor:
    pm = torch.zeros(len(rows), num_positions)
    for i, tokens in enumerate(rows):
        pm[i, tokens] = 1.0 / len(tokens)
    return pm


def test_box_conversions_round_trip_and_giou_values():
    xyxy = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]])
    cxcywh = box_xyxy_to_cxcywh(xyxy)
    assert torch.allclose(cxcywh[0], torch.tensor([0.3, 0.4, 0.4, 0.4]))
    assert torch.allclose(box_cxcywh_to_xyxy(cxcywh), xyxy)
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 1.0], [2.0, 0.0, 3.0, 1.0]])
    giou = generalized_box_iou(a, b)[0]
    # identical: 1; half-covered: IoU 0.5 with hull == union; disjoint 1x1 boxes 1 apart: 0 - (3 - 2) / 3.
    assert torch.allclose(giou, torch.tensor([1.0, 0.5, -1.0 / 3.0]), atol=1e-6)


def test_matcher_assigns_queries_by_box_and_token_costs():
    num_positions = 6
    boxes = torch.tensor([[0.2, 0.2, 0.2, 0.2], [0.7, 0.7, 0.3, 0.3], [0.5, 0.5, 0.1, 0.1]])
    outputs = {"pred_logits": _logits_pointing_at([2, 5, 1], num_positions)[None],
               "pred_boxes": boxes[None]}
    targets = [{"boxes": boxes[[2, 0]], "positive_map": _pos_map([[1], [2]], num_positions)}]
    (queries, tgt), = HungarianMatcher()(outputs, targets)
    assert dict(zip(queries.tolist(), tgt.tolist())) == {0: 1, 2: 0}


def test_class_cost_breaks_ties_between_identical_boxes():
    num_positions = 6
    box = torch.tensor([0.5, 0.5, 0.2, 0.2])
    outputs = {"pred_logits": _logits_pointing_at([3, 1], num_positions)[None],
               "pred_boxes": box.expand(2, 4)[None]}
    targets = [{"boxes": box.expand(2, 4), "positive_map": _pos_map([[1], [3]], num_positions)}]
    (queries, tgt), = HungarianMatcher()(outputs, targets)
    assert dict(zip(queries.tolist(), tgt.tolist())) == {0: 1, 1: 0}
    (_, tgt), = HungarianMatcher(cost_class=0.0)(outputs, targets)  # without it, either is optimal
    assert sorted(tgt.tolist()) == [0, 1]


def test_matcher_handles_images_without_targets():
    outputs = {"pred_logits": torch.zeros(1, 3, 5), "pred_boxes": torch.full((1, 3, 4), 0.5)}
    (queries, tgt), = HungarianMatcher()(outputs, [{"boxes": torch.zeros(0, 4),
                                                     "positive_map": torch.zeros(0, 5)}])
    assert queries.numel() == 0 and tgt.numel() == 0


def _criterion(contrastive: bool = True, num_aux: int = 0) -> SetCriterion:
    return SetCriterion(HungarianMatcher(), CriterionConfig(contrastive_align=contrastive), num_aux=num_aux)


def test_soft_token_cross_entropy_by_hand():
    # Uniform logits over P = 4 positions: every query's CE is log 4 against any target distribution.
    outputs = {"pred_logits": torch.zeros(1, 2, 4), "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2],
                                                                                [0.1, 0.1, 0.1, 0.1]]])}
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "positive_map": _pos_map([[1, 2]], 4)}]
    losses = _criterion(contrastive=False)(outputs, targets)
    # matched query weight 1, unmatched (no-object target) weight eos_coef = 0.1, over one box
    assert losses["loss_ce"].item() == pytest.approx(1.1 * math.log(4), rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)


def test_box_losses_by_hand():
    outputs = {"pred_logits": torch.zeros(1, 1, 4), "pred_boxes": torch.tensor([[[0.5, 0.5, 0.4, 0.4]]])}
    targets = [{"boxes": torch.tensor([[0.6, 0.5, 0.4, 0.4]]), "positive_map": _pos_map([[1]], 4)}]
    losses = _criterion(contrastive=False)(outputs, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.1, abs=1e-6)
    # boxes [0.3,0.3,0.7,0.7] and [0.4,0.3,0.8,0.7]: IoU 0.12/0.2 = 0.6, hull 0.2 = union, GIoU 0.6
    assert losses["loss_giou"].item() == pytest.approx(0.4, abs=1e-5)


def test_contrastive_alignment_by_hand_and_text_padding_is_ignored():
    # One query matched to token 1; token 0 is another token (cosine 0.93 = one temperature less), token 2
    # is padding (masked).
    tau = 0.07
    q = torch.tensor([[[1.0, 0.0]]])
    other = [1.0 - tau, math.sqrt(1.0 - (1.0 - tau) ** 2)]
    t = torch.tensor([[other, [1.0, 0.0], [1.0, 0.0]]])
    outputs = {"pred_logits": torch.zeros(1, 1, 4), "pred_boxes": torch.full((1, 1, 4), 0.5),
               "proj_queries": q, "proj_tokens": t}
    targets = [{"boxes": torch.full((1, 4), 0.5), "positive_map": _pos_map([[1]], 4)}]
    mask = torch.tensor([[True, True, False]])
    loss = _criterion()(outputs, targets, mask)["loss_contrastive_align"].item()
    box_to_token = math.log(1 + math.exp(-1))        # softmax over tokens 0 and 1
    token_to_box = 0.0                                # a single query: its softmax is 1
    assert loss == pytest.approx((box_to_token + token_to_box) / 2, rel=1e-4)
    unmasked = _criterion()(outputs, targets, torch.ones(1, 3, dtype=torch.bool))
    assert unmasked["loss_contrastive_align"].item() > loss


def test_aux_losses_weights_and_total():
    def layer(shift):
        return {"pred_logits": torch.randn(2, 3, 5) + shift, "pred_boxes": torch.rand(2, 3, 4) * 0.5 + 0.25,
                "proj_queries": torch.nn.functional.normalize(torch.randn(2, 3, 8), dim=-1),
                "proj_tokens": torch.nn.functional.normalize(torch.randn(2, 4, 8), dim=-1)}
    torch.manual_seed(0)
    outputs = {**layer(0), "aux_outputs": [layer(1), layer(2)]}
    targets = [{"boxes": torch.tensor([[0.4, 0.4, 0.2, 0.2]]), "positive_map": _pos_map([[1, 2]], 5)},
               {"boxes": torch.zeros(0, 4), "positive_map": torch.zeros(0, 5)}]
    crit = _criterion(num_aux=2)
    losses = crit(outputs, targets, torch.ones(2, 4, dtype=torch.bool))
    names = ["loss_ce", "loss_bbox", "loss_giou", "loss_contrastive_align"]
    assert set(losses) == {n + s for n in names for s in ("", "_0", "_1")}
    assert set(crit.weight_dict) == set(losses)
    manual = sum(losses[k] * crit.weight_dict[k] for k in losses)
    assert torch.allclose(crit.weighted_total(losses), manual)


def test_split_batches_with_the_global_box_count_average_to_the_whole_batch_loss():
    """Data-parallel training: each rank's loss over its share, normalised by the global box count per rank,
    averages (as the ranks' gradients are averaged) to the one-process loss of the whole batch."""
    torch.manual_seed(1)
    outputs = {"pred_logits": torch.randn(4, 3, 6), "pred_boxes": torch.rand(4, 3, 4) * 0.5 + 0.25,
               "proj_queries": torch.nn.functional.normalize(torch.randn(4, 3, 8), dim=-1),
               "proj_tokens": torch.nn.functional.normalize(torch.randn(4, 5, 8), dim=-1)}
    rows = [[[1], [2, 3]], [], [[4]], [[1], [2], [3]]]          # 2, 0, 1 and 3 boxes
    targets = [{"boxes": torch.rand(len(r), 2).repeat(1, 2) * 0.4 + 0.3, "positive_map": _pos_map(r, 6)}
               if r else {"boxes": torch.zeros(0, 4), "positive_map": torch.zeros(0, 6)} for r in rows]
    mask = torch.ones(4, 5, dtype=torch.bool)
    crit = _criterion()
    whole = crit(outputs, targets, mask)
    halves = [crit({k: v[i: i + 2] for k, v in outputs.items()}, targets[i: i + 2], mask[i: i + 2],
                   num_boxes=6 / 2) for i in (0, 2)]
    for key in whole:
        assert (halves[0][key] + halves[1][key]) / 2 == pytest.approx(whole[key].item(), rel=1e-5)
    local = [crit({k: v[i: i + 2] for k, v in outputs.items()}, targets[i: i + 2], mask[i: i + 2])
             for i in (0, 2)]
    mean_of_local = (local[0]["loss_bbox"] + local[1]["loss_bbox"]).item() / 2   # each rank's own count
    assert mean_of_local != pytest.approx(whole["loss_bbox"].item())


def test_gradients_stay_finite_with_an_image_without_targets():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    queries = torch.randn(2, 3, 8, requires_grad=True)
    outputs = {"pred_logits": logits, "pred_boxes": torch.full((2, 3, 4), 0.5, requires_grad=True),
               "proj_queries": queries, "proj_tokens": torch.randn(2, 4, 8)}
    targets = [{"boxes": torch.zeros(0, 4), "positive_map": torch.zeros(0, 5)},
               {"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]]), "positive_map": _pos_map([[1]], 5)}]
    crit = _criterion()
    crit.weighted_total(crit(outputs, targets, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]).bool())).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(queries.grad).all()
    assert logits.grad[0].abs().sum() > 0   # the empty image still learns "no object"


def test_tiny_mdetr_fits_one_batch():
    torch.manual_seed(0)
    model = build_mdetr("tiny", backbone_widths=(8, 16, 32), d_model=32, nheads=2, enc_layers=1, dec_layers=2,
                        dim_feedforward=64, num_queries=4, aux_loss=True, dropout=0.0,
                        text_encoder={"vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 1,
                                      "intermediate_size": 64})
    images, mask = torch.randn(2, 3, 32, 40), torch.zeros(2, 32, 40, dtype=torch.bool)
    mask[1, :, 32:] = True
    input_ids = torch.tensor([[0, 7, 8, 9, 2], [0, 11, 12, 2, 1]])
    attention = (input_ids != 1).long()
    p = model.config.num_classes + 1
    targets = [{"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]]),
                "positive_map": _pos_map([[1, 2], [3]], p)},
               {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]), "positive_map": _pos_map([[1, 2]], p)}]
    crit = _criterion(num_aux=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(60):
        losses = crit(model(images, mask, input_ids, attention), targets, attention.bool())
        total = crit.weighted_total(losses)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_contrastive_align"):
        assert history[-1][key] < 0.5 * history[0][key], key
