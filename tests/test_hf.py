"""The hf: adapter on tiny CLIP / SigLIP checkpoints written to tmp_path the way the hub has them.

Every checkpoint is real, only tiny: a randomly initialised ``CLIPModel`` / ``SiglipModel`` saved
with ``save_pretrained`` (safetensors), a real tokenizer (CLIP: byte-level BPE trained here with
``tokenizers`` and wrapped in ``CLIPTokenizer``; SigLIP: a SentencePiece model trained here,
wrapped in ``SiglipTokenizer``) and image processor settings that differ from CLIP's defaults
(size, crop, resample filter, mean and std), so that reading them wrongly fails a test.

Two layouts: ``hub`` is what hub checkpoints ship (``preprocessor_config.json``,
``special_tokens_map.json``, CLIP's ``vocab.json`` / ``merges.txt`` beside ``tokenizer.json``);
``processor`` is what transformers 5's ``Processor.save_pretrained`` writes
(``processor_config.json`` with an ``image_processor`` entry, no ``special_tokens_map.json``).
No network: HF_HUB_OFFLINE is set for every test.
"""

from __future__ import annotations

import inspect
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

from mmsafe.models.base import ModelError, create_model, list_models
from mmsafe.models.hf import (
    CLIP_MEAN,
    CLIP_STD,
    PREPROCESSOR_FILE,
    PROCESSOR_FILE,
    HFClip,
    build_hf,
    default_preprocessor_config,
    hub_offline,
    looks_like_hub_id,
)

HIDDEN, LAYERS, IMAGE, PATCH, MAXLEN = 32, 2, 32, 8, 16
TEXTS = ["a photo of a cat.", "a dog", "an image of a very long sentence " * 4, ""]
CORPUS = [
    "a photo of a cat.",
    "a photo of a dog on the grass",
    "a dog",
    "an image of a very long sentence",
    "a red square and a blue circle",
    "the cat sat on the mat",
] * 8

