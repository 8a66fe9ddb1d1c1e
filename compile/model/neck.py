"""ChannelMapper neck: project every backbone level to the transformer width, add extra levels."""

from __future__ import annotations

from codetr_stream.compile.model_config import NeckConfig
from torch import Tensor, nn


class ConvGN(nn.Module):
    """Conv (no bias, GroupNorm follows) + GroupNorm, no activation; keys `conv` and `gn`."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2,
                              bias=False)
        self.gn = nn.GroupNorm(groups, cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.gn(self.conv(x))


class ChannelMapper(nn.Module):
    """mmdet `ChannelMapper`: the first extra level is a stride-2 conv on the LAST backbone
    output (not on a neck output); later extra levels chain on the previous extra one."""

    def __init__(self, cfg: NeckConfig) -> None:
        super().__init__()
        c, g = cfg.out_channels, cfg.gn_num_groups
        self.convs = nn.ModuleList(ConvGN(cin, c, cfg.kernel_size, 1, g) for cin in cfg.in_channels)
        extra = cfg.num_outs - len(cfg.in_channels)
        self.extra_convs = nn.ModuleList(
            ConvGN(cfg.in_channels[-1] if i == 0 else c, c, 3, 2, g) for i in range(extra)
        )

    def forward(self, inputs: list[Tensor]) -> list[Tensor]:
        outs = [conv(x) for conv, x in zip(self.convs, inputs, strict=True)]
        for i, conv in enumerate(self.extra_convs):
            outs.append(conv(inputs[-1] if i == 0 else outs[-1]))
        return outs
