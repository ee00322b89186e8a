"""Official state_dict <-> Flax conversion: strictness, round trips, .npz/.pth files, fine-tuning
loader. The state dicts are random, built with the golden recipe (tests/golden_weights.py) over
the key shapes of the model's own variable template, so nothing here needs the golden folder
except the check that the template's keys and shapes are the official ones."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from damo_jax.config import load_config
from damo_jax.errors import InputPathError, UserError
from damo_jax.interop.convert import (CheckpointMismatchError, expected_torch_entries,
                                      from_torch_state_dict, load_official_checkpoint,
                                      load_pretrained, merge_variables, to_torch_state_dict,
                                      torch_key)
from damo_jax.interop.pth_io import PthFormatError
from damo_jax.models import build_model, init_variables
from damo_jax.models.reparam import fuse
from golden_weights import load_model_json, make_state_dict


@functools.lru_cache(maxsize=None)
def _random_state_dict(name: str, seed: int, gain: float = 1.0) -> dict:
    cfg = load_config(name)
    shapes = {key: shape for key, (_, _, shape) in expected_torch_entries(cfg).items()}
    shapes.update({k[:-len("running_mean")] + "num_batches_tracked": () for k in shapes
                   if k.endswith(".running_mean")})
    shapes["head.integral.project"] = (int(cfg.model.head.reg_max) + 1,)
    return make_state_dict(shapes, seed=seed, gain=gain)


def random_state_dict(name: str = "ns", seed: int = 7) -> dict:
    """A complete official-format state dict for config ``name`` with random values (a copy)."""
    return dict(_random_state_dict(name, seed))


@pytest.fixture(scope="module")
def ns_state_dict():
    return random_state_dict("ns")


def assert_trees_equal(a, b):
    flat_a, tree_a = jax.tree_util.tree_flatten(a)
    flat_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_state_dicts_equal(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_key_mapping_examples():
    assert torch_key("params", ("backbone", "block_list_1", "block_list_0", "conv2", "rbr_dense",
                                "conv", "kernel")) == \
        "backbone.block_list.1.block_list.0.conv2.rbr_dense.conv.weight"
    assert torch_key("batch_stats", ("neck", "merge_3", "convs_0", "conv", "conv_4", "var")) == \
        "neck.merge_3.convs.0.conv.conv.4.running_var"
    assert torch_key("params", ("neck", "bu_conv13", "bn", "scale")) == "neck.bu_conv13.bn.weight"
    assert torch_key("params", ("head", "scales_2", "scale")) == "head.scales.2.scale"
    assert torch_key("params", ("backbone", "csp_stage_3", "convstem_6", "conv1", "bn1", "bias")) \
        == "backbone.csp_stage.3.convstem.6.conv1.bn1.bias"


@pytest.mark.parametrize("model", ["Ns", "T"])
def test_template_keys_and_shapes_are_the_official_ones(model):
    """The only golden-data test here: the official key list (with shapes) of the PyTorch model."""
    official = {e["key"]: tuple(e["shape"]) for e in load_model_json(model)["weights"]["entries"]}
    assert sorted(random_state_dict(model.lower())) == sorted(official)
    for key, value in random_state_dict(model.lower()).items():
        assert value.shape == official[key], key


def test_round_trip_torch_flax_torch(ns_state_dict):
    cfg = load_config("ns")
    variables = from_torch_state_dict(ns_state_dict, cfg)
    assert_state_dicts_equal(to_torch_state_dict(variables, cfg), ns_state_dict)


def test_round_trip_flax_torch_flax():
    cfg = load_config("ns")
    variables = init_variables(build_model(cfg), jax.random.PRNGKey(0))
    assert_trees_equal(from_torch_state_dict(to_torch_state_dict(variables, cfg), cfg), variables)


def test_conv_layout_is_transposed(ns_state_dict):
    variables = from_torch_state_dict(ns_state_dict, load_config("ns"))
    torch_w = ns_state_dict["backbone.block_list.1.block_list.0.conv.3.weight"]  # depthwise 5x5
    flax_w = variables["params"]["backbone"]["block_list_1"]["block_list_0"]["conv_3"]["kernel"]
    assert torch_w.shape[1:] == (1, 5, 5) and flax_w.shape[:3] == (5, 5, 1)
    np.testing.assert_array_equal(np.asarray(flax_w), torch_w.transpose(2, 3, 1, 0))


def test_missing_key_is_named(ns_state_dict):
    sd = dict(ns_state_dict)
    del sd["neck.merge_5.conv3.bn.running_var"]
    with pytest.raises(ValueError, match=r"neck\.merge_5\.conv3\.bn\.running_var"):
        from_torch_state_dict(sd, load_config("ns"))


def test_unexpected_key_is_named(ns_state_dict):
    sd = dict(ns_state_dict, **{"neck.extra_layer.weight": np.zeros((3,), np.float32)})
    with pytest.raises(ValueError, match=r"neck\.extra_layer\.weight"):
        from_torch_state_dict(sd, load_config("ns"))


def test_misshaped_key_is_named(ns_state_dict):
    sd = dict(ns_state_dict)
    sd["head.gfl_reg.1.bias"] = np.zeros((33,), np.float32)
    with pytest.raises(ValueError, match=r"head\.gfl_reg\.1\.bias.*\(32,\).*\(33,\)"):
        from_torch_state_dict(sd, load_config("ns"))


def test_wrong_model_is_rejected(ns_state_dict):
    with pytest.raises(ValueError, match="missing|unexpected"):
        from_torch_state_dict(ns_state_dict, load_config("nm"))


def test_ignored_entries_and_module_prefix(ns_state_dict):
    cfg = load_config("ns")
    want = from_torch_state_dict(ns_state_dict, cfg)
    trimmed = {k: v for k, v in ns_state_dict.items()
               if not k.endswith("num_batches_tracked") and k != "head.integral.project"}
    assert_trees_equal(from_torch_state_dict(trimmed, cfg), want)
    prefixed = {f"module.{k}": v for k, v in ns_state_dict.items()}
    assert_trees_equal(from_torch_state_dict(prefixed, cfg), want)
    bad = dict(ns_state_dict, **{"head.integral.project": np.arange(17, dtype=np.float32)})
    with pytest.raises(ValueError, match=r"head\.integral\.project"):
        from_torch_state_dict(bad, cfg)


def test_npz_and_pth_files(ns_state_dict, tmp_path):
    cfg = load_config("ns")
    want = from_torch_state_dict(ns_state_dict, cfg)
    np.savez(tmp_path / "ns.npz", **ns_state_dict)
    assert_trees_equal(load_official_checkpoint(tmp_path / "ns.npz", cfg), want)
    from damo_jax.interop.pth_io import save_pth
    save_pth({"model": to_torch_state_dict(want, cfg), "epoch": 3}, tmp_path / "ns.pth")
    assert_trees_equal(load_official_checkpoint(tmp_path / "ns.pth", cfg), want)
    with pytest.raises(InputPathError, match=r"absent\.pth does not exist"):
        load_official_checkpoint(tmp_path / "absent.pth", cfg)
    assert issubclass(InputPathError, FileNotFoundError)


def test_reparam_state_dict_round_trip(ns_state_dict):
    cfg = load_config("t")
    variables = from_torch_state_dict(random_state_dict("t"), cfg)
    deployed = fuse(variables, cfg)
    sd = to_torch_state_dict(deployed, cfg)
    with pytest.raises(ValueError, match="deploy='reparam'"):
        from_torch_state_dict(sd, cfg)
    assert_trees_equal(from_torch_state_dict(sd, cfg, deploy="reparam"), deployed)


def test_load_pretrained_with_other_class_count(ns_state_dict, tmp_path):
    np.savez(tmp_path / "ns.npz", **ns_state_dict)
    cfg = load_config("ns")
    cfg.model.head.num_classes = 3
    subset, report = load_pretrained(tmp_path / "ns.npz", cfg)
    skipped = sorted(k for k, _ in report["skipped"])
    assert skipped == sorted(f"head.gfl_cls.{i}.{p}" for i in range(3) for p in ("weight", "bias"))
    num_bn = sum(k.endswith("num_batches_tracked") for k in ns_state_dict)
    assert report["num_loaded"] == len(report["loaded"]) == len(ns_state_dict) - num_bn - 1 - 6
    assert "gfl_cls_0" not in subset["params"]["head"]
    net = build_model(cfg)
    x = jnp.zeros((1, 64, 64, 3))
    shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), x)
    fresh = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 0.5, s.dtype), shapes)
    merged = merge_variables(fresh, subset)
    np.testing.assert_array_equal(np.asarray(merged["params"]["head"]["gfl_cls_0"]["kernel"]),
                                  np.asarray(fresh["params"]["head"]["gfl_cls_0"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(merged["params"]["head"]["gfl_reg_0"]["bias"]),
                                  ns_state_dict["head.gfl_reg.0.bias"])
    assert jax.jit(net.apply)(merged, x)["scores"].shape == (1, 84, 3)
    with pytest.raises(ValueError, match=r"head\.gfl_cls\.0\.(weight|bias)"):
        load_pretrained(tmp_path / "ns.npz", cfg, skip_head_if_mismatch=False)


def test_fresh_head_skips_every_head_tensor_as_the_official_fine_tuning(ns_state_dict, tmp_path):
    """SPEC §9.1 / Detector.load_pretrain_detector: every non-head tensor is loaded, the whole
    head (cls, reg, scales) is left to the fresh initialisation, even with the same class count."""
    np.savez(tmp_path / "ns.npz", **ns_state_dict)
    subset, report = load_pretrained(tmp_path / "ns.npz", "ns", fresh_head=True)
    head_keys = sorted(k for k in ns_state_dict if k.startswith("head.") and k != "head.integral.project")
    assert sorted(k for k, _ in report["skipped"]) == head_keys and len(head_keys) > 6
    assert "head" not in subset["params"] and "head" not in subset.get("batch_stats", {})
    num_bn = sum(k.endswith("num_batches_tracked") for k in ns_state_dict)
    assert report["num_loaded"] == len(ns_state_dict) - num_bn - 1 - len(head_keys)  # 1: the DFL buffer
    np.testing.assert_array_equal(subset["params"]["backbone"]["block_list_0"]["conv"]["bn1"]["scale"],
                                  ns_state_dict["backbone.block_list.0.conv.bn1.weight"])


def test_mismatch_errors_are_user_errors_naming_file_and_key(ns_state_dict, tmp_path):
    sd = dict(ns_state_dict)
    sd["head.gfl_reg.0.bias"] = np.zeros((5,), np.float32)
    np.savez(tmp_path / "bad.npz", **sd)
    with pytest.raises(CheckpointMismatchError, match=r"bad\.npz: key 'head\.gfl_reg\.0\.bias'"
                                                      r": expected shape \(32,\), got \(5,\)") as info:
        load_official_checkpoint(tmp_path / "bad.npz", "ns")
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    with pytest.raises(CheckpointMismatchError, match=r"bad\.npz: key 'head\.gfl_reg\.0\.bias'"):
        load_pretrained(tmp_path / "bad.npz", "ns")
    np.savez(tmp_path / "project.npz", **dict(ns_state_dict, **{
        "head.integral.project": np.ones(8, np.float32)}))
    with pytest.raises(CheckpointMismatchError, match=r"project\.npz: head\.integral\.project"):
        load_official_checkpoint(tmp_path / "project.npz", "ns")
    (tmp_path / "corrupt.pth").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(PthFormatError, match=r"corrupt\.pth: corrupt or truncated zip"):
        load_official_checkpoint(tmp_path / "corrupt.pth", "ns")
    (tmp_path / "dir.pth").mkdir()
    with pytest.raises(InputPathError, match=r"dir\.pth is not a file"):
        load_official_checkpoint(tmp_path / "dir.pth", "ns")


def test_mismatch_error_names_the_model_the_file_holds(tmp_path):
    """A state dict of another bundled model (here T with 3 classes) loaded with the wrong
    --config: the error says which model the file holds and which --config to use."""
    sd = random_state_dict("t", seed=3)
    for level in range(3):                       # another class count: the classifier differs
        sd[f"head.gfl_cls.{level}.weight"] = sd[f"head.gfl_cls.{level}.weight"][:3]
        sd[f"head.gfl_cls.{level}.bias"] = sd[f"head.gfl_cls.{level}.bias"][:3]
    np.savez(tmp_path / "t3.npz", **sd)
    hint = r"the file holds DAMO-YOLO-T: use --config t"
    with pytest.raises(CheckpointMismatchError, match=r"t3\.npz: .*" + hint):
        load_official_checkpoint(tmp_path / "t3.npz", "ns")
    with pytest.raises(CheckpointMismatchError, match=r"t3\.npz: .*" + hint):
        load_pretrained(tmp_path / "t3.npz", "s")
    # the right model: fine-tuning loads it (the classifier skipped); no hint for a real mismatch
    assert load_pretrained(tmp_path / "t3.npz", "t")[1]["skipped"]
    sd["neck.merge_3.conv1.conv.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    np.savez(tmp_path / "broken.npz", **sd)
    with pytest.raises(CheckpointMismatchError) as info:
        load_official_checkpoint(tmp_path / "broken.npz", "t")
    assert "the file holds" not in str(info.value)


def test_model_signatures_match_the_traced_models():
    """convert.MODEL_SIGNATURES (the table behind the "the file holds DAMO-YOLO-X" hint) against
    the variable templates of every bundled config, train and re-parameterised graphs, and each
    as the official fuse_model leaves it (the nano models have no RepConv: one form each)."""
    from damo_jax.config import MODEL_NAMES
    from damo_jax.interop.convert import MODEL_SIGNATURES, identify_model, model_signature
    from damo_jax.interop.convert import official_fuse_shapes
    want = {}
    for fused in (False, True):                 # the official fuse_model's forms after the others
        for name in MODEL_NAMES:
            for deploy in (False, "reparam"):
                shapes = {k: shape for k, (_, _, shape) in expected_torch_entries(name, deploy).items()}
                if fused:
                    shapes = official_fuse_shapes(shapes, name)
                label = ", ".join(["re-parameterised"] * bool(deploy) + ["fused"] * fused)
                want.setdefault(model_signature(shapes), name + (f" ({label})" if label else ""))
    assert MODEL_SIGNATURES == want
    sd = random_state_dict("ns", seed=1)
    assert identify_model(sd) == "ns"
    assert identify_model({"module." + k: v for k, v in sd.items()}) == "ns"
    assert identify_model({k: v for k, v in sd.items() if "neck" not in k}) is None


def _entries_state_dict(name: str, num_classes: int, deploy) -> dict:
    cfg = load_config(name)
    cfg.model.head.num_classes = num_classes
    return make_state_dict({k: v[2] for k, v in expected_torch_entries(cfg, deploy=deploy).items()},
                           gain=0.5)


def test_info_names_the_model_a_weights_file_holds(tmp_path, capsys):
    """``damo-jax info --weights``: an official-layout .pth (nested under "model", DDP "module."
    prefix) of T with 3 classes, and a deploy .npz of S, are named with their class counts; the
    summary then counts that model (the classifier sized to the file)."""
    from damo_jax.interop.pth_write import save_pth
    from damo_jax.models.__main__ import main
    t = {"module." + k: v for k, v in _entries_state_dict("t", 3, deploy=False).items()}
    save_pth({"model": t, "epoch": 3}, tmp_path / "t.pth")
    s = main(["--weights", str(tmp_path / "t.pth")])
    out = capsys.readouterr().out
    assert "t.pth: DAMO-YOLO-T (--config t), 3 classes, train graph" in out
    assert s["model"] == "t" and s["num_classes"] == 3 and s["deploy"] is False
    # the classifier follows the file: per class, each level's gfl_cls holds C_in x kh x kw + 1
    s80 = main(["--config", "t"])
    capsys.readouterr()
    per_class = sum(int(np.prod(v.shape[1:])) + 1 for k, v in t.items()
                    if ".gfl_cls." in k and k.endswith(".weight"))
    assert s80["params"]["head"] - s["params"]["head"] == (80 - 3) * per_class

    np.savez(tmp_path / "s_deploy.npz", **_entries_state_dict("s", 80, deploy="reparam"))
    s = main(["--weights", str(tmp_path / "s_deploy.npz")])
    assert "DAMO-YOLO-S (--config s), 80 classes, RepConv branches folded" in capsys.readouterr().out
    assert s["model"] == "s" and s["deploy"] == "reparam"

    with pytest.raises(SystemExit, match="holds DAMO-YOLO-S, not --config m"):
        main(["--weights", str(tmp_path / "s_deploy.npz"), "--config", "m"])
    np.savez(tmp_path / "other.npz", w=np.zeros((3, 3), np.float32))
    with pytest.raises(SystemExit, match="other.npz: its keys and shapes match none"):
        main(["--weights", str(tmp_path / "other.npz")])
    # the class count comes from the file: an override of it is refused, not silently ignored
    with pytest.raises(SystemExit, match="--weights and --config.model.head.num_classes both"):
        main(["--weights", str(tmp_path / "t.pth"), "--config.model.head.num_classes=5"])
    capsys.readouterr()
    with pytest.raises(SystemExit, match="multiples of 32"):     # checked before the file is read
        main(["--weights", str(tmp_path / "t.pth"), "--img-size", "33"])
    assert "DAMO-YOLO-T" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"--weights .*: is a folder, expected a file"):
        main(["--weights", str(tmp_path)])
    (tmp_path / "junk.pth").write_bytes(b"PK not a zip at all" * 10)
    with pytest.raises(SystemExit, match=r"--weights .*junk\.pth: "):
        main(["--weights", str(tmp_path / "junk.pth")])
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"empty\.pth: the file is empty"):
        main(["--weights", str(tmp_path / "empty.pth")])


# ------------------------------------------------------------------ the official fuse_model form
@pytest.mark.parametrize("model", ["Ns", "M"])
def test_official_fuse_model_state_dicts(model, tmp_path):
    """What the official ``fuse_model`` leaves after ``switch_to_deploy`` (the official
    evaluation's fuse option) keeps the BNs of the Mob / CSP backbones and the nano neck while
    folding every ConvBNAct: such a state dict did not load (``deploy=True`` expected no BN at
    all, ``"reparam"`` no conv biases), and ``info`` / ``--weights`` did not recognise it.
    tests/fixtures/official_fuse.json holds the official tool's output (keys, shapes, sums; the
    official code run on the golden recipe's weights, tests/fixtures/make_official_fuse.py)."""
    import json
    from pathlib import Path

    from damo_jax.inference.loading import load_model
    from damo_jax.interop.convert import identify_model, official_fuse_state_dict
    fixture = json.loads((Path(__file__).parent / "fixtures" / "official_fuse.json").read_text())
    meta = fixture["models"][model]
    cfg = load_config(model.lower())
    train_sd = _random_state_dict(model.lower(), meta["seed"], meta["conv_gain"])
    variables = from_torch_state_dict(train_sd, cfg)
    official = official_fuse_state_dict(to_torch_state_dict(fuse(variables, cfg), cfg), cfg)
    want = {e["key"]: e for e in meta["entries"]}
    assert sorted(official) == sorted(want)
    for key, e in want.items():
        assert list(np.shape(official[key])) == e["shape"], key
        got = float(np.asarray(official[key], np.float64).sum())
        assert abs(got - e["sum"]) <= 1e-5 * max(e["abs_sum"], 1e-6), (key, got, e["sum"])
    assert sum(int(np.prod(np.shape(v))) for k, v in official.items()
               if not k.endswith((".running_mean", ".running_var", ".num_batches_tracked"))
               and k != "head.integral.project") == meta["num_parameters"]
    name = model.lower()
    assert identify_model(official) == name + (" (fused)" if model == "Ns" else
                                               " (re-parameterised, fused)")
    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 64, 96, 3)), jnp.float32)
    with jax.default_matmul_precision("highest"):
        ref = build_model(cfg).apply(variables, x)
        graphs = {True: from_torch_state_dict(official, cfg, deploy=True),
                  "reparam": from_torch_state_dict(official, cfg, deploy="reparam")}
        for deploy, loaded in graphs.items():
            out = build_model(cfg, deploy=deploy).apply(loaded, x)
            for k in ("scores", "boxes"):
                r = np.asarray(ref[k], np.float64)
                assert np.abs(np.asarray(out[k]) - r).max() <= 1e-4 * max(1.0, np.abs(r).max()), \
                    (deploy, k)
    if model == "Ns":       # --weights FILE: the same file through the user-facing loader
        np.savez(tmp_path / "fused.npz", **official)
        for fuse_flag, graph in ((True, True), (False, False)):     # Ns has no RepConv
            loaded = load_model(name, weights=tmp_path / "fused.npz", fuse=fuse_flag)
            assert loaded.model.head.opts.deploy == graph
            with jax.default_matmul_precision("highest"):
                out = loaded.model.apply(loaded.variables, x)
            assert np.abs(np.asarray(out["scores"]) - np.asarray(ref["scores"])).max() <= 1e-4
