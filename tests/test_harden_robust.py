"""FARE fine-tuning and WiSE-FT (``mmsafe.harden.robust``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmsafe.harden.robust import fare_finetune, wise_ft
from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig


def _pair() -> tuple[TinyClip, TinyClip]:
    torch.manual_seed(0)
    a = TinyClip(TinyClipConfig.for_size("xs")).eval()
    torch.manual_seed(1)
    b = TinyClip(TinyClipConfig.for_size("xs")).eval()
    return a, b


def test_wise_ft_endpoints_and_midpoint() -> None:
    a, b = _pair()
    sa, sb = a.state_dict(), b.state_dict()
    for alpha, ref in ((0.0, sa), (1.0, sb)):
        got = wise_ft(a, b, alpha).state_dict()
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k]) for k in ref), alpha
    mid = wise_ft(a, b, 0.5).state_dict()
    for k, t in sa.items():
        if t.is_floating_point():
            assert torch.allclose(mid[k], (t + sb[k]) / 2, atol=1e-6), k
    assert all(torch.equal(sa[k], a.state_dict()[k]) for k in sa)  # inputs untouched


def test_wise_ft_rejects_mismatched_models() -> None:
    a, _ = _pair()
    with pytest.raises(ValueError, match="architectures"):
        wise_ft(a, TinyClip(TinyClipConfig.for_size("s")), 0.5)
    with pytest.raises(ValueError, match="classes"):
        wise_ft(a, torch.nn.Linear(2, 2), 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        wise_ft(torch.nn.Linear(2, 2), torch.nn.Linear(3, 2), 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha"):
        wise_ft(a, a, 1.5)


def test_fare_trains_only_the_image_tower_and_leaves_the_original() -> None:
    a, _ = _pair()
    before = {k: v.clone() for k, v in a.state_dict().items()}
    x = torch.rand(16, 3, a.cfg.image_size, a.cfg.image_size)
    f = fare_finetune(a, x, steps=2, batch_size=8, lr=1e-3)
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())
    sf = f.state_dict()
    for k, v in before.items():
        if not k.startswith("image."):
            assert torch.equal(sf[k], v), k
    assert any(not torch.equal(sf[k], v) for k, v in before.items() if k.startswith("image."))
    assert f.fingerprint() != a.fingerprint()
    assert f.training_info["fare"]["optimizer_steps"] == 2


def test_harden_adversarial_raises_robust_accuracy_and_saves_a_loadable_model(
    shapes_quick, tmp_path
) -> None:
    """FARE + WiSE-FT + re-audit on the quick tiny-clip (zero-shot, PGD L-inf 2/255).

    Measured with FARE alone (all labelled test rows, seed 0, PGD 5 steps; training eps 4/255,
    3 steps, lr 1e-4, batch 64): original clean 0.667 / robust 0.210. FARE 1 epoch: 0.660 /
    0.198 (no gain: only 5 optimiser steps); 5 epochs: 0.667 / 0.216; 10 epochs: 0.654 / 0.253;
    20 epochs: 0.642 / 0.278. lr 1e-3 destroys the model (clean 0.33). So the hardener defaults
    to 10 epochs (about 50 optimiser steps). With the full flow (10 PGD steps, sweep alphas
    0/.25/.5/.75/1 on the calibration rows): alpha 0.5 chosen, test robust 0.179 -> 0.216,
    clean 0.667 -> 0.660.
    """
    from mmsafe.engine import Engine
    from mmsafe.harden.flow import harden
    from mmsafe.harden.robust import AdversarialHardener
    from mmsafe.models.loading import load_model

    world, model = shapes_quick
    out = tmp_path / "hardened"
    hardener = AdversarialHardener(alphas=(0.0, 0.5, 1.0), eval_steps=5)
    result = harden(hardener, model, world, out=out, engine=Engine(progress=False))
    deltas = {d.metric: d for d in result.deltas}
    robust = deltas["robustness.adversarial.linf/pgd/eps=0.007843/robust_accuracy"]
    clean = deltas["performance.classification.accuracy"]
    # The sweep keeps the most robust alpha whose clean accuracy on the calibration rows holds
    # (choose_alpha). Whether FARE's clean cost fits that budget depends on the machine's
    # floating point over 50 optimiser steps: on one 2-core machine alpha 0.5 was chosen and the
    # test rows' robust accuracy went 0.179 -> 0.216; on an AVX2-only one FARE cost too much
    # clean accuracy and alpha 0 (the original) was kept, 0.191 -> 0.191. Either way the
    # hardened model is never less robust, and it gains whenever an alpha > 0 is chosen.
    if result.summary["alpha"] > 0:
        assert robust.after > robust.before, (robust, result.summary)
    else:
        assert robust.after == robust.before, (robust, result.summary)
    assert clean.before - clean.after <= 0.05, clean
    sweep = json.loads((out / "wise_ft_sweep.json").read_text())
    assert [p["alpha"] for p in sweep["sweep"]] == [0.0, 0.5, 1.0]
    assert sweep["chosen_alpha"] == result.summary["alpha"]
    # alpha = 1 is FARE itself: more robust on the calibration rows than the original
    assert sweep["sweep"][-1]["robust"] > sweep["sweep"][0]["robust"]
    loaded = load_model(f"tiny-clip:{result.artifact}")
    assert loaded.fingerprint() == result.after.card["model"]["fingerprint"]
    # a new model exactly when WiSE-FT moved away from the original (alpha 0 is the original)
    assert (loaded.fingerprint() != model.fingerprint()) == (result.summary["alpha"] > 0)


def test_harden_adversarial_cli_errors_cleanly(tmp_path) -> None:
    from typer.testing import CliRunner

    from mmsafe.cli import app

    res = CliRunner().invoke(
        app, ["harden", "adversarial", "--model", f"tiny-clip:{tmp_path}", "--out", str(tmp_path)]
    )
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "is not a saved tiny-clip" in text and "Traceback" not in text


def _attacked(model, data, eps: float = 2 / 255, steps: int = 5):
    """Per labelled row of ``data`` (zero-shot): robust correctness under PGD L-inf ``eps`` and
    how much the attack lowers the margin (true-class logit minus the best other)."""
    from mmsafe.engine import Engine
    from mmsafe.methods.attacks.pixel import pgd, pixel_forward
    from mmsafe.tasks import create_task

    task = create_task("zero_shot")
    task.prepare(model, Engine(progress=False), data.classes)
    rows = np.flatnonzero(np.asarray(data.labels) >= 0)
    x = model.preprocess("image", [data.modalities["image"][i] for i in rows])
    y = torch.as_tensor(np.asarray(data.labels)[rows], dtype=torch.long)
    forward = pixel_forward(model.eval(), task)
    adv = pgd(forward, x, y, eps, "linf", steps=steps, generator=torch.Generator().manual_seed(0))

    def margin(logits: torch.Tensor) -> torch.Tensor:
        true = logits.gather(1, y[:, None])[:, 0]
        return true - logits.scatter(1, y[:, None], -torch.inf).amax(1)

    with torch.no_grad():
        clean, attacked = forward(x), forward(adv)
    correct = clean.argmax(-1) == y
    robust = correct & (attacked.argmax(-1) == y)
    return correct.numpy(), robust.numpy(), (margin(clean) - margin(attacked)).numpy()


def test_free_adversarial_training_raises_robust_accuracy_cheaply(shapes_quick) -> None:
    """Free-AT (4 replays per batch, 3 epochs: 12 passes over the train images, no separate
    attack passes), judged on the 342 held-out (test + calibration) rows, paired row by row.

    Measured (PGD L-inf 2/255, 5 steps): robust accuracy 0.175 -> 0.219 (27 rows gained, 12
    lost: 2.4 sd of the paired noise), clean 0.632 -> 0.547. Another machine measured a gain of
    0.018 on the 162 test rows alone: at this training length a few rows decide the gain in
    robust accuracy, so a fixed margin on it holds for one machine's floating point only. What
    free-AT does to every row is asserted instead: the attack lowers the margin (true-class
    logit minus the best other) by 1.05 less on average (sd 0.72, z = 27), for 95% of the rows.
    Robust accuracy must not fall beyond its noise, and clean accuracy must not collapse
    (lr 1e-3, which breaks the model, gives 0.33).
    """
    world, model = shapes_quick
    images = world.split("train").modalities["image"]
    free = fare_finetune(model, images, epochs=3, free=4)
    assert free.training_info["fare"]["free"] == 4
    assert free.training_info["fare"]["optimizer_steps"] == 3 * 4 * 10  # epochs x replays x batches
    before = {k: v for k, v in model.state_dict().items()}
    assert all(torch.equal(v, free.state_dict()[k]) for k, v in before.items() if "image." not in k)
    held_out = world.subset([i for i, s in enumerate(world.splits) if s != "train"])
    clean0, robust0, damage0 = _attacked(model, held_out)
    clean1, robust1, damage1 = _attacked(free, held_out)
    n = len(robust0)
    assert n >= 300, n
    # the attack's damage to the margin falls: a one-sided 99.9% bound on the paired mean
    d = damage0 - damage1
    assert d.mean() - 3.1 * d.std(ddof=1) / np.sqrt(n) > 0, (d.mean(), d.std())
    assert (d > 0).mean() > 0.8, (d > 0).mean()  # about half for a model no more robust
    # robust accuracy: 3 epochs move it by about 2 sd of the paired noise (27 rows gained, 12
    # lost), so what holds on any machine is that it does not fall beyond that noise
    gained, lost = int((robust1 & ~robust0).sum()), int((robust0 & ~robust1).sum())
    assert gained - lost > -1.64 * np.sqrt(gained + lost), (gained, lost)
    assert clean0.mean() - clean1.mean() <= 0.15, (clean0.mean(), clean1.mean())


def test_harden_adversarial_on_the_fusion_task(tmp_path) -> None:
    """The WiSE-FT sweep re-fits the fusion head on the train rows for every candidate."""
    from mmsafe.data.loading import load_data
    from mmsafe.engine import Engine
    from mmsafe.harden.flow import harden
    from mmsafe.harden.robust import AdversarialHardener

    torch.manual_seed(0)
    model = TinyClip(TinyClipConfig.for_size("xs")).eval()
    world = load_data("shapes:n=300,train_defects=0")
    hardener = AdversarialHardener(epochs=1, alphas=(0.0, 1.0), eval_steps=2, max_rows=40)
    result = harden(
        hardener, model, world, task="fusion", out=tmp_path, engine=Engine(progress=False)
    )
    sweep = json.loads((tmp_path / "wise_ft_sweep.json").read_text())
    assert [p["alpha"] for p in sweep["sweep"]] == [0.0, 1.0]
    assert result.after.card["task"]["name"] == "fusion"
    assert "robustness.adversarial" in result.after.card["checks"]
