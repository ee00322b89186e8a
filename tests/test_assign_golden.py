"""AlignOTA against the 25 official assigner cases (golden README §5), JAX and NumPy reference.

Per case: candidate mask, box∩centre mask and dynamic k exactly; IoUs atol 1e-6; cost rtol 1e-6;
per-GT picks compared tie-insensitively (sorted picked costs); the conflict resolution fed with the
official top-k picks gives the official outputs and targets exactly; tie-free cases exactly end to
end. The JAX assigner runs batched (several cases of equal shape in one call, GTs padded to a
common G with ``gt_valid``), so padding is exercised too.
"""
from __future__ import annotations

import json
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ref_align_ota as ref
from conftest import golden_path
from damo_jax.assign import ota as assign

REG_MAX = 16


@pytest.fixture(scope="module")
def golden():
    meta = json.loads(golden_path("assigner", "cases.json").read_text())
    arrays = dict(np.load(golden_path("assigner", "cases.npz")))
    return meta, arrays


def _case(arrays, prefix):
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


@jax.jit
def _jax_assign(scores, priors, pred, gt, labels, valid):
    out = assign.align_ota(scores, priors, pred, gt, labels, valid, return_intermediates=True)
    tgt = assign.build_targets(out, priors, gt, labels, num_classes=scores.shape[-1],
                               reg_max=REG_MAX)
    return out, tgt


@jax.jit
def _jax_resolve(selected, cost):
    return jax.vmap(assign.resolve_conflicts)(selected, cost)


@pytest.fixture(scope="module")
def jax_results(golden):
    """Run all cases, batched by (A, C): {prefix: (out, tgt)} as numpy, image dim removed."""
    meta, arrays = golden
    groups = defaultdict(list)
    for c in meta["cases"]:
        ins = _case(arrays, c["prefix"] + "in.")
        groups[ins["pred_scores"].shape].append((c["prefix"], ins))
    results = {}
    for members in groups.values():
        g_pad = max(8, max(ins["gt_bboxes"].shape[0] for _, ins in members) + 3)
        gt = np.zeros((len(members), g_pad, 4), np.float32)
        labels = np.full((len(members), g_pad), -1, np.int32)    # padding labels are garbage
        valid = np.zeros((len(members), g_pad), bool)
        for i, (_, ins) in enumerate(members):
            g = ins["gt_bboxes"].shape[0]
            gt[i, :g], labels[i, :g], valid[i, :g] = ins["gt_bboxes"], ins["gt_labels"], True
            gt[i, g:] = ins["gt_bboxes"][:1] if g else 10.0       # padded rows overlap real ones
            gt[i, g:, 2:] += 30.0
        scores = np.stack([ins["pred_scores"] for _, ins in members])
        pred = np.stack([ins["pred_bboxes"] for _, ins in members])
        out, tgt = _jax_assign(scores, members[0][1]["priors"], pred, gt, labels, valid)
        out, tgt = jax.tree.map(np.asarray, (out, tgt))
        for i, (prefix, ins) in enumerate(members):
            g = ins["gt_bboxes"].shape[0]
            one = {k: v[i] for k, v in out.items()}
            assert not one["in_box_and_center"][:, g:].any()
            assert not one["topk_selected"][:, g:].any()
            assert np.isinf(one["cost_matrix"][:, g:]).all()      # padded GTs are never usable
            for k in ("in_box_and_center", "pairwise_ious", "cost_matrix", "topk_selected"):
                one[k] = one[k][:, :g]
            assert (one["dynamic_ks"][g:] == 0).all()
            one["dynamic_ks"] = one["dynamic_ks"][:g]
            results[prefix] = (one, {k: v[i] for k, v in tgt.items() if k != "num_pos"})
    return results


def _ids(meta):
    return [c["prefix"][:-1] + "_" + c["name"] for c in meta["cases"]]


CASES = list(range(25))


def _meta_case(golden, i):
    meta, arrays = golden
    c = meta["cases"][i]
    return c, _case(arrays, c["prefix"])


def _check_intermediates(mine, case, rows):
    """Compare (A, G)-style mine restricted to candidate rows with the official mid.* arrays."""
    np.testing.assert_array_equal(mine["candidate_mask"], case["mid.candidate_mask"])
    np.testing.assert_array_equal(mine["in_box_and_center"][rows], case["mid.in_box_and_center"])
    np.testing.assert_array_equal(mine["dynamic_ks"], case["mid.dynamic_ks"])
    np.testing.assert_allclose(mine["pairwise_ious"][rows], case["mid.pairwise_ious"], atol=1e-6,
                               rtol=0)
    np.testing.assert_allclose(mine["cost_matrix"][rows], case["mid.cost_matrix"], rtol=1e-6)
    official_cost = case["mid.cost_matrix"]
    for t in range(official_cost.shape[1]):     # tie-insensitive: same multiset of picked costs
        want = np.sort(official_cost[case["mid.topk_selected"][:, t], t])
        got = np.sort(official_cost[mine["topk_selected"][rows][:, t], t])
        np.testing.assert_array_equal(got, want, err_msg=f"GT {t}: picked costs differ")


