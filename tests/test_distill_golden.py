"""Feature-distillation loss (CWD and mimic) against the official FeatureLoss (golden README §7)."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from conftest import golden_path
from damo_jax import losses
from golden_weights import make_state_dict


@pytest.fixture(scope="module")
def golden():
    meta = json.loads(golden_path("distill", "distill_cases.json").read_text())
    arrays = dict(np.load(golden_path("distill", "distill_cases.npz")))
    return meta["cases"], arrays


def nhwc(a):
    return np.transpose(a, (0, 2, 3, 1))


@pytest.mark.parametrize("i", range(4))
def test_distill_loss_value_and_grads(golden, i):
    cases, arrays = golden
    case = cases[i]
    p = case["prefix"]
    meta = case["align_weights"]
    sd = make_state_dict({e["key"]: e["shape"] for e in meta["entries"]}, meta["seed"],
                         meta["conv_gain"])
    align = [dict(kernel=sd[f"align_module.{l}.weight"][:, :, 0, 0].T,
                  bias=sd[f"align_module.{l}.bias"]) for l in range(3)]
    students = [nhwc(arrays[f"{p}in.student{l}"]) for l in range(3)]
    teachers = [nhwc(arrays[f"{p}in.teacher{l}"]) for l in range(3)]

    def loss_fn(s, a):
        return losses.distill_loss(s, teachers, a, method=case["distiller"],
                                   loss_weight=case["loss_weight"])
    loss, (g_student, g_align) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(
        students, align)
    np.testing.assert_allclose(loss, case["loss"], rtol=1e-5)
    for l in range(3):
        np.testing.assert_allclose(g_student[l], nhwc(arrays[f"{p}grad.student{l}"]),
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(g_align[l]["bias"], arrays[f"{p}grad.align_module.{l}.bias"],
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(g_align[l]["kernel"]),
                                   case["align_param_grad_norms"][f"align_module.{l}.weight"],
                                   rtol=1e-4)


def test_init_align_params_shapes():
    params = losses.init_align_params(jax.random.PRNGKey(0), (64, 128), (128, 256))
    assert [p["kernel"].shape for p in params] == [(64, 128), (128, 256)]
    assert all(float(abs(p["kernel"]).max()) <= 1 / 8 for p in params[:1])
