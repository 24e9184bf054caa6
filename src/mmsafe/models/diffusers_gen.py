r"""Local diffusers text-to-image pipelines behind ``diffusers:<folder>`` (kind ``generator``).

:func:`load_diffusers_generator` loads a Stable-Diffusion-style pipeline folder written by
``pipe.save_pretrained(DIR)``: ``model_index.json`` and the subfolders ``unet``
(``UNet2DConditionModel``), ``vae`` (``AutoencoderKL``), ``text_encoder`` (``CLIPTextModel``),
``tokenizer`` (``CLIPTokenizer``) and ``scheduler`` (any scheduler config), and wraps it in the
:class:`~mmsafe.models.generator.ImageGenerator` protocol::

    gen = load_diffusers_generator("/models/stable-diffusion-v1-5")
    images = gen.generate(["a red circle"], seeds=[0], steps=25)  # (1, 3, S, S) in [0, 1]
    noise = gen.invert(images, [""], steps=25)                    # back to the initial latents

Nothing is ever downloaded (``local_files_only=True`` everywhere); the safety checker and the
feature extractor are not loaded (the audit looks at raw outputs).

**Sampler.** The folder's scheduler config is turned into a ``DDIMScheduler`` (deterministic,
``eta = 0``) with ``clip_sample = False`` and ``steps_offset = 1``, the two fixes
``StableDiffusionPipeline`` applies to old configs; its betas, prediction type and timestep
spacing are the folder's. :meth:`DiffusersGenerator.generate` is then exactly
``StableDiffusionPipeline.__call__`` with that scheduler: latents ``noise *
init_noise_sigma``, classifier-free guidance with the empty prompt as the unconditional branch
(when ``guidance > 1``), ``vae.decode(latents / scaling_factor)`` and ``(x / 2 + 0.5).clamp(0,
1)``. Each row is sampled on its own, so an image never depends on the batch it is in.

**Noise.** :meth:`~DiffusersGenerator.initial_noise` draws each row's latents ``(C, H/f, W/f)``
from a CPU ``torch.Generator`` seeded by the row's seed (the same draw as the pipeline's
``generator=[torch.Generator().manual_seed(s), ...]``), so the noise of a seed is the same on any
device.

**Denoiser.** Time ``t`` in ``[0, 1]`` is the training timestep ``round(t * (T - 1))``
(:meth:`~DiffusersGenerator.timesteps_of`, ``T = num_train_timesteps``), shared by
:meth:`~DiffusersGenerator.predict` (the UNet's raw output: noise for ``epsilon`` checkpoints,
velocity for ``v_prediction``) and :meth:`~DiffusersGenerator.add_noise` (the scheduler's
forward process on the VAE latents of the images, the mean of the latent distribution times
``scaling_factor``). :meth:`~DiffusersGenerator.invert` is DDIM inversion: the same timesteps as
sampling, walked upwards, each step the exact algebraic inverse of the sampling step with the
noise predicted at the current latents (as ``DDIMInverseScheduler``), conditioned on the prompt
without guidance (use ``[""]`` and ``guidance=1`` for the best round trip, as Tree-Ring does).

**Regeneration.** :meth:`~DiffusersGenerator.regenerate` is image-to-image (SDEdit), as
``StableDiffusionImg2ImgPipeline``: of ``steps`` DDIM timesteps the last
``min(int(steps * strength), steps)`` (at least one) are run, from the VAE latents noised to the
first of them with the seed's :meth:`~DiffusersGenerator.initial_noise`. The latents are the
posterior's mode, where the pipeline samples the posterior with the row's generator (so from
pixels the two differ by that sample; from the same latents they agree).

**Weights.** The VAE and the text encoder are frozen; the UNet keeps ``requires_grad`` as
loaded, so :meth:`~DiffusersGenerator.predict` is differentiable in its parameters (concept
erasure fine-tunes it). Everything is in eval mode.

``diffusers`` and ``transformers`` are imported lazily, so importing this module is cheap.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmsafe.models.base import ModelError, register_model
from mmsafe.models.generator import ImageGenerator
from mmsafe.models.vlm import row_generators

DEFAULT_STEPS = 50
"""Sampler steps when neither the loader nor the call names them (Stable Diffusion's)."""
DEFAULT_GUIDANCE = 7.5
"""Classifier-free guidance scale when neither the loader nor the call names it."""
COMPONENTS: dict[str, tuple[str, ...]] = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "scheduler": (),  # any scheduler config: only its noise schedule is read
}
"""The components ``diffusers:`` loads, and the classes it supports for each."""

