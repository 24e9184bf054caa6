r"""Local Hugging Face image-text-to-text models behind the ``hf-vlm:`` prefix (kind ``vlm``).

``create_model("hf-vlm:<folder>")`` loads a checkpoint folder written by ``save_pretrained``
(the model) and ``processor.save_pretrained`` (its processor: tokenizer, image processor, chat
template) with ``AutoProcessor`` and ``AutoModelForImageTextToText`` (``AutoModelForVision2Seq``
on transformers versions without it), and wraps it in the
:class:`~mmsafe.models.vlm.VisionLanguageModel` protocol::

    model = create_model("hf-vlm:/models/llava-1.5-7b-hf")
    pixels = model.preprocess_images(images)                  # (B, 3, S, S) in [0, 1]
    answers = model.generate(pixels, ["What is shown?"] * len(images), seeds=range(len(images)))
    ll = model.log_likelihood(pixels, prompts, targets)       # (B,), differentiable in pixels

Nothing is ever downloaded (``local_files_only=True`` everywhere): copy the folder first.

**Images.** :meth:`HFVisionLanguageModel.preprocess_images` resizes and crops with the
checkpoint's own image processor (its size, filter and crop) but does not normalise, giving
pixels in ``[0, 1]``; the processor's rescale and mean/std normalisation are then applied in
torch inside the model, so :meth:`~HFVisionLanguageModel.log_likelihood` is differentiable with
respect to the pixels. Pixels of another side are resized bilinearly (in torch) first. At load
time the torch normalisation is checked against the processor's own output on a probe image.

**Prompts.** With a chat template (the processor's), row ``i`` is the single user turn
``[{"type": "image"}, {"type": "text", "text": prompts[i]}]`` rendered with
``add_generation_prompt=True``. Without one, the plain format of the family is used
(:data:`PLAIN_FORMATS`: LLaVA's ``"USER: <image>\n{prompt} ASSISTANT:"``, else
``"<image>\n{prompt}"``, ``<image>`` being the processor's image token). The processor then
expands the image token to the number of image positions, as it does for the checkpoint.

**Generation** runs one row at a time with a KV cache, greedy when ``temperature == 0``, else
plain temperature sampling (no top-k / top-p) from ``torch.Generator`` seeded by the row's seed:
a row's answer never depends on the batch it is in. It stops at the end-of-text tokens (the
tokenizer's and the generation config's). Decoded new tokens only, special tokens skipped,
stripped.

**Likelihood** is the teacher-forced ``sum log p`` of ``tokenizer(target,
add_special_tokens=False)`` followed by the tokenizer's end-of-text token, after the formatted
prompt; rows are right-padded, so padding never changes a row's value.

**Suffix search** (optional capabilities): :meth:`~HFVisionLanguageModel.vocabulary` is the
tokenizer's tokens by id, :meth:`~HFVisionLanguageModel.suffix_gradients` feeds the prompt
through ``inputs_embeds`` with the suffix as a one-hot matrix times the token embeddings.

**Families.** Tested with a tiny random LLaVA (``LlavaForConditionalGeneration`` with a CLIP
vision tower and a Llama text model, ``LlavaProcessor`` with the PIL ``CLIPImageProcessor``) in
``tests/test_hf_vlm.py``. Other decoder-only families whose processor makes one ``(3, S, S)``
image per prompt and whose model needs only ``input_ids``, ``attention_mask`` and
``pixel_values`` should work; a processor that also makes other inputs (image tiles or grids:
LLaVA-NeXT, Qwen2-VL, Idefics3 / SmolVLM; ``token_type_ids`` of prefix-LM models: PaliGemma,
Gemma 3) and encoder-decoder models are refused at load time with a :class:`ModelError`.

``transformers`` is imported lazily, so importing this module (and registering ``hf-vlm:``)
is cheap.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mmsafe.models.base import ModelError, register_model
from mmsafe.models.hf import rgb_uint8
from mmsafe.models.vlm import VisionLanguageModel, row_generators

PLAIN_FORMATS: dict[str, str] = {"llava": "USER: {image}\n{prompt} ASSISTANT:"}
"""Prompt formats (by ``model_type``) for processors without a chat template."""
DEFAULT_PLAIN_FORMAT = "{image}\n{prompt}"
"""The prompt format of other families without a chat template."""
MODEL_INPUTS = frozenset({"input_ids", "attention_mask", "pixel_values"})
"""What the processor may make: the only inputs ``hf-vlm:`` passes to the model."""

_SAVE_HINT = (
    "Write the folder with `model.save_pretrained(DIR)` and `processor.save_pretrained(DIR)` "
    "(or copy the whole checkpoint folder, e.g. from `hf download <org/name> --local-dir DIR` "
    "on a machine with network)"
)
_SENTINEL = "\ue000"  # a private-use character: marks the end of the prompt in the template
_CACHE_ROWS = 4096


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()


def plain_prompt(model_type: str, image_token: str, prompt: str) -> str:
    r"""The prompt of a processor without a chat template (see :data:`PLAIN_FORMATS`).

    Example:
        >>> plain_prompt("llava", "<image>", "What colour?")
        'USER: <image>\nWhat colour? ASSISTANT:'
        >>> plain_prompt("other", "<img>", "Hi")
        '<img>\nHi'
    """
    fmt = PLAIN_FORMATS.get(model_type, DEFAULT_PLAIN_FORMAT)
    return fmt.format(image=image_token, prompt=prompt)


def _triple(value: Any) -> list[float]:
    vals = [float(v) for v in (value if isinstance(value, list | tuple) else [value])]
    return vals * 3 if len(vals) == 1 else vals


def _probe_image(side: int) -> np.ndarray:
    """A smooth uint8 ``(side, side, 3)`` pattern (its resize to the same side is exact)."""
    ramp = np.linspace(0, 255, side)
    chans = [ramp[None, :] + 0 * ramp[:, None], ramp[:, None] + 0 * ramp[None, :]]
    chans.append(255 - chans[0] / 2 - chans[1] / 2)
    return np.rint(np.stack(chans, axis=-1)).astype(np.uint8)


class HFVisionLanguageModel(VisionLanguageModel):
    """A local transformers image-text-to-text model as a :class:`VisionLanguageModel`.

    Build it with ``create_model("hf-vlm:<folder>")`` (:func:`build_hf_vlm`), which also checks
    the family is supported (see the module docstring). The weights are frozen
    (``requires_grad=False``), so a backward pass to the pixels computes no weight gradients;
    ``model.model.requires_grad_(True)`` undoes it for fine-tuning.

    Attributes:
        model: The wrapped transformers model (eval mode).
        processor: Its processor (tokenizer, image processor, chat template).
        source: The absolute folder it was loaded from.
        model_type: ``config.json``'s ``model_type`` (e.g. ``"llava"``).
        image_side: Side of the square image the vision tower takes.
        image_mean: Per-channel mean of the normalisation (zeros when the processor has none).
        image_std: Per-channel std of the normalisation (ones when the processor has none).
        pixel_scale: What ``[0, 1]`` pixels are multiplied by before normalising (``255 *
            rescale_factor``: 1 for the usual ``1/255``).
        eos_ids: Token ids that end generation.
        eos_id: The end-of-text id appended to targets in :meth:`log_likelihood`.
    """

    def __init__(self, model: nn.Module, processor: Any, *, source: str, image_side: int) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.source = source
        self.name = f"hf-vlm:{Path(source).name}"
        self.model_type = str(getattr(model.config, "model_type", "unknown"))
        self.image_side = int(image_side)
        self.image_token = str(getattr(processor, "image_token", None) or "<image>")
        ip = processor.image_processor
        norm = bool(getattr(ip, "do_normalize", True))
        self.image_mean = _triple(ip.image_mean) if norm else [0.0, 0.0, 0.0]
        self.image_std = _triple(ip.image_std) if norm else [1.0, 1.0, 1.0]
        rescale = bool(getattr(ip, "do_rescale", True))
        self.pixel_scale = 255.0 * float(ip.rescale_factor) if rescale else 255.0
        self.register_buffer(
            "pixel_mean", torch.tensor(self.image_mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(self.image_std).view(1, 3, 1, 1), persistent=False
        )
        self.eos_ids, self.eos_id = self._eos_ids()
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_id)
        self._ids_cache: dict[tuple[str, bool], tuple[list[int], list[int]]] = {}

    def _eos_ids(self) -> tuple[frozenset[int], int]:
        gen = getattr(self.model, "generation_config", None)
        found = getattr(gen, "eos_token_id", None) if gen is not None else None
        gen_ids = [found] if isinstance(found, int) else list(found or [])
        tok = self.tokenizer.eos_token_id
        ids = ([tok] if tok is not None else []) + [int(i) for i in gen_ids]
        if not ids:
            raise ModelError(
                f"{self.source}: neither the tokenizer nor generation_config.json names an "
                "end-of-text token (eos_token), which generation stops at and log_likelihood "
                "appends to targets. Set tokenizer.eos_token and save it again with "
                "processor.save_pretrained(...)."
            )
        return frozenset(int(i) for i in ids), int(ids[0])

    # -- images ------------------------------------------------------------------------------

    @property
    def input_size(self) -> int:
        """The side of the square image the vision tower takes (the processor's size)."""
        return self.image_side

    def preprocess_images(self, images: Sequence[np.ndarray]) -> Tensor:
        """uint8 ``(H, W, 3)`` images -> ``(B, 3, S, S)`` pixels in ``[0, 1]`` (CPU).

        The checkpoint's image processor resizes and crops (its size, filter and crop); the
        normalisation is left to the model (:meth:`normalize`).
        """
        if len(images) == 0:
            return torch.zeros(0, 3, self.image_side, self.image_side)
        out = self.processor.image_processor(
            images=[rgb_uint8(im) for im in images],
            do_normalize=False,
            do_rescale=True,
            rescale_factor=1 / 255,
            return_tensors="pt",
            input_data_format="channels_last",
        )
        return out["pixel_values"].float().clamp(0.0, 1.0)

    def normalize(self, pixels: Tensor) -> Tensor:
        """``[0, 1]`` pixels -> the vision tower's ``pixel_values`` (differentiable, in torch).

        Resizes bilinearly to :attr:`input_size` if needed, then applies the processor's
        rescale and mean/std.
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ModelError(
                f"{self.name}: pixels must be a (B, 3, S, S) tensor from preprocess_images(), "
                f"got shape {tuple(pixels.shape)}."
            )
        x = pixels.to(self.pixel_mean.device, torch.float32)
        side = self.image_side
        if tuple(x.shape[-2:]) != (side, side):
            x = nn.functional.interpolate(
                x, size=(side, side), mode="bilinear", align_corners=False, antialias=True
            )
        x = (x * self.pixel_scale - self.pixel_mean) / self.pixel_std
        return x.to(self._dtype)

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- text --------------------------------------------------------------------------------

    def format_prompt(self, prompt: str) -> str:
        """The model's input text for ``prompt`` (see the module docstring), unexpanded."""
        template = getattr(self.processor, "chat_template", None)
        if template:
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
            ]
            return str(
                self.processor.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
            )
        return plain_prompt(self.model_type, self.image_token, prompt)

    def _encode_with_image(self, text: str) -> list[int]:
        """Token ids of ``text`` with the image token expanded, as the processor makes them."""
        bos = self.tokenizer.bos_token
        extra = {"add_special_tokens": False} if bos and text.startswith(bos) else {}
        dummy = np.zeros((self.image_side, self.image_side, 3), np.uint8)
        enc = self.processor(text=[text], images=[dummy], return_tensors="pt", **extra)
        return [int(i) for i in enc["input_ids"][0].tolist()]

    def _prompt_ids(self, prompt: str, split: bool = False) -> tuple[list[int], list[int]]:
        """``(before, after)`` ids of a formatted prompt; ``after`` is empty unless ``split``.

        With ``split``, ``before`` ends with the prompt's text and ``after`` holds the template
        text that follows it (where a suffix goes in between).
        """
        if not isinstance(prompt, str):
            raise ModelError(f"{self.name}: prompts must be strings, got {type(prompt).__name__}.")
        key = (prompt, split)
        if key in self._ids_cache:
            return self._ids_cache[key]
        if not split:
            ids = (self._encode_with_image(self.format_prompt(prompt)), [])
        else:
            text = self.format_prompt(prompt + _SENTINEL)
            if text.count(_SENTINEL) != 1:
                raise ModelError(
                    f"{self.name}: cannot find where the prompt ends in the chat template's "
                    "output, so a suffix has nowhere to go."
                )
            before, after = text.split(_SENTINEL)
            tail = self.tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
            ids = (self._encode_with_image(before), [int(i) for i in tail])
        if len(self._ids_cache) >= _CACHE_ROWS:
            self._ids_cache.clear()
        self._ids_cache[key] = ids
        return ids

    def _target_ids(self, target: str) -> list[int]:
        if not isinstance(target, str):
            raise ModelError(f"{self.name}: targets must be strings, got {type(target).__name__}.")
        ids = self.tokenizer(target, add_special_tokens=False)["input_ids"] if target else []
        return [int(i) for i in ids] + [self.eos_id]

    def _check_rows(self, pixels: Tensor, *lists: Sequence[Any]) -> int:
        if not isinstance(pixels, Tensor) or pixels.ndim != 4 or pixels.shape[1] != 3:
            shape = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
            raise ModelError(
                f"{self.name}: pixels must be a (B, 3, S, S) tensor from preprocess_images(), "
                f"got {shape}."
            )
        n = int(pixels.shape[0])
        for values in lists:
            if isinstance(values, str) or len(values) != n:
                got = "a string" if isinstance(values, str) else f"{len(values)}"
                raise ModelError(
                    f"{self.name}: {got} prompts/targets for {n} images; pass one string per "
                    "image row (a list)."
                )
        return n

    # -- scoring -----------------------------------------------------------------------------

    def _score(
        self, pixel_values: Tensor, rows: list[tuple[list[int], list[int]]], embeds: Any = None
    ) -> tuple[Tensor, Tensor]:
        """``(sum log p (B,), n target tokens (B,))`` of right-padded ``context + target`` rows.

        ``embeds(ids)`` may replace the token embeddings (for :meth:`suffix_gradients`).
        """
        device = self.pixel_mean.device
        width = max(len(c) + len(t) for c, t in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        is_target = torch.zeros(len(rows), width, dtype=torch.bool)
        for r, (context, target) in enumerate(rows):
            n = len(context) + len(target)
            ids[r, :n] = torch.tensor(context + target)
            mask[r, :n] = 1
            is_target[r, len(context) : n] = True
        ids, mask, is_target = ids.to(device), mask.to(device), is_target.to(device)
        feed: dict[str, Any] = {"attention_mask": mask, "pixel_values": pixel_values}
        if embeds is None:
            feed["input_ids"] = ids
        else:
            feed["inputs_embeds"] = embeds(ids)
        logits = self.model(**feed, use_cache=False).logits
        # the logits at position j predict token j + 1
        sel = is_target[:, 1:]
        picked = logits[:, :-1][sel].float().log_softmax(-1)
        token_lp = picked.gather(-1, ids[:, 1:][sel][:, None])[:, 0]
        row_of = torch.arange(len(rows), device=device)[:, None].expand_as(sel)[sel]
        total = torch.zeros(len(rows), device=device, dtype=token_lp.dtype)
        total = total.index_add(0, row_of, token_lp)
        return total, is_target.sum(1)

    def log_likelihood(
        self, pixels: Tensor, prompts: Sequence[str], targets: Sequence[str]
    ) -> Tensor:
        """``(B,)`` teacher-forced ``sum log p(target tokens + end-of-text | image, prompt)``.

        Differentiable with respect to ``pixels`` when gradients are enabled. Rows are
        right-padded, so a row's value does not depend on the other rows.
        """
        n = self._check_rows(pixels, prompts, targets)
        if n == 0:
            return torch.zeros(0, device=self.pixel_mean.device)
        rows = [
            (self._prompt_ids(p)[0], self._target_ids(t))
            for p, t in zip(prompts, targets, strict=True)
        ]
        return self._score(self.normalize(pixels), rows)[0]

    # -- generation --------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        pixels: Tensor,
        prompts: Sequence[str],
        max_new_tokens: int = 16,
        seeds: Sequence[int] | None = None,
        temperature: float = 0.0,
    ) -> list[str]:
        """One answer per row, each decoded alone (see the module docstring).

        Args:
            pixels: ``(B, 3, S, S)`` pixels in ``[0, 1]``.
            prompts: One prompt per row.
            max_new_tokens: At most this many new tokens per answer.
            seeds: One seed per row (row ``i`` gets ``i`` when ``None``); used when sampling.
            temperature: ``0`` is greedy decoding; above, plain temperature sampling.

        Returns:
            The decoded new tokens of each row (special tokens skipped), stripped.
        """
        n = self._check_rows(pixels, prompts)
        if temperature < 0:
            raise ModelError(f"{self.name}: temperature must be >= 0, got {temperature}.")
        device = self.pixel_mean.device
        gens = row_generators(seeds, n, device)
        values = self.normalize(pixels)
        return [
            self._generate_row(values[i : i + 1], prompts[i], max_new_tokens, temperature, gens[i])
            for i in range(n)
        ]

    def _generate_row(
        self,
        pixel_values: Tensor,
        prompt: str,
        max_new_tokens: int,
        temperature: float,
        generator: torch.Generator,
    ) -> str:
        device = self.pixel_mean.device
        ids = torch.tensor([self._prompt_ids(prompt)[0]], device=device)
        mask = torch.ones_like(ids)
        new: list[int] = []
        if max_new_tokens <= 0:
            return ""
        out = self.model(
            input_ids=ids, attention_mask=mask, pixel_values=pixel_values, use_cache=True
        )
        cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else None
        for step in range(max_new_tokens):
            logits = out.logits[0, -1].float()
            if temperature == 0:
                token = int(logits.argmax())
            else:
                probs = (logits / temperature).softmax(-1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            if token in self.eos_ids:
                break
            new.append(token)
            if step + 1 == max_new_tokens:
                break
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            cache = getattr(out, "cache", None)
            if cache is None:
                cache = out.past_key_values
            out = self.model(
                input_ids=torch.tensor([[token]], device=device),
                attention_mask=mask,
                use_cache=True,
                **{cache_arg or "past_key_values": cache},
            )
        return str(self.tokenizer.decode(new, skip_special_tokens=True)).strip()

    # -- optional capabilities ---------------------------------------------------------------

    def _embedding(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def vocabulary(self) -> list[str]:
        """The tokenizer's token strings by id, one per row of the token-embedding matrix.

        Rows beyond the tokenizer (embedding matrices padded to a round size) are ``""``.
        """
        size = int(self._embedding().weight.shape[0])
        known = min(size, len(self.tokenizer))
        tokens = self.tokenizer.convert_ids_to_tokens(list(range(known)))
        return [t if isinstance(t, str) else "" for t in tokens] + [""] * (size - known)

    def suffix_gradients(
        self, pixels: Tensor, prompts: Sequence[str], suffix: Tensor, targets: Sequence[str]
    ) -> tuple[Tensor, Tensor]:
        """``(loss (B,), grad (k, V))`` of the suffix token ids ``suffix`` (k,) after each prompt.

        The suffix goes right after the prompt's text, before the rest of the chat template
        (the assistant turn). ``loss[b]`` is row ``b``'s negative log-likelihood summed over the
        target tokens (end-of-text included: ``-log_likelihood``); ``grad`` is the gradient of
        ``loss.mean()`` with respect to the suffix's one-hot rows over :meth:`vocabulary`. The
        pixels are held fixed.
        """
        n = self._check_rows(pixels, prompts, targets)
        weight = self._embedding().weight
        vocab = int(weight.shape[0])
        suffix = torch.as_tensor(suffix).reshape(-1).long()
        k = int(suffix.numel())
        image_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if k and (int(suffix.min()) < 0 or int(suffix.max()) >= vocab):
            raise ModelError(f"{self.name}: suffix token ids must be in [0, {vocab}).")
        if isinstance(image_id, int) and bool((suffix == image_id).any()):
            raise ModelError(
                f"{self.name}: the suffix holds the image token {self.image_token!r}, which the "
                "model fills with image features; leave it out of the search."
            )
        one_hot = torch.zeros(k, vocab, device=weight.device, dtype=weight.dtype)
        one_hot[torch.arange(k), suffix.to(weight.device)] = 1.0
        one_hot.requires_grad_(True)
        if n == 0:
            return torch.zeros(0, device=weight.device), torch.zeros(k, vocab)
        rows, starts = [], []
        for p, t in zip(prompts, targets, strict=True):
            before, after = self._prompt_ids(p, split=True)
            starts.append(len(before))
            rows.append((before + suffix.tolist() + after, self._target_ids(t)))
        embed = self._embedding()

        def embeds(ids: Tensor) -> Tensor:
            base = embed(ids)
            soft = (one_hot @ weight).to(base.dtype)
            parts = []
            for r, s in enumerate(starts):
                parts.append(torch.cat([base[r, :s], soft, base[r, s + k :]], dim=0))
            return torch.stack(parts)

        with torch.enable_grad():
            total, count = self._score(self.normalize(pixels).detach(), rows, embeds)
            loss = -total
            (grad,) = torch.autograd.grad(loss.mean(), one_hot, allow_unused=True)
        if grad is None:  # an empty suffix
            grad = torch.zeros_like(one_hot)
        return loss.detach(), grad.detach().float()

    # -- description -------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """Source, family, dims and image settings: JSON-able, shown in the safety card."""
        cfg = self.model.config
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        vision = getattr(cfg, "vision_config", None)

        def dims(c: Any) -> dict[str, int] | None:
            if c is None:
                return None
            out = {"hidden_size": getattr(c, "hidden_size", None)}
            out["layers"] = getattr(c, "num_hidden_layers", None)
            if getattr(c, "vocab_size", None) is not None:
                out["vocab_size"] = c.vocab_size
            return {k: int(v) for k, v in out.items() if v is not None}

        return {
            "type": "hf-vlm",
            "source": self.source,
            "model_type": self.model_type,
            "architecture": type(self.model).__name__,
            "dtype": str(self._dtype).replace("torch.", ""),
            "image_size": self.image_side,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "pixel_scale": self.pixel_scale,
            "image_processor": type(self.processor.image_processor).__name__,
            "prompt_format": (
                "chat_template"
                if getattr(self.processor, "chat_template", None)
                else PLAIN_FORMATS.get(self.model_type, DEFAULT_PLAIN_FORMAT)
            ),
            "eos_token_id": self.eos_id,
            "vision": dims(vision),
            "text": dims(text),
        }


# --------------------------------------------------------------------------- loading


def _auto_model_class() -> Any:
    try:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText
    except ImportError:  # older transformers
        from transformers import AutoModelForVision2Seq

        return AutoModelForVision2Seq


def _local_folder(ref: str) -> Path:
    ref = ref.strip()
    if not ref:
        raise ModelError(
            "hf-vlm: needs a checkpoint folder, e.g. hf-vlm:/models/llava-1.5-7b-hf. "
            + _SAVE_HINT
            + "."
        )
    path = Path(ref).expanduser()
    if not path.exists():
        raise ModelError(
            f"hf-vlm:{ref}: the folder {str(path)!r} does not exist on this machine (hf-vlm: "
            f"never downloads). Check the path. {_SAVE_HINT}."
        )
    if not path.is_dir():
        raise ModelError(
            f"hf-vlm:{ref}: {str(path)!r} is a file, not a checkpoint folder. Pass the folder "
            "that holds config.json, the weights and the processor files."
        )
    if not (path / "config.json").is_file():
        raise ModelError(
            f"hf-vlm:{ref}: {str(path)!r} has no config.json, so it is not a saved transformers "
            f"model. {_SAVE_HINT}."
        )
    return path.resolve()


def _load_processor(path: Path) -> Any:
    from transformers import AutoProcessor

    missing = (
        f"{str(path)!r} has no processor files (processor_config.json / "
        "preprocessor_config.json with the image settings, and the tokenizer files), which "
        "hf-vlm: needs to format prompts and images as the checkpoint expects. Save them with "
        "`processor.save_pretrained(DIR)` (the processor the model was trained with), or copy "
        "them from where the checkpoint came from."
    )
    try:
        processor = AutoProcessor.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False
        )
    except Exception as err:  # noqa: BLE001 - any loader failure becomes one clear message
        raise ModelError(f"Could not load the processor ({_first_line(err)}): {missing}") from err
    if getattr(processor, "image_processor", None) is None:
        raise ModelError(f"The processor in {str(path)!r} has no image processor: {missing}")
    if getattr(processor, "tokenizer", None) is None:
        raise ModelError(f"The processor in {str(path)!r} has no tokenizer: {missing}")
    return processor


def _check_family(path: Path, config: Any, auto_cls: Any) -> None:
    kind = getattr(config, "model_type", None)
    mapping = getattr(auto_cls, "_model_mapping", None)
    if mapping is not None and type(config) not in mapping:
        raise ModelError(
            f"{str(path)!r} holds a {kind!r} model, which is not an image-text-to-text model "
            f"({auto_cls.__name__} does not load it). hf-vlm: takes generative vision-language "
            "checkpoints such as LLaVA; CLIP / SigLIP encoders are `hf:`."
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(
            f"{str(path)!r} holds an encoder-decoder {kind!r} model; hf-vlm: supports "
            "decoder-only image-text-to-text models (LLaVA-style)."
        )


def _probe(path: Path, processor: Any, model_type: str) -> int:
    """Run the processor once: its image side, and that it makes only what hf-vlm: passes."""
    image_token = str(getattr(processor, "image_token", None) or "<image>")
    text = plain_prompt(model_type, image_token, "hi")
    try:
        enc = processor(text=[text], images=[np.zeros((37, 41, 3), np.uint8)], return_tensors="pt")
    except Exception as err:  # noqa: BLE001 - named below
        raise ModelError(
            f"The processor in {str(path)!r} failed on a test image and prompt "
            f"({_first_line(err)}). Check its files, or save them again with "
            "`processor.save_pretrained(DIR)`."
        ) from err
    pv = enc.get("pixel_values")
    if (
        not isinstance(pv, Tensor)
        or pv.ndim != 4
        or pv.shape[0] != 1
        or pv.shape[-1] != pv.shape[-2]
    ):
        shape = tuple(pv.shape) if isinstance(pv, Tensor) else type(pv).__name__
        raise ModelError(
            f"The processor in {str(path)!r} turns one image into pixel_values of shape {shape}; "
            "hf-vlm: supports processors that make one square (3, S, S) image per prompt "
            "(LLaVA-style), not image tiles or patch grids."
        )
    extra = set(enc.keys()) - MODEL_INPUTS
    tt = enc.get("token_type_ids")
    if "token_type_ids" in extra and isinstance(tt, Tensor) and not bool(tt.any()):
        extra.discard("token_type_ids")  # a plain tokenizer's all-zero segment ids
    if extra:
        raise ModelError(
            f"The processor in {str(path)!r} also makes {', '.join(sorted(extra))}, which this "
            f"{model_type!r} model needs and hf-vlm: does not pass (it passes input_ids, "
            "attention_mask and pixel_values); this family is not supported."
        )
    return int(pv.shape[-1])


def _check_normalisation(wrapped: HFVisionLanguageModel) -> None:
    """The torch normalisation must reproduce the processor's on a probe image."""
    side = wrapped.image_side
    image = _probe_image(side)
    theirs = wrapped.processor.image_processor(images=[image], return_tensors="pt")
    theirs = theirs["pixel_values"].float()
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    with torch.no_grad():
        ours = wrapped.normalize(pixels).float().cpu()
    err = float((ours - theirs).abs().max()) if ours.shape == theirs.shape else float("inf")
    if err > 1e-3:
        name = type(wrapped.processor.image_processor).__name__
        raise ModelError(
            f"{wrapped.source}: the image processor ({name}) does more than resize, rescale and "
            f"normalise (max difference {err:.3g} from hf-vlm:'s torch pipeline on a test "
            "image); hf-vlm: cannot reproduce it differentiably."
        )


@register_model(
    "hf-vlm:", "a local transformers image-text-to-text model: hf-vlm:<folder>", kind="vlm"
)
def build_hf_vlm(
    folder: str = "", *, device: str = "cpu", dtype: str = "float32", **_: Any
) -> HFVisionLanguageModel:
    """A local transformers image-text-to-text checkpoint as a :class:`VisionLanguageModel`.

    Args:
        folder: The checkpoint folder: ``config.json`` and weights (``save_pretrained``) and the
            processor files (``processor.save_pretrained``).
        device: Torch device to put the model on.
        dtype: Weight dtype (``"float32"``, ``"bfloat16"``, ``"float16"``).

    Returns:
        The wrapped model in eval mode.

    Raises:
        ModelError: The folder does not exist or is not a checkpoint, holds no image-text-to-text
            model or no processor files, or the family is not supported (see the module
            docstring); the message names the path and says what to do.
    """
    path = _local_folder(folder)
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ModelError(f"hf-vlm: dtype {dtype!r} is not a torch dtype (e.g. float32).")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False
        )
    except Exception as err:  # noqa: BLE001 - any loader failure becomes one clear message
        raise ModelError(
            f"Could not read {str(path / 'config.json')!r} ({_first_line(err)}). {_SAVE_HINT}."
        ) from err
    auto_cls = _auto_model_class()
    _check_family(path, config, auto_cls)
    processor = _load_processor(path)
    side = _probe(path, processor, str(config.model_type))
    try:
        model = auto_cls.from_pretrained(
            str(path), config=config, dtype=torch_dtype, local_files_only=True
        )
    except Exception as err:  # noqa: BLE001 - any loader failure becomes one clear message
        raise ModelError(
            f"Could not load the model weights in {str(path)!r} ({_first_line(err)}). {_SAVE_HINT}."
        ) from err
    wrapped = HFVisionLanguageModel(model, processor, source=str(path), image_side=side)
    wrapped = wrapped.to(device)
    _check_normalisation(wrapped)
    return wrapped


__all__ = [
    "DEFAULT_PLAIN_FORMAT",
    "MODEL_INPUTS",
    "PLAIN_FORMATS",
    "HFVisionLanguageModel",
    "build_hf_vlm",
    "plain_prompt",
]
