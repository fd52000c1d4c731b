"""ResNet-38 ("wider or deeper", model A1) patch classifier with the PDA training head.

Module and parameter names are those of the reference code (network/resnet38d.py and
network/resnet38_cls.py of ChuHan89/WSSS-Tissue): conv1a, b2, b2_1, ..., b7, bn7, fc8, and
inside a block bn_branch2a / conv_branch2a / bn_branch2b1 / conv_branch2b1 (/ bn_branch2b2 /
conv_branch2b2) / conv_branch1.  A stage-1 checkpoint of the reference code therefore loads
with ``strict=True``; the names are part of the checkpoint format, do not rename them.

Shapes: N batch, K classes, C = 4096 * width feature channels; for a 224 x 224 input the
feature maps b4_5, b5_2 and bn7 are 28 x 28 (output stride 8).
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss import ops

__all__ = ["ResNet38Classifier", "scaled_channels"]


def scaled_channels(channels: int, width: float) -> int:
    """Channel count of a reference layer at a fraction ``width`` of the reference width."""
    return max(1, int(round(channels * width)))


class ResBlock(nn.Module):
    """Pre-activation residual block: x -> BN -> ReLU -> 3x3 conv -> BN -> ReLU -> 3x3 conv (+ shortcut).

    The shortcut is the identity when shapes agree, else a 1x1 conv (with the block's stride)
    applied to the BN-ReLU'd input.  No ReLU after the sum.  [N,in,H,W] -> [N,out,H/s,W/s].
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1,
                 first_dilation: int = -1, dilation: int = 1) -> None:
        super().__init__()
        if first_dilation < 0:
            first_dilation = dilation
        self.same_shape = in_channels == out_channels and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, mid_channels, 3, stride, padding=first_dilation,
                                       dilation=first_dilation, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_channels)
        self.conv_branch2b1 = nn.Conv2d(mid_channels, out_channels, 3, padding=dilation, dilation=dilation,
                                        bias=False)
        # NB: an Identity stands in for the missing projection so TorchScript sees one type;
        # it has no parameters, so the state_dict keys stay those of the reference.
        self.conv_branch1 = nn.Identity() if self.same_shape else nn.Conv2d(in_channels, out_channels, 1, stride,
                                                                            bias=False)

    def forward(self, x: Tensor) -> Tensor:
        branch2 = F.relu(self.bn_branch2a(x))
        branch1 = x if self.same_shape else self.conv_branch1(branch2)
        branch2 = self.conv_branch2a(branch2)
        branch2 = F.relu(self.bn_branch2b1(branch2))
        branch2 = self.conv_branch2b1(branch2)
        return branch1 + branch2


