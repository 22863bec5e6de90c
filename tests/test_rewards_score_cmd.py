"""`srpo score`: a folder of images + prompts -> CSV of absolute and SRP scores."""

import argparse
import csv

import numpy as np
import pytest
import torch
from PIL import Image

from srpo.commands import score as score_cmd
from srpo.errors import UserError
from srpo.rewards.clip import CLIPReward
from srpo.rewards.srp import SRP
from srpo.rewards.tiny import save_tiny_clip

PROMPTS = ["a red cat on a sofa", "a harbour at night", "a bowl of fruit"]


def parse(argv):
    parser = argparse.ArgumentParser()
    score_cmd.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["score", *argv])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    clip_dir = save_tiny_clip(root / "clip", seed=0)
    imgs = root / "images"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in zip(["b.png", "a.jpg", "c.png"], [(48, 40), (64, 64), (30, 50)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(imgs / name, quality=95)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "reward.yaml").write_text("reward:\n  name: clip\n  path: clip\n")
    return root, clip_dir


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def expected(clip_dir, files, prompts, pos, neg):
    reward = CLIPReward.from_pretrained(clip_dir)
    srp = SRP(reward, [pos], [neg])
    out = []
    for f, p in zip(files, prompts):
        x = torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1)[None] / 255
        out.append((float(reward.score(x, [p])[0]), srp.relative(x, [p], pos, neg)))
    return out


@pytest.mark.parametrize("how", ["name", "config"])
def test_score_writes_csv(data, how, capsys):
    root, clip_dir = data
    by_name = ["--reward", "clip", "--reward-path", clip_dir]
    reward = by_name if how == "name" else ["--reward", str(root / "reward.yaml")]
    out = root / f"scores-{how}.csv"
    args = parse([*reward, "--images", str(root / "images"), "--prompts", str(root / "prompts.txt"),
                  "--pos", "Real", "--neg", "Anime", "--device", "cpu", "--output", str(out)])
    assert score_cmd.run(args) == 0
    rows = read_rows(out)
    assert [r["file"] for r in rows] == ["a.jpg", "b.png", "c.png"]  # sorted file names
    assert [r["prompt"] for r in rows] == PROMPTS
    files = [root / "images" / r["file"] for r in rows]
    for row, (score, srp) in zip(rows, expected(clip_dir, files, PROMPTS, "Real", "Anime")):
        assert float(row["score"]) == pytest.approx(score, abs=2e-6)
        assert float(row["srp"]) == pytest.approx(float(srp.relative[0]), abs=2e-6)
        assert float(row["srp_pos"]) - float(row["srp_neg"]) == pytest.approx(float(row["srp"]), abs=5e-6)
    assert "scored 3 images" in capsys.readouterr().err


def test_single_prompt_for_all_and_stdout(data, tmp_path, capsys):
    root, clip_dir = data
    one = tmp_path / "one.txt"
    one.write_text("a photo\n\n")
    args = parse(["--reward", "clip", "--reward-path", clip_dir, "--images", str(root / "images"),
                  "--prompts", str(one), "--device", "cpu"])
    assert score_cmd.run(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("file,prompt,score,srp,srp_pos,srp_neg") and len(lines) == 4
    assert all(",a photo," in ln for ln in lines[1:])


def test_prompts_from_jsonl_with_a_column(data, tmp_path):
    import json

    root, clip_dir = data
    rows_in = tmp_path / "prompts.jsonl"
    rows_in.write_text("".join(json.dumps({"caption": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    out = tmp_path / "scores.csv"
    args = parse(["--reward", "clip", "--reward-path", clip_dir, "--images", str(root / "images"), "--prompts",
                  str(rows_in), "--prompt-column", "caption", "--device", "cpu", "--output", str(out)])
    assert score_cmd.run(args) == 0
    rows = read_rows(out)
    assert [r["prompt"] for r in rows] == PROMPTS
    files = [root / "images" / r["file"] for r in rows]
    for row, (score, _) in zip(rows, expected(clip_dir, files, PROMPTS, "Real", "Anime")):
        assert float(row["score"]) == pytest.approx(score, abs=2e-6)
    with pytest.raises(UserError, match="caption|column"):
        score_cmd.run(parse(["--reward", "clip", "--reward-path", clip_dir, "--images", str(root / "images"),
                             "--prompts", str(rows_in), "--device", "cpu"]))  # no "prompt" field


def test_bad_inputs(data, tmp_path):
    root, clip_dir = data
    base = ["--reward", "clip", "--reward-path", clip_dir, "--device", "cpu"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    two = tmp_path / "two.txt"
    two.write_text("one\ntwo\n")
    cases = [
        (["--images", str(root / "images"), "--prompts", str(empty)], "has no prompts"),
        (["--images", str(root / "images"), "--prompts", str(two)], "has 2 prompts for 3 images"),
        (["--images", str(tmp_path / "nowhere"), "--prompts", str(two)], "is not a folder"),
        (["--images", str(tmp_path), "--prompts", str(two)], "has no images"),
        (["--images", str(root / "images"), "--prompts", str(tmp_path / "none.txt")], "not found"),
    ]
    for argv, message in cases:
        with pytest.raises(UserError, match=message):
            score_cmd.run(parse(base + argv))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png at all")
    with pytest.raises(UserError, match=r"cannot read image .*x\.png"):
        score_cmd.run(parse(base + ["--images", str(broken), "--prompts", str(two)]))
    with pytest.raises(UserError, match="reward config file not found"):
        score_cmd.run(parse(["--reward", str(tmp_path / "r.yaml"), "--images", str(root / "images"),
                             "--prompts", str(root / "prompts.txt")]))
