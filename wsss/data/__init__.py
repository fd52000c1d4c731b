"""Datasets: plain descriptions (classes, palette, background, label parsing) and readers."""
from wsss.data.description import (BCSS_WSSS, BUILTIN_DATASETS, LUAD_HISTOSEG, DatasetDescription,
                                   format_label, get_description, parse_label)
from wsss.data.datasets import (LabelledPatches, MaskedPatches, PseudoMaskPatches, list_images, read_mask,
                                read_rgb)

__all__ = [
    "DatasetDescription", "LUAD_HISTOSEG", "BCSS_WSSS", "BUILTIN_DATASETS", "get_description",
    "parse_label", "format_label", "LabelledPatches", "MaskedPatches", "PseudoMaskPatches",
    "list_images", "read_mask", "read_rgb",
]
