"""flexivit: train one vision transformer that works at every patch size (FlexiViT).

Importing the package registers the ``flexi_vit_*`` variants with timm's model registry.
"""

from flexivit.model.config import FlexiViTConfig
from flexivit.model.vit import FlexiViT
from flexivit.model.patch_embed import FlexiPatchEmbed, PatchScheme, check_patch_sizes, valid_patch_sizes
from flexivit.model.resize import RESIZE_METHODS, kernel_rank, pi_resize, resample_posemb, resize_matrix
from flexivit.model.variants import VARIANTS, create_variant

__all__ = [
    "FlexiViT",
    "FlexiViTConfig",
    "FlexiPatchEmbed",
    "PatchScheme",
    "valid_patch_sizes",
    "check_patch_sizes",
    "RESIZE_METHODS",
    "kernel_rank",
    "pi_resize",
    "resample_posemb",
    "resize_matrix",
    "VARIANTS",
    "create_variant",
]
__version__ = "0.1.0"
