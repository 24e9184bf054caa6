"""Pretrained towers loaded from weight packages: MobileNetV2 (image) and MiniLM (text)."""

from mmsafe.models.towers.minilm import MiniLM, load_minilm
from mmsafe.models.towers.mobilenet import MobileNetV2, load_mobilenet_v2
from mmsafe.models.towers.packages import INSTALL_COMMAND, PretrainedPackage

__all__ = [
    "INSTALL_COMMAND",
    "MiniLM",
    "MobileNetV2",
    "PretrainedPackage",
    "load_minilm",
    "load_mobilenet_v2",
]
