"""ResNets for 32x32 CIFAR images: the CIFAR family of He et al. 2016 and the ImageNet-depth family.

Two families, one module:

* **CIFAR ResNets** (He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
  section 4.2): a 3x3 convolution with 16 filters, then three stages of ``n`` BasicBlocks on
  feature maps of 32x32, 16x16 and 8x8 with 16, 32 and 64 filters, then global average pooling and a
  fully connected layer: ``6n + 2`` weighted layers. The first block of stages 2 and 3 halves the
  map with a stride-2 convolution. Where the width changes the shortcut is either

  - option **A** (the paper's choice on CIFAR): identity on every other pixel, the new channels
    padded with zeros -- no parameters; or
  - option **B**: a 1x1 stride-2 convolution + BatchNorm ("projection") where the shape changes,
    identity elsewhere.

  Parameter table (option A, 10 classes; the paper's Table 6 rounds these), pinned by
  ``tests/test_resnet.py``:

  ==========  ======  ==========  =========
  model       n       layers      params
  ==========  ======  ==========  =========
  resnet8     1       8           0.075M (not in the paper: a tiny model for smoke tests)
  resnet20    3       20          0.27M
  resnet32    5       32          0.46M
  resnet44    7       44          0.66M
  resnet56    9       56          0.85M
  resnet110   18      110         1.7M
  ==========  ======  ==========  =========

* **ImageNet-depth ResNets** 18/34 (BasicBlock) and 50/101/152 (Bottleneck, expansion 4, stride on
  the 3x3 convolution as in torchvision's "v1.5") with stages of 64/128/256/512 filters, adapted to
  32x32 inputs the usual way: the 7x7 stride-2 stem and the max-pool are replaced by one 3x3
  stride-1 convolution, so the four stages see 32, 16, 8 and 4 pixels. Projection shortcuts
  (option B) throughout. ResNet-18 has 11.17M parameters with 10 classes.

Names of the layers that a quantization wrapper may want to leave in float32: the first
convolution is ``model.conv1`` and the classifier is ``model.fc`` in every model here.

Weights are initialised as in He et al. 2015 ("Delving Deep into Rectifiers"), the initialisation
the paper names: normal with std sqrt(2 / fan_in) for every convolution; BatchNorm scale 1, shift 0;
the final Linear keeps PyTorch's default.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "BasicBlock", "Bottleneck", "CifarResNet", "ResNet", "MODELS", "build_model",
    "count_parameters", "resnet8", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
]

SHORTCUTS = ("A", "B")
CIFAR_STAGE_WIDTHS = (16, 32, 64)          # He et al. 2016, section 4.2
IMAGENET_STAGE_WIDTHS = (64, 128, 256, 512)


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Option A shortcut: keep every ``stride``-th pixel and zero-pad the extra channels.

    Parameter-free, as in He et al. 2016 on CIFAR. The new channels are split evenly before and
    after the existing ones (any split is equivalent up to a permutation of filters).
    """

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        if c_out < c_in:
            raise ValueError(f"option A shortcut cannot shrink channels ({c_in} -> {c_out})")
        self.stride = stride
        self.pad_lo = (c_out - c_in) // 2
        self.pad_hi = c_out - c_in - self.pad_lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_lo, self.pad_hi))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_lo}, {self.pad_hi})"


