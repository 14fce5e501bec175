"""TensorFlow "SAME" convolutions without padded copies, by running on the mirror image.

TF-ported networks (timm's `tf_` models, such as the EfficientNet-Lite0 teacher)
pad a strided convolution's input less on the top/left than on the bottom/right,
which PyTorch's convolutions cannot do: timm pads a copy of the input first. For
the Lite0 teacher at batch 16 and 256x256 those copies took about 11 ms of its
49 ms (Inductor's kernel profile). On the image flipped along both axes the
asymmetry changes sides, and then symmetric padding samples exactly the input
pixels TF's does, which the convolution applies without a copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mirror(x: torch.Tensor) -> torch.Tensor:
    """The image flipped top-bottom and left-right: (B, C, H, W) -> same shape."""
    return x.flip(2, 3)


class MirroredConv2d(nn.Conv2d):
    """A stride-1 or stride-2 convolution with TF "SAME" padding, applied to the
    mirror image of its input and giving the mirror image of its output.

    Along one axis, output j of a stride-2 conv with odd kernel k and TF
    padding reads input pixels 2j - p_top .. 2j - p_top + k - 1. Mirroring maps
    output j to m - 1 - j and input i to n - 1 - i (n inputs, m = ceil(n/2)
    outputs), which turns that window into 2j' - k//2 .. 2j' + k//2 for either
    parity of n: symmetric padding k//2 with the kernel flipped. At stride 1 TF
    pads k//2 on both sides already. Same parameters (names and values) as the
    convolution it replaces, so state dicts carry over.
    """

    @classmethod
    def replacing(cls, conv: nn.Conv2d) -> "MirroredConv2d":
        """The mirrored twin of `conv`, sharing its weight and bias tensors."""
        from timm.layers import Conv2dSame  # timm's TF "SAME" conv, which pads a copy

        k, stride = conv.kernel_size, conv.stride
        half = (k[0] // 2, k[1] // 2)
        tf_same = isinstance(conv, Conv2dSame) or (stride == (1, 1) and conv.padding == half)
        if not tf_same or any(s not in (1, 2) for s in stride) or conv.dilation != (1, 1) or k[0] % 2 == 0 \
                or k[1] % 2 == 0:
            raise ValueError(f"cannot mirror {conv}: needs TF 'SAME' padding, an odd kernel, "
                             "stride 1 or 2 and no dilation")
        twin = cls(conv.in_channels, conv.out_channels, k, stride, half,
                   groups=conv.groups, bias=conv.bias is not None, device="meta")
        twin.weight, twin.bias = conv.weight, conv.bias
        return twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.flip(2, 3), self.bias, self.stride, self.padding, self.dilation, self.groups)


def mirror_convolutions(net: nn.Module) -> nn.Module:
    """Replace every convolution of `net` whose kernel is larger than 1x1 by its
    `MirroredConv2d`; `net` then maps mirror(x) to the mirror of what it gave
    for x. (1x1 convolutions, batch norm and activations commute with mirroring.)"""
    for name, child in list(net.named_children()):
        if isinstance(child, nn.Conv2d) and child.kernel_size != (1, 1):
            setattr(net, name, MirroredConv2d.replacing(child))
        else:
            mirror_convolutions(child)
    return net
