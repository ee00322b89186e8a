"""Convolution kinds timed by ``conv_grad.py`` (XLA) and ``conv_grad_torch.py`` (PyTorch), in one
place: shapes of S@320 / Ns@320 layers, used with batch 8 by default.

kind -> (H = W, C_in, C_out, kernel, stride, depthwise). No imports: the PyTorch script runs in a
virtualenv without jax.
"""
KINDS = {
    "1x1": (80, 64, 64, 1, 1, False),
    "1x1s2": (80, 64, 128, 1, 2, False),
    "3x3": (80, 64, 64, 3, 1, False),
    "3x3s2": (80, 64, 128, 3, 2, False),
    "3x3@40": (40, 128, 128, 3, 1, False),
    "dw5": (80, 96, 96, 5, 1, True),
    "dw5s2": (80, 96, 96, 5, 2, True),
}
