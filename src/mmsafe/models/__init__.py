"""Models: the encoder protocol, the registry, and the built-in adapters (imported to register)."""

from mmsafe.models import (
    diffusers_gen,
    generated_images,
    hf,
    hf_vlm,
    lit_mini,
    seqrec,
    tiny_clip,
    tiny_diffusion,
    tiny_vlm,
)
from mmsafe.models.base import (
    Batch,
    EncoderModel,
    ModelError,
    create_model,
    images_to_tensor,
    list_models,
    register_model,
)

__all__ = [
    "Batch",
    "EncoderModel",
    "ModelError",
    "create_model",
    "diffusers_gen",
    "generated_images",
    "hf",
    "hf_vlm",
    "images_to_tensor",
    "list_models",
    "lit_mini",
    "register_model",
    "seqrec",
    "tiny_clip",
    "tiny_diffusion",
    "tiny_vlm",
]
