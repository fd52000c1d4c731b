"""Synthetic H&E-like tissue with exact class maps: patches, patch datasets and whole slides.

Seeded and deterministic; no download is ever needed.  See tissue.py for the renderer,
patches.py for LUAD-HistoSeg-layout datasets and slide.py for pyramidal TIFF slides.
"""
from wsss.synthetic.tissue import class_names_for, render_labels_window, render_tissue, render_window
from wsss.synthetic.slide import truth_path_for, write_synthetic_slide

__all__ = [
    "render_tissue",
    "render_window",
    "render_labels_window",
    "class_names_for",
    "write_synthetic_slide",
    "truth_path_for",
    "write_patch_dataset",
    "synthetic_description",
]


def __getattr__(name):
    # Lazy: the dataset writer pulls in PIL and the dataset descriptions.
    if name in ("write_patch_dataset", "synthetic_description"):
        from wsss.synthetic import patches

        return getattr(patches, name)
    raise AttributeError(name)
