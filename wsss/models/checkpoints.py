"""Load classifier / segmenter checkpoints, of the reference code or of wsss, strictly.

Accepted files (always read with ``torch.load(weights_only=True)``; nothing else is unpickled):

- reference stage 1 (ChuHan89/WSSS-Tissue ``1_train_stage1.py``): a plain state_dict with keys
  conv1a.*, b2.* ... b7.*, bn7.*, fc8.weight;
- reference stage 2 (``3_train_stage2.py``): ``{'state_dict': ..., 'optimizer': ...}`` with keys
  backbone.*, aspp.*, decoder.*;
- wsss training checkpoints: ``{'model': state_dict, 'config': dict, 'epoch': int,
  'optimizer': ..., 'kind': 'classifier' | 'segmenter'}`` (only 'model' is required; 'kind',
  when present, must match).

A ``module.`` prefix on every key (DataParallel) is stripped.  The architecture (number of
classes, width, DeepLab backbone depth) is read off the tensor shapes, then the state_dict is
loaded with ``strict=True``.  Anything else raises BundleError naming the file and what was wrong.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from wsss.errors import BundleError
from wsss.models.deeplab import BACKBONE_LAYERS, DeepLabV3Plus
from wsss.models.resnet38 import ResNet38Classifier

__all__ = [
    "CheckpointContents",
    "read_checkpoint",
    "load_classifier_checkpoint",
    "load_segmenter_checkpoint",
    "classifier_from_state_dict",
    "segmenter_from_state_dict",
    "load_backbone_init",
]


@dataclass
class CheckpointContents:
    """What a checkpoint file holds: its state_dict, the format it came in and any config."""

    path: str
    kind: str  # "classifier" | "segmenter"
    source_format: str  # "reference-stage1" | "reference-stage2" | "wsss"
    state_dict: Dict[str, Tensor]
    config: Dict[str, Any] = field(default_factory=dict)
    epoch: Optional[int] = None


def _guess_kind(state_dict: Mapping[str, Any]) -> Optional[str]:
    if "fc8.weight" in state_dict or "conv1a.weight" in state_dict:
        return "classifier"
    if any(k.startswith(("backbone.", "aspp.", "decoder.")) for k in state_dict):
        return "segmenter"
    return None


def _strip_prefix(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def load_checkpoint_file(path) -> Any:
    """``torch.load(path, weights_only=True)`` of a checkpoint, or BundleError saying what the file
    is instead: missing, a folder, a wsss model bundle or another TorchScript archive (given
    where a training checkpoint goes), or not a checkpoint at all.

    NB: torch's own message for these suggests re-running with weights_only=False, which a user
    should not do with a file they did not make, and which would not help here anyway."""
    import warnings
    import zipfile

    from wsss.bundle import METADATA_FILE, ZIP_DAMAGE, first_line, starts_like_zip

    path = os.fspath(path)
    if os.path.isdir(path):
        raise BundleError(f"checkpoint {path}: is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise BundleError(f"checkpoint {path}: no such file")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except ZIP_DAMAGE as e:
            raise BundleError(f"checkpoint {path}: is corrupted or truncated ({first_line(e)})") from None
        if any(n.endswith("/extra/" + METADATA_FILE) for n in names):
            raise BundleError(f"checkpoint {path}: is a wsss model bundle (what wsss-export and wsss-train-seg "
                              f"--bundle write, for wsss-infer), not a training checkpoint")
        if any("/code/" in n for n in names):
            raise BundleError(f"checkpoint {path}: is a TorchScript archive, not a training checkpoint "
                              f"(a torch.save file of a state_dict)")
        _verify_zip_checksums(path)
    elif starts_like_zip(path):
        raise BundleError(f"checkpoint {path}: is corrupted or truncated (a zip file without its central directory)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, disallowed globals ...
        if "Unsupported global" in str(e):
            raise BundleError(f"checkpoint {path}: holds pickled Python objects (e.g. a whole nn.Module), not "
                              f"only tensors and plain containers; wsss reads checkpoints with weights_only=True "
                              f"and unpickles nothing else (save the model's state_dict())") from None
        if zipfile.is_zipfile(path) or _starts_like_pickle(path):
            detail = type(e).__name__ if "weights_only" in str(e) else first_line(e)
        else:  # (torch's own words for these are a pickle opcode: "101" for a file starting "e")
            detail = _what_the_file_looks_like(path)
        raise BundleError(f"checkpoint {path}: not a PyTorch checkpoint ({detail})") from None


def _verify_zip_checksums(path: str) -> None:
    """BundleError where a member of the zip archive does not match its stored CRC-32.

    NB: torch.load reads the tensors' bytes without checking them, so a bit flipped on disk or
    in a copy loaded silently as other weights.  The check reads the file once more at about 5 GB/s
    (measured: 0.09 s for a 420 MB full-width ResNet-38 checkpoint, warm cache, against 0.22 s for
    torch.load and 1.1 s for load_classifier_checkpoint; it also brings a cold file into the cache
    that torch.load then reads)."""
    import zipfile

    from wsss.bundle import ZIP_DAMAGE, first_line

    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except ZIP_DAMAGE as e:
        raise BundleError(f"checkpoint {path}: is corrupted or truncated ({first_line(e)})") from None
    if bad is not None:
        member = bad.split("/", 1)[-1]  # (without the archive's top folder, which torch names after the file)
        raise BundleError(f"checkpoint {path}: is corrupted: the bytes of its entry {member} do not match their "
                          f"stored checksum (CRC-32): a damaged copy or download")


def _starts_like_pickle(path: str) -> bool:
    """A pickle (protocol 2+, as torch's legacy, non-zip format) starts with the PROTO opcode."""
    try:
        with open(path, "rb") as f:
            return f.read(1) == b"\x80"
    except OSError:
        return False


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"BM", "a BMP image"),
          (b"%PDF", "a PDF document"), (b"\x1f\x8b", "gzip-compressed data (unpack it first)"),
          (b"BZh", "bzip2-compressed data (unpack it first)"), (b"\xfd7zXZ\x00", "xz-compressed data (unpack it first)"),
          (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive (unpack it first)"), (b"\x89HDF\r\n\x1a\n", "an HDF5 file (e.g. Keras weights)"),
          (b"\x93NUMPY", "a NumPy .npy array"), (b"\x7fELF", "an executable program"))


