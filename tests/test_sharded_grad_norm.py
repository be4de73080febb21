"""The sharded (FSDP2) step's gradient clip and NaN/Inf check, on two gloo ranks: the norm and
clipped shards equal ``clip_grad_norm_``'s, a bad shard on one rank is named on both with no
gradient changed, and finite shards whose squares overflow stop as ``NORM_OVERFLOW``."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nestlearn.training.distributed import DistContext
from nestlearn.training.grad_norm import NORM_OVERFLOW
from nestlearn.training.sharded import clip_finite_sharded_gradients, local_gradients
from trainkit import free_port

WORLD = 2


def sharded_model(rank: int) -> torch.nn.Module:
    """A small model sharded over the ranks, after one backward of rank-specific inputs."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    mesh = init_device_mesh("cpu", (WORLD,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    torch.manual_seed(1 + rank)
    (model(torch.randn(5, 6)) * 40).square().sum().backward()
    return model


def shards(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: grad.clone() for name, grad in local_gradients(model).items()}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=0, equal_nan=True,
                                   msg=f"gradient shard of {name}")


CASES = (("finite", 0.0), ("finite", 0.5), ("nan", 1.0), ("nan on both", 1.0),
         ("overflow", 1.0))


def check_case(rank: int, ctx: DistContext, case: str, max_norm: float) -> None:
    model = sharded_model(rank)
    if case == "nan" and rank == 1:
        # a NaN in rank 1's shard only: rank 0's own shards are all finite
        local_gradients(model)["2.weight"].view(-1)[0] = float("nan")
    if case == "nan on both":
        # rank 0's bad shard is named, though rank 1's belongs to an earlier parameter
        name = "2.weight" if rank == 0 else "0.weight"
        local_gradients(model)[name].view(-1)[0] = float("inf")
    if case == "overflow":
        for grad in local_gradients(model).values():
            grad.mul_(1e25)  # finite, but the squares overflow float32
    before = shards(model)
    norm, where = clip_finite_sharded_gradients(model, max_norm, ctx)
    if case == "finite":
        assert where is None
        reference = sharded_model(rank)
        expected = torch.nn.utils.clip_grad_norm_(
            list(reference.parameters()), max_norm if max_norm > 0 else float("inf"))
        assert norm == pytest.approx(float(expected.full_tensor()), rel=1e-6)
        assert norm > 0.5  # so clipping to 0.5 changes the gradients
        assert_same(shards(model), shards(reference))
        return
    want = NORM_OVERFLOW if case == "overflow" else "gradient of 2.weight"
    assert where == want, f"rank {rank}: {where!r}"
    assert norm != norm or norm == float("inf")
    assert_same(shards(model), before)  # no gradient changed before the stop


def check_on_rank(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a rank that skipped a collective fails within a minute instead of gloo's 30
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        ctx = DistContext(rank=rank, world_size=WORLD, backend="gloo")
        for case, max_norm in CASES:  # one pair of processes for every case: spawning is slow
            try:
                check_case(rank, ctx, case, max_norm)
            except AssertionError as error:
                raise AssertionError(f"case {case}, max_norm {max_norm}: {error}") from error
    finally:
        dist.destroy_process_group()


def test_sharded_clip_checks_every_ranks_shards_through_the_global_norm():
    mp.spawn(check_on_rank, args=(free_port(),), nprocs=WORLD, join=True)
