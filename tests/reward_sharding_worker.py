"""Worker of tests/test_reward_sharding.py (run under torchrun, gloo): each rank scores its own
images with a reward whose image tower is sharded (``srpo.setup.shard_reward``) and with an
unsharded copy, and writes both scores, both pixel gradients and its tower's resident bytes."""

import copy
import json
import sys

import torch
import torch.distributed as dist

from srpo.rewards import REWARDS
from srpo.setup import shard_reward


def local_bytes(module) -> int:
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in module.parameters())


def main(out, hps_ckpt, hps_arch):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    prompts = ["a photo of a red cat", "an oil painting of a harbour at night"]
    rewards = {"tiny_clip": REWARDS.get("tiny_clip")(seed=0),
               "hps": REWARDS.get("hps")(path=hps_ckpt, arch=hps_arch)}
    result = {}
    for name, reward in rewards.items():
        reward = reward.frozen()
        whole = copy.deepcopy(reward)
        tower, _ = reward.image_tower()
        before = local_bytes(tower)
        assert shard_reward(reward)
        after = local_bytes(tower)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own images
        images = torch.rand(2, 3, 40, 48, generator=g)
        row = {"tower_bytes": [before, after]}
        for label, r in (("sharded", reward), ("whole", whole)):
            x = images.clone().requires_grad_(True)
            s = r.score(x, prompts)
            s.sum().backward()
            row[label] = {"score": s.tolist(), "grad": x.grad.flatten().tolist(),
                          "param_grads": sum(p.grad is not None for p in r.parameters())}
            with torch.no_grad():  # a no-grad call (the guard's) between two gradient calls
                r.score(images, prompts)
        result[name] = row
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
