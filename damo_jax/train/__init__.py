"""The main job: the train loop (``loop``, ``python -m damo_jax.train``), optimizer and LR schedule
(``optim``), Orbax checkpoints (``checkpoint``) and metrics / curves logging (``log``)."""
