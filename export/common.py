"""What every export route shares: weights -> fused deploy model -> NCHW export function.

* ``load_deploy_model(config, checkpoint=, weights=, image_size=, seed=)`` -> :class:`DeployModel`
  (the fully folded ``build_model(cfg, deploy=True)`` + ``reparam.fuse(..., fuse_bn=True)`` variables;
  random weights with a loud warning when neither a checkpoint nor weights are given).
* ``raw_fn(dm)``: ``images`` (N, 3, H, W) float32 RGB 0-255 **NCHW** -> ``(scores (N, A, C),
  boxes (N, A, 4) x1y1x2y2 input px)`` — the official raw export layout (SPEC §2.13, §10.1).
  The transpose to Flax's NHWC happens inside the function.
* ``end2end_fn(dm, topk, conf, iou)``: the same followed by ``damo_jax.ops.nms.multiclass_nms`` over all
  candidates (``pre_nms_topk = A*C``, the exact official semantics) — the JAX reference of the
  ``--end2end`` ONNX graph: ``(num_dets (N, 1) int32, boxes (N, K, 4), scores (N, K), labels (N, K))``.
* ``parse_img_size`` / ``parse_batch`` / ``input_spec``: CLI helpers shared by the scripts.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("damo_jax.export")

RAW_OUTPUTS = ("scores", "boxes")
INPUT_NAME = "images"
DYNAMIC_BATCH = "N"


@dataclasses.dataclass
class DeployModel:
    """The fused inference graph and everything an exporter writes into metadata."""
    cfg: object
    model: object                # build_model(cfg, deploy=True)
    variables: dict              # {"params": ...} from reparam.fuse(..., fuse_bn=True)
    class_names: tuple
    image_size: tuple            # (H, W) of the export
    source: str                  # where the weights came from (for metadata / logs)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def metadata(self) -> dict:
        """ONNX / IR metadata: names, sizes and the recommended thresholds of the config."""
        return {
            "model": str(self.cfg.model.name), "weights": self.source,
            "input": "images float32 (N,3,H,W) RGB 0-255, no normalisation",
            "image_size": json.dumps(list(self.image_size)),
            "class_names": json.dumps(list(self.class_names)),
            "conf_thre": str(self.cfg.test.conf_thre), "iou_thre": str(self.cfg.test.iou_thre),
            "strides": json.dumps(list(self.cfg.model.head.get("strides", (8, 16, 32)))),
        }


def setup_logging() -> None:
    """CLI logging: our INFO lines; converters' chatter (jax2onnx, onnx_ir, absl) only from WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("damo_jax").setLevel(logging.INFO)
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)


def parse_img_size(values, default) -> tuple[int, int]:
    """``--img-size 640`` or ``--img-size H W`` (None -> ``default``), multiples of 32."""
    if not values:
        h, w = tuple(int(v) for v in default)
    elif len(values) == 1:
        h = w = int(values[0])
    elif len(values) == 2:
        h, w = int(values[0]), int(values[1])
    else:
        raise ValueError(f"--img-size takes one or two integers, got {values}")
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise ValueError(f"--img-size {h} {w}: height and width must be positive multiples of 32")
    return h, w


def parse_batch(text) -> int | str:
    """``--batch``: a positive integer (static) or ``dynamic``."""
    if str(text).lower() in ("dynamic", "dyn", "-1"):
        return DYNAMIC_BATCH
    try:
        b = int(text)
    except ValueError:
        raise ValueError(f"--batch must be a positive integer or 'dynamic', got {text!r}") from None
    if b < 1:
        raise ValueError(f"--batch must be >= 1, got {b}")
    return b


def input_spec(batch, image_size) -> tuple:
    """jax2onnx input shape: (batch or 'N', 3, H, W)."""
    return (batch, 3, int(image_size[0]), int(image_size[1]))


def _random_variables(cfg, seed: int) -> dict:
    """Official-init train-graph variables; their shapes do not depend on the image size, so the
    init runs on a small 64x64 input (much cheaper than the export size)."""
    from damo_jax.models import build_model, init_variables
    return init_variables(build_model(cfg), jax.random.PRNGKey(seed), (1, 64, 64, 3))


