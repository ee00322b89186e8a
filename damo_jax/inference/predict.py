"""Alias of ``damo-jax predict`` (:mod:`damo_jax.cli.predict`): ``python -m damo_jax.inference.predict``."""
from __future__ import annotations

from damo_jax.inference.images import IMAGE_SUFFIXES, list_images  # noqa: F401 - public names


def main(argv=None) -> dict:
    from damo_jax.cli.predict import main as predict_main
    return predict_main(argv, prog="python -m damo_jax.inference.predict")


if __name__ == "__main__":
    main()
