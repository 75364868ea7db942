"""The core model: resize, patch embedding, config, the ViT, options registry, timm interop, weight files.

``FlexiViT`` and ``FlexiViTConfig`` are re-exported here as well, so ``from flexivit.model import FlexiViT``
(the module path before the package had layers) keeps working.
"""

from flexivit.model.config import FlexiViTConfig
from flexivit.model.vit import FlexiViT

__all__ = ["FlexiViT", "FlexiViTConfig"]