class BottleneckBlock(nn.Module):
    """Pre-activation bottleneck: BN-ReLU -> 1x1 (out/4) -> BN-ReLU-Dropout2d -> 3x3 (out/2, dilated)
    -> BN-ReLU-Dropout2d -> 1x1 (out), plus a 1x1 projection shortcut of the BN-ReLU'd input.
    [N,in,H,W] -> [N,out,H,W].
    """

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, out_channels // 4, 1, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_channels // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_channels // 4, out_channels // 2, 3, padding=dilation,
                                        dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(out_channels // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_channels // 2, out_channels, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        branch2 = F.relu(self.bn_branch2a(x))
        branch1 = self.conv_branch1(branch2)
        branch2 = self.conv_branch2a(branch2)
        branch2 = self.dropout_2b1(F.relu(self.bn_branch2b1(branch2)))
        branch2 = self.conv_branch2b1(branch2)
        branch2 = self.dropout_2b2(F.relu(self.bn_branch2b2(branch2)))
        branch2 = self.conv_branch2b2(branch2)
        return branch1 + branch2


class ResNet38Classifier(nn.Module):
    """ResNet-38 multi-label patch classifier (stage 1 of the method).

    Input x: float [N,3,H,W] already scaled (pixel/255, no mean/std, as the reference code).

    - ``forward(x) -> logits [N,K]``: fc8(GAP(ReLU(bn7(features)))); no attention.  In training
      mode Dropout2d(0.5) acts before the GAP, as in the reference code's training path without
      PDA (its first epochs); in eval mode this is the inference classifier of the gate.
    - ``forward_pda(x, mu) -> logits [N,K]``: training path with Progressive Dropout Attention,
      fused: wsss.ops.pda_pool(features, fc8 weight [K,C], mu) -> channel dropout p=0.5 on [N,C]
      -> fc8.  NB: dropping channel c of sample n before a GAP equals dropping element [n,c] of
      the pooled vector, so the dropout runs on [N,C] and A*features is never materialised.
    - ``feature_maps(x) -> {"b4_5", "b5_2", "bn7", "logits"}``: the Grad-CAM layers of the
      reference (b4_5 and b5_2 block outputs, bn7 after ReLU) and logits computed from bn7, so
      autograd can differentiate the logits with respect to the maps.

    ``width`` scales every channel count (e.g. 0.0625 for tests); 1.0 is the reference network
    (about 105 M parameters).
    """

    def __init__(self, num_classes: int = 4, *, width: float = 1.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"ResNet38Classifier: num_classes must be >= 1, got {num_classes}")
        if not width > 0:
            raise ValueError(f"ResNet38Classifier: width must be > 0, got {width}")
        c = [scaled_channels(n, width) for n in (64, 128, 256, 512, 1024, 2048, 4096)]
        c64, c128, c256, c512, c1024, c2048, c4096 = c
        self.num_classes = num_classes
        self.width = float(width)
        self.feature_channels = c4096

        self.conv1a = nn.Conv2d(3, c64, 3, padding=1, bias=False)
        self.b2 = ResBlock(c64, c128, c128, stride=2)
        self.b2_1 = ResBlock(c128, c128, c128)
        self.b2_2 = ResBlock(c128, c128, c128)
        self.b3 = ResBlock(c128, c256, c256, stride=2)
        self.b3_1 = ResBlock(c256, c256, c256)
        self.b3_2 = ResBlock(c256, c256, c256)
        self.b4 = ResBlock(c256, c512, c512, stride=2)
        self.b4_1 = ResBlock(c512, c512, c512)
        self.b4_2 = ResBlock(c512, c512, c512)
        self.b4_3 = ResBlock(c512, c512, c512)
        self.b4_4 = ResBlock(c512, c512, c512)
        self.b4_5 = ResBlock(c512, c512, c512)
        self.b5 = ResBlock(c512, c512, c1024, stride=1, first_dilation=1, dilation=2)
        self.b5_1 = ResBlock(c1024, c512, c1024, dilation=2)
        self.b5_2 = ResBlock(c1024, c512, c1024, dilation=2)
        self.b6 = BottleneckBlock(c1024, c2048, dilation=4, dropout=0.3)
        self.b7 = BottleneckBlock(c2048, c4096, dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(c4096)
        self.dropout7 = nn.Dropout(0.5)  # on the pooled [N,C] vector (see class docstring)
        self.fc8 = nn.Conv2d(c4096, num_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.fc8.weight)

        self._bn_frozen = False

    # ------------------------------------------------------------------ feature trunk
    def _trunk_to_b4_5(self, x: Tensor) -> Tensor:
        x = self.conv1a(x)
        x = self.b2_2(self.b2_1(self.b2(x)))
        x = self.b3_2(self.b3_1(self.b3(x)))
        x = self.b4(x)
        x = self.b4_1(x)
        x = self.b4_2(x)
        x = self.b4_3(x)
        x = self.b4_4(x)
        return self.b4_5(x)

    def _b5_2_to_bn7(self, x: Tensor) -> Tensor:
        return F.relu(self.bn7(self.b7(self.b6(x))))

    @torch.jit.export
    def features(self, x: Tensor) -> Tensor:
        """ReLU(bn7(...)) feature maps [N,C,H/8,W/8] of a scaled input x [N,3,H,W]."""
        x = self._trunk_to_b4_5(x)
        x = self.b5_2(self.b5_1(self.b5(x)))
        return self._b5_2_to_bn7(x)

    def _fc8_matrix(self, dtype: torch.dtype) -> Tensor:
        """fc8 weight as a [K,C] matrix in the given dtype."""
        return self.fc8.weight.reshape(self.fc8.weight.shape[0], self.fc8.weight.shape[1]).to(dtype)

    # ------------------------------------------------------------------ heads
    def forward(self, x: Tensor) -> Tensor:
        """Class logits [N,K] of x [N,3,H,W] (scaled): fc8(GAP(ReLU(bn7))), no attention."""
        feats = self.features(x)
        pooled = self.dropout7(feats.mean(dim=(2, 3)))
        return F.linear(pooled, self._fc8_matrix(pooled.dtype))

    @torch.jit.export
    def forward_pda(self, x: Tensor, mu: float) -> Tensor:
        """Training logits [N,K] with Progressive Dropout Attention at threshold factor mu in [0,1]."""
        feats = self.features(x)
        weight = self._fc8_matrix(feats.dtype)
        pooled = ops.pda_pool(feats, weight, mu)  # [N,C] = GAP(A * feats), A not detached
        pooled = self.dropout7(pooled)
        return F.linear(pooled, weight)

    @torch.jit.export
    def feature_maps(self, x: Tensor) -> Dict[str, Tensor]:
        """Grad-CAM layers of x [N,3,H,W]: "b4_5" [N,C4,h,w], "b5_2" [N,C5,h,w], "bn7" [N,C,h,w]
        (after ReLU) and "logits" [N,K] computed from "bn7" (eval-mode path, no dropout)."""
        b4_5 = self._trunk_to_b4_5(x)
        b5_2 = self.b5_2(self.b5_1(self.b5(b4_5)))
        bn7 = self._b5_2_to_bn7(b5_2)
        logits = F.linear(bn7.mean(dim=(2, 3)), self._fc8_matrix(bn7.dtype))
        return {"b4_5": b4_5, "b5_2": b5_2, "bn7": bn7, "logits": logits}

    # ------------------------------------------------------------------ training helpers
    def reference_frozen_modules(self) -> List[nn.Module]:
        """Modules the reference code never trains: conv1a, b2, b2_1, b2_2."""
        return [self.conv1a, self.b2, self.b2_1, self.b2_2]

    def freeze_reference_layers(self) -> "ResNet38Classifier":
        """Freeze as the reference trains: conv1a..b2_2 weights fixed, every BatchNorm fixed and in
        eval mode (kept in eval mode by later ``train()`` calls).  Returns self."""
        for module in self.reference_frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                for p in m.parameters():
                    p.requires_grad_(False)
        self._bn_frozen = True
        self.train(self.training)
        return self

    def train(self, mode: bool = True) -> "ResNet38Classifier":
        super().train(mode)
        if self._bn_frozen:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self
