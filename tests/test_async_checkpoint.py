"""Asynchronous sharded checkpoints (``parallel.async_checkpoints``, srpo/checkpoint.py) on 2 gloo
processes with FSDP2: the shards written are a snapshot of the state at the save (the weights and
the optimizer state changed in place right after it are not what lands on disk), the checkpoint
is published only once every rank's write finished (before that the previous one is the newest),
and a second save waits for the first."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from srpo import checkpoint, parallel


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _worker(rank: int, port: int, run_dir: str, out: dict):
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    net = _Net()
    for b in net.blocks:
        fully_shard(b)
    fully_shard(net)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    ctx = parallel.Context(rank=rank, world=2, strategy="fsdp")
    at_save = {k: v.full_tensor().clone() for k, v in net.state_dict().items()}
    checkpoint.save(run_dir, 1, net, opt, ctx=ctx, sharded=True, asynchronous=True)
    published_early = (checkpoint.latest(run_dir) is not None)
    with torch.no_grad():  # training goes on while the shards are written
        for p in net.parameters():
            p.add_(100.0)
    checkpoint.save(run_dir, 2, net, opt, ctx=ctx, sharded=True, asynchronous=True)  # waits for step 1 first
    step1_published_by_second_save = checkpoint.latest(run_dir).name
    checkpoint.wait(ctx)
    newest = checkpoint.latest(run_dir).name
    fresh = _Net()
    for b in fresh.blocks:
        fully_shard(b)
    fully_shard(fresh)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    checkpoint.load(os.path.join(run_dir, "checkpoints", "step-000001"), fresh, fresh_opt, ctx)
    loaded = {k: v.full_tensor() for k, v in fresh.state_dict().items()}
    if rank == 0:
        out.update(published_early=published_early, after_second=step1_published_by_second_save, newest=newest,
                   diff=max((loaded[k] - at_save[k]).abs().max().item() for k in at_save))
    dist.barrier()
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_async_sharded_checkpoint_is_a_snapshot_published_after_the_write(tmp_path):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_port(), str(tmp_path), out), nprocs=2, join=True)
        out = dict(out)
    assert out["published_early"] is False  # in flight: not yet the newest checkpoint
    assert out["after_second"] == "step-000001"  # the second save published the first before writing
    assert out["newest"] == "step-000002"
    assert out["diff"] == 0.0  # the weights as they were at the save, not +100 after it


def test_async_full_checkpoint_writes_the_state_at_the_save(tmp_path):
    """One process, full format: the writer thread is held until the weights and the AdamW state
    have changed in place after the save; what it writes is still the state at the save."""
    import threading

    torch.manual_seed(0)
    net = _Net()
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    moments = {k: v["exp_avg"].clone() for k, v in zip(dict(net.named_parameters()), opt.state.values())}
    gate = threading.Event()
    checkpoint._writer().submit(gate.wait)  # the one writer thread is busy until the gate opens
    checkpoint.save(tmp_path, 1, net, opt, asynchronous=True)
    assert checkpoint.latest(tmp_path) is None  # not published while its write waits
    with torch.no_grad():
        for p in net.parameters():
            p.add_(100.0)
        for st in opt.state.values():
            st["exp_avg"].add_(100.0)
    gate.set()
    checkpoint.wait()
    fresh = _Net()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    checkpoint.load(checkpoint.latest(tmp_path), fresh, fresh_opt)
    assert all(torch.equal(fresh.state_dict()[k], weights[k]) for k in weights)
    loaded = {k: v["exp_avg"] for k, v in zip(dict(fresh.named_parameters()), fresh_opt.state.values())}
    assert all(torch.equal(loaded[k], moments[k]) for k in moments)
