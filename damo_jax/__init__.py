"""damo_jax: DAMO-YOLO in JAX/Flax (models, AlignOTA, losses, training, evaluation, export)."""
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: ``damo_jax.Detector`` without importing jax/flax at ``import damo_jax`` time.
    if name == "Detector":
        from damo_jax.inference.detector import Detector
        return Detector
    raise AttributeError(f"module 'damo_jax' has no attribute {name!r}")