def _check_outputs(fg, gt_index, iou, case):
    np.testing.assert_array_equal(gt_index + 1, case["out.gt_inds"])
    np.testing.assert_array_equal(fg, case["out.gt_inds"] > 0)
    labels = np.full(fg.shape, -1, np.int64)
    labels[fg] = case["in.gt_labels"][gt_index[fg]]
    np.testing.assert_array_equal(labels, case["out.labels"])
    np.testing.assert_allclose(iou[fg], case["out.max_overlaps"][fg], atol=1e-6, rtol=0)


def _check_targets(tgt, case):
    np.testing.assert_array_equal(tgt["labels"], case["tgt.labels"])
    np.testing.assert_allclose(tgt["label_scores"], case["tgt.label_scores"], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(tgt["bbox_targets"], case["tgt.bbox_targets"])
    np.testing.assert_allclose(tgt["dfl_targets"], case["tgt.dfl_targets"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("i", CASES)
def test_jax_matches_official(golden, jax_results, i):
    c, case = _meta_case(golden, i)
    mine, tgt = jax_results[c["prefix"]]
    if "mid.cost_matrix" in case:
        _check_intermediates(mine, case, case["mid.candidate_mask"])
    else:                                        # early exit: nothing is a candidate / positive
        none = np.zeros_like(mine["candidate_mask"])
        np.testing.assert_array_equal(mine["candidate_mask"], case.get("mid.candidate_mask", none))
        assert not mine["fg_mask"].any()
    if c["tie_free"]:
        assert int(mine["num_pos"]) == c["num_positive"]
        _check_outputs(mine["fg_mask"], mine["gt_index"], mine["iou"], case)
        _check_targets(tgt, case)


@pytest.mark.parametrize("i", CASES)
def test_jax_conflict_resolution_on_official_picks(golden, jax_results, i):
    """Official top-k picks -> JAX conflict resolution -> official gt_inds / targets exactly."""
    c, case = _meta_case(golden, i)
    if "mid.topk_selected" not in case:
        pytest.skip("the official code exits before matching in this case (no GT / candidate)")
    mine, _ = jax_results[c["prefix"]]
    rows = case["mid.candidate_mask"]
    num_priors, num_gt = rows.shape[0], case["mid.topk_selected"].shape[1]
    selected = np.zeros((num_priors, num_gt), bool)
    selected[rows] = case["mid.topk_selected"]
    fg, gt_index = _jax_resolve(selected[None], mine["cost_matrix"][None])
    fg, gt_index = np.asarray(fg[0]), np.asarray(gt_index[0])
    iou = np.where(fg, mine["pairwise_ious"][np.arange(num_priors), np.maximum(gt_index, 0)], 0)
    _check_outputs(fg, gt_index, iou, case)
    out = dict(fg_mask=fg, gt_index=gt_index, iou=iou)
    tgt = assign.build_targets(jax.tree.map(lambda v: jnp.asarray(v)[None], out),
                               case["in.priors"], case["in.gt_bboxes"][None],
                               case["in.gt_labels"][None],
                               num_classes=case["in.pred_scores"].shape[1], reg_max=REG_MAX)
    _check_targets({k: np.asarray(v[0]) for k, v in tgt.items() if k != "num_pos"}, case)


@pytest.mark.parametrize("i", CASES)
def test_numpy_reference_matches_official(golden, i):
    c, case = _meta_case(golden, i)
    args = (case["in.priors"], case["in.pred_scores"], case["in.pred_bboxes"],
            case["in.gt_bboxes"], case["in.gt_labels"])
    mine = ref.assign_image(*args)
    num_classes = case["in.pred_scores"].shape[1]
    if "mid.cost_matrix" not in case:
        assert not mine["fg_mask"].any() and not mine["candidate_mask"].any()
    else:
        rows = case["mid.candidate_mask"]
        full = {k: _expand(v, rows) for k, v in mine.items()
                if k in ("in_box_and_center", "pairwise_ious", "cost_matrix", "topk_selected")}
        _check_intermediates({**mine, **full}, case, rows)
        picked = ref.assign_image(*args, selected=case["mid.topk_selected"])
        _check_outputs(picked["fg_mask"], picked["gt_index"], picked["iou"], case)
        _check_targets(ref.targets_image(picked, case["in.priors"], case["in.gt_bboxes"],
                                         case["in.gt_labels"], num_classes, REG_MAX), case)
    if c["tie_free"]:
        assert int(mine["fg_mask"].sum()) == c["num_positive"]
        _check_outputs(mine["fg_mask"], mine["gt_index"], mine["iou"], case)
        _check_targets(ref.targets_image(mine, case["in.priors"], case["in.gt_bboxes"],
                                         case["in.gt_labels"], num_classes, REG_MAX), case)


def _expand(matrix, rows):
    full = np.zeros((rows.shape[0],) + matrix.shape[1:], matrix.dtype)
    full[rows] = matrix
    return full


def test_jax_equals_numpy_reference_on_all_cases(golden, jax_results):
    """Own selection of both implementations agrees exactly, tie cases included (same tie rule)."""
    meta, arrays = golden
    for c in meta["cases"]:
        case = _case(arrays, c["prefix"])
        want = ref.assign_image(case["in.priors"], case["in.pred_scores"], case["in.pred_bboxes"],
                                case["in.gt_bboxes"], case["in.gt_labels"])
        mine, _ = jax_results[c["prefix"]]
        np.testing.assert_array_equal(mine["gt_index"], want["gt_index"], err_msg=c["name"])
        np.testing.assert_allclose(mine["iou"], want["iou"], atol=1e-6, err_msg=c["name"])
