"""Model variants written as config files (a researcher audit, session 31): every architecture or
recipe value that cannot work is one ConfigError naming the key — before anything is built where
the config alone tells (:func:`damo_jax.config.validate_model` / ``validate_recipe``), else when the
model is traced (channels a structure file gives, feature strides) — never a Flax traceback, a
silently ignored key, or priors at the wrong places."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from damo_jax.config import apply_overrides, load_config, validate_config, validate_recipe
from damo_jax.errors import ConfigError
from damo_jax.models import build_model


def _t(**changes):
    """Config t with ``section.key`` (dots) values replaced (no override parsing)."""
    cfg = load_config("t")
    for key, value in changes.items():
        *parents, leaf = key.split("__")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


@pytest.mark.parametrize("key,value,message", [
    ("model__backbone__act", "gelu", r"model.backbone.act = 'gelu' is not a known activation \(relu, silu"),
    ("model__neck__act", "mish", r"model.neck.act = 'mish' is not a known activation"),
    ("model__backbone__name", "ResNet", r"model.backbone.name = 'ResNet' is not a known backbone"),
    ("model__backbone__depthwise", True, r"model.backbone.depthwise = True does not fit TinyNAS_res: it is never"),
    ("model__backbone__use_se", True, r"model.backbone.use_se = True is not supported"),
    ("model__neck__spp", True, r"model.neck.spp = True is not supported"),
    ("model__head__stacked_convs", 2, r"model.head.stacked_convs = 2 is not supported"),
    ("model__backbone__out_indices", (4, 5), r"model.backbone.out_indices = \(4, 5\) must be 3 stage"),
    ("model__neck__in_channels", (96, 192), r"model.neck.in_channels = \(96, 192\) must be 3 channel"),
    ("model__neck__out_channels", (96, 192, 384),
     r"model.head.in_channels = \(64, 128, 256\) must equal model.neck.out_channels \(96, 192, 384\)"),
    ("model__head__strides", (8, 32, 16), r"model.head.strides = \(8, 32, 16\) must be 3 increasing"),
    ("model__head__num_classes", 0, r"model.head.num_classes = 0 must be an integer >= 1"),
    ("model__head__reg_max", 0, r"model.head.reg_max = 0 must be an integer >= 1"),
    ("model__head__last_kernel_size", 2, r"model.head.last_kernel_size = 2 must be an odd integer"),
    ("model__neck__hidden_ratio", 0.01, r"model.neck.hidden_ratio = 0.01 leaves no channel"),
    ("model__neck__hidden_ratio", None, r"model.neck.hidden_ratio = None must be a number > 0"),
    ("model__neck__depth", -1.0, r"model.neck.depth = -1.0 must be a number >= 0"),
    ("model__bn_epsilon", -1.0, r"model.bn_epsilon = -1.0 must be a number > 0"),
    ("model__bn_momentum", 1.5, r"model.bn_momentum = 1.5 must be a number in \[0, 1\)"),
    # a stage the backbone does not have was "not enough values to unpack" in the neck; an
    # unordered or repeated index fed the neck other levels; block_name selected nothing
    ("model__backbone__out_indices", (2, 4, 9), r"model.backbone.out_indices = \(2, 4, 9\) indexes a "
     r"stage TinyNAS_res does not have: with structure 'tinynas_L20_k1kx' its stages are 0 \(the "
     r"stem\) .. 5"),
    ("model__backbone__out_indices", (4, 2, 5), r"model.backbone.out_indices = \(4, 2, 5\) must be 3 "
     r"increasing"),
    ("model__backbone__out_indices", (2, 2, 5), r"model.backbone.out_indices = \(2, 2, 5\) must be 3 "
     r"increasing"),
    ("model__neck__block_name", "foo", r"model.neck.block_name = 'foo' is not supported: every "
     r"released neck is built of BasicBlock_3x3_Reverse"),
])
def test_architecture_mistakes_name_the_key(key, value, message):
    cfg = _t(**{key: value})
    with pytest.raises(ConfigError, match=r"^--config v: " + message):
        validate_config(cfg, where="--config v")
    with pytest.raises(ConfigError, match=message):        # the Python path too
        build_model(cfg)


@pytest.mark.parametrize("name,indices,last", [("m", (2, 3, 5), 4), ("ns", (3, 5, 6), 5)])
def test_out_indices_are_checked_against_each_backbone_type(name, indices, last):
    """TinyNAS_csp has 4 stage groups after the stem (indices up to 4), TinyNAS_mob / _res the
    structure file's stages."""
    cfg = load_config(name)
    cfg.model.backbone.out_indices = indices
    with pytest.raises(ConfigError, match=rf"model.backbone.out_indices = .* its stages are 0 "
                                          rf"\(the stem\) .. {last}$"):
        validate_config(cfg)
    validate_config(load_config(name))


