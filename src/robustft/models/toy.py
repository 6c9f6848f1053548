"""The embedded toy backbone: a small ResNet for 32×32 images with timm's interface."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.downsample(x))


class ToyResNet(nn.Module):
    """ResNet with four stages (width, 2·width, 4·width, 8·width), one block each.

    Like a timm model: `forward_features` gives the spatial map, `forward_head(x,
    pre_logits=True)` the pooled penultimate features, `num_classes=0` makes `forward`
    return those features, and `group_matcher` groups the parameters as timm's ResNets do.
    Width 16 has about 0.3M parameters and 128 features.
    """

    def __init__(
        self,
        *,
        width: int = 16,
        num_classes: int = 0,
        in_channels: int = 3,
        stem_stride: int = 2,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.width = width
        self.drop_rate = float(drop_rate)  # timm's: dropout on the pooled features, training only
        self.stem = nn.Sequential(
            # Stride 2 at the stem: a 32×32 image needs no full-resolution stage, and it makes
            # the network four times cheaper (the embedded benchmark must run on 2 CPU cores).
            nn.Conv2d(in_channels, width, 3, stem_stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        channels = [width, 2 * width, 4 * width, 8 * width]
        stages, previous = [], width
        for index, out_channels in enumerate(channels):
            stages.append(BasicBlock(previous, out_channels, stride=1 if index == 0 else 2))
            previous = out_channels
        self.stages = nn.Sequential(*stages)
        self.num_features = channels[-1]
        self.num_classes = num_classes
        self.fc: nn.Module = nn.Identity()
        self.reset_classifier(num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """timm's parameter grouping (layer-wise lr decay, which layers a method freezes): the
        stem, then one group per stage (each stage is one block); `fc` falls last, as timm's
        heads do. `coarse` changes nothing here."""
        return {"stem": r"^stem", "blocks": r"^stages\.(\d+)"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        if self.drop_rate:  # no call at 0: the same random stream as before this option
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
