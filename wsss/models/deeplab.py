"""DeepLabV3+ segmenter (stage 3 of the method) on a torchvision ResNet backbone.

Module names follow the reference code's stage-2 checkpoints (network/deeplab.py, aspp.py,
decoder.py and backbone/resnet.py of ChuHan89/WSSS-Tissue): ``backbone.conv1/bn1/layer1..4``
(torchvision Bottleneck blocks: conv1..3, bn1..3, downsample.0/1), ``aspp.aspp1..4.atrous_conv/bn``,
``aspp.global_avg_pool.1/2``, ``aspp.conv1/bn1``, ``decoder.conv1/bn1`` and
``decoder.last_conv.0/1/4/5/8``, so a reference checkpoint loads with ``strict=True``.

Output stride 16: layer4 keeps the resolution with the reference's multi-grid dilations 2/4/8
(torchvision's own ``replace_stride_with_dilation`` would give 1/2/2, so the blocks are built
here from torchvision's Bottleneck class with the reference dilations).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck

from wsss.models.resize import resize_bilinear
from wsss.models.resnet38 import scaled_channels

__all__ = ["DeepLabV3Plus", "BACKBONE_LAYERS"]

# Bottleneck blocks per stage; layer4 of the reference is a 3-block multi-grid unit.
BACKBONE_LAYERS = {
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet152": (3, 8, 36, 3),
}


class ResNetBackbone(nn.Module):
    """ResNet trunk returning (high-level features [N,C4,H/os,W/os], low-level layer1 features
    [N,C1,H/4,W/4]); C4 = 2048 * width, C1 = 256 * width."""

    def __init__(self, layers: Tuple[int, int, int, int], output_stride: int, width: float) -> None:
        super().__init__()
        if output_stride == 16:
            strides, dilations = (1, 2, 2, 1), (1, 1, 1, 2)
        elif output_stride == 8:
            strides, dilations = (1, 2, 1, 1), (1, 1, 2, 4)
        else:
            raise ValueError(f"DeepLabV3Plus: output_stride must be 8 or 16, got {output_stride}")
        self.inplanes = scaled_channels(64, width)
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        planes = [scaled_channels(p, width) for p in (64, 128, 256, 512)]
        self.layer1 = self._make_layer(planes[0], [dilations[0]] * layers[0], strides[0])
        self.layer2 = self._make_layer(planes[1], [dilations[1]] * layers[1], strides[1])
        self.layer3 = self._make_layer(planes[2], [dilations[2]] * layers[2], strides[2])
        # multi-grid (1, 2, 4) x dilation, as the reference's _make_MG_unit
        self.layer4 = self._make_layer(planes[3], [g * dilations[3] for g in (1, 2, 4)][: layers[3]], strides[3])
        self.out_channels = self.inplanes
        self.low_level_channels = planes[0] * Bottleneck.expansion

    def _make_layer(self, planes: int, block_dilations: List[int], stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        blocks = []
        for i, dilation in enumerate(block_dilations):
            block = Bottleneck(self.inplanes, planes, stride=stride if i == 0 else 1,
                               downsample=downsample if i == 0 else None)
            # NB: torchvision's Bottleneck takes one dilation per layer and gives the first block
            # the previous one; set the reference's per-block dilation on the 3x3 conv directly.
            block.conv2.dilation = (dilation, dilation)
            block.conv2.padding = (dilation, dilation)
            blocks.append(block)
            self.inplanes = planes * Bottleneck.expansion
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low_level = self.layer1(x)
        x = self.layer4(self.layer3(self.layer2(low_level)))
        return x, low_level


class ASPPBranch(nn.Module):
    """Conv (no bias) -> BN -> ReLU.  [N,Cin,h,w] -> [N,Cout,h,w]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        padding = 0 if kernel_size == 1 else dilation
        self.atrous_conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                                     bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.atrous_conv(x)))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1 + three dilated 3x3 branches + image pooling, fused
    by a 1x1 conv.  [N,Cin,h,w] -> [N,Cout,h,w] (Cout = 256 * width)."""

    def __init__(self, in_channels: int, out_channels: int, output_stride: int) -> None:
        super().__init__()
        rates = (1, 6, 12, 18) if output_stride == 16 else (1, 12, 24, 36)
        self.aspp1 = ASPPBranch(in_channels, out_channels, 1, rates[0])
        self.aspp2 = ASPPBranch(in_channels, out_channels, 3, rates[1])
        self.aspp3 = ASPPBranch(in_channels, out_channels, 3, rates[2])
        self.aspp4 = ASPPBranch(in_channels, out_channels, 3, rates[3])
        self.global_avg_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )
        self.conv1 = nn.Conv2d(5 * out_channels, out_channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.aspp1(x)
        x2 = self.aspp2(x)
        x3 = self.aspp3(x)
        x4 = self.aspp4(x)
        x5 = self.global_avg_pool(x)
        x5 = resize_bilinear(x5, [x4.shape[2], x4.shape[3]], True)
        x = torch.cat((x1, x2, x3, x4, x5), dim=1)
        return self.dropout(self.relu(self.bn1(self.conv1(x))))


class Decoder(nn.Module):
    """Fuses ASPP output (upsampled to 1/4) with 48*width reduced low-level features; returns
    logits [N,K,H/4,W/4]."""

    def __init__(self, num_classes: int, low_level_channels: int, aspp_channels: int, width: float) -> None:
        super().__init__()
        reduced = scaled_channels(48, width)
        self.conv1 = nn.Conv2d(low_level_channels, reduced, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(reduced)
        self.relu = nn.ReLU()
        self.last_conv = nn.Sequential(
            nn.Conv2d(aspp_channels + reduced, aspp_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(aspp_channels),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Conv2d(aspp_channels, aspp_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(aspp_channels),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Conv2d(aspp_channels, num_classes, kernel_size=1),
        )

    def forward(self, x: Tensor, low_level: Tensor) -> Tensor:
        low_level = self.relu(self.bn1(self.conv1(low_level)))
        x = resize_bilinear(x, [low_level.shape[2], low_level.shape[3]], True)
        return self.last_conv(torch.cat((x, low_level), dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ segmentation network.

    ``forward(x) -> logits [N,K,H,W]`` for a scaled input x [N,3,H,W] (pixel/255, as the
    reference); ``forward_low_res(x) -> logits [N,K,H/4,W/4]`` is the decoder output before
    the final bilinear upsampling (align_corners=True, as the reference).

    backbone: "resnet50" | "resnet101" (reference) | "resnet152"; width scales every channel
    count (1.0 = reference, about 59.3 M parameters with resnet101).
    """

    def __init__(self, num_classes: int = 4, *, backbone: str = "resnet101", width: float = 1.0,
                 output_stride: int = 16) -> None:
        super().__init__()
        if backbone not in BACKBONE_LAYERS:
            raise ValueError(f"DeepLabV3Plus: backbone must be one of {sorted(BACKBONE_LAYERS)}, got {backbone!r}")
        if num_classes < 1:
            raise ValueError(f"DeepLabV3Plus: num_classes must be >= 1, got {num_classes}")
        if not width > 0:
            raise ValueError(f"DeepLabV3Plus: width must be > 0, got {width}")
        self.num_classes = num_classes
        self.backbone_name = backbone
        self.width = float(width)
        self.output_stride = output_stride
        self.backbone = ResNetBackbone(BACKBONE_LAYERS[backbone], output_stride, width)
        aspp_channels = scaled_channels(256, width)
        self.aspp = ASPP(self.backbone.out_channels, aspp_channels, output_stride)
        self.decoder = Decoder(num_classes, self.backbone.low_level_channels, aspp_channels, width)
        self._init_weights()

    def _init_weights(self) -> None:
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.export
    def forward_low_res(self, x: Tensor) -> Tensor:
        """Decoder logits [N,K,H/4,W/4] of x [N,3,H,W]."""
        high, low_level = self.backbone(x)
        return self.decoder(self.aspp(high), low_level)

    def forward(self, x: Tensor) -> Tensor:
        """Logits [N,K,H,W] at the input size."""
        logits = self.forward_low_res(x)
        return resize_bilinear(logits, [x.shape[2], x.shape[3]], True)

    def backbone_parameters(self) -> List[nn.Parameter]:
        """Parameters trained at the base learning rate in the reference (the backbone)."""
        return list(self.backbone.parameters())

    def head_parameters(self) -> List[nn.Parameter]:
        """Parameters trained at 10x the base learning rate in the reference (ASPP + decoder)."""
        return list(self.aspp.parameters()) + list(self.decoder.parameters())
