"""Dropout (Srivastava et al. 2014): while training, each value is zeroed with probability p
and the survivors are scaled by 1 / (1 - p), so that every value keeps its expected size; at
evaluation it does nothing.

The Transformer applies it to the output of each sublayer, before the residual addition, and
to the sum of the embeddings and the positions (P_drop = 0.1 in the base model).

The keep-mask is drawn as uniform numbers compared with p. PyTorch's own dropout draws it with
`bernoulli_`, which is slower on a CPU (docs/translation.md). The module is an `nn.Dropout`,
so code that looks for one still finds it.
"""

from __future__ import annotations

import torch
from torch import nn


class Dropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return torch.zeros_like(x)
        keep = torch.rand(x.shape, device=x.device) >= self.p  # True with probability 1 - p
        return (x * keep).mul_(1.0 / (1.0 - self.p))
