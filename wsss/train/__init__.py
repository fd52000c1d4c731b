"""Training pipeline: stage 1 classifier (PDA), stage 2 pseudo masks, stage 3 segmenter, evaluation.

Each stage has a Python API here and a CLI module (wsss/cli/train_cls.py, pseudo_masks.py,
train_seg.py, eval.py).  Submodules are imported lazily so ``import wsss.train`` stays cheap.
"""
__all__ = ["classifier", "pseudo_masks", "segmenter", "metrics", "common"]