# Image settings unlike CLIP's defaults (bicubic, 224, OpenAI mean/std) and unlike SigLIP's.
CLIP_PIPELINE = {
    "size": {"shortest_edge": 40},
    "crop_size": {"height": IMAGE, "width": IMAGE},
    "resample": 0,  # nearest
    "image_mean": [0.25, 0.5, 0.75],
    "image_std": [0.2, 0.3, 0.4],
}
SIGLIP_PIPELINE = {
    "size": {"height": IMAGE, "width": IMAGE},
    "resample": 2,  # bilinear
    "image_mean": [0.4, 0.45, 0.5],
    "image_std": [0.25, 0.3, 0.35],
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def clip_tokenizer() -> transformers.CLIPTokenizer:
    """A byte-level BPE trained on CORPUS with CLIP's normaliser and pre-tokeniser."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    special = ["<|startoftext|>", "<|endoftext|>"]
    tok = Tokenizer(BPE(unk_token=special[1], end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    words = (  # CLIP's word pattern
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
        r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(words), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    assert merges, "the BPE learned no merges"
    return transformers.CLIPTokenizer(vocab=model["vocab"], merges=merges, model_max_length=MAXLEN)


def siglip_tokenizer(folder: Path) -> transformers.SiglipTokenizer:
    """A SentencePiece unigram model trained on CORPUS, as SigLIP's spiece.model."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=buf,
        vocab_size=48,
        model_type="unigram",
        hard_vocab_limit=False,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    return transformers.SiglipTokenizer(
        vocab_file=str(folder / "spiece.model"), model_max_length=MAXLEN
    )


def image_processor(kind: str, pipeline: dict[str, Any] | None = None) -> Any:
    cls = (
        transformers.CLIPImageProcessorPil
        if kind == "clip"
        else transformers.SiglipImageProcessorPil
    )
    return cls(**(pipeline or (CLIP_PIPELINE if kind == "clip" else SIGLIP_PIPELINE)))


def save_checkpoint(path: Path, kind: str = "clip", layout: str = "hub", seed: int = 0) -> Path:
    """A tiny random CLIP or SigLIP checkpoint with a real tokenizer and image processor."""
    tok = clip_tokenizer() if kind == "clip" else siglip_tokenizer(path.parent / f"spm-{path.name}")
    text = {
        "vocab_size": len(tok),
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "max_position_embeddings": MAXLEN,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    vision = {
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "image_size": IMAGE,
        "patch_size": PATCH,
    }
    torch.manual_seed(seed)
    if kind == "clip":
        config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
        model = transformers.CLIPModel(config)
    else:
        config = transformers.SiglipConfig(text_config=text, vision_config=vision)
        model = transformers.SiglipModel(config)
    with torch.no_grad():  # distinctive values, so a wrong read of either is caught
        model.logit_scale.fill_(math.log(12.5))
        if kind == "siglip":
            model.logit_bias.fill_(-3.25)
    model.save_pretrained(path)
    images = image_processor(kind)
    if layout == "processor":
        cls = transformers.CLIPProcessor if kind == "clip" else transformers.SiglipProcessor
        cls(image_processor=images, tokenizer=tok).save_pretrained(path)
    else:
        images.save_pretrained(path)  # preprocessor_config.json
        tok.save_pretrained(path)
        (path / "special_tokens_map.json").write_text(json.dumps(tok.special_tokens_map))
        if kind == "clip":  # the hub's CLIP checkpoints ship the BPE files beside tokenizer.json
            tok.backend_tokenizer.model.save(str(path))
    return path


def save_tiny(path: Path, kind: str = "clip", seed: int = 0) -> Path:
    """A tiny checkpoint in the hub layout (for the other test modules that need one)."""
    return save_checkpoint(path, kind, "hub", seed)


def tiny_tokenizer() -> transformers.CLIPTokenizer:
    """A hand-built byte-level CLIP tokenizer: the 256 byte symbols (+ word-final forms), a few
    merges. For test modules that build their own random CLIP (no training needed)."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = [("p", "h"), ("o", "t</w>"), ("c", "a"), ("ca", "t</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAXLEN)


def images(shapes: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


SHAPES = [(40, 56), (64, 48), (32, 32)]  # landscape, portrait, already the input size


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        (kind, layout): save_checkpoint(root / f"{kind}-{layout}", kind, layout)
        for kind in ("clip", "siglip")
        for layout in ("hub", "processor")
    }


@pytest.fixture(scope="module")
def clip_dir(checkpoints: dict[tuple[str, str], Path]) -> Path:
    return checkpoints["clip", "hub"]


@pytest.fixture(scope="module")
def siglip_dir(checkpoints: dict[tuple[str, str], Path]) -> Path:
    return checkpoints["siglip", "hub"]


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def reference_embeddings(
    path: Path, kind: str, imgs: list[np.ndarray], texts: list[str], processor: Any = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """transformers alone: the saved processor, get_image_features / get_text_features."""
    if kind == "clip":
        model = transformers.CLIPModel.from_pretrained(path).eval()
        proc = processor or transformers.CLIPProcessor.from_pretrained(path)
        enc = proc(
            text=texts,
            images=[Image.fromarray(i) for i in imgs],
            padding=True,
            truncation=True,
            max_length=MAXLEN,
            return_tensors="pt",
        )
        text_kw = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    else:  # SigLIP: max-length padding, no attention mask (as in the model card)
        model = transformers.SiglipModel.from_pretrained(path).eval()
        proc = processor or transformers.SiglipProcessor.from_pretrained(path)
        enc = proc(
            text=texts,
            images=[Image.fromarray(i) for i in imgs],
            padding="max_length",
            truncation=True,
            max_length=MAXLEN,
            return_tensors="pt",
        )
        text_kw = {"input_ids": enc["input_ids"]}
    with torch.no_grad():
        img = model.get_image_features(pixel_values=enc["pixel_values"]).pooler_output
        txt = model.get_text_features(**text_kw).pooler_output
        logits = model(pixel_values=enc["pixel_values"], **text_kw).logits_per_image
    norm = torch.nn.functional.normalize
    return norm(img, dim=-1), norm(txt, dim=-1), logits, text_kw


def test_registered() -> None:
    assert "hf:" in list_models()


HUB_FILES = {
    "clip": {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"},
    "siglip": {"spiece.model", "tokenizer_config.json"},
}


@pytest.mark.parametrize("layout", ["hub", "processor"])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_round_trip_matches_transformers(
    kind: str, layout: str, checkpoints: dict[tuple[str, str], Path]
) -> None:
    path = checkpoints[kind, layout]
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= files
    assert ("tokenizer.json" if kind == "clip" else "spiece.model") in files
    assert "pytorch_model.bin" not in files
    if layout == "hub":
        assert {PREPROCESSOR_FILE, "special_tokens_map.json"} | HUB_FILES[kind] <= files
        assert PROCESSOR_FILE not in files
    else:
        assert PROCESSOR_FILE in files and PREPROCESSOR_FILE not in files

    model = create_model("hf:" + str(path))
    assert isinstance(model, HFClip) and model.model_type == kind and model.kind == "encoder"
    tok_cls = transformers.CLIPTokenizer if kind == "clip" else transformers.SiglipTokenizer
    assert isinstance(model.tokenizer, tok_cls)
    # input_size is the config's image size, and preprocess makes exactly that.
    assert model.input_size == IMAGE == model.model.config.vision_config.image_size
    imgs = images(SHAPES)
    batch = {"image": model.preprocess("image", imgs), "text": model.preprocess("text", TEXTS)}
    assert batch["image"].shape == (len(imgs), 3, IMAGE, IMAGE)
    assert batch["image"].min() >= 0 and batch["image"].max() <= 1
    with torch.no_grad():
        emb = model.encode(batch)
    dim = 24 if kind == "clip" else HIDDEN
    assert model.embed_dim == dim
    assert emb["image"].shape == (len(imgs), dim) and emb["text"].shape == (len(TEXTS), dim)

    ref_img, ref_txt, ref_logits, text_kw = reference_embeddings(path, kind, imgs, TEXTS)
    assert torch.equal(batch["text"]["input_ids"], text_kw["input_ids"])  # same tokens
    torch.testing.assert_close(emb["image"], ref_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(emb["text"], ref_txt, atol=1e-5, rtol=0)
    assert model.logit_scale == pytest.approx(12.5, rel=1e-5)
    assert model.logit_bias == (pytest.approx(-3.25) if kind == "siglip" else 0.0)
    ours = model.logit_scale * emb["image"] @ emb["text"].T + model.logit_bias
    torch.testing.assert_close(ours, ref_logits, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_the_checkpoints_own_image_settings_are_used(
    kind: str, checkpoints: dict[tuple[str, str], Path]
) -> None:
    path = checkpoints[kind, "hub"]
    model = build_hf(str(path))
    want = CLIP_PIPELINE if kind == "clip" else SIGLIP_PIPELINE
    assert model.image_mean == pytest.approx(tuple(want["image_mean"]))
    assert model.image_std == pytest.approx(tuple(want["image_std"]))
    described = model.config()["preprocessing"]
    assert described["source"] == PREPROCESSOR_FILE
    assert described["resample"] == ("nearest" if kind == "clip" else "bilinear")
    assert described["center_crop"] is (kind == "clip")
    assert described["resize"] == want["size"] and described["side"] == IMAGE

    # The same checkpoint read with the standard pipeline instead gives other pixels and other
    # embeddings: the round-trip test above would fail if the file's settings were ignored.
    imgs = images(SHAPES)
    standard = image_processor(kind, default_preprocessor_config(kind, IMAGE))
    ours, _, _, _ = reference_embeddings(path, kind, imgs, ["a"])
    theirs, _, _, _ = reference_embeddings(
        path, kind, imgs, ["a"], processor=_processor(path, kind, standard)
    )
    with torch.no_grad():
        emb = model.encode({"image": model.preprocess("image", imgs)})["image"]
    torch.testing.assert_close(emb, ours, atol=1e-5, rtol=0)
    assert (emb - theirs).abs().max() > 1e-2


def _processor(path: Path, kind: str, images_proc: Any) -> Any:
    cls = transformers.CLIPProcessor if kind == "clip" else transformers.SiglipProcessor
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return cls(image_processor=images_proc, tokenizer=tok)


def test_processor_config_entry_wins_over_preprocessor_config(
    clip_dir: Path, tmp_path: Path
) -> None:
    """transformers 5 reads processor_config.json's image_processor first; so does hf:."""
    path = copy_checkpoint(clip_dir, tmp_path / "both")
    nested = {**json.loads((path / PREPROCESSOR_FILE).read_text()), "image_mean": [0.1, 0.2, 0.3]}
    (path / PROCESSOR_FILE).write_text(json.dumps({"image_processor": nested}))
    model = build_hf(str(path))
    assert model.image_mean == pytest.approx((0.1, 0.2, 0.3))
    assert model.config()["preprocessing"]["source"] == PROCESSOR_FILE
    theirs = transformers.AutoImageProcessor.from_pretrained(path)
    assert tuple(theirs.image_mean) == pytest.approx(model.image_mean)


def test_openai_style_legacy_preprocessor_config(clip_dir: Path, tmp_path: Path) -> None:
    """The file of openai/clip-vit-base-patch32: integer sizes, CLIPFeatureExtractor."""
    path = copy_checkpoint(clip_dir, tmp_path / "legacy")
    legacy = {
        "crop_size": IMAGE,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "resample": 3,
        "size": 48,
    }
    (path / PREPROCESSOR_FILE).write_text(json.dumps(legacy))
    model = build_hf(str(path))
    assert model.config()["preprocessing"]["resize"] == {"shortest_edge": 48}
    imgs = images(SHAPES, seed=1)
    ref_img, _, _, _ = reference_embeddings(path, "clip", imgs, ["a"])
    with torch.no_grad():
        emb = model.encode({"image": model.preprocess("image", imgs)})["image"]
    torch.testing.assert_close(emb, ref_img, atol=1e-5, rtol=0)


def test_normalisation_and_rescaling_off(clip_dir: Path, tmp_path: Path) -> None:
    """do_normalize / do_rescale false: the model sees what the processor gives it."""
    path = copy_checkpoint(clip_dir, tmp_path / "raw")
    settings = {**CLIP_PIPELINE, "do_normalize": False, "do_rescale": False}
    del settings["image_mean"], settings["image_std"]  # not needed without normalisation
    (path / PREPROCESSOR_FILE).write_text(json.dumps(settings))
    model = build_hf(str(path))
    assert model.image_mean == (0.0, 0.0, 0.0) and model.image_std == (1.0, 1.0, 1.0)
    assert model.pixel_scale == 255.0
    imgs = images(SHAPES, seed=2)
    ref_img, _, _, _ = reference_embeddings(path, "clip", imgs, ["a"])
    with torch.no_grad():
        emb = model.encode({"image": model.preprocess("image", imgs)})["image"]
    torch.testing.assert_close(emb, ref_img, atol=1e-5, rtol=0)


def test_clip_tokenizer_from_vocab_and_merges_alone(clip_dir: Path, tmp_path: Path) -> None:
    """Older hub checkpoints have vocab.json + merges.txt but no tokenizer.json."""
    path = copy_checkpoint(clip_dir, tmp_path / "bpe-files")
    (path / "tokenizer.json").unlink()
    a, b = build_hf(str(clip_dir)), build_hf(str(path))
    ids_a, ids_b = a.preprocess("text", TEXTS), b.preprocess("text", TEXTS)
    assert torch.equal(ids_a["input_ids"], ids_b["input_ids"])
    assert len(set(ids_a["input_ids"][0].tolist())) > 4  # real sub-words, not all <unk>


def test_siglip_tokenizer_without_protobuf_says_what_to_install(
    siglip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers' SiglipTokenizer needs protobuf; a core install must say so, not crash."""
    from transformers.utils import import_utils

    _, message = import_utils.BACKENDS_MAPPING["protobuf"]
    monkeypatch.setitem(import_utils.BACKENDS_MAPPING, "protobuf", (lambda: False, message))
    with pytest.raises(ModelError, match="pip install sentencepiece protobuf") as info:
        build_hf(str(siglip_dir))
    assert "protobuf" in str(info.value).split("(")[1]  # transformers' own reason is kept


# --------------------------------------------------------------------------- missing / bad files


def test_missing_preprocessor_config_is_an_error(clip_dir: Path, tmp_path: Path) -> None:
    path = copy_checkpoint(clip_dir, tmp_path / "no-preprocessor")
    (path / PREPROCESSOR_FILE).unlink()
    with pytest.raises(ModelError) as info:
        create_model(f"hf:{path}")
    message = str(info.value)
    assert f"{path} has no {PREPROCESSOR_FILE}" in message
    assert "default_preprocessing=True" in message and "hf download" in message
    # The message gives the file to write for the standard pipeline; writing it works.
    standard = json.dumps(default_preprocessor_config("clip", IMAGE))
    assert standard in message
    (path / PREPROCESSOR_FILE).write_text(standard)
    written = build_hf(str(path))
    (path / PREPROCESSOR_FILE).unlink()
    opted = build_hf(str(path), default_preprocessing=True)
    assert opted.config()["preprocessing"]["source"] == "default"
    assert written.config()["preprocessing"]["source"] == PREPROCESSOR_FILE
    assert opted.image_mean == written.image_mean == pytest.approx(CLIP_MEAN)
    assert opted.config()["preprocessing"]["resample"] == "bicubic"
    imgs = images(SHAPES)
    assert torch.equal(opted.preprocess("image", imgs), written.preprocess("image", imgs))


def test_siglip_missing_preprocessor_config_suggests_siglip_defaults(
    siglip_dir: Path, tmp_path: Path
) -> None:
    path = copy_checkpoint(siglip_dir, tmp_path / "no-preprocessor")
    (path / PREPROCESSOR_FILE).unlink()
    with pytest.raises(ModelError, match="standard SigLIP preprocessing") as info:
        build_hf(str(path))
    assert json.dumps(default_preprocessor_config("siglip", IMAGE)) in str(info.value)
    model = build_hf(str(path), default_preprocessing=True)
    assert model.image_mean == (0.5, 0.5, 0.5) and model.image_std == (0.5, 0.5, 0.5)


def _settings(**change: Any) -> str:
    data = {"image_processor_type": "CLIPImageProcessor", **CLIP_PIPELINE, **change}
    return json.dumps({k: v for k, v in data.items() if v is not ...})


BAD_FILES = [
    # (file content, the field or words the message must name)
    ('{"image_mean": [0.25, 0.5,', "is not valid JSON (Expecting value at line 1"),
    (b"\xff\xfe{}", "is not UTF-8 text"),
    ("[0.25, 0.5, 0.75]", "must be a JSON object of image processor settings"),
    (_settings(image_mean=...), "has no field image_mean"),
    (_settings(image_std=...), "has no field image_std"),
    (_settings(image_mean=[0.5, 0.5]), "field image_mean is [0.5, 0.5]"),
    (_settings(image_mean=["r", "g", "b"]), "field image_mean"),
    (
        _settings(image_std=[0.2, 0.0, 0.4]),
        "field image_std is [0.2, 0.0, 0.4]; it must be positive",
    ),
    (_settings(resample=7), "field resample is 7"),
    (_settings(resample="bicubic"), 'field resample is "bicubic"'),
    (_settings(rescale_factor=-1), "field rescale_factor is -1"),
    (_settings(do_normalize="yes"), 'field do_normalize is "yes"; it must be true or false'),
    (_settings(do_resize=False), "field do_resize is false"),
    (_settings(size={"longest_edge": 40}), 'field size is {"longest_edge": 40}'),
    (_settings(crop_size={"height": IMAGE, "width": 24}), "field crop_size is 32x24"),
    (_settings(crop_size={"height": 24, "width": 24}), "vision_config.image_size is 32"),
    (_settings(do_center_crop=False), 'field size {"shortest_edge": 40} without a centre crop'),
    (_settings(image_processor_type="ViTImageProcessor"), "field image_processor_type"),
    (
        json.dumps(
            {
                **SIGLIP_PIPELINE,
                "image_processor_type": "SiglipImageProcessor",
                "do_center_crop": True,
            }
        ),  # fmt: skip
        "field do_center_crop is true but there is no crop_size",
    ),
]


@pytest.mark.parametrize(("content", "says"), BAD_FILES)
def test_bad_preprocessor_config_names_file_and_field(
    content: str | bytes, says: str, clip_dir: Path, tmp_path: Path
) -> None:
    path = copy_checkpoint(clip_dir, tmp_path / "bad")
    file = path / PREPROCESSOR_FILE
    file.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ModelError) as info:
        create_model(f"hf:{path}")
    message = str(info.value)
    assert str(file) in message, message
    assert says in message, message


def test_unreadable_preprocessor_config(clip_dir: Path, tmp_path: Path) -> None:
    path = copy_checkpoint(clip_dir, tmp_path / "unreadable")
    (path / PREPROCESSOR_FILE).unlink()
    (path / PREPROCESSOR_FILE).mkdir()  # there, but not a readable file (root reads any mode)
    with pytest.raises(ModelError, match="cannot be read") as info:
        build_hf(str(path))
    assert str(path / PREPROCESSOR_FILE) in str(info.value)


def test_bad_processor_config_entry(clip_dir: Path, tmp_path: Path) -> None:
    path = copy_checkpoint(clip_dir, tmp_path / "nested")
    (path / PROCESSOR_FILE).write_text(json.dumps({"image_processor": ["not", "settings"]}))
    with pytest.raises(ModelError, match="entry image_processor must be a JSON object") as info:
        build_hf(str(path))
    assert str(path / PROCESSOR_FILE) in str(info.value)
    nested = {k: v for k, v in CLIP_PIPELINE.items() if k != "image_std"}
    (path / PROCESSOR_FILE).write_text(json.dumps({"image_processor": nested}))
    with pytest.raises(ModelError, match="entry image_processor has no field image_std"):
        build_hf(str(path))
    (path / PROCESSOR_FILE).write_text("{")
    with pytest.raises(ModelError, match="processor_config.json is not valid JSON"):
        build_hf(str(path))


CLI_CASES = [
    ("missing", f"has no {PREPROCESSOR_FILE}"),
    ("malformed", "is not valid JSON"),
    ("no-std", "has no field image_std"),
]


@pytest.mark.parametrize(("case", "says"), CLI_CASES)
def test_cli_exits_2_naming_the_file(case: str, says: str, clip_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mmsafe.cli import app

    path = copy_checkpoint(clip_dir, tmp_path / "ckpt")
    file = path / PREPROCESSOR_FILE
    if case == "missing":
        file.unlink()
    elif case == "malformed":
        file.write_text('{"image_mean": ')
    else:
        file.write_text(_settings(image_std=...))
    args = ["audit", "--model", f"hf:{path}", "--data", "shapes:n=200", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")])
    output = result.output
    assert result.exit_code == 2, output
    assert "Traceback" not in output and "internal error" not in output
    flat = "".join(output.split())  # rich wraps long lines
    assert "error:" in output and "".join(says.split()) in flat, output
    assert "".join(str(file if case != "missing" else path).split()) in flat, output


# --------------------------------------------------------------------------- weights


def _spy_torch_load(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    real = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


class _Payload:
    """Unpickling this opens (creates) a file: a stand-in for arbitrary code in a .bin."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _bin_only(src: Path, dst: Path, extra: dict[str, Any] | None = None) -> Path:
    """The checkpoint with pytorch_model.bin instead of model.safetensors.

    transformers 5's ``save_pretrained`` writes safetensors only (``safe_serialization`` is
    gone), so the legacy file is written as transformers 4 wrote it: ``torch.save`` of the
    state dict.
    """
    path = copy_checkpoint(src, dst)
    state = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    torch.save({**state, **(extra or {})}, path / "pytorch_model.bin")
    return path


def test_transformers_loads_bin_weights_only_by_default() -> None:
    """Pin what the installed transformers does (checked in its source): weights_only=True."""
    from transformers import modeling_utils

    params = inspect.signature(transformers.PreTrainedModel.from_pretrained).parameters
    assert params["weights_only"].default is True
    assert inspect.signature(modeling_utils.load_state_dict).parameters["weights_only"].default
    source = inspect.getsource(modeling_utils.load_state_dict)
    assert (
        "torch.load(checkpoint_path, map_location=map_location, weights_only=weights_only" in source
    )


def test_bin_checkpoint_loads_weights_only(
    clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _bin_only(clip_dir, tmp_path / "bin")
    calls = _spy_torch_load(monkeypatch)
    model = build_hf(str(path))
    assert calls and all(c.get("weights_only") is True for c in calls), calls
    safe = build_hf(str(clip_dir))
    for (k, a), (_, b) in zip(
        sorted(model.model.state_dict().items()),
        sorted(safe.model.state_dict().items()),
        strict=True,
    ):
        assert torch.equal(a, b), k


def test_bin_with_pickled_object_is_refused(clip_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    path = _bin_only(clip_dir, tmp_path / "evil", extra={"payload": _Payload(marker)})
    with pytest.raises(ModelError, match="pickled objects other than tensors") as info:
        build_hf(str(path))
    assert str(path / "pytorch_model.bin") in str(info.value)
    assert "weights_only=True" in str(info.value)
    assert not marker.exists()  # nothing in the file ran
    # Control: the payload is live, an unrestricted unpickler runs it.
    torch.load(path / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_safetensors_is_preferred_over_a_bin(
    clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "payload-ran"
    path = copy_checkpoint(clip_dir, tmp_path / "both")
    torch.save({"payload": _Payload(marker)}, path / "pytorch_model.bin")
    calls = _spy_torch_load(monkeypatch)
    model = build_hf(str(path))
    assert calls == [] and not marker.exists()  # the .bin was never opened
    with torch.no_grad():
        a = model.encode({"text": model.preprocess("text", TEXTS)})["text"]
        ref = build_hf(str(clip_dir))
        b = ref.encode({"text": ref.preprocess("text", TEXTS)})["text"]
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_dir_without_weights(clip_dir: Path, tmp_path: Path) -> None:
    path = copy_checkpoint(clip_dir, tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="has no weights") as info:
        build_hf(str(path))
    assert str(path) in str(info.value) and "model.safetensors" in str(info.value)


# --------------------------------------------------------------------------- hub cache


def _fake_hub_cache(root: Path, repo: str, checkpoint: Path) -> Path:
    """A Hugging Face cache holding ``repo`` at one revision (files copied, no symlinks)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    shutil.copytree(checkpoint, base / "snapshots" / commit)
    return base / "snapshots" / commit


def test_hub_id_from_the_cache(
    clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    repo = "mmsafe-test-org/tiny-clip"
    snapshot = _fake_hub_cache(tmp_path / "hub", repo, clip_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    model = create_model(f"hf:{repo}")
    assert model.source == repo
    assert model.image_mean == pytest.approx(tuple(CLIP_PIPELINE["image_mean"]))
    local = build_hf(str(clip_dir))
    imgs = images(SHAPES)
    with torch.no_grad():
        a = model.encode({"image": model.preprocess("image", imgs)})["image"]
        b = local.encode({"image": local.preprocess("image", imgs)})["image"]
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    # The cached copy without its preprocessor_config.json: an error, never CLIP's defaults.
    (snapshot / PREPROCESSOR_FILE).unlink()
    with pytest.raises(ModelError, match=f"holds the model but not its {PREPROCESSOR_FILE}"):
        create_model(f"hf:{repo}")


# --------------------------------------------------------------------------- unchanged behaviour


def test_text_preprocessing(clip_dir: Path, siglip_dir: Path) -> None:
    clip, siglip = build_hf(str(clip_dir)), build_hf(str(siglip_dir))
    c = clip.preprocess("text", TEXTS)
    s = siglip.preprocess("text", TEXTS)
    assert set(c) == set(s) == {"input_ids", "attention_mask"}
    assert c["input_ids"].dtype == c["attention_mask"].dtype == torch.long
    assert c["input_ids"].shape[1] == MAXLEN  # the long text is truncated to the max length
    assert s["input_ids"].shape == (len(TEXTS), MAXLEN)  # SigLIP always pads to max length
    short = clip.preprocess("text", ["a", "a cat"])
    assert short["input_ids"].shape[1] < MAXLEN  # CLIP pads to the longest only
    eos = clip.tokenizer.eos_token_id
    # Every row ends its real tokens with EOS (CLIP pools the first EOS), even when truncated.
    for ids, mask in zip(c["input_ids"], c["attention_mask"], strict=True):
        assert ids[int(mask.sum()) - 1] == eos
    # SigLIP ignores the attention mask: changing it does not change the embedding.
    with torch.no_grad():
        a = siglip.encode_modality("text", s)
        b = siglip.encode_modality("text", {**s, "attention_mask": torch.ones_like(s["input_ids"])})
    torch.testing.assert_close(a, b)
    with pytest.raises(ModelError, match="strings"):
        clip.preprocess("text", [1, 2])
    with pytest.raises(ModelError, match="audio"):
        clip.preprocess("audio", ["x"])


def test_empty_batches(clip_dir: Path) -> None:
    model = build_hf(str(clip_dir))
    with torch.no_grad():
        emb = model.encode(
            {"image": model.preprocess("image", []), "text": model.preprocess("text", [])}
        )
    assert emb["image"].shape == (0, 24) and emb["text"].shape == (0, 24)


def test_hidden_states(clip_dir: Path, siglip_dir: Path) -> None:
    for path in (clip_dir, siglip_dir):
        model = build_hf(str(path))
        with torch.no_grad():
            hs = model.hidden_states("image", model.preprocess("image", images([(40, 40)] * 2)))
            ht = model.hidden_states("text", model.preprocess("text", ["a cat", "a dog"]))
        assert len(hs) == len(ht) == LAYERS + 1
        tokens = (IMAGE // PATCH) ** 2 + (1 if model.model_type == "clip" else 0)  # + CLS for CLIP
        assert all(h.shape == (2, tokens, HIDDEN) for h in hs)
        assert all(h.shape[0] == 2 and h.shape[-1] == HIDDEN for h in ht)
        assert not torch.equal(hs[0], hs[-1])


def test_config_is_json(clip_dir: Path) -> None:
    cfg = build_hf(str(clip_dir)).config()
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg["model_type"] == "clip" and cfg["source"] == str(clip_dir.resolve())
    assert cfg["embed_dim"] == 24 and cfg["image_size"] == IMAGE and cfg["max_length"] == MAXLEN
    assert cfg["vision"]["layers"] == LAYERS


def test_fingerprint_stable_and_weight_sensitive(clip_dir: Path, tmp_path: Path) -> None:
    path = copy_checkpoint(clip_dir, tmp_path / "m")
    a, b = build_hf(str(path)), build_hf(str(path))
    assert a.fingerprint() == b.fingerprint()
    weights = load_file(str(path / "model.safetensors"))
    key = next(k for k in sorted(weights) if k.endswith("visual_projection.weight"))
    weights[key] = weights[key] + 1e-3
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    c = build_hf(str(path))
    assert c.fingerprint() != a.fingerprint()
    # The image pipeline is part of the model: another resample filter, another fingerprint.
    settings = json.loads((path / PREPROCESSOR_FILE).read_text())
    (path / PREPROCESSOR_FILE).write_text(json.dumps({**settings, "resample": 2}))
    assert build_hf(str(path)).fingerprint() != c.fingerprint()


def test_nonexistent_path(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelError, match="does not exist") as info:
        create_model(f"hf:{missing}")
    assert str(missing) in str(info.value)
    assert "hf download" in str(info.value)


def test_dir_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        create_model(f"hf:{tmp_path / 'empty'}")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a checkpoint directory"):
        create_model(f"hf:{tmp_path / 'file.bin'}")


def test_unsupported_model_type(tmp_path: Path) -> None:
    path = tmp_path / "bert"
    transformers.BertConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
    ).save_pretrained(path)
    with pytest.raises(ModelError, match="CLIP and SigLIP"):
        build_hf(str(path))


def test_hub_id_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    assert hub_offline()
    with pytest.raises(ModelError) as info:
        create_model("hf:mmsafe-test-org/no-such-clip")
    message = str(info.value)
    assert "network" in message and "HF_HUB_OFFLINE" in message
    assert "hf download mmsafe-test-org/no-such-clip --local-dir" in message


def test_empty_reference() -> None:
    with pytest.raises(ModelError, match="hub id"):
        create_model("hf:")


def test_hub_id_shapes() -> None:
    assert looks_like_hub_id("google/siglip-base-patch16-224")
    assert looks_like_hub_id("bert-base-uncased")
    assert not looks_like_hub_id("../models/clip")
    assert not looks_like_hub_id("C:\\models\\clip")


def test_hub_id_unreachable_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not offline, but the hub cannot be reached: one quick probe, then a clear error."""
    import socket

    import mmsafe.models.hf as hf

    with socket.socket() as s:  # a loopback port that nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    for name in (
        "HTTPS_PROXY",
        "HTTP_PROXY",
        "ALL_PROXY",
        "https_proxy",
        "http_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hf, "_hub_endpoint", lambda: endpoint)
    monkeypatch.chdir(tmp_path)
    assert not hub_offline() and not hf.endpoint_reachable(endpoint, timeout=2.0)
    with pytest.raises(ModelError, match="cannot be reached") as info:
        create_model("hf:mmsafe-test-org/no-such-clip")
    assert endpoint in str(info.value) and "needs network" in str(info.value)
