"""``python -m damo_jax.train --config s``: the main job (alias of ``damo-jax train``)."""
import sys

from damo_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m damo_jax.train"))
