"""Shapes, jit, modes and dtypes of the model API (no golden data needed)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from damo_jax.config import load_config
from damo_jax.models import build_model, init_variables, make_priors
from damo_jax.models.blocks import focus_space_to_depth, make_divisible
from damo_jax.models.structures import load_structure, parse_structure_text


@pytest.fixture(scope="module")
def ns():
    cfg = load_config("ns")
    net = build_model(cfg)
    return cfg, net, init_variables(net, jax.random.PRNGKey(0))


def level_sizes(h, w):
    return [(h // s) * (w // s) for s in (8, 16, 32)]


def test_non_square_batch3_under_jit():
    cfg = load_config("t")
    net = build_model(cfg)
    variables = init_variables(net, jax.random.PRNGKey(1))
    apply = jax.jit(net.apply)
    for b, h, w in [(3, 96, 160)]:  # (other sizes: 64x64 in init_variables, 64x96 below)
        x = jax.random.uniform(jax.random.PRNGKey(2), (b, h, w, 3), maxval=255.0)
        out = apply(variables, x)
        a = sum(level_sizes(h, w))
        assert out["scores"].shape == (b, a, 80) and out["boxes"].shape == (b, a, 4)
        assert out["cls_logits_flat"].shape == (b, a, 80)
        assert out["reg_logits_flat"].shape == (b, a, 4, 17)
        assert out["dfl"].shape == (b, a, 4)
        assert out["priors"].shape == (a, 4) and out["strides_flat"].shape == (a,)
        for i, s in enumerate((8, 16, 32)):
            assert out["cls_logits"][i].shape == (b, h // s, w // s, 80)
            assert out["reg_logits"][i].shape == (b, h // s, w // s, 68)
            assert out["backbone"][i].shape == (b, h // s, w // s, (96, 192, 384)[i])
            assert out["neck"][i].shape == (b, h // s, w // s, (64, 128, 256)[i])
        np.testing.assert_array_equal(np.asarray(out["priors"]), make_priors(h, w))
        for key in ("scores", "boxes", "dfl"):
            assert out[key].dtype == jnp.float32
        # flat layouts are the level maps in row-major order
        np.testing.assert_array_equal(np.asarray(out["cls_logits_flat"][:, :h * w // 64]),
                                      np.asarray(out["cls_logits"][0]).reshape(b, -1, 80))
        reg0 = np.asarray(out["reg_logits"][2]).reshape(b, -1, 4, 17)
        np.testing.assert_array_equal(np.asarray(out["reg_logits_flat"][:, -reg0.shape[1]:]), reg0)
        # decode: boxes = prior -/+ dfl * stride
        pri, d = np.asarray(out["priors"]), np.asarray(out["dfl"]) * np.asarray(out["strides_flat"])[:, None]
        want = np.stack([pri[:, 0] - d[..., 0], pri[:, 1] - d[..., 1],
                         pri[:, 0] + d[..., 2], pri[:, 1] + d[..., 3]], -1)
        np.testing.assert_allclose(np.asarray(out["boxes"]), want, rtol=1e-6, atol=1e-4)
        assert np.all(np.asarray(out["dfl"]) >= 0) and np.all(np.asarray(out["dfl"]) <= 16)


def test_make_priors_layout():
    pri = make_priors(64, 96)
    assert pri.dtype == np.float32 and pri.shape == (8 * 12 + 4 * 6 + 2 * 3, 4)
    np.testing.assert_array_equal(pri[:3], [[0, 0, 8, 8], [8, 0, 8, 8], [16, 0, 8, 8]])
    np.testing.assert_array_equal(pri[12], [0, 8, 8, 8])            # row 1, col 0
    np.testing.assert_array_equal(pri[96], [0, 0, 16, 16])          # first stride-16 prior
    np.testing.assert_array_equal(pri[-1], [64, 32, 32, 32])        # last stride-32 prior


def test_train_mode_updates_batch_stats(ns):
    _, net, variables = ns
    x = jax.random.uniform(jax.random.PRNGKey(3), (2, 64, 96, 3), maxval=255.0)
    out, updates = jax.jit(lambda v, x: net.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x)
    assert set(updates) == {"batch_stats"}
    old, new = variables["batch_stats"], updates["batch_stats"]
    assert jax.tree_util.tree_structure(old) == jax.tree_util.tree_structure(new)
    stem_old = np.asarray(old["backbone"]["block_list_0"]["conv"]["bn1"]["mean"])
    stem_new = np.asarray(new["backbone"]["block_list_0"]["conv"]["bn1"]["mean"])
    assert not np.allclose(stem_old, stem_new)
    assert out["scores"].shape == (2, sum(level_sizes(64, 96)), 80)


def test_bfloat16_compute(ns):
    cfg, net, variables = ns
    cfg16 = load_config("ns")
    cfg16.model.dtype = "bfloat16"
    net16 = build_model(cfg16)
    x = jax.random.uniform(jax.random.PRNGKey(4), (1, 64, 64, 3), maxval=255.0)
    ref = jax.jit(net.apply)(variables, x)
    out = jax.jit(net16.apply)(variables, x)
    assert out["neck"][0].dtype == jnp.bfloat16
    for key in ("scores", "boxes", "dfl", "cls_logits_flat", "reg_logits_flat"):
        assert out[key].dtype == jnp.float32, key
    assert np.isfinite(np.asarray(out["boxes"])).all()
    # bf16 keeps ~3 significant digits: the class logits stay close to the float32 ones
    diff = np.abs(np.asarray(out["cls_logits_flat"]) - np.asarray(ref["cls_logits_flat"]))
    assert diff.mean() < 0.1 * max(1.0, np.abs(np.asarray(ref["cls_logits_flat"])).mean())


def test_initialisation_follows_spec(ns):
    _, _, variables = ns
    p = variables["params"]
    head = p["head"]
    np.testing.assert_allclose(np.asarray(head["gfl_cls_0"]["bias"]), -math.log(99.0), rtol=1e-6)
    assert float(head["scales_1"]["scale"]) == 1.0
    assert np.all(np.asarray(head["gfl_reg_2"]["bias"]) == 0)
    assert abs(float(np.asarray(head["gfl_cls_0"]["kernel"]).std()) - 0.01) < 1e-3
    blk = p["backbone"]["block_list_3"]["block_list_0"]
    np.testing.assert_allclose(np.asarray(blk["conv_1"]["bias"]), 1e-4)          # mob BN beta
    w = np.asarray(blk["conv_0"]["kernel"])                                       # 1x1, in = 40
    assert abs(w.std() * 40 - 1.0) < 0.05
    dw = np.asarray(p["neck"]["bu_conv13"]["depthwise"]["kernel"])                # (3,3,1,80)
    assert abs(dw.std() - math.sqrt(2 / (80 * 9))) < 0.2 * math.sqrt(2 / (80 * 9))
    conv3 = np.asarray(p["neck"]["merge_3"]["conv3"]["conv"]["kernel"])            # torch default
    bound = 1 / math.sqrt(conv3.shape[2])
    assert np.abs(conv3).max() <= bound and np.abs(conv3).max() > 0.9 * bound


def test_bad_inputs_are_rejected(ns):
    _, net, variables = ns
    with pytest.raises(ValueError, match="multiples of 32"):
        net.apply(variables, jnp.zeros((1, 80, 64, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        net.apply(variables, jnp.zeros((1, 3, 64, 64)))
    with pytest.raises(ValueError, match="deploy"):
        build_model("ns", deploy="fused")
    bad = load_config("ns")
    bad.model.backbone["name"] = "ResNet50"
    with pytest.raises(ValueError, match="model.backbone.name"):
        build_model(bad)


def test_focus_channel_order():
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    y = np.asarray(focus_space_to_depth(x))
    xs = np.asarray(x)
    np.testing.assert_array_equal(y[..., 0:3], xs[:, 0::2, 0::2])   # TL
    np.testing.assert_array_equal(y[..., 3:6], xs[:, 1::2, 0::2])   # BL
    np.testing.assert_array_equal(y[..., 6:9], xs[:, 0::2, 1::2])   # TR
    np.testing.assert_array_equal(y[..., 9:12], xs[:, 1::2, 1::2])  # BR


def test_structure_parsing_and_helpers():
    st = load_structure("tinynas_L25_k1kx")
    assert (st.stem.in_ch, st.stem.out_ch) == (3, 32)
    assert [(s.in_ch, s.out_ch, s.btn, s.s, s.num_blocks) for s in st.stages][1] == (128, 128, 88, 2, 5)
    assert load_structure("tinynas_L35_kxkx").stages[0].kind == "kxkx"
    text = "[{'class':'ConvKXBNRELU','in':3,'out':8,'s':1,'k':3},\n {'class':'SuperResConvK1KX'," \
           "'in':8,'out':16,'s':2,'k':3,'L':1,'btn':8,'nbitsA':[8],'nbitsW':[8,8]}]"
    assert parse_structure_text(text).stages[0].out_ch == 16
    with pytest.raises(ValueError, match="missing key"):
        parse_structure_text("[{'class':'ConvKXBNRELU','in':3,'out':8,'s':1,'k':3},{'class':'SuperResConvK1KX'}]")
    with pytest.raises(FileNotFoundError):
        load_structure("no_such_structure")
    assert [make_divisible(v) for v in (84, 60, 880, 4, 7.1)] == [88, 64, 880, 8, 8]


def test_summary_matches_spec_checksums():
    """SPEC §1.7: deploy-graph params per part and 2 x conv-MACs at the native size."""
    from damo_jax.models.__main__ import summary
    s = summary("t", deploy="reparam")
    assert s["params"] == {"backbone": 2169744, "neck": 5712704, "head": 597183}
    assert abs(sum(s["gflops"].values()) - 18.01) < 0.005
    ns = summary("ns", img_size=(416, 416), deploy=True)
    # full folding: each BN's (gamma, beta) become one conv bias -> one parameter per channel less
    assert sum(ns["params"].values()) == 1405691 - sum(_bn_channels("ns").values())
    assert abs(sum(ns["gflops"].values()) - 1.50) < 0.005


def _bn_channels(name):
    """{bn path: channels} of the train graph."""
    net = build_model(name)
    shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    flat = jax.tree_util.tree_flatten_with_path(shapes["batch_stats"])[0]
    return {jax.tree_util.keystr(p): s.shape[0] for p, s in flat if jax.tree_util.keystr(p).endswith("['mean']")}


def test_summary_of_demo_config_is_the_model_it_trains():
    """``damo-jax info --config demo`` reports the demo's class count and size, not T's 80 / 640."""
    from damo_jax.data_pipelines.demo import CLASS_NAMES
    from damo_jax.models.__main__ import summary
    demo, t = summary("demo"), summary("t")
    assert demo["num_classes"] == len(CLASS_NAMES) == 6 and t["num_classes"] == 80
    assert demo["size"] == tuple(load_config("demo").test.image_size) == (256, 256)
    assert load_config("demo").model.class_names == load_config("demo_ns").model.class_names == CLASS_NAMES
    assert demo["params"]["backbone"] == t["params"]["backbone"]
    fewer = t["params"]["head"] - demo["params"]["head"]      # 74 classes' worth of cls outputs
    assert fewer > 0 and fewer % (80 - 6) == 0
