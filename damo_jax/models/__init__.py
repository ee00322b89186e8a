"""DAMO-YOLO model zoo in Flax linen (backbones, GiraffeNeckV2, ZeroHead).

Public API: ``build_model(config_or_name, deploy=False)``, ``init_variables(model, key)`` (a
fast-compiling ``model.init``), ``make_priors(h, w, strides)`` and ``with_depthwise_impl(cfg, impl)``
(config copy selecting the depthwise-conv formulation; exporters force ``"conv"``).
"""
from damo_jax.models.build import DamoYolo, build_model, init_variables, with_depthwise_impl
from damo_jax.models.head import dfl_integral, distance2bbox, make_priors

__all__ = ["DamoYolo", "build_model", "init_variables", "make_priors", "dfl_integral", "distance2bbox",
           "with_depthwise_impl"]
