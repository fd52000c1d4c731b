"""Model bundles: one TorchScript archive carrying the inference module and its metadata.

A bundle is a file written by ``torch.jit.save`` with one extra file, ``wsss_bundle.json``
(``_extra_files``), so both Python (``load_bundle``) and C++ (``torch::jit::load(path, device,
extra_files)``) read the module and the metadata from the one file, nothing else needed
except the wsss op library.

The module follows the TissueSegmenter signature:
``forward(tiles [N,3,H,W] uint8|float 0..255, with_scores: bool) -> (labels uint8 [N,H,W],
scores float [N,K,H,W] or empty, class_prob float [N,K])``.

Metadata (``wsss_bundle.json``):
  format="wsss-bundle", format_version=1, class_names [str], palette [[r,g,b], ...],
  background_index int, tile_size int, mpp float|null (microns/pixel the model was trained at),
  input_scale float, gate_eps float, config dict, wsss_version, torch_version,
  content_hash = sha256 over the module's parameters and buffers (names, dtypes, shapes, bytes)
  and the canonical JSON of the other metadata, so it identifies the model, not the zip file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from wsss.errors import BundleError

__all__ = ["Bundle", "BundlePredictor", "CudaGraphs", "PendingPrediction", "save_bundle", "load_bundle", "script_module", "read_bundle_metadata", "content_hash", "cpu_reduced_precision_supported",
           "BUNDLE_FORMAT", "BUNDLE_FORMAT_VERSION", "METADATA_FILE"]

BUNDLE_FORMAT = "wsss-bundle"
BUNDLE_FORMAT_VERSION = 1
METADATA_FILE = "wsss_bundle.json"
# what Python's zipfile raises for a damaged archive (bad CRC, bad central directory, cut short)
ZIP_DAMAGE = (zipfile.BadZipFile, zlib.error, EOFError)
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# key -> what it must be (the text of the error that names a missing or wrong key)
_REQUIRED = {
    "class_names": "a non-empty list of class names",
    "palette": "a list of [r, g, b] colours (ints in 0..255), at least one per class and at most 256",
    "background_index": "an int in K..255, K the number of classes (labels 0..K-1 are theirs)",
    "tile_size": "a positive int (pixels)",
}
_DEFAULTS = {"mpp": None, "input_scale": 1.0 / 255.0, "gate_eps": 0.1, "config": {}}
_AUTOMATIC = ("format", "format_version", "wsss_version", "torch_version", "content_hash")


def file_sha256(path) -> str:
    """sha256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def content_hash(module: torch.nn.Module, metadata: Mapping[str, Any]) -> str:
    """sha256 of the module's parameters and buffers and the metadata (without the automatic keys)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    payload = {k: v for k, v in metadata.items() if k not in _AUTOMATIC}
    h.update(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate_metadata(metadata: Mapping[str, Any], where: str = "bundle metadata") -> Dict[str, Any]:
    """The metadata save_bundle writes (defaults filled in, automatic keys left out), or
    BundleError starting with ``where`` naming the first bad field.  save_bundle and the
    readers (_parse_metadata) both check with this, so a bundle is never read with metadata
    that could not have been saved."""
    if not isinstance(metadata, Mapping):
        raise BundleError(f"{where} must be a dict, got {type(metadata).__name__}")
    meta = dict(_DEFAULTS)
    meta.update({k: v for k, v in metadata.items() if k not in _AUTOMATIC})
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise BundleError(f"{where} is missing " + ", ".join(f"{k} ({_REQUIRED[k]})" for k in missing))
    names = meta["class_names"]
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise BundleError(f"{where}: class_names must be {_REQUIRED['class_names']}, got {names!r}")
    palette = meta["palette"]
    ok = isinstance(palette, (list, tuple)) and len(names) <= len(palette) <= 256 and all(
        isinstance(c, (list, tuple)) and len(c) == 3 and all(_is_int(v) and 0 <= v <= 255 for v in c)
        for c in palette)
    if not ok:
        raise BundleError(f"{where}: palette must be {_REQUIRED['palette']} ({len(names)} classes), got {palette!r}")
    bg = meta["background_index"]
    # NB: labels 0..K-1 are the classes (wsss.ops.gate_argmax writes background_index where there
    # is no tissue): a background index among them would make background pixels a class
    if not _is_int(bg) or not len(names) <= bg <= 255:
        raise BundleError(f"{where}: background_index must be an int in {len(names)}..255 (labels "
                          f"0..{len(names) - 1} are the {len(names)} classes), got {bg!r}")
    ts = meta["tile_size"]
    if not _is_int(ts) or ts <= 0:
        raise BundleError(f"{where}: tile_size must be {_REQUIRED['tile_size']}, got {ts!r}")
    mpp = meta["mpp"]
    if mpp is not None and not (_is_number(mpp) and math.isfinite(mpp) and mpp > 0):
        raise BundleError(f"{where}: mpp must be a positive number or None, got {mpp!r}")
    for key in ("input_scale", "gate_eps"):
        if not _is_number(meta[key]) or not math.isfinite(meta[key]):
            raise BundleError(f"{where}: {key} must be a finite number, got {meta[key]!r}")
        meta[key] = float(meta[key])
    if not isinstance(meta["config"], Mapping):
        raise BundleError(f"{where}: config must be a dict, got {type(meta['config']).__name__}")
    meta["class_names"] = list(names)
    meta["palette"] = [list(c) for c in palette]
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise BundleError(f"{where} must be JSON-serialisable: {e}") from None
    return meta


def _check_module(where: str, module: torch.jit.ScriptModule, class_names) -> None:
    """BundleError unless the scripted ``module`` has TissueSegmenter's signature and, when it
    says (``num_classes``), as many classes as ``class_names``."""
    schema = None
    try:
        schema = module.forward.schema
        args, returns = schema.arguments[1:], schema.returns
        ok = (len(args) >= 2 and isinstance(args[0].type, torch.TensorType) and args[1].type == torch.BoolType.get()
              and all(a.has_default_value() for a in args[2:]) and len(returns) == 1
              and isinstance(returns[0].type, torch.TupleType) and len(returns[0].type.elements()) == 3)
    except (AttributeError, RuntimeError):
        ok = False
    if not ok:
        raise BundleError(f"{where}: the module is not a wsss inference module (TissueSegmenter): its forward must be "
                          f"forward(tiles: Tensor, with_scores: bool) -> (labels, scores, class_prob), got "
                          f"{schema if schema is not None else 'no forward'}")
    k = getattr(module, "num_classes", None)
    if _is_int(k) and k != len(class_names):
        raise BundleError(f"{where}: class_names has {len(class_names)} names but the module has {k} classes")


def script_module(module: torch.nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script(module)``, safe from a TorchScript bug that strikes after torch.export
    or Inductor ran in the same process.

    TorchScript's table of Python builtins (``torch.jit._builtins``) is keyed by ``id(fn)`` and
    holds no reference to some of its functions: ``torch.ops`` packets register their op's id,
    and when a library adds an overload later (``quantized_decomposed::quantize_per_tensor``
    when Inductor loads) the old op is freed, its id left in the table.  A module attribute that
    Python later allocates at that address (a Conv2d's ``_reversed_padding_repeated_twice``
    list, say) is then taken for a builtin function and scripting fails with "builtin cannot be
    used as a value", depending on where the allocator put the list.  The table only holds
    callables, so an entry whose id belongs to a live non-callable attribute of the module is
    stale by construction: forget those entries, then script.
    """
    try:
        from torch.jit._builtins import _get_builtin_table
        table = _get_builtin_table()
    except (ImportError, AttributeError):  # a torch without that private table: nothing to fix
        table = {}
    for m in module.modules():
        for value in vars(m).values():
            if not callable(value):
                table.pop(id(value), None)
    return torch.jit.script(module)


