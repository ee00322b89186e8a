"""damo_jax: DAMO-YOLO in JAX/Flax (models, AlignOTA, losses, training, evaluation, export)."""
__version__ = "0.1.0"
