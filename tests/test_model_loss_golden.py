"""Full-model training loss against the official head (golden README §6.1).

1. Without the network (cases with ``raw.*``): the loss on the official train-mode outputs and
   targets (rtol 1e-5), and our assigner + targets on those outputs (= official targets).
2. End to end: golden weights → train-mode forward (batch statistics) → AlignOTA → targets →
   loss, then gradients; loss terms rtol 1e-4, targets, and the stored parameter gradients.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import golden_path
from damo_jax import losses
from damo_jax.assign import ota as assign
from damo_jax.config import load_config
from damo_jax.interop.convert import from_torch_state_dict, to_torch_state_dict
from damo_jax.models import build_model, make_priors
from golden_weights import golden_state_dict

NUM_CLASSES, G_PAD = 80, 16
LOSS_KEYS = ("total_loss", "loss_cls", "loss_bbox", "loss_dfl")
GRAD_KEYS = ("head.gfl_cls.0.bias", "head.gfl_cls.2.bias", "head.gfl_reg.0.bias",
             "head.gfl_reg.2.bias", "head.scales.0.scale", "head.scales.1.scale",
             "head.scales.2.scale")


@pytest.fixture(scope="module")
def golden():
    meta = json.loads(golden_path("losses", "model_loss_cases.json").read_text())
    arrays = dict(np.load(golden_path("losses", "model_loss_cases.npz")))
    return {c["prefix"][:-1]: (c, {k[len(c["prefix"]):]: v for k, v in arrays.items()
                                   if k.startswith(c["prefix"])}) for c in meta["cases"]}


def padded_gt(case, batch=2):
    """``in.gt_boxes`` rows (image, x1, y1, x2, y2) -> (B, G_PAD, 4), labels, valid."""
    boxes = np.zeros((batch, G_PAD, 4), np.float32)
    labels = np.zeros((batch, G_PAD), np.int32)
    valid = np.zeros((batch, G_PAD), bool)
    for b in range(batch):
        rows = case["in.gt_boxes"][:, 0] == b
        n = int(rows.sum())
        boxes[b, :n], labels[b, :n], valid[b, :n] = (case["in.gt_boxes"][rows, 1:],
                                                     case["in.gt_labels"][rows], True)
    return boxes, labels, valid


def golden_targets(case):
    t = {k: case["tgt." + k] for k in ("labels", "label_scores", "bbox_targets", "dfl_targets")}
    t["fg_mask"] = t["labels"] < NUM_CLASSES
    return t


def check_targets(mine, case, score_atol):
    np.testing.assert_array_equal(np.asarray(mine["labels"]), case["tgt.labels"])
    np.testing.assert_allclose(mine["label_scores"], case["tgt.label_scores"], atol=score_atol)
    np.testing.assert_array_equal(np.asarray(mine["bbox_targets"]), case["tgt.bbox_targets"])
    np.testing.assert_allclose(mine["dfl_targets"], case["tgt.dfl_targets"], atol=1e-5)


def assign_and_targets(scores, priors, boxes, gt, labels, valid, reg_max):
    assignment = assign.align_ota(scores, priors, boxes, gt, labels, valid)
    return assign.build_targets(assignment, priors, gt, labels, num_classes=NUM_CLASSES,
                                reg_max=reg_max)


def check_losses(metrics, meta, rtol):
    for key in LOSS_KEYS:
        np.testing.assert_allclose(metrics[key], meta["losses"][key], rtol=rtol, atol=1e-7,
                                   err_msg=key)
    assert int(metrics["num_pos"]) == meta["num_pos_total"]
    avg = meta["avg_factors"]
    assert max(float(metrics["num_pos"]), 1.0) == avg["loss_cls"]
    np.testing.assert_allclose(max(float(metrics["weight_sum"]), 1.0), avg.get("loss_bbox", 1.0),
                               rtol=rtol)


@pytest.mark.parametrize("name", ["c00", "c05"])
def test_loss_on_official_raw_outputs(golden, name):
    meta, case = golden[name]
    head = dict(scores=case["raw.cls_scores"], boxes=case["raw.decoded_bboxes"],
                reg_logits_flat=case["raw.bbox_before_softmax"])
    reg_max = case["raw.bbox_before_softmax"].shape[-1] - 1
    total, metrics = jax.jit(lambda h, t: losses.detection_loss(h, t, reg_max=reg_max))(
        head, golden_targets(case))
    check_losses(metrics, meta, rtol=1e-5)
    np.testing.assert_allclose(total, meta["losses"]["total_loss"], rtol=1e-5)


@pytest.mark.parametrize("name", ["c00", "c05"])
def test_assigner_on_official_raw_outputs(golden, name):
    meta, case = golden[name]
    reg_max = case["raw.bbox_before_softmax"].shape[-1] - 1
    gt, labels, valid = padded_gt(case)
    tgt = jax.jit(assign_and_targets, static_argnums=6)(
        case["raw.cls_scores"], make_priors(128, 128), case["raw.decoded_bboxes"], gt, labels,
        valid, reg_max)
    check_targets(tgt, case, score_atol=1e-6)
    assert int(tgt["num_pos"]) == meta["num_pos_total"]


@pytest.fixture(scope="module")
def golden_images():
    x = np.load(golden_path("models", "input_b2_128x128.npz"))["input"]
    return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


_STEP_CACHE: dict = {}


def train_step_for(model_name):
    """(jitted loss-and-grad fn, variables, config) for a golden model, built once per module."""
    if model_name not in _STEP_CACHE:
        cfg = load_config(model_name.lower())
        model = build_model(cfg)
        variables = from_torch_state_dict(golden_state_dict(model_name), cfg)
        reg_max = int(cfg.model.head.reg_max)

        def loss_fn(params, batch_stats, images, gt, labels, valid):
            out, _ = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                 train=True, mutable=["batch_stats"])
            tgt = assign_and_targets(out["scores"], out["priors"], out["boxes"], gt, labels,
                                     valid, reg_max)
            total, metrics = losses.detection_loss(out, tgt, reg_max=reg_max)
            return total, (metrics, tgt)
        step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
        _STEP_CACHE[model_name] = (step, variables, cfg)
    return _STEP_CACHE[model_name]


@pytest.mark.parametrize("name", [f"c{i:02d}" for i in range(8)])
def test_end_to_end_loss_and_grads(golden, golden_images, name):
    meta, case = golden[name]
    step, variables, cfg = train_step_for(meta["model"])
    gt, labels, valid = padded_gt(case)
    (total, (metrics, tgt)), grads = step(variables["params"], variables["batch_stats"],
                                          golden_images, gt, labels, valid)
    check_targets(tgt, case, score_atol=1e-4)
    check_losses(metrics, meta, rtol=1e-4)
    torch_grads = to_torch_state_dict({"params": grads}, cfg)
    for key in GRAD_KEYS:   # through the whole network: S's scales.0 (a sum with cancellation,
        # |g| = 1.8e-3) is off by 1.2e-6, hence atol 2e-6; everything else is within 1e-4
        np.testing.assert_allclose(torch_grads[key], case["grad." + key], rtol=1e-4, atol=2e-6,
                                   err_msg=key)
    for key, norm in meta["grad_norms"].items():
        if key == "__all_parameters__":
            # Measured: ours is 0.10-0.23 % above the official value for T and S, 1e-4 for Ns,
            # while every named gradient above matches (<= 7e-4) and our float32 norm equals our
            # float64 one to 7e-5. Unexplained (see docs/bench_assign.md); bounded here.
            mine = np.sqrt(sum(float(np.sum(np.square(g))) for g in jax.tree.leaves(grads)))
            np.testing.assert_allclose(mine, norm, rtol=3e-3, err_msg=key)
        else:
            # 2e-3: these norms sit on a float32 noise floor of ~1e-3. Measured (T, cases c00-c03,
            # 2026-12-07): scaling the input images by 1 +- 1e-7 or 1 + 3e-7 moves the stem's and
            # neck.bu_conv13's gradient norms by up to 9.6e-4 (XLA's BatchNorm) / 9.9e-4 (the
            # native one, model.bn_impl); the unperturbed c02 gave 6.5e-5 / 1.36e-3. A wrong
            # gradient is off by >= 1e-2.
            np.testing.assert_allclose(np.linalg.norm(torch_grads[key]), norm, rtol=2e-3,
                                       atol=1e-6, err_msg=key)