_SAVE_HINT = (
    "Write the folder with `pipe.save_pretrained(DIR)` (a StableDiffusionPipeline), or copy the "
    "whole pipeline folder, e.g. from `hf download <org/name> --local-dir DIR` on a machine with "
    "network"
)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()


class DiffusersGenerator(ImageGenerator):
    """A local Stable-Diffusion-style diffusers pipeline as an :class:`ImageGenerator`.

    Build it with :func:`load_diffusers_generator`, which also checks the components (see the
    module docstring).

    Attributes:
        unet: The ``UNet2DConditionModel`` (eval mode).
        vae: The ``AutoencoderKL`` (eval mode, frozen).
        text_encoder: The ``CLIPTextModel`` (eval mode, frozen).
        tokenizer: Its ``CLIPTokenizer``.
        scheduler: The ``DDIMScheduler`` built from the folder's scheduler config.
        source: The absolute folder it was loaded from.
        steps: Default sampler (and inversion) steps.
        guidance: Default classifier-free guidance scale.
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer: Any,
        scheduler: Any,
        *,
        source: str,
        pipeline: str = "",
        components: dict[str, str] | None = None,
        steps: int = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
    ) -> None:
        super().__init__()
        self.unet = unet.eval()
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.source = source
        self.name = f"diffusers:{Path(source).name}"
        self.pipeline = pipeline
        self.components = dict(components or {})
        self.steps = _check_steps(steps, self.num_train_timesteps, "steps")
        self.guidance = float(guidance)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = float(vae.config.scaling_factor)
        size = unet.config.sample_size
        side = size if isinstance(size, int) else size[0]
        if not isinstance(size, int) and (len(size) != 2 or size[0] != size[1]):
            raise ModelError(f"{source}: the UNet's sample_size {size} is not square.")
        self.latent_side = int(side)
        self.latent_channels = int(unet.config.in_channels)

    # -- sizes -------------------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        """The side of the images: the UNet's ``sample_size`` times the VAE's scale factor."""
        return self.latent_side * self.vae_scale_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one row's latents (and of its initial noise)."""
        return (self.latent_channels, self.latent_side, self.latent_side)

    @property
    def num_train_timesteps(self) -> int:
        """``T``, the number of training timesteps of the noise schedule."""
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    # -- building blocks ---------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """``(B, L, D)`` text-encoder states of the prompts, padded to the tokenizer's length."""
        prompts = self._check_prompts(prompts)
        tok = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        device = self.device
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tok.attention_mask.to(device)
        out = self.text_encoder(tok.input_ids.to(device), attention_mask=mask)[0]
        return out.to(self._dtype)

    def encode_images(self, images: Tensor) -> Tensor:
        """Images ``(B, 3, S, S)`` in ``[0, 1]`` -> latents ``(B, C, h, w)`` (differentiable).

        The mean of the VAE's latent distribution times ``scaling_factor``.
        """
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ModelError(f"{self.name}: images must be (B, 3, S, S) in [0, 1], got {shape}.")
        x = images.to(self.device, self.vae.dtype) * 2.0 - 1.0
        return self.vae.encode(x).latent_dist.mode() * self.scaling_factor

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Latents ``(B, C, h, w)`` -> float images ``(B, 3, S, S)`` in ``[0, 1]``."""
        images = self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor)[0]
        return (images / 2 + 0.5).clamp(0, 1).float()

    def timesteps_of(self, t: Tensor | float) -> Tensor:
        """Training timesteps ``(B,)`` of times ``t`` in ``[0, 1]`` (:func:`timestep_index`)."""
        return timestep_index(t, self.num_train_timesteps)

    def _unet(self, x: Tensor, timestep: Tensor | int, context: Tensor) -> Tensor:
        return self.unet(x, timestep, encoder_hidden_states=context, return_dict=False)[0]

    def _epsilon(self, out: Tensor, x: Tensor, alpha: Tensor) -> Tensor:
        """The noise from the UNet output ``out`` at ``x`` (noise level ``alpha = ᾱ``)."""
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return out
        if kind == "v_prediction":
            return alpha**0.5 * out + (1 - alpha) ** 0.5 * x
        return (x - alpha**0.5 * out) / (1 - alpha) ** 0.5  # "sample"

    # -- protocol ----------------------------------------------------------------------------

    def initial_noise(self, seeds: Sequence[int]) -> Tensor:
        """``(B, C, h, w)`` standard normal latents, row ``i`` from ``seeds[i]`` alone.

        Drawn on the CPU (the same on any device), returned on the model's device.
        """
        gens = row_generators(list(seeds), len(seeds), torch.device("cpu"))
        rows = [torch.randn((1, *self.latent_shape), generator=g) for g in gens]
        noise = torch.cat(rows) if rows else torch.zeros(0, *self.latent_shape)
        return noise.to(self.device, self._dtype)

    @torch.no_grad()
    def denoise(
        self,
        noise: Tensor,
        prompts: Sequence[str],
        *,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> Tensor:
        """The DDIM sampler: initial noise ``(B, C, h, w)`` -> final latents, one row at a time."""
        prompts = self._check_prompts(prompts)
        noise = self._check_noise(noise, len(prompts))
        steps = _check_steps(self.steps if steps is None else steps, self.num_train_timesteps)
        scale = self.guidance if guidance is None else float(guidance)
        return self._sample(noise * self.scheduler.init_noise_sigma, prompts, steps, scale)

    def _sample(
        self, latents: Tensor, prompts: list[str], steps: int, scale: float, start: int = 0
    ) -> Tensor:
        """DDIM from ``scheduler.timesteps[start]`` to the end, one row at a time."""
        cfg = scale > 1.0
        uncond = self.encode_prompts([""]) if cfg else None
        out = []
        for i, prompt in enumerate(prompts):
            cond = self.encode_prompts([prompt])
            context = torch.cat([uncond, cond]) if uncond is not None else cond
            x = latents[i : i + 1]
            self.scheduler.set_timesteps(steps, device=self.device)
            for t in self.scheduler.timesteps[start:]:
                inp = torch.cat([x] * 2) if cfg else x
                pred = self._unet(self.scheduler.scale_model_input(inp, t), t, context)
                if cfg:
                    pred_uncond, pred_cond = pred.chunk(2)
                    pred = pred_uncond + scale * (pred_cond - pred_uncond)
                x = self.scheduler.step(pred, t, x, eta=0.0, return_dict=False)[0]
            out.append(x)
        return torch.cat(out) if out else latents

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        *,
        noise: Tensor | None = None,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> Tensor:
        """``(B, 3, S, S)`` float images in ``[0, 1]``, one per prompt (see the module docstring).

        Args:
            prompts: One prompt per image.
            seeds: One seed per prompt (default ``0, 1, ...``); ignored where ``noise`` is given.
            noise: The initial latents ``(B, C, h, w)`` (as :meth:`initial_noise`).
            steps: DDIM steps (the loader's ``steps`` when None).
            guidance: Classifier-free guidance scale (the loader's when None); ``<= 1`` uses
                the prompt's prediction alone.
        """
        prompts = self._check_prompts(prompts)
        if noise is None:
            seeds = list(range(len(prompts))) if seeds is None else list(seeds)
            if len(seeds) != len(prompts):
                raise ModelError(
                    f"{self.name}: {len(seeds)} seeds for {len(prompts)} prompts; pass one seed "
                    "per prompt."
                )
            noise = self.initial_noise(seeds)
        latents = self.denoise(noise, prompts, steps=steps, guidance=guidance)
        rows = [self.decode_latents(latents[i : i + 1]) for i in range(len(prompts))]
        return torch.cat(rows) if rows else torch.zeros(0, 3, self.image_size, self.image_size)

    @torch.no_grad()
    def regenerate(
        self,
        images: Tensor,
        prompts: Sequence[str],
        strength: float,
        seeds: Sequence[int] | None = None,
        *,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> Tensor:
        """Image-to-image (SDEdit), as ``StableDiffusionImg2ImgPipeline`` with DDIM (eta 0).

        Of ``steps`` DDIM timesteps the last ``k = min(int(steps * strength), steps)`` are run
        (at least 1): the VAE latents of each image (:meth:`encode_images`, the distribution's
        mode) are noised to the first of them with the seed's :meth:`initial_noise`
        (``scheduler.add_noise``), denoised as :meth:`generate` does, and decoded. The pipeline
        *samples* the VAE posterior with the row's generator before drawing the noise from it,
        so its output from pixels differs; from the same latents it is the same (see
        ``tests/test_diffusers_gen.py``).

        Args:
            images: ``(B, 3, S, S)`` float images in ``[0, 1]``.
            prompts: one prompt per image.
            strength: the share of the noise schedule to go back, in ``(0, 1]``.
            seeds: one seed per image (default ``0, 1, ...``).
            steps: DDIM steps of a full run (the loader's when None).
            guidance: classifier-free guidance scale (the loader's when None).

        Returns:
            ``(B, 3, S, S)`` float images in ``[0, 1]``.
        """
        prompts = self._check_prompts(prompts)
        n = len(prompts)
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[0] != n:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ModelError(
                f"{self.name}: images must be (B, 3, S, S) with one row per prompt ({n}), "
                f"got {shape}."
            )
        strength, seeds = self._check_regen(strength, seeds, n)
        if n == 0:
            return torch.zeros(0, 3, self.image_size, self.image_size)
        latents = torch.cat([self.encode_images(images[i : i + 1]) for i in range(n)])
        return self.regenerate_latents(latents, prompts, strength, seeds, steps=steps,
                                       guidance=guidance)  # fmt: skip

    @torch.no_grad()
    def regenerate_latents(
        self,
        latents: Tensor,
        prompts: Sequence[str],
        strength: float,
        seeds: Sequence[int] | None = None,
        *,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> Tensor:
        """:meth:`regenerate` from clean latents ``(B, C, h, w)`` (already VAE-encoded)."""
        prompts = self._check_prompts(prompts)
        latents = self._check_noise(latents, len(prompts), what="latents")
        strength, seeds = self._check_regen(strength, seeds, len(prompts))
        steps = _check_steps(self.steps if steps is None else steps, self.num_train_timesteps)
        scale = self.guidance if guidance is None else float(guidance)
        start = steps - max(1, min(int(steps * strength), steps))
        self.scheduler.set_timesteps(steps, device=self.device)
        t0 = self.scheduler.timesteps[start : start + 1].repeat(len(prompts))
        noisy = self.scheduler.add_noise(latents, self.initial_noise(seeds), t0)
        out = self._sample(noisy, prompts, steps, scale, start=start)
        rows = [self.decode_latents(out[i : i + 1]) for i in range(len(prompts))]
        return torch.cat(rows)

    def predict(self, x_t: Tensor, t: Tensor, prompts: Sequence[str]) -> Tensor:
        """The UNet's raw output at latents ``x_t`` ``(B, C, h, w)``, times ``t`` ``(B,)``.

        Noise for ``epsilon`` checkpoints (velocity for ``v_prediction``); ``""`` is the
        unconditional branch. Differentiable in the UNet's parameters and in ``x_t``.
        """
        prompts = self._check_prompts(prompts)
        x_t = self._check_noise(x_t, len(prompts), what="x_t")
        timesteps = self._row_timesteps(t, len(prompts))
        return self._unet(x_t, timesteps, self.encode_prompts(prompts))

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x_t = sqrt(ᾱ_t) z0 + sqrt(1 - ᾱ_t) noise`` with ``z0`` the VAE latents of ``x0``.

        ``x0`` are images ``(B, 3, S, S)`` in ``[0, 1]``, ``noise`` latents ``(B, C, h, w)``;
        differentiable in ``x0``.
        """
        z0 = self.encode_images(x0)
        noise = self._check_noise(noise, int(z0.shape[0]))
        timesteps = self._row_timesteps(t, int(z0.shape[0]))
        return self.scheduler.add_noise(z0, noise.to(z0.dtype), timesteps)

    @torch.no_grad()
    def invert_latents(
        self, latents: Tensor, prompts: Sequence[str], *, steps: int | None = None
    ) -> Tensor:
        """DDIM inversion of clean latents ``(B, C, h, w)`` to initial noise, one row at a time."""
        prompts = self._check_prompts(prompts)
        latents = self._check_noise(latents, len(prompts), what="latents")
        steps = _check_steps(self.steps if steps is None else steps, self.num_train_timesteps)
        sched = self.scheduler
        sched.set_timesteps(steps, device=self.device)
        gap = self.num_train_timesteps // steps
        alphas = sched.alphas_cumprod.to(self.device)
        out = []
        for i, prompt in enumerate(prompts):
            cond = self.encode_prompts([prompt])
            x = latents[i : i + 1]
            for t in sched.timesteps.flip(0):
                lower = int(t) - gap
                alpha_lo = alphas[lower] if lower >= 0 else sched.final_alpha_cumprod
                alpha_t = alphas[int(t)]
                pred = self._unet(sched.scale_model_input(x, t), t, cond)
                eps = self._epsilon(pred, x, alpha_lo)
                x0 = (x - (1 - alpha_lo) ** 0.5 * eps) / alpha_lo**0.5
                x = alpha_t**0.5 * x0 + (1 - alpha_t) ** 0.5 * eps
            out.append(x / sched.init_noise_sigma)
        return torch.cat(out) if out else latents

    @torch.no_grad()
    def invert(self, images: Tensor, prompts: Sequence[str], *, steps: int | None = None) -> Tensor:
        """DDIM inversion of images ``(B, 3, S, S)`` in ``[0, 1]`` to their initial noise.

        VAE-encodes each row, then :meth:`invert_latents` (the prompt's prediction, no
        guidance). Returns latents shaped like :meth:`initial_noise`.
        """
        prompts = self._check_prompts(prompts)
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[0] != len(prompts):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ModelError(
                f"{self.name}: images must be (B, 3, S, S) with one row per prompt "
                f"({len(prompts)}), got {shape}."
            )
        latents = [self.encode_images(images[i : i + 1]) for i in range(len(prompts))]
        if not latents:
            return torch.zeros(0, *self.latent_shape, device=self.device)
        return self.invert_latents(torch.cat(latents), prompts, steps=steps)

    def config(self) -> dict[str, Any]:
        """Source, components, sizes and sampler settings: JSON-able, shown in the safety card."""
        sched = self.scheduler.config
        unet = self.unet.config
        text = self.text_encoder.config
        return {
            "type": "diffusers",
            "source": self.source,
            "pipeline": self.pipeline,
            "components": dict(self.components),
            "sampler": type(self.scheduler).__name__,
            "eta": 0.0,
            "steps": self.steps,
            "guidance": self.guidance,
            "image_size": self.image_size,
            "latent_shape": list(self.latent_shape),
            "vae_scale_factor": self.vae_scale_factor,
            "scaling_factor": self.scaling_factor,
            "dtype": str(self._dtype).replace("torch.", ""),
            "prediction_type": str(sched.prediction_type),
            "num_train_timesteps": self.num_train_timesteps,
            "timestep_spacing": str(sched.timestep_spacing),
            "beta_schedule": str(sched.beta_schedule),
            "unet": {
                "block_out_channels": [int(c) for c in unet.block_out_channels],
                "cross_attention_dim": _jsonable(unet.cross_attention_dim),
            },
            "text_encoder": {
                "hidden_size": int(text.hidden_size),
                "layers": int(text.num_hidden_layers),
                "vocab_size": int(text.vocab_size),
                "max_length": int(self.tokenizer.model_max_length),
            },
        }

    # -- checks ------------------------------------------------------------------------------

    def _check_prompts(self, prompts: Sequence[str]) -> list[str]:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ModelError(f"{self.name}: prompts must be a list of strings, one per image.")
        return list(prompts)

    def _check_noise(self, noise: Tensor, n: int, what: str = "noise") -> Tensor:
        want = (n, *self.latent_shape)
        if not isinstance(noise, Tensor) or tuple(noise.shape) != want:
            shape = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise ModelError(
                f"{self.name}: {what} must have shape {want} (one latent row per prompt, as "
                f"initial_noise() returns), got {shape}."
            )
        return noise.to(self.device, self._dtype)

    def _check_regen(
        self, strength: float, seeds: Sequence[int] | None, n: int
    ) -> tuple[float, list[int]]:
        strength = float(strength)
        if not 0.0 < strength <= 1.0:
            raise ModelError(f"{self.name}: strength must be in (0, 1], got {strength}.")
        seeds = list(range(n)) if seeds is None else [int(x) for x in seeds]
        if len(seeds) != n:
            raise ModelError(
                f"{self.name}: {len(seeds)} seeds for {n} images; pass one seed per image."
            )
        return strength, seeds

    def _row_timesteps(self, t: Tensor | float, n: int) -> Tensor:
        timesteps = self.timesteps_of(t)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(n)
        if timesteps.numel() != n:
            raise ModelError(f"{self.name}: {timesteps.numel()} times t for {n} rows.")
        return timesteps.to(self.device)


def timestep_index(t: Tensor | float, num_train_timesteps: int) -> Tensor:
    """Training timesteps ``round(t * (T - 1))`` (long, ``(B,)``) of times ``t`` in ``[0, 1]``.

    Example:
        >>> timestep_index(torch.tensor([0.0, 0.5, 1.0]), 1000).tolist()
        [0, 500, 999]
    """
    t = torch.as_tensor(t, dtype=torch.float64).detach().cpu().reshape(-1)
    if bool(((t < 0) | (t > 1) | t.isnan()).any()):
        raise ModelError(f"diffusers: times t must be in [0, 1], got {t.tolist()}.")
    return torch.round(t * (num_train_timesteps - 1)).long()


def _jsonable(value: Any) -> Any:
    return [int(v) for v in value] if isinstance(value, list | tuple) else int(value)


def _check_steps(steps: Any, total: int, name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= total:
        raise ModelError(f"diffusers: {name} must be an integer in [1, {total}], got {steps!r}.")
    return steps


# --------------------------------------------------------------------------- loading


def _local_folder(ref: str | Path) -> Path:
    text = str(ref).strip()
    if not text:
        raise ModelError(
            "diffusers: needs a pipeline folder, e.g. diffusers:/models/stable-diffusion-v1-5. "
            + _SAVE_HINT
            + "."
        )
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelError(
            f"diffusers:{text}: the folder {str(path)!r} does not exist on this machine "
            f"(diffusers: never downloads). Check the path. {_SAVE_HINT}."
        )
    if not path.is_dir():
        raise ModelError(
            f"diffusers:{text}: {str(path)!r} is a file, not a pipeline folder. Pass the folder "
            "that holds model_index.json and the unet, vae, text_encoder, tokenizer and "
            "scheduler subfolders."
        )
    if not (path / "model_index.json").is_file():
        raise ModelError(
            f"diffusers:{text}: {str(path)!r} has no model_index.json, so it is not a saved "
            f"diffusers pipeline. {_SAVE_HINT}."
        )
    return path.resolve()


def _component_classes(path: Path) -> tuple[str, dict[str, str]]:
    """The pipeline's class and each needed component's class, from ``model_index.json``."""
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelError(
            f"Could not read {str(path / 'model_index.json')!r} ({_first_line(err)}). {_SAVE_HINT}."
        ) from err
    classes, missing = {}, []
    for name in COMPONENTS:
        entry = index.get(name) if isinstance(index, dict) else None
        ok = isinstance(entry, list) and len(entry) == 2 and entry[1]
        if not ok or not (path / name).is_dir():
            missing.append(name)
        else:
            classes[name] = str(entry[1])
    if missing:
        raise ModelError(
            f"The pipeline folder {str(path)!r} lacks {', '.join(missing)} (in model_index.json "
            "or as a subfolder); diffusers: needs a Stable-Diffusion-style text-to-image pipeline "
            f"with unet, vae, text_encoder, tokenizer and scheduler. {_SAVE_HINT}."
        )
    for name, allowed in COMPONENTS.items():
        if allowed and classes[name] not in allowed:
            raise ModelError(
                f"The pipeline in {str(path)!r} has a {classes[name]} as its {name}; diffusers: "
                f"supports {' / '.join(allowed)} there (Stable Diffusion 1.x / 2.x pipelines)."
            )
    pipeline = str(index.get("_class_name", "")) if isinstance(index, dict) else ""
    return pipeline, classes


def _check_unet(path: Path, config: Any) -> None:
    extra = [
        key
        for key in (
            "addition_embed_type",
            "class_embed_type",
            "encoder_hid_dim_type",
            "time_cond_proj_dim",
        )
        if getattr(config, key, None) is not None
    ]
    if extra or config.in_channels != config.out_channels:
        why = f"it needs {', '.join(extra)}" if extra else "its in- and out-channels differ"
        raise ModelError(
            f"The UNet in {str(path)!r} is not a plain text-to-image UNet ({why}: SDXL, "
            "inpainting, upscaling or LCM pipelines); diffusers: supports Stable Diffusion "
            "1.x / 2.x text-to-image pipelines."
        )


def _load(path: Path, name: str, load: Any) -> Any:
    try:
        return load()
    except Exception as err:  # noqa: BLE001 - any loader failure becomes one clear message
        raise ModelError(
            f"Could not load the {name} of the pipeline in {str(path)!r} from "
            f"{str(path / name)!r} ({_first_line(err)}). {_SAVE_HINT}."
        ) from err


def ddim_from_config(config: Any) -> Any:
    """A deterministic ``DDIMScheduler`` with the noise schedule of any scheduler ``config``.

    ``clip_sample`` is off and ``steps_offset`` is 1, as ``StableDiffusionPipeline`` sets them.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(
        dict(config), clip_sample=False, steps_offset=1, thresholding=False
    )


def load_diffusers_generator(
    folder: str | Path,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
) -> DiffusersGenerator:
    """A local Stable-Diffusion-style pipeline folder as a :class:`DiffusersGenerator`.

    Args:
        folder: The pipeline folder written by ``pipe.save_pretrained(DIR)``.
        device: Torch device to put the model on.
        dtype: Weight dtype (``"float32"``, ``"float16"``, ``"bfloat16"``).
        steps: Default DDIM steps of :meth:`~DiffusersGenerator.generate` and
            :meth:`~DiffusersGenerator.invert`.
        guidance: Default classifier-free guidance scale.

    Returns:
        The wrapped pipeline in eval mode.

    Raises:
        ModelError: The folder does not exist, is not a diffusers pipeline, lacks a component,
            holds unsupported components, or a component fails to load; the message names the
            folder and says what to do.
    """
    path = _local_folder(folder)
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ModelError(f"diffusers: dtype {dtype!r} is not a torch dtype (e.g. float32).")
    pipeline, classes = _component_classes(path)
    import diffusers
    import transformers

    sched_cfg = _load(
        path,
        "scheduler",
        lambda: diffusers.DDIMScheduler.load_config(
            str(path), subfolder="scheduler", local_files_only=True
        ),
    )
    scheduler = _load(path, "scheduler", lambda: ddim_from_config(sched_cfg))
    _check_steps(steps, int(scheduler.config.num_train_timesteps))
    local = {"local_files_only": True}
    unet = _load(
        path,
        "unet",
        lambda: diffusers.UNet2DConditionModel.from_pretrained(
            str(path), subfolder="unet", torch_dtype=torch_dtype, **local
        ),
    )
    _check_unet(path, unet.config)
    vae = _load(
        path,
        "vae",
        lambda: diffusers.AutoencoderKL.from_pretrained(
            str(path), subfolder="vae", torch_dtype=torch_dtype, **local
        ),
    )
    text_encoder = _load(
        path,
        "text_encoder",
        lambda: transformers.CLIPTextModel.from_pretrained(
            str(path / "text_encoder"), dtype=torch_dtype, **local
        ),
    )
    tok_cls = getattr(transformers, classes["tokenizer"])
    tokenizer = _load(
        path, "tokenizer", lambda: tok_cls.from_pretrained(str(path / "tokenizer"), **local)
    )
    gen = DiffusersGenerator(
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        source=str(path),
        pipeline=pipeline,
        components=classes,
        steps=steps,
        guidance=guidance,
    )
    return gen.to(device)


__all__ = [
    "COMPONENTS",
    "DEFAULT_GUIDANCE",
    "DEFAULT_STEPS",
    "DiffusersGenerator",
    "ddim_from_config",
    "load_diffusers_generator",
    "timestep_index",
]


@register_model(
    "diffusers:", "a local diffusers text-to-image pipeline folder: diffusers:<folder>",
    kind="generator",
)  # fmt: skip
def build_diffusers(
    folder: str = "", *, device: str = "cpu", dtype: str = "float32", **_: Any
) -> DiffusersGenerator:
    """``diffusers:<folder>``: :func:`load_diffusers_generator` with the default sampler."""
    return load_diffusers_generator(folder, device=device, dtype=dtype)
