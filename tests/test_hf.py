"""The hf: adapter on tiny random CLIP / SigLIP checkpoints written to tmp_path (no network).

SigLIP's real tokenizer is SentencePiece (needs a spiece.model file and the sentencepiece
package); the tiny SigLIP checkpoint here ships the same tiny byte-level CLIP tokenizer instead,
which AutoTokenizer picks up from tokenizer_config.json. What is tested for SigLIP is therefore
the model side (max-length padding, no attention mask, logit bias), not its tokenizer.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from mmsafe.models.base import ModelError, create_model, list_models
from mmsafe.models.hf import (
    CLIP_MEAN,
    SIGLIP_MEAN,
    HFClip,
    build_hf,
    hub_offline,
    looks_like_hub_id,
    normalisation_constants,
)

HIDDEN, LAYERS, IMAGE, PATCH, MAXLEN = 32, 2, 32, 8, 16
TEXTS = ["a photo of a cat.", "a dog", "an image of a very long sentence " * 4, ""]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def tiny_tokenizer() -> transformers.CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer: the 256 byte symbols (+ word-final forms), a few merges."""
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


def save_tiny(path: Path, kind: str = "clip", seed: int = 0, preprocessor: bool = False) -> Path:
    """A randomly initialised tiny CLIP or SigLIP checkpoint + tokenizer saved to ``path``."""
    tok = tiny_tokenizer()
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
    tok.save_pretrained(path)
    if preprocessor:
        (path / "preprocessor_config.json").write_text(
            '{"image_mean": [0.25, 0.5, 0.75], "image_std": [0.2, 0.3, 0.4]}'
        )
    return path


def images(n: int, size: int = 40, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("clip"), "clip")


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("siglip"), "siglip")


def reference(
    path: Path, kind: str
) -> tuple[torch.nn.Module, transformers.PreTrainedTokenizerBase]:
    cls = transformers.CLIPModel if kind == "clip" else transformers.SiglipModel
    return cls.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path)


def test_registered() -> None:
    assert "hf:" in list_models()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_round_trip_matches_transformers(kind: str, clip_dir: Path, siglip_dir: Path) -> None:
    path = clip_dir if kind == "clip" else siglip_dir
    model = create_model("hf:" + str(path))
    assert isinstance(model, HFClip) and model.model_type == kind and model.kind == "encoder"
    imgs = images(3)
    batch = {"image": model.preprocess("image", imgs), "text": model.preprocess("text", TEXTS)}
    assert batch["image"].shape == (3, 3, IMAGE, IMAGE)
    assert batch["image"].min() >= 0 and batch["image"].max() <= 1
    with torch.no_grad():
        emb = model.encode(batch)
    dim = 24 if kind == "clip" else HIDDEN
    assert model.embed_dim == dim
    assert emb["image"].shape == (3, dim) and emb["text"].shape == (len(TEXTS), dim)
    for e in emb.values():
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(len(e)), atol=1e-5, rtol=0)

    # The reference: transformers itself, with the documented pre-processing done by hand.
    ref, tok = reference(path, kind)
    mean, std = (
        (CLIP_MEAN, (0.26862954, 0.26130258, 0.27577711))
        if kind == "clip"
        else (
            SIGLIP_MEAN,
            (0.5, 0.5, 0.5),
        )
    )
    pixels = torch.stack(
        [
            torch.nn.functional.interpolate(
                torch.from_numpy(i).permute(2, 0, 1)[None].float() / 255,
                size=(IMAGE, IMAGE),
                mode="bilinear",
                antialias=True,
            )[0]
            for i in imgs
        ]
    )
    pixels = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    if kind == "clip":
        enc = tok(TEXTS, padding=True, truncation=True, max_length=MAXLEN, return_tensors="pt")
        text_kw = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    else:  # SigLIP: max-length padding, no attention mask
        enc = tok(
            TEXTS, padding="max_length", truncation=True, max_length=MAXLEN, return_tensors="pt"
        )
        text_kw = {"input_ids": enc["input_ids"]}
    with torch.no_grad():
        ref_img = ref.get_image_features(pixel_values=pixels).pooler_output
        ref_txt = ref.get_text_features(**text_kw).pooler_output
    torch.testing.assert_close(
        emb["image"], torch.nn.functional.normalize(ref_img, dim=-1), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        emb["text"], torch.nn.functional.normalize(ref_txt, dim=-1), atol=1e-5, rtol=0
    )
    assert model.logit_scale == pytest.approx(12.5, rel=1e-5)
    assert model.logit_bias == (pytest.approx(-3.25) if kind == "siglip" else 0.0)

    # The full model's logits agree with scale * cos + bias from our embeddings.
    with torch.no_grad():
        out = ref(pixel_values=pixels, **text_kw)
    ours = model.logit_scale * emb["image"] @ emb["text"].T + model.logit_bias
    torch.testing.assert_close(ours, out.logits_per_image, atol=1e-4, rtol=1e-5)


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
            hs = model.hidden_states("image", model.preprocess("image", images(2)))
            ht = model.hidden_states("text", model.preprocess("text", ["a cat", "a dog"]))
        assert len(hs) == len(ht) == LAYERS + 1
        tokens = (IMAGE // PATCH) ** 2 + (1 if model.model_type == "clip" else 0)  # + CLS for CLIP
        assert all(h.shape == (2, tokens, HIDDEN) for h in hs)
        assert all(h.shape[0] == 2 and h.shape[-1] == HIDDEN for h in ht)
        assert not torch.equal(hs[0], hs[-1])


def test_preprocessor_config_overrides_constants(tmp_path: Path) -> None:
    model = build_hf(str(save_tiny(tmp_path / "m", "clip", preprocessor=True)))
    assert model.config()["image_mean"] == [0.25, 0.5, 0.75]
    assert model.config()["image_std"] == [0.2, 0.3, 0.4]
    assert normalisation_constants("clip", None)[0] == CLIP_MEAN


def test_config_is_json(clip_dir: Path) -> None:
    import json

    cfg = build_hf(str(clip_dir)).config()
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg["model_type"] == "clip" and cfg["source"] == str(clip_dir.resolve())
    assert cfg["embed_dim"] == 24 and cfg["image_size"] == IMAGE and cfg["max_length"] == MAXLEN
    assert cfg["vision"]["layers"] == LAYERS


def test_fingerprint_stable_and_weight_sensitive(tmp_path: Path) -> None:
    path = save_tiny(tmp_path / "m", "clip")
    a, b = build_hf(str(path)), build_hf(str(path))
    assert a.fingerprint() == b.fingerprint()
    weights = load_file(str(path / "model.safetensors"))
    key = next(k for k in sorted(weights) if k.endswith("visual_projection.weight"))
    weights[key] = weights[key] + 1e-3
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    c = build_hf(str(path))
    assert c.fingerprint() != a.fingerprint()


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


def test_dir_without_weights(tmp_path: Path) -> None:
    path = save_tiny(tmp_path / "m", "clip")
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="Could not load") as info:
        build_hf(str(path))
    assert "model.safetensors" in str(info.value)


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
