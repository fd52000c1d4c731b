"""wsss-export: checkpoints -> model bundle (.pt, TorchScript) and optionally an AOTInductor package (.pt2).

    wsss-export --classifier stage1.pth --segmenter stage2.pth --out model.pt [--pt2 model.pt2]
                [--dataset luad|bcss|description.json] [--tile-size N] [--mpp 1.0] [--eps 0.1]

Checkpoints may be reference-format (the reference code's stage 1, the classifier: plain state_dict;
its stage 2, the segmenter, which the paper and wsss call stage 3: {'state_dict', 'optimizer'})
or wsss training checkpoints ({'model', 'config', ...}); see wsss.models.checkpoints.  Before a
file is put in place, the exported module is run on random tiles and compared with the eager
module (labels, class probabilities); on a mismatch nothing is written.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from typing import Any, Dict, Optional, Sequence

from wsss.cli import run
from wsss.cli._train_args import check_args, check_outputs_spare_inputs, dataset_file, same_file

PROG = "wsss-export"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Export trained checkpoints as a wsss model bundle "
                                "(TorchScript .pt with metadata) and optionally an AOTInductor package (.pt2).")
    p.add_argument("--classifier", required=True,
                   help="ResNet-38 classifier checkpoint (stage 1 everywhere: wsss-train-cls's classifier.pt; the "
                        "reference code's stage-1 file, e.g. stage1.pth)")
    p.add_argument("--segmenter", required=True,
                   help="DeepLabV3+ segmenter checkpoint (the paper's and wsss's stage 3: wsss-train-seg's "
                        "segmenter_best.pt; the reference code's stage-2 file, e.g. stage2.pth)")
    p.add_argument("-o", "--out", "--output", dest="out", required=True, help="bundle file to write (.pt)")
    p.add_argument("--pt2", default=None, help="also write an AOTInductor package here (.pt2; compiles for this CPU)")
    p.add_argument("--dataset", default=None,
                   help="dataset description: built-in name (luad-histoseg or luad, bcss-wsss or bcss) or JSON file; gives "
                        "class names, palette, "
                        "background index and mpp (default: the description the wsss checkpoints recorded; "
                        "luad for reference-code checkpoints, which record none)")
    p.add_argument("--tile-size", type=int, default=None,
                   help="tile size the model runs at (default: the patch size the wsss segmenter checkpoint "
                        "recorded; 224, the reference datasets' patch size, for checkpoints that record none)")
    p.add_argument("--mpp", type=float, default=None, help="microns per pixel trained at (default: the dataset's)")
    p.add_argument("--eps", "--gate-eps", dest="eps", type=float, default=0.1,
                   help="classification gate threshold (default 0.1; --gate-eps as in wsss-train-seg and wsss-eval)")
    p.add_argument("--input-scale", type=float, default=1.0 / 255.0, help="pixel scaling (default 1/255)")
    p.add_argument("--check-tiles", type=int, default=2, help="random tiles for the self-check (default 2)")
    p.add_argument("--pt2-max-batch", type=int, default=64, help="largest batch the .pt2 accepts (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the self-check tiles (default 0)")
    return p


def _check_args(args: argparse.Namespace) -> None:
    from wsss.errors import WsssError

    for flag, path in (("--classifier", args.classifier), ("--segmenter", args.segmenter)):
        if not os.path.isfile(path):
            raise WsssError(f"{flag} {path}: no such file")
    check_args(args, out_folders=(), out_files=("out", "pt2"))  # (paths that cannot be made, --tile-size)
    for flag, path in (("--out", args.out), ("--pt2", args.pt2)):
        folder = os.path.dirname(os.path.abspath(path)) if path is not None else None
        if folder is not None and not os.path.isdir(folder):
            raise WsssError(f"{flag} {path}: folder {folder} does not exist")
    if args.pt2 is not None and same_file(args.pt2, args.out):
        raise WsssError("--pt2 and --out must be different files")
    check_outputs_spare_inputs(
        reads=[("--classifier checkpoint", args.classifier), ("--segmenter checkpoint", args.segmenter),
               ("--dataset description", dataset_file(args.dataset, None) if args.dataset else None)],
        writes=[("--out", args.out), ("--pt2", args.pt2)])
    if not 0.0 <= args.eps < 1.0:
        raise WsssError(f"--eps must be in [0, 1), got {args.eps}")
    if not (args.input_scale > 0 and math.isfinite(args.input_scale)):  # (NaN fails every comparison)
        raise WsssError(f"--input-scale must be a positive number, got {args.input_scale}")
    if args.mpp is not None and not (args.mpp > 0 and math.isfinite(args.mpp)):
        raise WsssError(f"--mpp must be a positive number, got {args.mpp}")
    if args.check_tiles < 1:
        raise WsssError(f"--check-tiles must be >= 1, got {args.check_tiles}")
    if args.pt2_max_batch < 2:
        raise WsssError(f"--pt2-max-batch must be >= 2, got {args.pt2_max_batch}")


def compare_outputs(expected, got, what: str, *, min_agreement: float = 0.999, prob_tol: float = 1e-3) -> Dict[str, float]:
    """Compare (labels, scores, class_prob) of an exported module with the eager ones.

    Returns {"label_agreement", "class_prob_max_diff"}; raises BundleError when labels agree on
    fewer than ``min_agreement`` of the pixels or class probabilities differ by more than prob_tol.
    """
    from wsss.errors import BundleError

    labels_e, _, prob_e = expected
    labels_g, _, prob_g = got
    if tuple(labels_g.shape) != tuple(labels_e.shape) or tuple(prob_g.shape) != tuple(prob_e.shape):
        raise BundleError(f"self-check of the {what} failed: output shapes {list(labels_g.shape)}, "
                          f"{list(prob_g.shape)} differ from eager {list(labels_e.shape)}, {list(prob_e.shape)}")
    agreement = (labels_g.cpu() == labels_e.cpu()).float().mean().item()
    prob_diff = (prob_g.float().cpu() - prob_e.float().cpu()).abs().max().item()
    # NB: not ``prob_diff > prob_tol``, which is False for NaN: a classifier whose outputs are NaN
    # passed with "class_prob max diff nan"
    if not (agreement >= min_agreement and prob_diff <= prob_tol):
        raise BundleError(f"self-check of the {what} failed: label agreement {agreement:.5f} (need >= "
                          f"{min_agreement}), class_prob max diff {prob_diff:.2e} (need <= {prob_tol:g})")
    return {"label_agreement": agreement, "class_prob_max_diff": prob_diff}


def export_pt2(module, example_tiles, path: str, *, max_batch: int = 64, metadata: Optional[Dict[str, Any]] = None) -> str:
    """torch.export + AOTInductor package of ``module`` (TissueSegmenter signature, eager) at
    ``path``; dynamic batch 2..max_batch, fixed H x W.

    NB: a batch of 1 is not in the package's range: torch.export specialises sizes 0 and 1, so
    its batch dimension starts at 2 (AOTInductor's input check says "dim value is too small ...
    expected >= 2, got 1"; without the check the compiled code is not promised to be right).
    Outputs are per tile, so a host runs a single tile as two copies of it and keeps the first,
    and runs more than max_batch tiles in batches (tools/cpp_host does both).

    The package's forward takes tiles [N,3,H,W] uint8 and returns [labels, scores, class_prob]
    (scores always computed).  The wsss custom ops stay graph nodes (torch.ops.wsss.*), so a
    host must load the op library first.  The package's aot_inductor.metadata holds the bundle
    JSON ("wsss_bundle.json"), the H x W it is compiled for ("wsss_tile_hw": "HxW") and the
    largest batch it takes ("wsss_max_batch": decimal string), which a host checks its tiles
    against without parsing JSON.
    """
    import torch
    from torch.export import Dim

    class _WithScores(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, tiles):
            return self.inner(tiles, True)

    if int(max_batch) < 2:
        raise ValueError(f"export_pt2: max_batch must be >= 2, got {max_batch}")
    wrapper = _WithScores(module).eval()
    batch = Dim("batch", min=1, max=max_batch)
    with torch.no_grad():
        exported = torch.export.export(wrapper, (example_tiles,), dynamic_shapes={"tiles": {0: batch}})
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    if not any(t.startswith("wsss.") for t in targets):
        from wsss.errors import BundleError
        raise BundleError("export: the exported graph lost the wsss custom ops (expected wsss.gate_argmax)")
    h, w = (int(v) for v in example_tiles.shape[-2:])
    configs: Dict[str, Any] = {"aot_inductor.metadata": {"wsss_tile_hw": f"{h}x{w}",
                                                         "wsss_max_batch": str(int(max_batch))}}
    if metadata is not None:
        configs["aot_inductor.metadata"]["wsss_bundle.json"] = json.dumps(metadata, sort_keys=True)
    return torch._inductor.aoti_compile_and_package(exported, package_path=path, inductor_configs=configs)


def choose_dataset(dataset_arg: Optional[str], *configs: Dict[str, Any]):
    """The DatasetDescription a bundle gets: --dataset if given (refused when its classes differ
    from those the checkpoints recorded), else the description a wsss training checkpoint
    recorded, else a dataset name it recorded, else LUAD (reference-code checkpoints record
    nothing; the run says so).

    NB: wsss checkpoints record dataset "auto" (as typed) beside the resolved description: the
    description is what counts; taking "auto" here meant LUAD's names, palette and mpp for a
    model trained on any other dataset."""
    from wsss.data.description import DatasetDescription, get_description
    from wsss.errors import DataError, WsssError

    recorded = None
    for config in configs:
        d = config.get("description") if isinstance(config, dict) else None
        if isinstance(d, dict):
            try:
                recorded = DatasetDescription.from_dict(d)
            except (DataError, KeyError, TypeError, ValueError) as e:
                raise WsssError(f"the checkpoint's recorded dataset description is invalid: {e}") from None
            break
    if dataset_arg and dataset_arg != "auto":
        chosen = get_description(dataset_arg)
        if recorded is not None and list(chosen.class_names) != list(recorded.class_names):
            raise WsssError(f"--dataset {dataset_arg}: its classes {list(chosen.class_names)} are not the ones the "
                            f"checkpoints were trained on ({list(recorded.class_names)}, dataset {recorded.name!r}); "
                            f"leave --dataset out to use the recorded description")
        return chosen
    if recorded is not None:
        return recorded
    for config in configs:
        value = config.get("dataset") if isinstance(config, dict) else None
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            value = value["name"]
        if isinstance(value, str) and value != "auto":
            return get_description(value)
    print(f"{PROG}: the checkpoints record no dataset: using luad's classes, palette and mpp "
          f"(--dataset names another)", file=sys.stderr)
    return get_description("luad")


def check_same_cohort(cls_ckpt, seg_ckpt) -> None:
    """WsssError (one line, both lists and files) when the classifier and the segmenter
    checkpoints record different class names (wsss checkpoints record their dataset's
    description; reference-code ones record nothing and pass).

    NB: choose_dataset took the first recorded description, so a classifier of one cohort and a
    segmenter of another made a bundle under the segmenter's names."""
    from wsss.cli._train_args import recorded_class_names
    from wsss.errors import WsssError

    cls_names, seg_names = recorded_class_names(cls_ckpt.config), recorded_class_names(seg_ckpt.config)
    if cls_names is not None and seg_names is not None and cls_names != seg_names:
        raise WsssError(f"--classifier {cls_ckpt.path} was trained on the classes {cls_names} but --segmenter "
                        f"{seg_ckpt.path} on {seg_names}: models of different cohorts do not make one bundle")


def check_finite_outputs(expected, classifier: str, segmenter: str) -> None:
    """BundleError (one line) when the eager module's outputs on the self-check tiles are not
    finite: the class probabilities (the classifier's), the gated scores (the segmenter's).

    NB: a classifier whose weights had overflowed (trained with a huge --lr) exported "fine",
    with "class_prob max diff nan" in its self-check."""
    import torch

    from wsss.errors import BundleError

    _, scores, class_prob = expected
    if not bool(torch.isfinite(class_prob).all()):
        raise BundleError(f"--classifier {classifier}: its class probabilities on the self-check tiles are not "
                          f"finite (NaN or infinite): its weights are broken (a diverged training run?); nothing "
                          f"written")
    if scores.numel() and not bool(torch.isfinite(scores).all()):
        raise BundleError(f"--segmenter {segmenter}: its scores on the self-check tiles are not finite (NaN or "
                          f"infinite): its weights are broken (a diverged training run?); nothing written")


def _final_names(text: str, written: Dict[str, str], out: str, pt2: Optional[str]) -> str:
    """``text`` with each temporary file's path replaced by the file it was to become (also one
    that failed to be made: named by its suffix)."""
    import re

    for tmp, final in written.items():
        text = text.replace(tmp, final).replace(os.path.basename(tmp), os.path.basename(final))
    return re.sub(r"[^\s'\"]*\.tmp-wsss-[^\s'\"]*?\.pt(2?)\b",
                  lambda m: (pt2 if m.group(1) and pt2 is not None else out), text)


def default_tile_size(segmenter_config: Dict[str, Any]) -> int:
    """The patch size the segmenter was trained on (wsss checkpoints record it), else 224 (the
    patches of LUAD-HistoSeg and BCSS-WSSS, which the reference checkpoints were trained on);
    says which on stderr."""
    recorded = segmenter_config.get("patch_size") if isinstance(segmenter_config, dict) else None
    if isinstance(recorded, int) and 16 <= recorded <= 8192:
        print(f"{PROG}: tile size {recorded} (the patches the segmenter was trained on; --tile-size to change)",
              file=sys.stderr)
        return recorded
    print(f"{PROG}: tile size 224 (the checkpoint records no patch size: the reference datasets' patches; "
          f"--tile-size to change)", file=sys.stderr)
    return 224


def _quiet_jit_deprecations(fn):
    """Run ``fn`` with torch 2.14's per-call "torch.jit is deprecated" FutureWarnings silenced,
    for that call only (export_bundle is library code too: no process-wide filter)."""
    import functools

    @functools.wraps(fn)
    def quiet(*args, **kwargs):
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
            return fn(*args, **kwargs)

    return quiet


@_quiet_jit_deprecations
def export_bundle(classifier: str, segmenter: str, out: str, *, dataset: Optional[str] = None,
                  tile_size: Optional[int] = None, mpp: Optional[float] = None, eps: float = 0.1,
                  input_scale: float = 1.0 / 255.0, check_tiles: int = 2, seed: int = 0, pt2: Optional[str] = None,
                  pt2_max_batch: int = 64, extra_metadata: Optional[Dict[str, Any]] = None):
    """Checkpoints -> bundle at ``out`` (and an AOTInductor package at ``pt2``), each checked
    against the eager module on ``check_tiles`` random tiles before it is put in place; on any
    failure nothing is written.  The one place bundle metadata is made (wsss-export,
    wsss-train-seg --bundle and the Python pipeline all come here).  Returns (the loaded
    Bundle, the self-check report {"bundle": {...}, "pt2": {...}}).

    dataset: as --dataset (None: the description the checkpoints recorded, see choose_dataset);
    tile_size None: the patch size the segmenter checkpoint recorded (default_tile_size);
    extra_metadata: more bundle metadata keys (e.g. the demo bundle's synthetic_only)."""
    import torch

    from wsss.bundle import first_line, load_bundle, save_bundle, temp_path_beside
    from wsss.errors import BundleError, WsssError
    from wsss.files import made_folders
    from wsss.models import TissueSegmenter
    from wsss.models.checkpoints import classifier_from_state_dict, read_checkpoint, segmenter_from_state_dict

    written = {}  # temporary path -> the file it becomes
    # (the folders made for the outputs go again on a failure, where empty: after the finally
    # below has removed the temporaries)
    with contextlib.ExitStack() as made:
        try:  # NB: from the first read on: a malformed checkpoint is one line too
            cls_ckpt = read_checkpoint(classifier, expected_kind="classifier")
            seg_ckpt = read_checkpoint(segmenter, expected_kind="segmenter")
            check_same_cohort(cls_ckpt, seg_ckpt)
            description = choose_dataset(dataset, seg_ckpt.config, cls_ckpt.config)
            k = len(description.class_names)
            cls_net = classifier_from_state_dict(cls_ckpt.state_dict, num_classes=k,
                                                 where=f"--classifier {cls_ckpt.path}")
            seg_net = segmenter_from_state_dict(seg_ckpt.state_dict, num_classes=k,
                                                where=f"--segmenter {seg_ckpt.path}")
            module = TissueSegmenter(cls_net, seg_net, eps=eps, input_scale=input_scale).eval()
            if tile_size is None:
                tile_size = default_tile_size(seg_ckpt.config)

            metadata = {
                "class_names": list(description.class_names),
                "palette": [list(c) for c in description.palette],
                "background_index": int(description.background_index),
                "tile_size": int(tile_size),
                "mpp": mpp if mpp is not None else description.mpp,
                "input_scale": input_scale,
                "gate_eps": eps,
                "config": {
                    "dataset": description.name,
                    "classifier": {"checkpoint": os.path.basename(cls_ckpt.path), "format": cls_ckpt.source_format,
                                   "width": cls_net.width, "epoch": cls_ckpt.epoch, "train_config": cls_ckpt.config},
                    "segmenter": {"checkpoint": os.path.basename(seg_ckpt.path), "format": seg_ckpt.source_format,
                                  "backbone": seg_net.backbone_name, "width": seg_net.width,
                                  "output_stride": seg_net.output_stride, "epoch": seg_ckpt.epoch,
                                  "train_config": seg_ckpt.config},
                },
            }
            # (wsss.synthetic's datasets: wsss-infer warns on real slides)
            if description.name.startswith("synthetic-"):
                metadata["synthetic_only"] = True
            metadata.update(extra_metadata or {})
            g = torch.Generator().manual_seed(seed)
            tiles = torch.randint(0, 256, (check_tiles, 3, tile_size, tile_size), dtype=torch.uint8, generator=g)
            with torch.inference_mode():
                expected = module(tiles, True)
            check_finite_outputs(expected, cls_ckpt.path, seg_ckpt.path)

            for path in (out, pt2):  # (made as wsss-train-seg makes --out; wsss-export refuses a missing one)
                if path is not None:
                    made.enter_context(made_folders(os.path.dirname(os.path.abspath(path))))
            tmp_bundle = temp_path_beside(out, ".pt")
            written[tmp_bundle] = out
            save_bundle(tmp_bundle, module, metadata)
            bundle = load_bundle(tmp_bundle)
            with torch.inference_mode():
                report = {"bundle": compare_outputs(expected, bundle.module(tiles, True), "TorchScript bundle")}
            if pt2 is not None:
                tmp_pt2 = temp_path_beside(pt2, ".pt2")
                written[tmp_pt2] = pt2
                export_pt2(module, tiles, tmp_pt2, max_batch=pt2_max_batch, metadata=bundle.metadata)
                runner = torch._inductor.aoti_load_package(tmp_pt2)
                with torch.inference_mode():
                    got = runner(tiles)
                report["pt2"] = compare_outputs(expected, tuple(got), "AOTInductor package")
                os.replace(tmp_pt2, pt2)
            os.replace(tmp_bundle, out)
        except WsssError as e:
            text = _final_names(str(e), written, out, pt2)
            if text == str(e):
                raise
            raise type(e)(text) from e
        except Exception as e:  # export/compile failures: one line, nothing half-written
            # NB: named by the files they were to become: "FileNotFoundError: .../.tmp-wsss-XXXX.pt"
            # named a file the user never asked for
            text = first_line(e)
            if isinstance(e, OSError) and e.filename and e.strerror:
                text = f"{e.filename}: {e.strerror}"
            raise BundleError(f"export failed: {type(e).__name__}: {_final_names(text, written, out, pt2)}") from e
        finally:
            for path in written:
                if os.path.exists(path):
                    os.unlink(path)
    bundle.path = out
    return bundle, report


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    bundle, report = export_bundle(args.classifier, args.segmenter, args.out, dataset=args.dataset,
                                   tile_size=args.tile_size, mpp=args.mpp, eps=args.eps, input_scale=args.input_scale,
                                   check_tiles=args.check_tiles, seed=args.seed, pt2=args.pt2,
                                   pt2_max_batch=args.pt2_max_batch)
    tile = bundle.metadata["tile_size"]
    print(f"{PROG}: wrote {args.out} (sha256 {bundle.sha256[:16]}..., content_hash "
          f"{bundle.metadata['content_hash'][:16]}...)")
    if args.pt2 is not None:
        print(f"{PROG}: wrote {args.pt2}")
    for what, numbers in report.items():
        print(f"{PROG}: self-check {what}: label agreement {numbers['label_agreement']:.5f}, "
              f"class_prob max diff {numbers['class_prob_max_diff']:.2e} on {args.check_tiles} random "
              f"{tile}x{tile} tiles")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
