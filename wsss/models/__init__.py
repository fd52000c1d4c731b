"""The networks of the method, TorchScript-scriptable, with the reference code's module names.

- ResNet38Classifier: stage-1 patch classifier (PDA training head, Grad-CAM feature maps).
- DeepLabV3Plus: stage-3 segmenter (ResNet backbone, output stride 16).
- TissueSegmenter: the inference module a bundle carries (gate + segmentation + argmax).
- wsss.models.checkpoints: strict loading of reference-format and wsss checkpoints.
"""
from wsss.models.deeplab import DeepLabV3Plus
from wsss.models.resnet38 import ResNet38Classifier
from wsss.models.segmenter import TissueSegmenter

__all__ = ["ResNet38Classifier", "DeepLabV3Plus", "TissueSegmenter"]