def export_config(config):
    """The config to trace for export: depthwise convs as one grouped conv each
    (``model.depthwise_impl = "conv"``; the models' CPU default may unroll them into shifted-slice
    "taps", which would export as dozens of Mul/Add nodes instead of one ``Conv``)."""
    from damo_jax import models
    from damo_jax.config import load_config

    cfg = load_config(config)
    if hasattr(models, "with_depthwise_impl"):
        cfg = models.with_depthwise_impl(cfg, "conv")
    return cfg


def load_deploy_model(config=None, *, checkpoint=None, weights=None, image_size=None,
                      seed: int = 0) -> DeployModel:
    """Weights -> fused deploy model.

    ``checkpoint``: a training-run directory (EMA weights + its stored config); ``weights``: official
    ``.pth`` or converted ``.npz`` for ``config``; neither: random initialisation (``seed``), with a
    warning — useful only for latency tests and format checks.
    """
    from damo_jax.models import build_model
    from damo_jax.models.reparam import fuse

    if checkpoint is not None and weights is not None:
        raise ValueError("export: give at most one of --checkpoint and --weights")
    if checkpoint is not None or weights is not None:
        from damo_jax.inference.detector import load_jax_model
        cfg, _, variables, class_names = load_jax_model(
            config=config, checkpoint=checkpoint, weights=weights, fuse=True)
        cfg = export_config(cfg)
        model = build_model(cfg, deploy=True)
        source = str(checkpoint or weights)
    else:
        if config is None:
            raise ValueError("export: --config is required when no --checkpoint is given")
        cfg = export_config(config)
        msg = (f"NO WEIGHTS GIVEN: exporting model {cfg.model.name!r} with RANDOM weights "
               f"(seed {seed}). The file is only good for format / latency tests, not detection.")
        warnings.warn(msg, stacklevel=2)
        log.warning("!" * 20 + " " + msg + " " + "!" * 20)
        variables = fuse(_random_variables(cfg, seed), cfg, fuse_bn=True)
        model = build_model(cfg, deploy=True)
        class_names = tuple(cfg.model.class_names)
        source = f"random-init(seed={seed})"
    size = tuple(int(v) for v in (image_size or cfg.model.image_size))
    return DeployModel(cfg=cfg, model=model, variables=variables, class_names=tuple(class_names),
                       image_size=size, source=source)


def from_variables(cfg, train_variables, image_size, *, source="variables") -> DeployModel:
    """DeployModel from in-memory train-graph variables (tests, notebooks)."""
    from damo_jax.models import build_model
    from damo_jax.models.reparam import fuse

    cfg = export_config(cfg)
    return DeployModel(cfg=cfg, model=build_model(cfg, deploy=True),
                       variables=fuse(train_variables, cfg, fuse_bn=True),
                       class_names=tuple(cfg.model.class_names),
                       image_size=tuple(int(v) for v in image_size), source=source)


def raw_fn(dm: DeployModel):
    """NCHW images -> (scores, boxes); weights are closed over (exported as constants)."""
    model, variables = dm.model, dm.variables

    def forward(images):
        out = model.apply(variables, jnp.transpose(images, (0, 2, 3, 1)), train=False)
        return out["scores"], out["boxes"]
    return forward


def end2end_fn(dm: DeployModel, *, topk: int, conf_thre: float, iou_thre: float):
    """JAX reference of the ``--end2end`` graph (official NMS over *all* candidates)."""
    from damo_jax.ops.nms import multiclass_nms

    forward = raw_fn(dm)

    def e2e(images):
        scores, boxes = forward(images)
        num_candidates = scores.shape[1] * scores.shape[2]
        det = multiclass_nms(scores, boxes, conf_thre=conf_thre, iou_thre=iou_thre,
                             max_dets=topk, pre_nms_topk=num_candidates)
        return (det["num_dets"].reshape(-1, 1).astype(jnp.int32), det["boxes"], det["scores"],
                det["labels"].astype(jnp.int32))
    return e2e


def run_jax(fn, images_nchw) -> list[np.ndarray]:
    """Run an export function under jit and return numpy outputs."""
    return [np.asarray(o) for o in jax.jit(fn)(jnp.asarray(images_nchw, jnp.float32))]