def save_bundle(path: str, module: torch.nn.Module, metadata: Mapping[str, Any]) -> str:
    """Write ``module`` (scripted here if it is not a ScriptModule yet) and ``metadata`` to ``path``.

    The file appears atomically (temp file in the same folder, then os.replace).  Returns the
    sha256 of the written file.  Raises BundleError for bad metadata, a module that cannot be
    scripted, or one without TissueSegmenter's signature or with another number of classes
    (its ``num_classes``) than class_names.
    """
    import wsss.ops  # noqa: F401  (the op library: scripting resolves torch.ops.wsss.*)

    path = os.fspath(path)
    meta = _validate_metadata(metadata, f"bundle {path}: metadata")
    if not isinstance(module, torch.jit.ScriptModule):
        try:
            module = script_module(module.eval())
        except Exception as e:
            raise BundleError(f"bundle {path}: the module cannot be scripted with TorchScript: {first_line(e)}") from None
    _check_module(f"bundle {path}", module, meta["class_names"])
    module = module.eval()
    meta.update(format=BUNDLE_FORMAT, format_version=BUNDLE_FORMAT_VERSION, wsss_version=wsss.__version__,
                torch_version=torch.__version__)
    meta["content_hash"] = content_hash(module, meta)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temp_path_beside(path, ".pt")
    try:
        torch.jit.save(module, tmp, _extra_files={METADATA_FILE: json.dumps(meta, indent=1, sort_keys=True)})
        digest = file_sha256(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return digest


def temp_path_beside(path: str, suffix: str) -> str:
    """A new empty temp file in the folder of ``path`` (for write-then-os.replace), with the
    permissions a plainly created file would get (mkstemp alone gives 0600)."""
    from wsss.files import new_temp_file

    fd, tmp = new_temp_file(os.path.dirname(os.path.abspath(path)), ".tmp-wsss-", suffix)
    os.close(fd)
    return tmp


def starts_like_zip(path: str) -> bool:
    """Whether the file starts with a zip entry's signature (so one that zipfile.is_zipfile
    refuses lost its end: a cut-short copy or download)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def read_bundle_metadata(path: str) -> Dict[str, Any]:
    """The metadata of a bundle without loading its module (cheap; validates the format and
    every field, as save_bundle does)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise BundleError(f"bundle {path}: is a directory, not a bundle file")
    if not os.path.isfile(path):
        raise BundleError(f"bundle {path}: no such file")
    if not zipfile.is_zipfile(path):
        if starts_like_zip(path):
            raise BundleError(f"bundle {path}: is corrupted or truncated (a zip file without its central directory)")
        raise BundleError(f"bundle {path}: not a TorchScript archive (not a zip file)")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if not any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
                raise BundleError(f"bundle {path}: not a TorchScript archive (no code/ folder); a wsss bundle is "
                                  f"written by wsss-export (or wsss.bundle.save_bundle), not by torch.save")
            found = [n for n in names if n.endswith("/extra/" + METADATA_FILE)]
            if not found:
                raise BundleError(f"bundle {path}: no {METADATA_FILE} in the archive (not a wsss bundle; write "
                                  f"bundles with wsss-export or wsss.bundle.save_bundle)")
            raw = zf.read(found[0])
    except ZIP_DAMAGE as e:
        raise BundleError(f"bundle {path}: is corrupted or truncated ({first_line(e)})") from None
    return _parse_metadata(path, raw)


def _parse_metadata(path: str, raw: bytes) -> Dict[str, Any]:
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"bundle {path}: invalid {METADATA_FILE}: {e}") from None
    if not isinstance(meta, dict):
        raise BundleError(f"bundle {path}: invalid {METADATA_FILE}: expected a JSON object")
    if meta.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"bundle {path}: invalid {METADATA_FILE}: format is {meta.get('format')!r}, "
                          f"expected {BUNDLE_FORMAT!r}")
    version = meta.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        raise BundleError(f"bundle {path}: unsupported format_version {version!r} (this wsss reads "
                          f"version {BUNDLE_FORMAT_VERSION}); re-export it with this wsss version")
    missing = [k for k in list(_REQUIRED) + list(_DEFAULTS) if k not in meta]
    if missing:
        raise BundleError(f"bundle {path}: invalid {METADATA_FILE}: missing {', '.join(missing)}")
    _validate_metadata(meta, f"bundle {path}: invalid {METADATA_FILE}")
    return meta