def test_choice_values_are_stored_in_their_canonical_spelling_for_every_command():
    """The choices were checked case-insensitively, by validate_recipe (training) only, but used
    as written: ``model.dtype=BFLOAT16`` then failed in numpy ("data type 'BFLOAT16' not
    understood"), ``data.loader=Process`` in the loader, ``distill.method=MIMIC`` in the loss; and
    eval / info never checked ``model.dtype`` at all."""
    cfg = apply_overrides(load_config("t"), ["model.dtype=BFLOAT16", "data.loader=Process",
                                             "train.optimizer=SGD", "distill.method=MIMIC"])
    validate_config(cfg)
    assert (cfg.model.dtype, cfg.data.loader, cfg.train.optimizer, cfg.distill.method) == (
        "bfloat16", "process", "sgd", "mimic")
    out = jax.eval_shape(build_model(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    assert out["params"]
    for override, message in (("model.dtype=bogus", r"model.dtype = 'bogus' must be one of float32, "
                                                     r"bfloat16, float16"),
                              ("distill.method=foo", r"distill.method = 'foo' must be one of cwd, mimic")):
        with pytest.raises(ConfigError, match=message):
            validate_config(apply_overrides(load_config("t"), [override]))


@pytest.mark.parametrize("override,message", [
    ("data.shear=-3", r"data.shear = -3.0 must be a number in \[0, 45\)"),
    ("data.shear=45", r"data.shear = 45.0 must be a number in \[0, 45\)"),
    ("data.degrees=-5", r"data.degrees = -5.0 must be a number in \[0, 180\]"),
    ("data.translate=-0.2", r"data.translate = -0.2 must be a number in \[0, 0.5\]"),
    ("data.translate=5", r"data.translate = 5.0 must be a number in \[0, 0.5\]"),   # 0 boxes, rc 0
    ("data.mosaic_scale=(2.0, 0.1)", r"data.mosaic_scale = \(2.0, 0.1\) must be \(low, high\)"),
    ("data.flip_prob=2.0", r"data.flip_prob = 2.0 must be a number in \[0, 1\]"),
])
def test_augmentation_ranges_are_checked_for_every_command(override, message):
    """A negative range was numpy's ``high - low < 0`` traceback (train and show); a translate
    beyond 0.5 moved the image, with every box, out of the output: batches without a box, rc 0."""
    with pytest.raises(ConfigError, match=r"^--config t: " + message):
        validate_config(apply_overrides(load_config("t"), [override]), where="--config t")


def test_optional_augmentation_keys_of_a_config_file_are_checked(tmp_path):
    head = "from damo_jax.config import load_config\n\ndef get_config():\n    c = load_config('t')\n"
    for line, message in (("c.data.mixup_scale = (1.5, 0.5)", r"data.mixup_scale = \(1.5, 0.5\)"),
                          ("c.data.min_box_area = -1.0", r"data.min_box_area = -1.0 must be a number >= 0")):
        (tmp_path / "v.py").write_text(head + f"    {line}\n    return c\n")
        with pytest.raises(ConfigError, match=message):
            validate_config(load_config(str(tmp_path / "v.py")))


@pytest.mark.parametrize("override,message", [
    ("distill.tau=0", r"distill.tau = 0.0 must be a number > 0"),       # a non-finite loss at step 0
    ("distill.tau=-1", r"distill.tau = -1.0 must be a number > 0"),
    ("distill.weight=-1", r"distill.weight = -1.0 must be a number >= 0"),
    ("distill.weight_end=-0.1", r"distill.weight_end = -0.1 must be a number >= 0"),
    ("distill.min_teacher_ap=2", r"distill.min_teacher_ap = 2.0 must be a number in \[0, 1\]"),
    ("distill.method=foo", r"distill.method = 'foo' must be one of cwd, mimic"),  # after the teacher
])
def test_distillation_settings_are_checked_before_the_teacher_loads(override, message):
    with pytest.raises(ConfigError, match=message):
        validate_recipe(apply_overrides(load_config("t"), [override]))


def test_a_missing_model_part_names_it():
    cfg = load_config("t")
    del cfg.model["head"]
    with pytest.raises(ConfigError, match=r"model.head is missing"):
        validate_config(cfg)


@pytest.mark.parametrize("override,message", [
    ("train.min_lr_ratio=-1.0", r"train.min_lr_ratio = -1.0 must be a number in \[0, 1\]"),
    ("train.adam_betas=(0.9, 1.5)", r"train.adam_betas = \(0.9, 1.5\) must be two numbers in \[0, 1\)"),
    ("train.adam_betas=(0.9,)", r"train.adam_betas = \(0.9,\) must be two numbers"),
    ("train.adam_eps=-1.0", r"train.adam_eps = -1.0 must be a number > 0"),
    ("data.mosaic_scale=(2.0, 0.1)", r"data.mosaic_scale = \(2.0, 0.1\) must be \(low, high\) with 0 < low <= high"),
    ("data.workers=-1", r"data.workers = -1 must be an integer >= 0"),
])
def test_recipe_values_that_train_nonsense_are_refused(override, message):
    cfg = apply_overrides(load_config("t"), [override])
    with pytest.raises(ConfigError, match=message):
        validate_recipe(cfg)


@pytest.mark.parametrize("epochs,warmup,no_aug", [(1, 5, 0), (1, 5, 16), (20, 5, 16), (3, 1, 3)])
def test_a_schedule_that_does_not_fit_suggests_one_that_does(epochs, warmup, no_aug):
    """The suggestion was "--config.train.no_aug_epochs=0" also when no_aug was 0 already, or when
    the warm-up alone was longer than the run."""
    cfg = apply_overrides(load_config("t"), [f"train.epochs={epochs}", f"train.warmup_epochs={warmup}",
                                             f"train.no_aug_epochs={no_aug}"])
    with pytest.raises(ConfigError, match="lower them, e.g. ") as err:
        validate_recipe(cfg)
    suggested = str(err.value).split("lower them, e.g. ")[1].split()
    fixed = apply_overrides(cfg, [s.removeprefix("--config.") for s in suggested])
    validate_recipe(fixed)                                   # the suggestion fits


def test_stride_mismatch_is_caught_when_traced():
    """``use_focus`` off on T: its stem does not stride, the neck's maps are at strides 4/8/16 and
    the priors (assumed 8/16/32) landed outside the image; other head strides likewise."""
    x = jnp.zeros((1, 64, 64, 3), jnp.float32)
    for cfg, got in ((_t(model__backbone__use_focus=False), r"strides \(4, 8, 16\)"),
                     (_t(model__head__strides=(8, 16, 64)), r"strides \(8, 16, 32\)")):
        model = build_model(cfg)
        with pytest.raises(ConfigError, match=r"model.head.strides = .*but the backbone and neck give "
                                              r"feature maps .*" + got):
            jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    jax.eval_shape(build_model("t").init, jax.random.PRNGKey(0), x)        # the real one traces


def test_neck_channels_that_do_not_fit_the_structure_name_the_keys():
    cfg = _t(model__backbone__structure="tinynas_L25_k1kx")    # S's backbone under T's neck
    with pytest.raises(ConfigError, match=r"model.neck.in_channels = \(96, 192, 384\), but the backbone "
                                          r"gives \(128, 256, 512\) channels"):
        jax.eval_shape(build_model(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    with pytest.raises(ConfigError, match=r"model.backbone.structure: NAS structure 'nope' not found"):
        build_model(_t(model__backbone__structure="nope"))


def test_config_file_keys_typos_sections_and_optional_keys(tmp_path):
    head = "from damo_jax.config import load_config\n\ndef get_config():\n    c = load_config('t')\n"
    (tmp_path / "typo.py").write_text(head + "    c.train.warmup_epoch = 0\n    return c\n")
    with pytest.raises(ConfigError, match=r"typo.py: unknown key train.warmup_epoch; did you mean "
                                          r"train.warmup_epochs\?"):
        load_config(str(tmp_path / "typo.py"))
    (tmp_path / "nosection.py").write_text(head + "    del c['test']\n    return c\n")
    with pytest.raises(ConfigError, match=r"nosection.py: section 'test' is missing"):
        load_config(str(tmp_path / "nosection.py"))
    (tmp_path / "optional.py").write_text(head + "    c.data.mixup_scale = (0.8, 1.2)\n    return c\n")
    assert tuple(load_config(str(tmp_path / "optional.py")).data.mixup_scale) == (0.8, 1.2)


def test_readme_variant_config_and_python_loss_blocks_run(tmp_path):
    """README "Model variants": the variant file validates and builds; the Python block computes a
    loss whose gradient reaches every parameter (a block that went stale would fail here)."""
    import re
    from pathlib import Path

    import numpy as np
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Model variants", 1)[1].split("\n## ", 1)[0]
    variant, python = re.findall(r"```python\n(.*?)```", section, re.S)
    (tmp_path / "wide_t.py").write_text(variant)
    cfg = validate_config(load_config(str(tmp_path / "wide_t.py")))
    assert cfg.model.name == "t_wide" and tuple(cfg.model.head.in_channels) == (96, 192, 384)
    jax.eval_shape(build_model(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    scope: dict = {}
    exec(compile(python, "README.md", "exec"), scope)
    assert np.isfinite(float(scope["loss"])) and float(scope["loss"]) > 0
    assert {"loss_cls", "loss_bbox", "loss_dfl"} <= set(scope["parts"])
    assert float(scope["parts"]["num_pos"]) >= 2                   # both boxes got positives
    norms = [float(jnp.abs(g).sum()) for g in jax.tree_util.tree_leaves(scope["grads"])]
    assert sum(n > 0 for n in norms) > 0.9 * len(norms)       # the loss reaches the network


@pytest.mark.parametrize("name", ["t", "s", "ns"])
def test_fractional_schedule_lengths_are_taken_and_counters_must_be_whole(name, tmp_path):
    """``--config.train.warmup_epochs=0.5`` was refused on t/s/m/l ("expected an integer": the
    default was the int 5) while the demo needed a ``del`` to set 0.3; and a fractional
    ``eval_every_epochs`` in a config file was truncated by ``int()`` to 0 (= only at the end)."""
    from damo_jax.train.loop import run_length
    cfg = apply_overrides(load_config(name), ["train.warmup_epochs=0.5", "train.no_aug_epochs=1.5",
                                              "train.epochs=4"])
    validate_recipe(validate_config(cfg))
    rl = run_length(cfg, 10 * int(cfg.train.batch_size))      # 10 steps per epoch
    assert (rl.warmup_steps, rl.no_aug_start_step, rl.total_steps) == (5, 25, 40)
    head = f"from damo_jax.config import load_config\n\ndef get_config():\n    c = load_config({name!r})\n"
    (tmp_path / "half.py").write_text(head + "    c.train.warmup_epochs = 0.25\n    return c\n")
    assert load_config(str(tmp_path / "half.py")).train.warmup_epochs == 0.25
    for key in ("eval_every_epochs", "eval_every_epochs_tail", "ckpt_every_steps", "max_steps"):
        bad = load_config(name)
        with bad.unlocked():                       # a file can re-create a key with another type
            del bad.train[key]
            bad.train[key] = 0.5 if key != "max_steps" else 2.5
        with pytest.raises(ConfigError, match=rf"train.{key} = .* must be an integer >= 0"):
            validate_config(bad)
