"""What every export route shares: weights -> fused deploy model -> NCHW export function.

* ``load_deploy_model(config, checkpoint=, weights=, image_size=, seed=)`` -> :class:`DeployModel`
  (:func:`damo_jax.inference.loading.load_model` with ``export=True``: the fully folded ``build_model(cfg, deploy=True)`` + ``reparam.fuse(..., fuse_bn=True)`` variables;
  random weights with a loud warning when neither a checkpoint nor weights are given).
* ``raw_fn(dm)``: ``images`` (N, 3, H, W) float32 RGB 0-255 **NCHW** -> ``(scores (N, A, C),
  boxes (N, A, 4) x1y1x2y2 input px)`` — the official raw export layout (SPEC §2.13, §10.1).
  The transpose to Flax's NHWC happens inside the function.
* ``end2end_fn(dm, topk, conf, iou)``: the inference path's forward + NMS
  (``damo_jax.inference.pipeline.detect_batch``) over all
  candidates (``pre_nms_topk = A*C``, the exact official semantics) — the JAX reference of the
  ``--end2end`` ONNX graph: ``(num_dets (N, 1) int32, boxes (N, K, 4), scores (N, K), labels (N, K))``.
* ``parse_img_size`` / ``parse_batch`` / ``input_spec``: CLI helpers shared by the scripts.
"""
from __future__ import annotations

import dataclasses
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("damo_jax.export")

RAW_OUTPUTS = ("scores", "boxes")
INPUT_NAME = "images"
DYNAMIC_BATCH = "N"
#: the pre-processing of every damo_jax inference path (``damo_jax.inference.pipeline.stretch_resize``),
#: recorded in the export metadata: a deployment that resizes otherwise (letterbox, PIL's bilinear
#: with its antialiasing) finds fewer objects
RESIZE = ("stretch to (H, W), no letterbox (x and y scaled independently): cv2.resize "
          "INTER_LINEAR on the uint8 RGB image")


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
        """ONNX / IR metadata (strings): what a reader needs to run the file as the run's own
        evaluation did — names, size, pre-processing and the config's ``test`` settings
        (``damo_jax.inference.loading`` reads them back when no ``--config`` is given). The keys
        are listed in docs/EXPORT.md ("Export metadata")."""
        import damo_jax
        from damo_jax.inference.pipeline import nms_params
        test = nms_params(self.cfg.get("test"))       # what eval / predict use (defaults filled)
        return {
            "model": str(self.cfg.model.name), "weights": self.source,
            "damo_jax_version": str(damo_jax.__version__),
            "input": "images float32 (N,3,H,W) RGB 0-255, no normalisation",
            "resize": RESIZE,
            "image_size": json.dumps(list(self.image_size)),
            "class_names": json.dumps(list(self.class_names)),
            "conf_thre": str(test.conf), "iou_thre": str(test.iou),
            "max_dets": str(test.max_dets), "pre_nms_topk": str(test.pre_nms_topk),
            "strides": json.dumps(list(self.cfg.model.head.get("strides", (8, 16, 32)))),
        }


def setup_logging() -> None:
    """Alias of :func:`damo_jax.cli.common.setup_logging` (the one logging set-up)."""
    from damo_jax.cli.common import setup_logging as setup
    setup()


def parse_img_size(values, default) -> tuple[int, int]:
    """``--img-size 640`` or ``--img-size H W`` (None -> ``default``), multiples of 32."""
    from damo_jax.cli.common import img_size
    from damo_jax.ops.boxes import check_image_size
    return img_size(values) if values else check_image_size(tuple(default), "image size")


def parse_batch(text) -> int | str:
    """``--batch``: a positive integer (static) or ``dynamic``."""
    from damo_jax.errors import ConfigError
    if text == DYNAMIC_BATCH or str(text).lower() in ("dynamic", "dyn", "-1"):
        return DYNAMIC_BATCH
    if isinstance(text, bool) or isinstance(text, float):
        raise ConfigError(f"--batch must be a positive integer or 'dynamic', got {text!r}")
    try:
        b = int(text)
    except ValueError:
        raise ConfigError(f"--batch must be a positive integer or 'dynamic', got {text!r}") from None
    if b < 1:
        raise ConfigError(f"--batch must be >= 1, got {b}")
    return b