@dataclass
class Bundle:
    """A loaded bundle: ``module`` (ScriptModule, eval mode, on the load device), ``metadata``,
    ``sha256`` of the file, ``path``."""

    module: torch.jit.ScriptModule
    metadata: Dict[str, Any]
    sha256: str
    path: str
    file_identity: Optional[tuple] = None  # (device, inode, size, mtime) when loaded: see _private_module

    @property
    def class_names(self):
        return list(self.metadata["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.metadata["class_names"])

    def predictor(self, device: str = "cpu", precision: str = "float32", *, channels_last: Optional[bool] = None,
                  precision_mode: Optional[str] = None, cuda_graphs: Optional[bool] = None) -> "BundlePredictor":
        """A ``BundlePredictor``: ``predict(tiles, with_scores=False) -> (labels, scores, class_prob)``
        and ``predict.submit(tiles, ...) -> PendingPrediction`` (see BundlePredictor).

        precision: "float32", "bfloat16" or "float16".  precision_mode says how reduced precision
        reaches the convolutions:

        - "autocast" (default on CUDA): float32 weights, the module runs under
          ``torch.autocast(device.type, dtype)``.  NB: autocast acts in the dispatcher, so it
          reaches the ops a TorchScript module calls (checked: conv outputs come out bf16).
        - "cast" (default on CPU, the behaviour measured in docs/models.md): a private copy of the
          module's weights cast to the dtype; the module casts its input to the weights' dtype.

        Either way the module upsamples, gates and argmaxes in float32 (TissueSegmenter calls
        ``.float()`` on the network outputs), so scores and class_prob are float32.  bfloat16 is the
        fast CPU mode only on CPUs with bf16 units (AVX-512 BF16 / AMX; see
        cpu_reduced_precision_supported, which warns otherwise); channels_last (default: on) suits
        both CPU and CUDA.

        cuda_graphs (CUDA only; default: on unless the environment sets WSSS_CUDA_GRAPHS=0): a
        batch shape seen ``CudaGraphs.WARMUP`` times is captured into a CUDA graph and replayed
        from then on (see CudaGraphs): the same kernels, launched with one call instead of
        hundreds, which frees the host thread that feeds the model.
        """
        if precision not in PRECISIONS:
            raise BundleError(f"bundle {self.path}: precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if precision_mode not in (None,) + PRECISION_MODES:
            raise BundleError(f"bundle {self.path}: precision_mode must be one of {list(PRECISION_MODES)} or None, "
                              f"got {precision_mode!r}")
        dev = _bundle_device(self.path, device)
        dtype = PRECISIONS[precision]
        mode = precision_mode or ("autocast" if dev.type == "cuda" else "cast")
        if dev.type == "cpu" and not cpu_reduced_precision_supported(dtype):
            warnings.warn(f"wsss: {precision} inference on this CPU ({torch.backends.cpu.get_cpu_capability()}) has no "
                          f"fast {precision} kernels and will be slower than float32", RuntimeWarning, stacklevel=2)
        use_channels_last = True if channels_last is None else bool(channels_last)
        cast_weights = dtype != torch.float32 and mode == "cast"
        # NB: a private copy, so predictors of different precisions or layouts never share weights,
        # nor TorchScript's optimised graphs (an executor that first ran under autocast is never
        # reused without it).
        shared = dtype == torch.float32 and not use_channels_last and dev == _module_device(self.module)
        module = self.module if shared else self._private_module(dev)
        if cast_weights:
            module = module.to(dtype)
        if use_channels_last:
            module = module.to(memory_format=torch.channels_last)
        module.eval()
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("WSSS_CUDA_GRAPHS", "1").strip().lower() not in ("0", "false", "no", "off")
        return BundlePredictor(module, dev, precision, mode, use_channels_last,
                               cuda_graphs=bool(cuda_graphs) and dev.type == "cuda")

    def _private_module(self, dev: torch.device) -> torch.jit.ScriptModule:
        """The module loaded again from the file, on ``dev``: a copy that shares nothing with
        ``self.module`` (``copy.deepcopy`` would share the methods, and with them the executors).

        NB: the file must still be the one loaded (its hash is in ``sha256``, the runner's
        identity and run.json): a bundle replaced or rewritten since is an error, not a
        silently different model."""
        def changed() -> bool:
            return self.file_identity is not None and _file_identity(self.path) != self.file_identity

        try:
            if not changed():
                module = torch.jit.load(self.path, map_location=dev)
                if not changed():
                    return module
        except Exception as e:
            raise BundleError(f"bundle {self.path}: could not be loaded again for its {dev} predictor: "
                              f"{first_line(e)}") from None
        raise BundleError(f"bundle {self.path}: the file changed on disk after it was loaded (sha256 "
                          f"{self.sha256[:12]}...); load it again")


def _bundle_device(path: str, device) -> torch.device:
    """``device`` as a torch.device a bundle can be loaded on, else BundleError naming the bundle."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise BundleError(f"bundle {path}: invalid device {device!r}: {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise BundleError(f"bundle {path}: device must be cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BundleError(f"bundle {path}: device {device!r} requested but CUDA is not available")
    return dev


def _file_identity(path: str) -> Optional[tuple]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


PRECISION_MODES = ("cast", "autocast")
PREDICTION_OUTPUTS = ("labels", "scores", "class_prob")


class BundlePredictor:
    """A bundle's module bound to a device and precision (made by ``Bundle.predictor``).

    ``predict(tiles, with_scores=False) -> (labels, scores, class_prob)``, synchronous:
    tiles uint8 (or float 0..255) [N,3,H,W] (or [3,H,W]) on any device; outputs on the CPU:
    labels uint8 [N,H,W], scores float32 [N,K,H,W] (empty unless with_scores), class_prob
    float32 [N,K].

    ``predict.submit(tiles, with_scores=False, outputs=...) -> PendingPrediction`` starts the
    same work and returns at once where the device allows; ``.result()`` gives the same triple
    (None for outputs not asked for).  On the CPU, submit computes before it returns (the
    result is ready).  On CUDA it overlaps transfers with compute:

    - the tiles are copied into a pinned host buffer from a small ring (``PINNED_RING``
      buffers, allocated once per tile shape and dtype at the largest batch seen);
    - the upload runs on its own stream with non_blocking=True; an event recorded after it
      guards the ring buffer's reuse; the device copy is record_stream'ed to the compute stream
      so the caching allocator never hands its memory out while the model still reads it;
    - the model runs on the current (compute) stream after waiting for the upload;
    - the outputs asked for are made contiguous on the compute stream, then downloaded on a
      third stream with non_blocking=True into pinned host tensors (torch's caching host
      allocator: a freed block is reused only once the copies recorded on it are done);
    - ``result()`` waits for that download's event (the GIL is released while waiting).

    So batch i+1's upload and compute overlap batch i's download and whatever the caller does
    with batch i's result, when the caller submits i+1 before it asks for i's result.
    """

    PINNED_RING = 3

    def __init__(self, module, device: torch.device, precision: str, precision_mode: str, channels_last: bool,
                 *, cuda_graphs: bool = False) -> None:
        self.module = module
        self.device = device
        self.precision = precision
        self.precision_mode = precision_mode
        self.channels_last = channels_last
        self._dtype = PRECISIONS[precision]
        self._cuda: Optional[_CudaOverlap] = None
        self.graphs: Optional[CudaGraphs] = CudaGraphs(self) if cuda_graphs else None

    def _autocast(self, cache_enabled: bool = True):
        if self.precision_mode == "autocast" and self._dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=self._dtype, cache_enabled=cache_enabled)
        return contextlib.nullcontext()

    def _eager(self, x: Tensor, with_scores: bool, cache_enabled: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
        with torch.inference_mode(), self._autocast(cache_enabled):
            return self.module(x, with_scores)

    @staticmethod
    def _check(tiles) -> Tensor:
        if not isinstance(tiles, Tensor):
            raise BundleError(f"predictor: tiles must be a torch.Tensor [N,3,H,W], got {type(tiles).__name__}")
        if tiles.dim() == 3:
            tiles = tiles.unsqueeze(0)
        if tiles.dim() != 4 or tiles.shape[1] != 3:
            raise BundleError(f"predictor: tiles must have shape [N, 3, H, W], got {list(tiles.shape)}")
        if tiles.dtype != torch.uint8 and not tiles.is_floating_point():  # (what TissueSegmenter takes)
            raise BundleError(f"predictor: tiles must be uint8 or floating point (0..255), got {tiles.dtype}")
        return tiles

    def _run(self, x: Tensor, with_scores: bool) -> Tuple[Tensor, Tensor, Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.graphs is not None:
            out = self.graphs.run(x, with_scores)
            if out is not None:
                return out
        return self._eager(x, with_scores)

    def __call__(self, tiles: Tensor, with_scores: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
        tiles = self._check(tiles)
        labels, scores, class_prob = self._run(tiles.to(self.device, non_blocking=True), with_scores)
        return labels.cpu(), scores.float().cpu(), class_prob.float().cpu()

    def submit(self, tiles: Tensor, with_scores: bool = False, *,
               outputs: Tuple[str, ...] = PREDICTION_OUTPUTS) -> "PendingPrediction":
        """Start predicting ``tiles``; see the class docstring.  The caller may reuse the memory
        of ``tiles`` as soon as submit returns (they have been copied or consumed)."""
        tiles = self._check(tiles)
        bad = [o for o in outputs if o not in PREDICTION_OUTPUTS]
        if bad:
            raise BundleError(f"predictor.submit: outputs must be among {list(PREDICTION_OUTPUTS)}, got {bad}")
        if "scores" in outputs and not with_scores:
            raise BundleError("predictor.submit: outputs include 'scores' but with_scores is False")
        if self.device.type != "cuda":
            full = self(tiles, with_scores)
            return PendingPrediction(tuple(t if name in outputs else None for name, t in zip(PREDICTION_OUTPUTS, full)))
        if self._cuda is None:
            self._cuda = _CudaOverlap(self.device, self.PINNED_RING)
        return self._cuda.submit(self, tiles, with_scores, outputs)


    def on_device(self, tiles: Tensor, with_scores: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
        """(labels, scores, class_prob) left on the predictor's device, in the model's output
        dtypes, queued on the current stream (on CUDA: nothing waits for them; the upload
        overlaps as in ``submit``).  For callers that go on computing there, e.g. the runner's
        device-side blending.  The caller may reuse the memory of ``tiles`` at once."""
        tiles = self._check(tiles)
        if self.device.type != "cuda":
            return self._run(tiles.to(self.device), with_scores)
        if self._cuda is None:
            self._cuda = _CudaOverlap(self.device, self.PINNED_RING)
        with torch.cuda.device(self.device):
            return self._run(self._cuda.stage(tiles), with_scores)


class CudaGraphs:
    """CUDA graphs of a predictor's module, one per (input shape, dtype, with_scores).

    The module launches hundreds of kernels per batch; from Python that took 33.8 ms of host
    time for a batch of 32 reference-size tiles on an H100 host, as long as the GPU took to run
    them (34.6 ms), so the thread that feeds the model was the whole-slide runner's bottleneck.
    A replayed graph launches the same kernels with one call (1.8 ms per batch in all).

    - A shape is captured on its ``WARMUP``-th call (TorchScript's profiling executor settles
      its optimised graph over the first calls; the earlier calls run eagerly), so a slide of a
      few batches, or the runner's last partial batch, never pays for a capture.
    - Replays read a static input buffer (the batch is copied in on the current stream) and
      write static outputs, which are cloned on the current stream before they are returned:
      callers own their outputs as with eager calls, and the next replay, queued behind those
      clones, cannot overwrite what a caller still reads on another stream.
    - Under autocast the capture runs with autocast's weight-cast cache off (a cached cast made
      during capture would be freed with the cache while the graph still reads it); eager
      calls use the cache.  The values are the same either way.
    - If a capture fails (an op that synchronises with the host, an old driver), the error is
      shown once as a warning and the predictor runs eagerly from then on.
    - Each graph keeps its own device memory pool (about the eager call's peak), so at most
      ``MAX_GRAPHS`` shapes are captured; others run eagerly.
    - A batch of fewer tiles than a captured graph takes (the last batch of each slide, the
      pieces of a batch split after an out-of-memory error) runs in the smallest such graph,
      padded: its tiles are copied into the graph's first rows, the rows after them keep
      whatever they held (the model treats each tile on its own), and only its rows are
      returned.  Without this, each slide's last batch ran eagerly, in device memory of its own
      on top of the graph's pool: on a card held to about half a batch of memory beside one
      captured graph, that call ran out of memory and the slide went on in batches of 18 tiles
      instead of 128 (tests/test_runner_device.py, an H200 held to 616 MB).
    """

    WARMUP = 3
    MAX_GRAPHS = 2

    def __init__(self, predictor: "BundlePredictor") -> None:
        self.predictor = predictor
        self.enabled = True
        self._calls: Dict[tuple, int] = {}
        self._graphs: Dict[tuple, Tuple[Any, Tensor, Tuple[Tensor, Tensor, Tensor]]] = {}

    @property
    def captured(self) -> int:
        """How many graphs have been captured."""
        return len(self._graphs)

    @staticmethod
    def _on_cuda(x: Tensor) -> bool:
        return x.device.type == "cuda"

    def run(self, x: Tensor, with_scores: bool) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
        """The module's outputs for ``x`` by a graph replay, or None: run it eagerly."""
        if not self.enabled or not self._on_cuda(x) or torch.cuda.is_current_stream_capturing():
            return None
        key = (tuple(x.shape), tuple(x.stride()), x.dtype, bool(with_scores), x.device)
        entry = self._graphs.get(key) or self._holding(x, with_scores)
        if entry is None:
            calls = self._calls[key] = self._calls.get(key, 0) + 1
            if calls < self.WARMUP or len(self._graphs) >= self.MAX_GRAPHS:
                return None
            try:
                entry = self._graphs[key] = self._capture(x, with_scores)
            except Exception as error:  # noqa: BLE001 - any failure: fall back to eager calls
                self.enabled = False
                self._graphs.clear()
                warnings.warn(f"wsss: capturing a CUDA graph of the model failed ({type(error).__name__}: {error}); "
                              "running it without CUDA graphs", RuntimeWarning, stacklevel=3)
                return None
        graph, static_in, static_out = entry
        n = x.shape[0]
        with torch.inference_mode():
            static_in[:n].copy_(x)
            graph.replay()
            # NB: every output is batch-first but the empty scores of with_scores=False ([0][:n] is empty)
            return tuple(t[:n].clone() for t in static_out)

    def _holding(self, x: Tensor, with_scores: bool):
        """The smallest captured graph of more tiles of ``x``'s size and dtype (None: none)."""
        fits = [(key[0][0], entry) for key, entry in self._graphs.items()
                if key[0][1:] == tuple(x.shape[1:]) and key[0][0] > x.shape[0]
                and key[2:] == (x.dtype, bool(with_scores), x.device)]
        return min(fits, key=lambda f: f[0])[1] if fits else None

    def _capture(self, x: Tensor, with_scores: bool):
        p = self.predictor
        with torch.inference_mode():
            static_in = torch.empty_like(x)
            static_in.copy_(x)
        # NB: a warm-up on a side stream first, as torch.cuda.graphs' docs ask (lazy handles and
        # workspaces are made outside the capture)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                p._eager(static_in, with_scores, cache_enabled=False)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = p._eager(static_in, with_scores, cache_enabled=False)
        return graph, static_in, tuple(static_out)


class PendingPrediction:
    """A submitted prediction; ``result()`` -> (labels, scores, class_prob) CPU tensors (None for
    outputs not asked for).  ``host_outputs`` holds the same tensors (pinned on CUDA)."""

    def __init__(self, host_outputs: Tuple[Optional[Tensor], ...], done_event=None) -> None:
        self.host_outputs = host_outputs
        self._done = done_event

    def ready(self) -> bool:
        return self._done is None or self._done.query()

    def result(self) -> Tuple[Optional[Tensor], ...]:
        if self._done is not None:
            self._done.synchronize()  # NB: releases the GIL; CUDA errors of the batch surface here
            self._done = None
        return self.host_outputs


class _CudaOverlap:
    """Streams and pinned staging buffers behind BundlePredictor.submit on one CUDA device."""

    def __init__(self, device: torch.device, ring_size: int) -> None:
        self.device = device
        self.ring_size = ring_size
        self.upload = torch.cuda.Stream(device)
        self.download = torch.cuda.Stream(device)
        self._ring_key: Optional[tuple] = None
        self._ring: list = []  # [(pinned host tensor [cap,3,H,W] channels_last, event after its upload)]
        self._next = 0

    def _staging(self, tiles: Tensor) -> Tuple[Tensor, Any]:
        """A pinned host view [n,3,H,W] (channels_last) holding a copy of ``tiles``, and the
        event to record after its upload."""
        n, c, h, w = tiles.shape
        key = (c, h, w, tiles.dtype)
        if key != self._ring_key or n > self._ring[0][0].shape[0]:
            for _, done in self._ring:  # uploads from the old buffers must finish before they go
                done.synchronize()
            # NB: NHWC memory seen as NCHW (channels_last strides): the runner's batches have this
            # layout, so the host copy below is a plain memcpy.
            self._ring = [(torch.empty((n, h, w, c), dtype=tiles.dtype, pin_memory=True).permute(0, 3, 1, 2),
                           torch.cuda.Event()) for _ in range(self.ring_size)]
            self._ring_key, self._next = key, 0
        host, done = self._ring[self._next]
        self._next = (self._next + 1) % self.ring_size
        done.synchronize()  # its previous upload has finished reading it (no-op if never recorded)
        view = host[:n]
        view.copy_(tiles)
        return view, done

    def stage(self, tiles: Tensor) -> Tensor:
        """``tiles`` on the device, ready for kernels on the current (compute) stream: CPU tiles
        go through a pinned ring buffer and the upload stream, so the caller may reuse their
        memory at once."""
        compute = torch.cuda.current_stream(self.device)
        if tiles.device.type == "cuda":
            return tiles.to(self.device)
        host, uploaded = self._staging(tiles)
        with torch.cuda.stream(self.upload):
            x = torch.empty_like(host, device=self.device)  # allocated on the upload stream
            x.copy_(host, non_blocking=True)
            uploaded.record(self.upload)
        compute.wait_stream(self.upload)
        x.record_stream(compute)  # NB: freed after this batch's kernels, not after the upload
        return x

    def submit(self, predictor: BundlePredictor, tiles: Tensor, with_scores: bool,
               outputs: Tuple[str, ...]) -> PendingPrediction:
        with torch.cuda.device(self.device):
            compute = torch.cuda.current_stream(self.device)
            x = self.stage(tiles)
            with torch.inference_mode():
                results = predictor._run(x, with_scores)
                device_out = [t.float().contiguous() if name != "labels" else t.contiguous()
                              for name, t in zip(PREDICTION_OUTPUTS, results) if name in outputs]
            self.download.wait_stream(compute)
            with torch.cuda.stream(self.download):
                # NB: host tensors made outside inference mode, like the synchronous path's .cpu()
                # copies, so callers may update them in place; the copies and record_stream (which
                # counts as a write to the device tensor) stay inside it, as the device tensors
                # are inference tensors.
                host_out = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in device_out]
                with torch.inference_mode():
                    for pinned, t in zip(host_out, device_out):
                        pinned.copy_(t, non_blocking=True)
                        t.record_stream(self.download)  # allocated on the compute stream, read here
                # NB: blocking=True: result() sleeps instead of spinning a core, which the reader
                # and stitcher threads need
                done = torch.cuda.Event(blocking=True)
                done.record(self.download)
        it = iter(host_out)
        return PendingPrediction(tuple(next(it) if name in outputs else None for name in PREDICTION_OUTPUTS), done)


def cpu_reduced_precision_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN has fast CPU kernels for ``dtype`` convolutions on this CPU (bf16: AVX-512
    BF16 or AMX; fp16: AVX-512 FP16 or AMX-FP16).  Without them PyTorch falls back to slow
    reference kernels: measured on an AVX2-only AMD EPYC, bfloat16 ran 2-7x SLOWER than float32."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False
    return dtype == torch.float32


def _module_device(module: torch.nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    return torch.device("cpu")


def load_bundle(path: str, *, device: str = "cpu", verify: bool = True) -> Bundle:
    """Load a bundle written by save_bundle.  The wsss op library is loaded first (the module
    calls torch.ops.wsss.*).  verify=True recomputes the content hash (detects a corrupted or
    edited bundle).  Raises BundleError naming the file for: missing file, not a TorchScript
    archive, a damaged zip, no/invalid wsss_bundle.json (any field save_bundle would refuse),
    unsupported format version, hash mismatch, a module without TissueSegmenter's signature or
    with another number of classes than class_names."""
    import wsss.ops  # noqa: F401  (loads the op library the module calls)

    path = os.fspath(path)
    saved = read_bundle_metadata(path)  # cheap, precise errors before the expensive load
    device = _bundle_device(path, device)
    extra = {METADATA_FILE: ""}
    identity = _file_identity(path)
    try:
        module = torch.jit.load(path, map_location=device, _extra_files=extra)
    except Exception as e:
        why = first_line(e)
        made_with = saved.get("torch_version")
        if made_with and made_with != torch.__version__:
            # NB: TorchScript archives hold code compiled by the saving torch: sure to load in that
            # torch or a newer one; an older one loads them only if the code calls no op it lacks
            # (why the models resize with wsss.models.resize: bundles of older wsss carry 2.14's
            # F.interpolate, which calls an op 2.11 lacks; tools/resave_bundle.py re-saves them)
            why += (f" (the bundle was saved with torch {made_with}, this is torch {torch.__version__}; a bundle "
                    f"loads in the torch it was saved with or a newer one - re-export it here or install that torch)")
        raise BundleError(f"bundle {path}: not a loadable TorchScript archive: {why}") from None
    meta = _parse_metadata(path, extra[METADATA_FILE] if isinstance(extra[METADATA_FILE], bytes)
                           else str(extra[METADATA_FILE]).encode())
    if verify:
        actual = content_hash(module, meta)
        if actual != meta.get("content_hash"):
            raise BundleError(f"bundle {path}: content hash mismatch (file corrupted or edited): "
                              f"metadata says {meta.get('content_hash')}, contents give {actual}")
    _check_module(f"bundle {path}", module, meta["class_names"])
    return Bundle(module=module.eval(), metadata=meta, sha256=file_sha256(path), path=path, file_identity=identity)
