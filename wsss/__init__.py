"""wsss: weakly-supervised tissue segmentation of H&E histology from patch-level labels.

Implements Han et al., Medical Image Analysis 2022 (multi-layer pseudo-supervision with
Progressive Dropout Attention) with fused PyTorch custom ops (``torch.ops.wsss.*``),
TorchScript-scriptable models, model bundles and a whole-slide runner.

NB: ``import wsss`` imports neither torch nor the op library (the commands' ``--help`` stays
fast); ``wsss.ops`` loads the library, and every module that calls an op imports it.
"""
__version__ = "0.1.0"

__all__ = ["ops", "__version__"]


def __getattr__(name: str):
    """Submodules on first use (``wsss.ops``, ``wsss.bundle``, ... after a plain ``import wsss``)."""
    if not name.startswith("__"):
        import importlib

        try:
            return importlib.import_module(f"wsss.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"wsss.{name}":
                raise
    raise AttributeError(f"module 'wsss' has no attribute {name!r}")
