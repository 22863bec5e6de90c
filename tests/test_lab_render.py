"""The lab renderer, captions, prompt sets and image statistics."""

import torch

from srpo.lab.captions import STYLE_TEMPLATES, caption, content_text, parse_content
from srpo.lab.judge import content_index, content_target, hack_index
from srpo.lab.prompts import HELDOUT_FILE, TRAIN_FILE, prompt_sets
from srpo.lab.render import COLOURS, STYLES, adjust, image_stats, render, sample_scene, sample_scenes


def test_render_is_deterministic_per_scene():
    scenes = sample_scenes(12, seed=5)
    batch = render(scenes)
    again = render(sample_scenes(12, seed=5))
    assert torch.equal(batch, again)
    for i in (0, 7, 11):  # a scene renders the same alone as inside a batch
        assert torch.equal(render([scenes[i]])[0], batch[i])
    other = render(sample_scenes(12, seed=6))
    assert (other - batch).abs().mean() > 0.05
    assert batch.shape == (12, 3, 32, 32) and batch.dtype == torch.float32


def test_scene_pins_and_object_colours():
    s = sample_scene(3, style="cartoon", content=(("red", "circle"),))
    assert s.style == "cartoon" and s.content == (("red", "circle"),)
    img = render([s])[0]
    o = s.objects[0]
    centre = img[:, int(o.y), int(o.x)]  # a cartoon fill is the named colour exactly
    assert torch.allclose(centre, torch.tensor(COLOURS["red"]), atol=1e-6)
    two = sample_scene(4, n_objects=2)
    assert len(two.objects) == 2 and two.objects[0].x < two.objects[1].x


def test_styles_are_balanced_in_the_hack_statistics():
    """Steering between styles must not itself look like a colour hack: per-style means of the
    statistics lie within one pooled standard deviation of each other."""
    stats = {st: image_stats(render(sample_scenes(150, seed=40 + i, style=st))) for i, st in enumerate(STYLES)}
    for key in ("saturation", "contrast", "sharpness"):
        pooled = torch.cat([stats[st][key] for st in STYLES])
        means = torch.stack([stats[st][key].mean() for st in STYLES])
        assert (means.max() - means.min()) / pooled.std() < 1.0, key


def test_image_stats_match_their_formulas():
    grey = torch.full((1, 3, 8, 8), 0.5)
    s = image_stats(grey)
    assert s["saturation"].item() == 0 and s["contrast"].item() == 0 and s["sharpness"].item() == 0
    img = torch.zeros(1, 3, 8, 8)
    img[0, 0] = 1.0  # pure red: HSV saturation 1 everywhere
    img[0, :, :, 4:] = torch.tensor([0.2, 0.4, 0.8]).view(3, 1, 1)
    s = image_stats(img)
    expected_sat = (1.0 + (0.8 - 0.2) / 0.8) / 2
    assert abs(s["saturation"].item() - expected_sat) < 1e-6
    lum = torch.tensor([0.299, 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.8])
    assert abs(s["contrast"].item() - torch.cat([lum[0].repeat(32), lum[1].repeat(32)]).std().item()) < 1e-6
    # the Laplacian is non-zero only on the two columns next to the edge (valid 6x6 region)
    step = (lum[1] - lum[0]).abs().item()
    assert abs(s["sharpness"].item() - 2 * 6 * step / 36) < 1e-6


def test_adjust_moves_the_statistics():
    x = render(sample_scenes(16, seed=9))
    base = image_stats(x)
    assert torch.allclose(adjust(x), x, atol=1e-6)
    assert (image_stats(adjust(x, saturation=1.8))["saturation"] > base["saturation"]).float().mean() > 0.9
    assert (image_stats(adjust(x, contrast=1.5))["contrast"] > base["contrast"]).all()
    assert (image_stats(adjust(x, sharpen=1.5))["sharpness"] > base["sharpness"]).all()
    assert (image_stats(adjust(x, saturation=0.0))["saturation"] < 0.02).all()


def test_captions_and_parsing():
    g = torch.Generator().manual_seed(0)
    s = sample_scene(11, style="photo", content=(("orange", "star"), ("blue", "square")))
    assert content_text(s.content) == "an orange star and a blue square"
    texts = [caption(s, g) for _ in range(40)]
    assert all(set(parse_content(t)) == set(s.content) for t in texts)
    assert any(t in {tp.format(c=content_text(c)) for tp in STYLE_TEMPLATES["photo"] for c in (s.content, s.content[::-1])}
               for t in texts)
    assert all(t in (content_text(s.content), content_text(s.content[::-1]))
               for t in (caption(s, g, style_prob=0.0) for _ in range(10)))
    assert parse_content("Real. A Red Circle") == (("red", "circle"),)
    assert parse_content("a cat") == ()


def test_prompt_sets_are_disjoint_content_only_and_shipped():
    train, heldout = prompt_sets()
    assert len(train) == 112 and len(heldout) == 96
    assert not set(train) & set(heldout)
    assert not {frozenset(parse_content(p)) for p in train} & {frozenset(parse_content(p)) for p in heldout}
    words = {w for tps in STYLE_TEMPLATES.values() for tp in tps for w in tp.replace("{c}", "").replace(",", " ").replace(".", " ").split()}
    words -= {"a", "an", "of", "and"}
    assert all(not (set(p.split()) & words) for p in train + heldout)
    shipped = [ln for ln in TRAIN_FILE.read_text().splitlines() if ln and not ln.startswith("#")]
    assert shipped == train
    assert [ln for ln in HELDOUT_FILE.read_text().splitlines() if ln and not ln.startswith("#")] == heldout


def test_content_targets_and_hack_index_formula():
    y = content_target([(("red", "circle"), ("blue", "star")), (("purple", "square"),)])
    assert y.sum().item() == 3 and y[0, content_index("blue", "star")] == 1
    base = {"saturation": torch.tensor([0.2, 0.4]), "contrast": torch.tensor([0.1, 0.1 + 1e-3]),
            "sharpness": torch.tensor([0.0, 1.0])}
    moved = {"saturation": torch.tensor([0.5, 0.5]), "contrast": base["contrast"], "sharpness": base["sharpness"]}
    std = torch.tensor([0.2, 0.4]).std().item()
    assert abs(hack_index(moved, base) - (0.5 - 0.3) / std) < 1e-5
    assert hack_index(base, base) == 0.0
