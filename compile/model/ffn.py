"""The feed-forward block with a residual, named like mmcv's `FFN` so checkpoint keys line up."""

from __future__ import annotations

from torch import Tensor, nn


class FFN(nn.Module):
    """`identity + Linear(act(Linear(x)))`; keys `layers.0.0` and `layers.1` as in mmcv."""

    def __init__(self, dims: int, hidden: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dims, hidden), activation()),
                                    nn.Linear(hidden, dims))

    def forward(self, x: Tensor, identity: Tensor) -> Tensor:
        return identity + self.layers(x)
