"""`srpo lab` end to end through the real CLI (a few updates), and its input errors."""

import json

import numpy as np
from PIL import Image

from srpo.cli import main
from srpo.lab.run import METRICS, targets

TILE, PAD, NROW = 32 * 3, 2, 12  # lab images are 32x32, shown 3x upscaled, 12 per row (lab.run._grid)


def check_grids(out, n_images: int):
    """Each sample grid has the canvas size save_grid makes for its images (ceil(n / 12) rows of
    12 tiles, 2 px white padding), white padding and empty slots, and a non-blank image in every
    tile; curves.png is the 4-panel figure (16.8 x 3.2 in at 110 dpi)."""
    n = min(n_images, 48)
    rows = -(-n // NROW)
    for name in ("before.png", "after.png", "control.png"):
        img = np.asarray(Image.open(out / name).convert("RGB")).astype(float)
        assert img.shape == (rows * (TILE + PAD) + PAD, NROW * (TILE + PAD) + PAD, 3), (name, img.shape)
        tiles = []
        for i in range(rows * NROW):
            r, c = divmod(i, NROW)
            y, x = PAD + r * (TILE + PAD), PAD + c * (TILE + PAD)
            tile = img[y:y + TILE, x:x + TILE]
            if i < n:
                assert tile.std() > 5, (name, i, tile.std())  # an image, not a flat fill
                tiles.append(tile)
            else:
                assert (tile == 255).all(), (name, i)  # an empty slot stays white
        assert (img[:PAD] == 255).all() and (img[:, :PAD] == 255).all()  # the padding is white
        assert len({t.tobytes() for t in tiles}) == n  # every prompt got its own image
    with Image.open(out / "curves.png") as curves:
        assert curves.size == (round(4.2 * 4 * 110), round(3.2 * 110))
        assert np.asarray(curves.convert("L")).astype(float).std() > 5


def test_lab_quick_run_through_the_cli(tmp_path, capsys):
    out = tmp_path / "lab"
    assert main(["lab", "--quick", "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for part in ("before", "after", "control"):
        assert set(summary[part]) == set(METRICS)
        assert all(isinstance(v, float) for v in summary[part].values())
    assert summary["before"]["hack_index"] == 0.0  # the base is its own reference
    check_grids(out, summary["eval_images"])
    # the trainer really ran: its metrics, checkpoints and final weights are in the run folders
    rows = [json.loads(x) for x in (out / "srpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("denoise/reward" in r and "inversion/reward" in r for r in rows)
    control = [json.loads(x) for x in (out / "control" / "metrics.jsonl").read_text().splitlines()]
    assert all("inversion/reward" not in r for r in control)
    assert (out / "srpo" / "final" / "config.json").is_file()
    curves = json.loads((out / "curves.json").read_text())
    assert [p["step"] for p in curves["srpo"]] == [0, 1, 2]
    assert curves["srpo"][-1]["realism"] == summary["after"]["realism"]
    printed = capsys.readouterr().out
    assert "realism" in printed and "targets:" in printed
    # a second run into the same folder is refused
    assert main(["lab", "--quick", "--output", str(out)]) == 2


def test_lab_targets_logic():
    s = {"before": {"realism": 0.1, "fidelity": 0.8, "hack_index": 0.0},
         "after": {"realism": 0.31, "fidelity": 0.76, "hack_index": 0.9},
         "control": {"hack_index": 2.5}}
    assert all(targets(s).values())
    s["after"]["realism"] = 0.29
    s["control"]["hack_index"] = 1.9
    t = targets(s)
    assert not t["realism_x3"] and not t["control_hacks"] and t["fidelity_kept"]


def test_lab_missing_weights_is_a_one_line_error(tmp_path, capsys):
    code = main(["lab", "--quick", "--output", str(tmp_path / "x"), "--set", f"model.path={tmp_path / 'nope'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "nope" in err and "srpo lab build" in err
