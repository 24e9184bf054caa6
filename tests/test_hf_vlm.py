"""``hf-vlm:``: a tiny random LLaVA (CLIP vision tower + Llama text model) saved locally.

The tokenizer is a WordLevel ``tokenizers`` model over a small vocabulary (with ``<image>``),
the image processor the PIL ``CLIPImageProcessor`` (no torchvision), the chat template a
LLaVA-1.5-like ``USER: <image> ... ASSISTANT:``. The model is built and saved once per module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers  # a core dependency: missing is a failure, not a skip

from mmsafe.models import ModelError, create_model
from mmsafe.models.hf_vlm import HFVisionLanguageModel, plain_prompt

SIDE, PATCH = 30, 10
_PLAIN_WORDS = (
    "a an the what is this image picture colour red green blue shape circle square triangle "
    "yes no describe how many of in on and i see it small big USER ASSISTANT : ? . , please "
    "tell me about say hello world sure here"
)
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", *_PLAIN_WORDS.split()]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'].upper() }} : "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )


def _processor(chat: bool = True) -> transformers.LlavaProcessor:
    image_processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE}
    )
    return transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=_tokenizer(),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=TEMPLATE if chat else None,
    )


def _llava() -> transformers.LlavaForConditionalGeneration:
    vision = transformers.CLIPVisionConfig(
        image_size=SIDE,
        patch_size=PATCH,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    text = transformers.LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=WORDS.index("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # a sharper output distribution than the random init's
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llava-tiny")
    _llava().save_pretrained(path)
    _processor().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vlm(folder: Path) -> HFVisionLanguageModel:
    model = create_model("hf-vlm:" + str(folder))
    assert isinstance(model, HFVisionLanguageModel)
    return model


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(n)]


# --------------------------------------------------------------------------- protocol


def test_kind_name_size_and_config(vlm: HFVisionLanguageModel, folder: Path) -> None:
    assert vlm.kind == "vlm"
    assert vlm.name == f"hf-vlm:{folder.name}"
    assert vlm.input_size == SIDE
    cfg = vlm.config()
    json.dumps(cfg)
    assert cfg["model_type"] == "llava" and cfg["source"] == str(folder.resolve())
    assert cfg["text"] == {"hidden_size": 32, "layers": 2, "vocab_size": len(WORDS)}
    assert cfg["vision"]["hidden_size"] == 32 and cfg["prompt_format"] == "chat_template"
    assert vlm.capabilities() == {"vocabulary", "suffix_gradients"}
    pixels = vlm.preprocess_images([np.zeros((40, 50, 3), np.uint8)] + _images(1))
    assert pixels.shape == (2, 3, SIDE, SIDE) and 0 <= float(pixels.min()) <= 1


def test_normalisation_matches_the_processor(vlm: HFVisionLanguageModel) -> None:
    image = _images(1, seed=3)[0]
    theirs = vlm.processor(images=[image], text=["<image>"], return_tensors="pt")["pixel_values"]
    ours = vlm.normalize(vlm.preprocess_images([image]))
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=0)


def test_prompt_format() -> None:
    assert plain_prompt("llava", "<image>", "hi") == "USER: <image>\nhi ASSISTANT:"


# --------------------------------------------------------------------------- generate


def test_generate_greedy_matches_transformers(vlm: HFVisionLanguageModel) -> None:
    image = _images(1, seed=5)
    prompt = "what is this image ?"
    ours = vlm.generate(vlm.preprocess_images(image), [prompt], max_new_tokens=6)
    text = vlm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
        add_generation_prompt=True,
    )
    enc = vlm.processor(text=[text], images=image, return_tensors="pt", add_special_tokens=False)
    out = vlm.model.generate(**enc, max_new_tokens=6, do_sample=False, eos_token_id=2)
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    new = new[: new.index(2)] if 2 in new else new
    assert ours == [vlm.tokenizer.decode(new, skip_special_tokens=True).strip()]
    assert ours[0]  # the sharpened random model says something


def test_generate_is_per_row(vlm: HFVisionLanguageModel) -> None:
    pixels = vlm.preprocess_images(_images(3, seed=1))
    prompts = ["what is this ?", "describe the picture please", "how many ?"]
    kw = {"max_new_tokens": 4, "temperature": 1.0}
    batch = vlm.generate(pixels, prompts, seeds=[7, 8, 9], **kw)
    assert len(batch) == 3 and all(isinstance(t, str) for t in batch)
    assert batch == vlm.generate(pixels, prompts, seeds=[7, 8, 9], **kw)
    alone = vlm.generate(pixels[1:2], prompts[1:2], seeds=[8], **kw)
    assert alone == batch[1:2]
    mixed = vlm.generate(pixels[[2, 1]], [prompts[2], prompts[1]], seeds=[1, 8], **kw)
    assert mixed[1] == batch[1]
    draws = set(vlm.generate(pixels[[0] * 4], prompts[:1] * 4, seeds=range(4), **kw))
    assert len(draws) > 1  # the seed matters when sampling
    greedy = vlm.generate(pixels[:2], prompts[:2], seeds=[0, 1], max_new_tokens=4)
    assert greedy == vlm.generate(pixels[:2], prompts[:2], seeds=[5, 6], max_new_tokens=4)


# --------------------------------------------------------------------------- log-likelihood


def test_log_likelihood_matches_a_manual_computation(vlm: HFVisionLanguageModel) -> None:
    image = _images(1, seed=2)
    prompt, target = "what colour is it ?", "red circle"
    got = vlm.log_likelihood(vlm.preprocess_images(image), [prompt], [target])
    text = vlm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
        add_generation_prompt=True,
    )
    enc = vlm.processor(text=[text], images=image, return_tensors="pt", add_special_tokens=False)
    target_ids = [WORDS.index("red"), WORDS.index("circle"), WORDS.index("</s>")]
    ids = torch.cat([enc["input_ids"], torch.tensor([target_ids])], dim=1)
    with torch.no_grad():
        logits = vlm.model(input_ids=ids, pixel_values=enc["pixel_values"]).logits[0]
    n = enc["input_ids"].shape[1]
    logp = logits.double().log_softmax(-1)
    want = sum(float(logp[n - 1 + j, t]) for j, t in enumerate(target_ids))
    assert got.shape == (1,)
    assert math.isclose(float(got[0]), want, abs_tol=1e-4)


def test_log_likelihood_has_pixel_gradients(vlm: HFVisionLanguageModel) -> None:
    pixels = vlm.preprocess_images(_images(2, seed=4)).requires_grad_(True)
    ll = vlm.log_likelihood(pixels, ["what is this ?", "say hello"], ["a red square", ""])
    assert ll.shape == (2,) and bool((ll < 0).all())
    ll.sum().backward()
    grad = pixels.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


def test_padding_does_not_change_a_row(vlm: HFVisionLanguageModel) -> None:
    pixels = vlm.preprocess_images(_images(2, seed=6))
    short, long = "what ?", "please tell me about the colour and shape of this small picture"
    alone = vlm.log_likelihood(pixels[:1], [short], ["red"])
    both = vlm.log_likelihood(pixels, [short, long], ["red", "a big blue triangle here"])
    torch.testing.assert_close(both[:1], alone, atol=1e-5, rtol=0)


def test_plain_format_without_a_chat_template(folder: Path, tmp_path: Path) -> None:
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    _processor(chat=False).save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    (tmp_path / "chat_template.json").unlink(missing_ok=True)
    model = create_model("hf-vlm:" + str(tmp_path))
    assert model.config()["prompt_format"] == "USER: {image}\n{prompt} ASSISTANT:"
    assert model.format_prompt("hi") == "USER: <image>\nhi ASSISTANT:"
    pixels = model.preprocess_images(_images(1))
    assert torch.isfinite(model.log_likelihood(pixels, ["what ?"], ["red"])).all()


# --------------------------------------------------------------------------- suffix search


def test_vocabulary_and_suffix_gradients(vlm: HFVisionLanguageModel) -> None:
    vocab = vlm.vocabulary()
    assert vocab[: len(WORDS)] == WORDS
    pixels = vlm.preprocess_images(_images(2, seed=8))
    prompts, targets = ["what is this ?", "describe it"], ["sure", "sure here"]
    suffix = torch.tensor([WORDS.index("please"), WORDS.index("say")])
    loss, grad = vlm.suffix_gradients(pixels, prompts, suffix, targets)
    assert loss.shape == (2,) and grad.shape == (2, len(vocab))
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
    # the same ids through input_ids: the suffix goes before " ASSISTANT :"
    assert vlm._prompt_ids(prompts[0], split=True)[1] == [
        WORDS.index("ASSISTANT"),
        WORDS.index(":"),
    ]
    for r in range(2):
        before, after = vlm._prompt_ids(prompts[r], split=True)
        ids = before + suffix.tolist() + after
        tgt = vlm._target_ids(targets[r])
        with torch.no_grad():
            total, count = vlm._score(vlm.normalize(pixels[r : r + 1]), [(ids, tgt)])
        assert math.isclose(float(loss[r]), -float(total[0]), abs_tol=1e-5)
    # the image token may not be written; the weights collect no gradient
    weight = vlm.model.get_input_embeddings().weight
    with pytest.raises(ModelError, match="image token"):
        vlm.suffix_gradients(pixels, prompts, torch.tensor([WORDS.index("<image>")]), targets)
    assert weight.grad is None


# --------------------------------------------------------------------------- errors


def test_missing_folder_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match="does not exist") as err:
        create_model(f"hf-vlm:{missing}")
    assert str(missing) in str(err.value) and "save_pretrained" in str(err.value)
    with pytest.raises(ModelError, match="checkpoint folder"):
        create_model("hf-vlm:")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json") as err:
        create_model(f"hf-vlm:{tmp_path / 'empty'}")
    assert str(tmp_path / "empty") in str(err.value)


def test_not_an_image_text_to_text_model(tmp_path: Path) -> None:
    cfg = transformers.LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2,
    )  # fmt: skip
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="not an image-text-to-text model") as err:
        create_model(f"hf-vlm:{tmp_path}")
    assert str(tmp_path) in str(err.value)


def test_missing_processor_files(folder: Path, tmp_path: Path) -> None:
    for name in ("config.json", "generation_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(ModelError, match="processor.save_pretrained") as err:
        create_model(f"hf-vlm:{tmp_path}")
    assert str(tmp_path) in str(err.value)
