"""``python -m damo_jax COMMAND ...``: the ``damo-jax`` command (:mod:`damo_jax.cli`)."""
import sys

from damo_jax.cli import console_main

if __name__ == "__main__":
    sys.exit(console_main())