def _projection(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """Option B shortcut: 1x1 convolution (with the block's stride) followed by BatchNorm."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                         nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and ReLU plus a shortcut (He et al. 2016, figure 2 left).

    ``shortcut`` chooses what happens where the shape changes: "A" (zero padding) or "B"
    (projection). Where the shape is kept the shortcut is the identity in both cases.
    """

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = _conv3x3(c_in, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        if stride == 1 and c_in == c_out:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(c_in, c_out, stride)
        else:
            self.shortcut = _projection(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, plus a shortcut (figure 5 right)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, c_out, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        if stride == 1 and c_in == c_out:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(c_in, c_out, stride)
        else:
            self.shortcut = _projection(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Generic ResNet for 32x32 inputs: 3x3 stem, stages of blocks, global average pool, Linear.

    ``blocks_per_stage[i]`` blocks of width ``widths[i]``; every stage after the first starts with
    stride 2. Used by both families (see the module docstring).
    """

    def __init__(self, block: Type[nn.Module], blocks_per_stage: List[int], widths: List[int],
                 num_classes: int = 10, shortcut: str = "B"):
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
        if len(blocks_per_stage) != len(widths):
            raise ValueError("blocks_per_stage and widths must have the same length")
        self.shortcut_option = shortcut
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        c_in = widths[0]
        for i, (n_blocks, planes) in enumerate(zip(blocks_per_stage, widths)):
            layers = []
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(block(c_in, planes, stride, shortcut))
                c_in = planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He et al. 2015, forward case: std = sqrt(2 / (k*k*c_in)).
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.stages(out)
        # global average pool as a mean: same value as adaptive_avg_pool2d(., 1), but its CUDA
        # backward is deterministic (see --deterministic) and it compiles to one reduction
        return self.fc(out.mean(dim=(2, 3)))


class CifarResNet(ResNet):
    """The 6n+2-layer CIFAR ResNet of He et al. 2016, section 4.2 (16/32/64 filters, n blocks
    each)."""

    def __init__(self, depth: int, num_classes: int = 10, shortcut: str = "A"):
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError("CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 20, 32, ...), "
                             f"got {depth}")
        n = (depth - 2) // 6
        super().__init__(BasicBlock, [n, n, n], list(CIFAR_STAGE_WIDTHS), num_classes, shortcut)
        self.depth = depth


def _cifar(depth: int) -> Callable[..., CifarResNet]:
    def build(num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
        return CifarResNet(depth, num_classes=num_classes, shortcut=shortcut)
    build.__name__ = f"resnet{depth}"
    build.__doc__ = (f"ResNet-{depth} for CIFAR (He et al. 2016, 6n+2 with n={(depth - 2) // 6}); "
                     f"shortcut 'A' (zero padding, the paper's) or 'B' (projection).")
    return build


def _imagenet_depth(block: Type[nn.Module], blocks: List[int], depth: int) -> Callable[..., ResNet]:
    def build(num_classes: int = 10, shortcut: str = "B") -> ResNet:
        return ResNet(block, blocks, list(IMAGENET_STAGE_WIDTHS), num_classes, shortcut)
    build.__name__ = f"resnet{depth}"
    build.__doc__ = (f"ResNet-{depth} ({block.__name__}, stages {blocks}) with a 3x3 stride-1 stem "
                     f"for 32x32 inputs; projection shortcuts by default.")
    return build


resnet8 = _cifar(8)
resnet20 = _cifar(20)
resnet32 = _cifar(32)
resnet44 = _cifar(44)
resnet56 = _cifar(56)
resnet110 = _cifar(110)
resnet18 = _imagenet_depth(BasicBlock, [2, 2, 2, 2], 18)
resnet34 = _imagenet_depth(BasicBlock, [3, 4, 6, 3], 34)
resnet50 = _imagenet_depth(Bottleneck, [3, 4, 6, 3], 50)
resnet101 = _imagenet_depth(Bottleneck, [3, 4, 23, 3], 101)
resnet152 = _imagenet_depth(Bottleneck, [3, 8, 36, 3], 152)

#: name -> builder; the ``--model`` flag chooses from these keys.
MODELS: Dict[str, Callable[..., nn.Module]] = {
    f.__name__: f for f in (resnet8, resnet20, resnet32, resnet44, resnet56, resnet110,
                            resnet18, resnet34, resnet50, resnet101, resnet152)
}
#: the models of the CIFAR family (their default shortcut is option A).
CIFAR_MODELS = ("resnet8", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110")


def build_model(name: str, num_classes: int = 10, shortcut: str | None = None) -> nn.Module:
    """Build a model by its ``--model`` name; ``shortcut=None`` takes the family's default.

    Unknown names raise ValueError listing the accepted ones.
    """
    key = name.lower()
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    kwargs = {"num_classes": num_classes}
    if shortcut is not None:
        if shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut {shortcut!r}; choose A or B")
        kwargs["shortcut"] = shortcut
    return MODELS[key](**kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
