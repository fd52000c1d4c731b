"""wsss: weakly-supervised tissue segmentation of H&E histology from patch-level labels.

Implements Han et al., Medical Image Analysis 2022 (multi-layer pseudo-supervision with
Progressive Dropout Attention) with fused PyTorch custom ops (``torch.ops.wsss.*``),
TorchScript-scriptable models, model bundles and a whole-slide runner.
"""
from wsss import _library

__version__ = "0.1.0"

_library.load()

from wsss import ops  # noqa: E402  (registers fake kernels and autograd)

__all__ = ["ops", "__version__"]
