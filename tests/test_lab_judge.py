"""The lab's independent judge: accuracy on renderer ground truth and robustness."""

import pytest
import torch

from srpo.errors import UserError
from srpo.lab.build import WEIGHTS
from srpo.lab.captions import content_text
from srpo.lab.judge import Judge, content_target
from srpo.lab.render import STYLES, adjust, render, sample_scenes
from srpo.lab.train_vae import load_vae, vae_roundtrip


@pytest.fixture(scope="module")
def judge():
    return Judge.load(WEIGHTS / "judge")


@pytest.fixture(scope="module")
def world():
    scenes = sample_scenes(600, seed=424242)  # the judge trained on seed 23's pool
    return scenes, render(scenes)


def _accuracy(judge, scenes, images):
    style, probs = judge.predict(images)
    truth = torch.tensor([STYLES.index(s.style) for s in scenes])
    exact = ((probs > 0.5) == content_target([s.content for s in scenes]).bool()).all(1)
    return (style == truth).float().mean().item(), exact.float().mean().item()


def test_judge_accuracy_on_renderer_ground_truth(judge, world):
    scenes, images = world
    style_acc, content_acc = _accuracy(judge, scenes, images)
    assert style_acc >= 0.95 and content_acc >= 0.95, (style_acc, content_acc)
    prompts = [content_text(s.content) for s in scenes]
    m = judge.evaluate(images, prompts)
    assert m["fidelity"] >= 0.95
    true_photo = sum(s.style == "photo" for s in scenes) / len(scenes)
    assert abs(m["realism"] - true_photo) < 0.03
    # a prompt naming other objects is not matched
    wrong = [content_text(sample_scenes(1, seed=i + 10**6)[0].content) for i in range(len(scenes))]
    wrong_ok = judge.matches(images, wrong)[1].float().mean().item()
    assert wrong_ok < 0.15


def test_judge_on_vae_reconstructions(judge, world):
    """What the base model produces passes through its VAE decoder: the judge still holds there."""
    scenes, images = world
    recon = vae_roundtrip(load_vae(WEIGHTS), images[:300])
    style_acc, content_acc = _accuracy(judge, scenes[:300], recon)
    assert style_acc >= 0.93 and content_acc >= 0.9, (style_acc, content_acc)


def test_judge_calls_ignore_the_hack_statistics(judge, world):
    """Oversaturated / contrasty / sharpened copies keep their style and content calls, so realism
    and fidelity do not reward a hack; the hack shows in hack_index instead."""
    scenes, images = world
    x = images[:300]
    hacked = adjust(x, saturation=1.6, contrast=1.3, sharpen=1.0)
    s0, p0 = judge.predict(x)
    s1, p1 = judge.predict(hacked)
    assert (s0 == s1).float().mean() >= 0.9
    assert ((p0 > 0.5) == (p1 > 0.5)).all(1).float().mean() >= 0.9
    prompts = [content_text(s.content) for s in scenes[:300]]
    base_stats = judge.evaluate(x, prompts)
    from srpo.lab.render import image_stats

    m = judge.evaluate(hacked, prompts, image_stats(x))
    assert m["hack_index"] > 2.0 and base_stats["hack_index"] == 0.0


def test_judge_load_error_names_the_folder(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path)):
        Judge.load(tmp_path)