def _what_the_file_looks_like(path: str) -> str:
    """What a file that torch.load refused is instead, in a few plain words (for the message)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        return f"cannot read it: {e.strerror or e}"
    if not head:
        return "the file is empty, 0 bytes"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return f"the file is {what}"
    if len(head) > 10 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "the file is a safetensors file; wsss reads torch.save files"
    if len(head) > 262 and head[257:262] == b"ustar":
        return "the file is a tar archive (unpack it first)"
    text = head.decode("utf-8", errors="ignore") if b"\x00" not in head else ""
    if text and len(text.encode("utf-8")) >= len(head) - 3 and all(c.isprintable() or c in "\t\r\n" for c in text):
        first = text.strip().splitlines()[0] if text.strip() else ""
        if not first:
            return "the file is text of blank lines"
        what = f"the file is text, starting {first[:40]!r}"
        if text.lstrip().startswith("<"):
            what += ": a web page (HTML) saved in place of the checkpoint?"
        return what
    return f"the file is binary data of another kind, starting with the bytes {head[:8].hex(' ')}"


def read_checkpoint(path: str, *, expected_kind: Optional[str] = None) -> CheckpointContents:
    """Read a checkpoint file (any accepted format) without building a network."""
    path = os.fspath(path)
    obj = load_checkpoint_file(path)
    if not isinstance(obj, Mapping):
        raise BundleError(f"checkpoint {path}: expected a dict (state_dict or training checkpoint), got {type(obj).__name__}")

    config: Dict[str, Any] = {}
    epoch: Optional[int] = None
    declared_kind: Optional[str] = None
    if "model" in obj and isinstance(obj["model"], Mapping):
        source_format = "wsss"
        state_dict = obj["model"]
        config = obj.get("config") or {}
        if not isinstance(config, Mapping):
            raise BundleError(f"checkpoint {path}: its 'config' must be a dict (the training settings), "
                              f"got {type(config).__name__}")
        config = dict(config)
        epoch = obj.get("epoch")
        declared_kind = obj.get("kind")
    elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        source_format = "reference-stage2"
        state_dict = obj["state_dict"]
        epoch = obj.get("epoch")
    else:
        source_format = "reference-stage1"
        state_dict = obj
    bad = [k for k in state_dict if not isinstance(k, str)]
    if bad:
        raise BundleError(f"checkpoint {path}: not a state_dict: keys {bad[:3]} are not strings")
    state_dict = _strip_prefix(state_dict)
    bad = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if bad:
        raise BundleError(f"checkpoint {path}: not a state_dict: entries {bad[:3]} are not tensors")
    if not state_dict:
        raise BundleError(f"checkpoint {path}: the state_dict is empty")
    kind = _guess_kind(state_dict)
    if kind is None:
        raise BundleError(
            f"checkpoint {path}: not a wsss network: expected classifier keys (conv1a.*, fc8.weight) or "
            f"segmenter keys (backbone.*, aspp.*, decoder.*), got e.g. {list(state_dict)[:3]}"
        )
    if declared_kind is not None and declared_kind != kind:
        raise BundleError(f"checkpoint {path}: says kind={declared_kind!r} but holds {kind} weights")
    if source_format == "reference-stage2" and kind == "classifier":
        source_format = "reference-stage1"
    if source_format == "reference-stage1" and kind == "segmenter":
        source_format = "state_dict"  # (a plain segmenter state_dict: not how the reference saves stage 2)
    if expected_kind is not None and kind != expected_kind:
        raise BundleError(f"checkpoint {path}: wrong network: expected a {expected_kind} checkpoint, got a {kind} checkpoint")
    if obj.get("finished") is False:  # (wsss checkpoints since the seventh session; older ones say nothing)
        import warnings

        done = f"epoch {epoch + 1} of {config.get('epochs')}" if isinstance(epoch, int) else "unfinished"
        warnings.warn(f"checkpoint {path} comes from an unfinished training run ({done}): rerun the same "
                      f"training command to finish it", stacklevel=2)
    return CheckpointContents(path=path, kind=kind, source_format=source_format, state_dict=dict(state_dict),
                              config=config, epoch=epoch if isinstance(epoch, int) else None)


def _summarise(keys, n: int = 4) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_matching_state_dict(model: torch.nn.Module, state_dict: Mapping[str, Tensor], where: str, *,
                             except_prefixes: Tuple[str, ...] = (), counters_optional: bool = False) -> None:
    """Load ``state_dict`` into ``model`` if every key and shape matches (keys starting with one of
    ``except_prefixes`` are left out on both sides and keep the model's values), else one
    BundleError starting with ``where`` that counts the missing and unexpected keys and the
    shape mismatches.

    ``counters_optional``: BatchNorm's ``num_batches_tracked`` counters may be missing (they keep
    the model's values): initial weights converted from other frameworks (the reference code's
    MXNet ResNet-38, older torchvision files) have none, and with a momentum set they change
    nothing."""
    def kept(keys):
        return {k for k in keys if not k.startswith(except_prefixes)} if except_prefixes else set(keys)

    own = model.state_dict()
    state_dict = {k: state_dict[k] for k in kept(state_dict)}
    if counters_optional:
        state_dict.update({k: own[k] for k in kept(own) - set(state_dict) if k.endswith(".num_batches_tracked")})
    missing = kept(own) - set(state_dict)
    unexpected = set(state_dict) - set(own)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_summarise(unexpected)}")
    shapes = [k for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if shapes:
        k = sorted(shapes)[0]
        problems.append(f"{len(shapes)} shape mismatches, e.g. {k}: checkpoint {list(state_dict[k].shape)} vs "
                        f"model {list(own[k].shape)}")
    if problems:
        raise BundleError(f"{where}: does not match the network: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=not except_prefixes)


def _channels(state_dict: Mapping[str, Tensor], key: str, where: str) -> int:
    """The leading (output channel) size of a weight, or BundleError if it has none."""
    shape = tuple(state_dict[key].shape)
    if not shape or shape[0] < 1:
        raise BundleError(f"{where}: {key} has shape {list(shape)}, expected [out_channels, in_channels, kh, kw]")
    return int(shape[0])


def _width_from(channels: int, reference: int, where: str) -> float:
    width = channels / reference
    if width <= 0:
        raise BundleError(f"{where}: cannot infer the network width from {channels} channels")
    return width


def classifier_from_state_dict(state_dict: Mapping[str, Tensor], *, num_classes: Optional[int] = None,
                               where: str = "state_dict") -> ResNet38Classifier:
    """Build a ResNet38Classifier sized from the state_dict shapes and load it strictly (eval mode)."""
    for key in ("conv1a.weight", "fc8.weight"):
        if key not in state_dict:
            raise BundleError(f"{where}: not a ResNet-38 classifier: key {key} is missing")
    k = _channels(state_dict, "fc8.weight", where)
    if num_classes is not None and k != num_classes:
        raise BundleError(f"{where}: wrong num_classes: the classifier has {k} classes, expected {num_classes}")
    width = _width_from(_channels(state_dict, "conv1a.weight", where), 64, where)
    model = ResNet38Classifier(k, width=width)
    load_matching_state_dict(model, state_dict, where)
    return model.eval()


def segmenter_from_state_dict(state_dict: Mapping[str, Tensor], *, num_classes: Optional[int] = None,
                              where: str = "state_dict") -> DeepLabV3Plus:
    """Build a DeepLabV3Plus sized from the state_dict shapes (classes, width, ResNet depth) and
    load it strictly (eval mode)."""
    for key in ("backbone.conv1.weight", "decoder.last_conv.8.weight"):
        if key not in state_dict:
            raise BundleError(f"{where}: not a DeepLabV3+ segmenter: key {key} is missing")
    k = _channels(state_dict, "decoder.last_conv.8.weight", where)
    if num_classes is not None and k != num_classes:
        raise BundleError(f"{where}: wrong num_classes: the segmenter has {k} classes, expected {num_classes}")
    width = _width_from(_channels(state_dict, "backbone.conv1.weight", where), 64, where)
    pattern = re.compile(r"backbone\.layer(\d)\.(\d+)\.")
    depth = [0, 0, 0, 0]
    for key in state_dict:
        m = pattern.match(key)
        if m:
            i = int(m.group(1)) - 1
            depth[i] = max(depth[i], int(m.group(2)) + 1)
    backbone = next((name for name, layers in BACKBONE_LAYERS.items() if tuple(depth) == layers), None)
    if backbone is None:
        raise BundleError(f"{where}: unsupported DeepLab backbone: blocks per stage {depth}, expected one of "
                          f"{ {n: list(v) for n, v in BACKBONE_LAYERS.items()} }")
    model = DeepLabV3Plus(k, backbone=backbone, width=width)
    load_matching_state_dict(model, state_dict, where)
    return model.eval()


def load_classifier_checkpoint(path: str, *, num_classes: Optional[int] = None) -> ResNet38Classifier:
    """ResNet38Classifier (eval mode, CPU) from a reference stage-1 or wsss classifier checkpoint."""
    contents = read_checkpoint(path, expected_kind="classifier")
    return classifier_from_state_dict(contents.state_dict, num_classes=num_classes, where=f"checkpoint {contents.path}")


def load_segmenter_checkpoint(path: str, *, num_classes: Optional[int] = None) -> DeepLabV3Plus:
    """DeepLabV3Plus (eval mode, CPU) from a reference stage-2 or wsss segmenter checkpoint."""
    contents = read_checkpoint(path, expected_kind="segmenter")
    return segmenter_from_state_dict(contents.state_dict, num_classes=num_classes, where=f"checkpoint {contents.path}")


def load_backbone_init(model: DeepLabV3Plus, path: str, where: str) -> str:
    """Initial weights of a segmenter's ResNet backbone (the reference starts stage 3 from an
    ImageNet ResNet): a plain ResNet state_dict in torchvision's names (``conv1.*``, ``bn1.*``,
    ``layer1.*`` ...; ``fc.*`` ignored), e.g. torchvision's ImageNet file of the same depth, or a
    segmenter checkpoint, whose ``backbone.*`` keys are taken.  Every backbone key and shape must
    match; ``num_batches_tracked`` counters may be missing.  Returns what the file was, for the log.
    ``where`` names the option and the network it must fit, for the messages."""
    obj = load_checkpoint_file(path)
    if isinstance(obj, Mapping):
        inner = next((obj[k] for k in ("model", "state_dict") if isinstance(obj.get(k), Mapping)), None)
        obj = obj if inner is None else inner
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) for k in obj):
        raise BundleError(f"{where}: not a state_dict of a ResNet (conv1.weight, layer1.*, ...) or of a segmenter (backbone.*)")
    state_dict = _strip_prefix(obj)
    if any(k.startswith("backbone.") for k in state_dict):
        state_dict = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        source = "the backbone of a segmenter checkpoint"
    elif "conv1.weight" in state_dict and any(k.startswith("layer1.") for k in state_dict):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        source = "a ResNet state_dict"
    elif _guess_kind(state_dict) == "classifier":
        raise BundleError(f"{where}: is a ResNet-38 classifier (stage 1's weights, for wsss-train-cls --init or "
                          f"--classifier), not a ResNet backbone for the segmenter")
    else:
        raise BundleError(f"{where}: not a ResNet backbone: expected conv1.weight and layer1.* (torchvision's names) "
                          f"or backbone.* keys, got e.g. {list(state_dict)[:3]}")
    bad = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if bad:
        raise BundleError(f"{where}: not a state_dict: entries {bad[:3]} are not tensors")
    load_matching_state_dict(model.backbone, state_dict, where, counters_optional=True)
    return source