def input_spec(batch, image_size) -> tuple:
    """jax2onnx input shape: (batch or 'N', 3, H, W)."""
    return (batch, 3, int(image_size[0]), int(image_size[1]))


def export_config(config):
    """The config to trace for export: depthwise convs as one grouped conv each and 1x1 convs as
    convs (``model.depthwise_impl = model.pointwise_impl = "conv"``; the models' CPU defaults
    unroll depthwise convs into shifted-slice "taps", which would export as dozens of Mul/Add
    nodes instead of one ``Conv``, and write 1x1 convs as matrix products), and computing in
    float32 (``model.dtype``): a run trained in bfloat16 / float16 keeps float32 parameters, and an
    ONNX ``Conv`` has no bfloat16 (the export crashed in shape inference); FP16 files come from
    ``--fp16``, which converts the float32 graph."""
    from damo_jax.models import with_depthwise_impl
    cfg = with_depthwise_impl(config, "conv", "conv", "conv")
    dtype = str(cfg.model.get("dtype", "float32"))
    if dtype != "float32":
        log.info("model.dtype %s is a training setting: the export computes in float32", dtype)
        with cfg.unlocked():
            cfg.model.dtype = "float32"
    return cfg


def load_deploy_model(config=None, *, checkpoint=None, weights=None, image_size=None,
                      seed: int = 0, overrides=()) -> DeployModel:
    """Weights -> fused deploy model (:func:`damo_jax.inference.loading.load_model`, built once).

    ``checkpoint``: a training-run directory (EMA weights + its stored config); ``weights``: official
    ``.pth`` or converted ``.npz`` for ``config``; neither: random initialisation (``seed``), with a
    warning — useful only for latency tests and format checks.
    """
    from damo_jax.inference.loading import load_model

    random_init = checkpoint is None and weights is None
    loaded = load_model(config, checkpoint=checkpoint, weights=weights, overrides=overrides,
                        fuse=True, export=True, random_init=random_init, seed=seed)
    if random_init:
        msg = (f"NO WEIGHTS GIVEN: exporting model {loaded.cfg.model.name!r} with RANDOM weights "
               f"(seed {seed}). The file is only good for format / latency tests, not detection.")
        log.warning("!" * 20 + " " + msg + " " + "!" * 20)     # one loud line, not also a warning
    if not image_size:      # the size the model is evaluated at (a run trained with --img-size 320 exports at 320)
        from damo_jax.evaluation.evaluator import test_image_size
        image_size = test_image_size(loaded.cfg)
    size = tuple(int(v) for v in image_size)
    return DeployModel(cfg=loaded.cfg, model=loaded.model, variables=loaded.variables,
                       class_names=loaded.class_names, image_size=size, source=loaded.source)


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
    """JAX reference of the ``--end2end`` graph: the inference path's forward + NMS
    (:func:`damo_jax.inference.pipeline.detect_batch`) over *all* candidates (official NMS)."""
    from damo_jax.inference.pipeline import detect_batch

    strides = tuple(dm.cfg.model.head.get("strides", (8, 16, 32)))

    def e2e(images):
        nhwc = jnp.transpose(images, (0, 2, 3, 1))
        h, w = images.shape[2], images.shape[3]
        num_candidates = sum((h // s) * (w // s) for s in strides) * dm.num_classes
        det = detect_batch(dm.model, dm.variables, nhwc, conf_thre, iou_thre, max_dets=topk,
                           pre_nms_topk=num_candidates)
        return (det["num_dets"].reshape(-1, 1).astype(jnp.int32), det["boxes"], det["scores"],
                det["labels"].astype(jnp.int32))
    return e2e


def run_jax(fn, images_nchw) -> list[np.ndarray]:
    """Run an export function under jit and return numpy outputs."""
    return [np.asarray(o) for o in jax.jit(fn)(jnp.asarray(images_nchw, jnp.float32))]
