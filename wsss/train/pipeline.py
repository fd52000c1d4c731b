"""All four stages in one call (Python API): classifier -> pseudo masks -> segmenter -> evaluation -> bundle.

Used by the end-to-end test, tools/make_demo_bundle.py and tools/run_synthetic_experiment.py;
the CLI commands run the same stage functions one at a time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Optional

from wsss.train.classifier import ClassifierConfig, train_classifier
from wsss.train.pseudo_masks import PseudoMaskConfig, generate_pseudo_masks
from wsss.train.segmenter import SegmenterConfig, evaluate_segmenter, train_segmenter

__all__ = ["PipelineSettings", "run_pipeline"]


@dataclass
class PipelineSettings:
    """Overrides for the stage configs (everything else keeps the stage defaults)."""

    classifier: Dict = field(default_factory=dict)
    pseudo_masks: Dict = field(default_factory=dict)
    segmenter: Dict = field(default_factory=dict)
    eval_split: str = "test"
    gate_eps: float = 0.1
    bundle: Optional[str] = None
    bundle_extra: Dict = field(default_factory=dict)


def run_pipeline(data_root: str, out_dir: str, settings: PipelineSettings, *, truth_dir: Optional[str] = None,
                 classifier_checkpoint: Optional[str] = None, pseudo_dir: Optional[str] = None) -> Dict:
    """Run the stages that are not given; returns checkpoints, pseudo-mask scores and test metrics.

    ``classifier_checkpoint`` / ``pseudo_dir`` skip stage 1 / stage 2 (ablations share them).
    """
    from wsss.data import MaskedPatches, get_description
    from wsss.models.checkpoints import load_classifier_checkpoint, load_segmenter_checkpoint

    os.makedirs(out_dir, exist_ok=True)
    result: Dict = {}
    if classifier_checkpoint is None:
        cls_cfg = ClassifierConfig(data_root=data_root, out_dir=os.path.join(out_dir, "classifier"),
                                   **settings.classifier)
        classifier_checkpoint = train_classifier(cls_cfg, resume=False)["checkpoint"]
    result["classifier"] = classifier_checkpoint
    if pseudo_dir is None:
        pm_cfg = PseudoMaskConfig(data_root=data_root, checkpoint=classifier_checkpoint,
                                  out_dir=os.path.join(out_dir, "pseudo_masks"), truth_dir=truth_dir,
                                  **settings.pseudo_masks)
        pm = generate_pseudo_masks(pm_cfg)
        pseudo_dir = pm_cfg.out_dir
        result["pseudo_masks"] = pm
    result["pseudo_dir"] = pseudo_dir
    seg_cfg = SegmenterConfig(data_root=data_root, mask_dir=pseudo_dir, out_dir=os.path.join(out_dir, "segmenter"),
                              **settings.segmenter)
    seg = train_segmenter(seg_cfg, resume=False)
    result["segmenter"] = seg["best"]
    result["best_val_miou"] = seg["best_miou"]
    description = get_description(seg_cfg.dataset, data_root)
    classifier = load_classifier_checkpoint(classifier_checkpoint, num_classes=description.num_classes)
    segmenter = load_segmenter_checkpoint(seg["best"], num_classes=description.num_classes)
    test = MaskedPatches(data_root, description, settings.eval_split)
    result["test"] = evaluate_segmenter(segmenter, classifier, test, description, device=seg_cfg.device,
                                        precision=seg_cfg.precision, eps=settings.gate_eps, workers=seg_cfg.workers)
    if settings.bundle:
        from wsss.cli.export import export_bundle

        tile = int(test[0]["image"].shape[-1])
        export_bundle(classifier_checkpoint, seg["best"], settings.bundle, tile_size=tile, eps=settings.gate_eps,
                      extra_metadata=settings.bundle_extra)
        result["bundle"] = settings.bundle
    return result
