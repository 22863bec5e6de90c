"""parallel.shard_reward: under FSDP the frozen reward's image tower is sharded over the ranks
(srpo.setup.shard_reward): two gloo ranks, each scoring its own images, get the scores and the
pixel gradients of the unsharded reward (transformers' CLIP and open_clip's HPS), hold about
half of the tower each, and give the reward no parameter gradients."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from family_runs import launcher_env
from test_rewards_hps import TINY, tiny_model, write_arch

ROOT = Path(__file__).resolve().parents[1]


def test_sharded_reward_tower_scores_and_backpropagates_as_the_whole(tmp_path):
    arch = write_arch(tmp_path, "tiny-hps-vit-shard", TINY)
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": tiny_model(arch, seed=0).state_dict()}, ckpt)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "reward_sharding_worker.py"), str(tmp_path), str(ckpt), str(arch)]
    r = subprocess.run(cmd, cwd=ROOT, env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    for name in ("tiny_clip", "hps"):
        rows = [rank[name] for rank in ranks]
        assert rows[0]["whole"]["score"] != rows[1]["whole"]["score"]  # each rank scored its own images
        for row in rows:
            s, w = row["sharded"], row["whole"]
            assert torch.allclose(torch.tensor(s["score"]), torch.tensor(w["score"]), rtol=1e-5, atol=1e-6), name
            gs, gw = torch.tensor(s["grad"]), torch.tensor(w["grad"])
            assert gw.abs().sum() > 0 and torch.allclose(gs, gw, rtol=1e-4, atol=1e-7), name
            assert s["param_grads"] == 0 == w["param_grads"]
            before, after = row["tower_bytes"]
            assert 0.45 * before <= after <= 0.55 * before, (name, before, after)  # half of it each
