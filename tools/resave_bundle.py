#!/usr/bin/env python
"""Re-save a model bundle with this wsss's model code: same weights, same metadata, same outputs.

    PYTHONPATH=. python tools/resave_bundle.py BUNDLE [-o OUT] [--tiles 4] [--seed 0]

A bundle is a TorchScript archive: it holds the code that the saving wsss and torch compiled,
not just weights.  Re-saving rebuilds the eager TissueSegmenter, loads the bundle's weights into
it and scripts it again, so the archive gets the current model code.  What for: bundles saved
before wsss.models.resize carried the whole body of torch 2.14's F.interpolate, which calls
aten::_upsample_lanczos2d_aa, so they failed to load in torch 2.11 ("Unknown builtin op");
re-saved ones call aten::upsample_bilinear2d only.

Steps: load BUNDLE (the torch here must load it); rebuild the eager networks with the
architecture the scripted module was built with (widths, backbone, output stride, gate eps and
input scale, which it holds as attributes), refusing when the metadata's config names another;
load the bundle's state_dict strictly; save_bundle with the same metadata (so the content_hash,
which covers weights and metadata, stays the same; wsss_version and torch_version become this
wsss's and torch's).  The new file replaces OUT (default: BUNDLE itself) only when the new
bundle gives torch.equal outputs (labels, scores, class_prob) on random tiles of the bundle's
tile size, has the same content_hash, and has no "lanczos" in its code; otherwise nothing is
written and the exit status is 1.

Run it with the wsss of this checkout (PYTHONPATH=. from the repository root) or an installed
wsss of the same version: the code that goes into the archive is the imported wsss's.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
import zipfile
from typing import Any, Dict, List, Optional, Sequence

PROG = "resave_bundle"


class Refused(Exception):
    """The re-saved bundle would not be the same model; nothing was written."""


def archive_code_mentions(path: str, word: str) -> List[str]:
    """The code files (code/*.py) of a TorchScript archive that contain ``word``."""
    with zipfile.ZipFile(path) as zf:
        return [n for n in zf.namelist()
                if "/code/" in n and n.endswith(".py") and word in zf.read(n).decode("utf-8", "replace")]


def _sub_state_dict(state: Dict[str, Any], prefix: str) -> Dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _same_width(a: float, b: float) -> bool:
    """Widths that give the networks the same channel counts (the training pipeline records the
    width asked for, e.g. 0.3; the bundled module holds channels / 64, e.g. 19 / 64)."""
    from wsss.models.resnet38 import scaled_channels

    return all(scaled_channels(n, float(a)) == scaled_channels(n, float(b))
               for n in (48, 64, 128, 256, 512, 1024, 2048, 4096))


def rebuild_module(scripted, metadata: Dict[str, Any], where: str):
    """The eager TissueSegmenter of a loaded bundle's ScriptModule, weights loaded strictly.

    The architecture is the one the scripted module was built with (its classifier.width,
    segmenter.backbone_name / width / output_stride, eps, input_scale attributes); the state
    dict's shapes stand in for attributes a module lacks (as wsss-export infers them from a
    checkpoint).  Raises Refused when the metadata (config, gate_eps, input_scale) names another
    model."""
    from wsss.models import DeepLabV3Plus, ResNet38Classifier, TissueSegmenter
    from wsss.models.checkpoints import classifier_from_state_dict, segmenter_from_state_dict

    state = scripted.state_dict()
    k = len(metadata["class_names"])
    inferred_clf = classifier_from_state_dict(_sub_state_dict(state, "classifier."), num_classes=k,
                                              where=f"{where} (classifier)")
    inferred_seg = segmenter_from_state_dict(_sub_state_dict(state, "segmenter."), num_classes=k,
                                             where=f"{where} (segmenter)")
    arch = {
        ("classifier", "width"): float(getattr(scripted.classifier, "width", inferred_clf.width)),
        ("segmenter", "backbone"): str(getattr(scripted.segmenter, "backbone_name", inferred_seg.backbone_name)),
        ("segmenter", "width"): float(getattr(scripted.segmenter, "width", inferred_seg.width)),
        ("segmenter", "output_stride"): int(getattr(scripted.segmenter, "output_stride", 16)),
    }
    config = metadata.get("config") if isinstance(metadata.get("config"), dict) else {}
    for (part, key), actual in arch.items():
        recorded = config.get(part).get(key) if isinstance(config.get(part), dict) else None
        if recorded is None:
            continue
        same = _same_width(recorded, actual) if key == "width" else recorded == actual
        if not same:
            raise Refused(f"{where}: the metadata's config says {part} {key} {recorded!r}, the bundled module "
                          f"has {actual!r}")
    eps = float(getattr(scripted, "eps", metadata["gate_eps"]))
    input_scale = float(getattr(scripted, "input_scale", metadata["input_scale"]))
    if eps != float(metadata["gate_eps"]) or input_scale != float(metadata["input_scale"]):
        raise Refused(f"{where}: the module's eps {eps} / input_scale {input_scale} are not the metadata's "
                      f"gate_eps {metadata['gate_eps']} / input_scale {metadata['input_scale']}")
    classifier = ResNet38Classifier(k, width=arch["classifier", "width"])
    segmenter = DeepLabV3Plus(k, backbone=arch["segmenter", "backbone"], width=arch["segmenter", "width"],
                              output_stride=arch["segmenter", "output_stride"])
    module = TissueSegmenter(classifier, segmenter, eps=eps, input_scale=input_scale).eval()
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise Refused(f"{where}: the bundle's weights do not fit the rebuilt module: "
                      f"{str(e).strip().splitlines()[0]}") from None
    return module


def _outputs_equal(old, new, tiles) -> Optional[str]:
    """None when old and new give torch.equal outputs on tiles, else what differs."""
    import torch

    with torch.inference_mode():
        a, b = old(tiles, True), new(tiles, True)
    for name, x, y in zip(("labels", "scores", "class_prob"), a, b):
        if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
            diff = (x.float() - y.float()).abs().max().item() if x.shape == y.shape else float("nan")
            return f"{name} differ (max abs diff {diff:.3g}, shapes {list(x.shape)} / {list(y.shape)})"
    return None


def resave(path: str, out: Optional[str] = None, *, n_tiles: int = 4, seed: int = 0) -> Dict[str, Any]:
    """Re-save bundle ``path`` to ``out`` (default: in place); returns a summary dict.  Raises
    Refused (nothing written) when the new bundle would differ."""
    import torch

    import wsss
    from wsss.bundle import content_hash, file_sha256, load_bundle, save_bundle, temp_path_beside

    out = out or path
    old = load_bundle(path)
    meta = old.metadata
    module = rebuild_module(old.module, meta, path)
    if content_hash(module, meta) != meta["content_hash"]:
        raise Refused(f"{path}: the rebuilt module's content hash differs from the bundle's")
    g = torch.Generator().manual_seed(seed)
    size = int(meta["tile_size"])
    tiles = torch.randint(0, 256, (n_tiles, 3, size, size), dtype=torch.uint8, generator=g)
    tmp = temp_path_beside(out, ".pt")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
            save_bundle(tmp, module, meta)
        new = load_bundle(tmp)  # verifies the content hash against the file's contents
        if new.metadata["content_hash"] != meta["content_hash"]:
            raise Refused(f"{path}: content_hash changed ({meta['content_hash']} -> {new.metadata['content_hash']})")
        why = _outputs_equal(old.module, new.module, tiles)
        if why is not None:
            raise Refused(f"{path}: the re-saved bundle's outputs are not the old ones on {n_tiles} random "
                          f"{size}x{size} tiles: {why}")
        left = archive_code_mentions(tmp, "lanczos")
        if left:
            raise Refused(f"{path}: the re-saved archive still has lanczos code ({', '.join(left)}): the wsss "
                          f"imported from {os.path.dirname(wsss.__file__)} still scripts F.interpolate")
        summary = {
            "path": path, "out": out, "content_hash": meta["content_hash"],
            "old_sha256": old.sha256, "new_sha256": file_sha256(tmp),
            "old_size": os.path.getsize(path), "new_size": os.path.getsize(tmp),
            "old_lanczos": bool(archive_code_mentions(path, "lanczos")),
            "old_torch": meta.get("torch_version"), "new_torch": new.metadata.get("torch_version"),
            "tiles": n_tiles, "tile_size": size,
        }
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("bundle", help="bundle file (.pt) to re-save")
    p.add_argument("-o", "--out", default=None, help="file to write (default: replace BUNDLE)")
    p.add_argument("--tiles", type=int, default=4, help="random tiles for the output check (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of those tiles (default 0)")
    args = p.parse_args(argv)
    if args.tiles < 1:
        p.error("--tiles must be >= 1")

    from wsss.errors import WsssError

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")  # deprecation notices
    try:
        s = resave(args.bundle, args.out, n_tiles=args.tiles, seed=args.seed)
    except (Refused, WsssError) as e:
        print(f"{PROG}: refused, nothing written: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # an output folder that does not exist, a full disk, ...
        print(f"{PROG}: error, nothing written: {e}", file=sys.stderr)
        return 1
    print(f"{PROG}: wrote {s['out']}: content_hash {s['content_hash'][:16]}... (unchanged), outputs torch.equal on "
          f"{s['tiles']} random {s['tile_size']}x{s['tile_size']} tiles; sha256 {s['old_sha256'][:16]}... -> "
          f"{s['new_sha256'][:16]}...; {s['old_size']} -> {s['new_size']} bytes; torch {s['old_torch']} -> "
          f"{s['new_torch']}; lanczos code: {'yes' if s['old_lanczos'] else 'no'} -> no")
    return 0


if __name__ == "__main__":
    sys.exit(main())
