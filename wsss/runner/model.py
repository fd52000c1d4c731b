"""The runner's view of a model (``SlideModel``): a bundle's predictor, or any callable
``predict(tiles uint8 [N,3,t,t]) -> probabilities float [N,K,t,t]`` (already gated per tile),
which is how the tests drive the runner; batches that run later (``PendingProbabilities``),
halved batches after a GPU ran out of memory (``_BatchHalving``), and ``--precision``."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import numpy as np

from wsss.errors import BundleError, WsssError

__all__ = ["SlideModel", "PendingProbabilities", "resolve_precision"]


@dataclass
class SlideModel:
    """What the runner needs from a model.

    predict: uint8 torch tensor [N, 3, t, t] -> float tensor/array [N, K, t, t] of per-tile gated
    class probabilities.  mpp / tile_size: the resolution and tile edge the model expects.
    identity: a string that changes whenever the model's outputs could (bundle sha256).
    submit: optional ``tiles -> handle`` whose ``handle.result()`` gives what predict would have
    returned, for models that can start a batch and finish it later (the bundle predictor's
    overlapped CUDA path); None: ``predict`` runs when the batch is submitted.
    predict_device: optional ``tiles -> tensor [N,K,t,t]`` left on the model's device and queued
    on its current stream (nothing waits for it), for blending there (``--stitch-device``).
    """

    predict: Callable
    class_names: Sequence[str]
    palette: Sequence[Sequence[int]]
    background_index: int
    mpp: Optional[float]  # None: read the slide at its own level-0 resolution
    tile_size: int
    identity: str
    description: dict = field(default_factory=dict)
    submit: Optional[Callable] = None
    predict_device: Optional[Callable] = None

    @property
    def device(self) -> str:
        """The device the model runs on, as its description names it ("cpu" when it names none)."""
        return str(self.description.get("device", "cpu"))

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def predict_async(self, tiles) -> "PendingProbabilities":
        """Start predicting ``tiles`` (uint8 [N,3,t,t]); ``.result()`` -> float32 array [N,K,t,t]
        that the caller owns.  The caller may overwrite ``tiles`` once this returns.

        NB: without ``submit`` the prediction runs here and is copied out at once (a plain
        callable may reuse its output buffer), so the runner's one-batch-behind loop behaves the
        same for every model, and the CPU tests exercise it.
        """
        if self.submit is None:
            return PendingProbabilities(ready=_owned_probs(self.predict(tiles), copy=True))
        return PendingProbabilities(handle=self.submit(tiles))

    @classmethod
    def from_bundle(cls, bundle, *, device: str = "cpu", precision: str = "auto",
                    precision_mode: Optional[str] = None) -> "SlideModel":
        """Adapter over wsss.bundle.Bundle: ``bundle.predictor(device, precision)(tiles, True)[1]``
        for ``predict``, and the predictor's ``submit`` (scores only) for ``submit``.

        precision: "auto" (see ``resolve_precision``), "float32", "bfloat16" or "float16"
        (also fp32 / bf16 / fp16).  precision_mode: "cast" or "autocast" (None: the predictor's
        default, autocast on CUDA and cast on CPU; see wsss.bundle.Bundle.predictor).
        """
        md = bundle.metadata
        precision = resolve_precision(precision, device)
        predictor = bundle.predictor(device, precision, precision_mode=precision_mode)

        def predict(tiles):
            return predictor(tiles, True)[1]  # (labels, gated probabilities, class_prob)

        def submit(tiles):
            return _ScoresOf(predictor.submit(tiles, True, outputs=("scores",)))

        def predict_device(tiles):
            return predictor.on_device(tiles, True)[1]

        # NB: how reduced precision is applied changes the outputs, so it is part of the identity
        # (float32 keeps the identity it always had).
        identity = f"{bundle.sha256}:{precision}" + ("" if precision == "float32" else f":{predictor.precision_mode}")
        try:
            return cls(predict=predict, class_names=list(md["class_names"]), palette=[list(p) for p in md["palette"]],
                       background_index=int(md["background_index"]),
                       mpp=None if md.get("mpp") is None else float(md["mpp"]),
                       tile_size=int(md["tile_size"]), identity=identity,
                       description={"path": str(bundle.path), "sha256": bundle.sha256,
                                    "content_hash": md.get("content_hash"), "wsss_version": md.get("wsss_version"),
                                    "torch_version": md.get("torch_version"), "device": device,
                                    "precision": precision, "precision_mode": predictor.precision_mode},
                       submit=submit, predict_device=predict_device)
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{bundle.path}: bundle metadata lacks or mangles a field the runner needs: {e}") from None


class _ScoresOf:
    """The scores of a wsss.bundle.PendingPrediction."""

    def __init__(self, pending) -> None:
        self.pending = pending

    def result(self):
        return self.pending.result()[1]


class PendingProbabilities:
    """A batch handed to the model: ``result()`` -> float32 array [N, K, t, t] owned by the caller."""

    def __init__(self, *, ready=None, handle=None) -> None:
        self._ready, self._handle = ready, handle

    def result(self) -> np.ndarray:
        if self._handle is not None:
            self._ready, self._handle = _owned_probs(self._handle.result()), None
        return self._ready


def _is_device_oom(error: BaseException) -> bool:
    """A GPU allocation failure (torch.OutOfMemoryError; from inside TorchScript it can also come
    as a RuntimeError that says so)."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and "out of memory" in text and ("CUDA" in text or "HIP" in text)


class _BatchHalving:
    """Wraps a SlideModel's callables so that a batch the GPU has no memory for is run in halves
    (then quarters, ...), and every later batch of the slide in pieces of the size that fit.
    ``limit``: that size (None: no batch failed).  A batch of one tile that still fails raises."""

    def __init__(self, on_halve: Callable[[int], None]) -> None:
        self.limit: Optional[int] = None
        self._on_halve = on_halve

    def call(self, fn: Callable, tiles, combine: Callable):
        while True:
            n = len(tiles) if self.limit is None else min(self.limit, len(tiles))
            try:
                if n >= len(tiles):
                    return fn(tiles)
                return combine([fn(tiles[i:i + n]) for i in range(0, len(tiles), n)])
            except RuntimeError as e:  # (torch.OutOfMemoryError is one)
                if not _is_device_oom(e) or n <= 1:
                    raise
                import torch

                self.limit = n // 2
                torch.cuda.empty_cache()  # (what the failed batch had allocated goes back first)
                self._on_halve(self.limit)

    def wrap(self, model: SlideModel) -> SlideModel:
        return replace(
            model,
            predict=lambda t: self.call(model.predict, t, _concat),
            submit=None if model.submit is None else (lambda t: self.call(model.submit, t, _JoinedHandles)),
            predict_device=None if model.predict_device is None else (
                lambda t: self.call(model.predict_device, t, _concat)))


def _concat(parts):
    import torch

    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)
    return np.concatenate([np.asarray(p) for p in parts])


class _JoinedHandles:
    """Handles of a batch's pieces (``_BatchHalving``) as one: ``result()`` joins theirs."""

    def __init__(self, handles) -> None:
        self.handles = handles

    def result(self):
        return _concat([h.result() for h in self.handles])


def _owned_probs(probs, copy: bool = False) -> np.ndarray:
    """Model output -> float32 numpy array the runner may keep.  A torch tensor from a ``submit``
    handle is the predictor's fresh output and is viewed without a copy when it is already
    float32, contiguous and on the CPU (the array keeps the tensor, pinned or not, alive);
    ``copy``: what a plain callable returns, tensor or not, may be a buffer it reuses for the
    next batch (which the runner submits before it reads this one), so it is copied."""
    import torch

    if isinstance(probs, torch.Tensor):
        out = probs.detach().to("cpu", torch.float32).contiguous().numpy()
        return out.copy() if copy else out
    return np.array(probs, np.float32, copy=True)


_PRECISION_ALIASES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
                      "fp16": "float16", "float16": "float16", "half": "float16", "auto": "auto"}


def resolve_precision(precision: str, device: str) -> str:
    """"auto": bfloat16 on a CPU with bf16 matrix units (AMX / AVX512-BF16), else float32;
    on CUDA bfloat16 where supported, else float16.  Aliases fp32/bf16/fp16 accepted."""
    import torch

    name = _PRECISION_ALIASES.get(str(precision).lower())
    if name is None:
        raise WsssError(f"--precision must be one of auto, float32, bfloat16, float16 (or fp32, bf16, fp16), "
                        f"got {precision!r}")
    if name != "auto":
        return name
    if str(device).startswith("cuda"):
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float16"
    cpu = torch.cpu
    has_bf16 = any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return "bfloat16" if has_bf16 else "float32"
