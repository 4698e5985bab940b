"""DistributedDataParallel (gloo, 2 CPU processes, static_graph=True as YOLOv9's smart_DDP) in float64.

(a) With ``nn.SyncBatchNorm.convert_sync_batchnorm``: outputs, gradients and BN running statistics
    equal one oracle process on the concatenated batch.
(b) Without it: standard DDP semantics. Each rank's BN normalises with its local batch and updates
    its own running statistics; DDP averages the gradients and broadcasts rank 0's buffers before
    every forward. The oracle replays exactly that with one copy per rank.

torch's SyncBatchNorm has no CPU kernels (``aten::batch_norm_stats`` is CUDA-only and its forward
rejects CPU inputs), so on CPU the converted modules get a test-only subclass that synchronises the
same statistics with a differentiable ``all_reduce`` (and DDP refuses SyncBatchNorm layers in CPU
modules anyway). Our blocks see a BN that is not a plain
``nn.BatchNorm2d`` either way, which is what the conversion is about.
"""

from __future__ import annotations

import copy

import mobileone_rs
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tests import oracle
from tests._util import TOLERANCE, assert_close, random_input

F64 = TOLERANCE[torch.float64]
WORLD = 2
LOCAL_BATCH = 2
STEPS = 2  # the second step runs on the graph that static_graph=True recorded in the first
LR = 0.1
# A small stage: one stride-2 pair and one stride-1 pair (with BN skip branches and SE).
STAGE_ARGS = (16, 32, 2, 2, True, 1)
IN_SHAPE = (16, 10, 9)
CASES = ("sync_bn", "local_bn")

pytestmark = [
    pytest.mark.skipif(not dist.is_gloo_available(), reason="torch.distributed without gloo"),
    pytest.mark.slow,  # two processes, end to end (make test runs it)
]


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of every rank's gradient."""

    @staticmethod
    def forward(ctx, tensor):
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        total = grad.clone()
        dist.all_reduce(total)
        return total


class _CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm semantics on CPU: global batch statistics, running statistics from them.

    Not a SyncBatchNorm subclass: DDP refuses SyncBatchNorm layers in CPU modules.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        dims = [0, 2, 3]
        count = torch.tensor(float(x.numel() // x.size(1)), dtype=x.dtype)
        dist.all_reduce(count)
        mean = _AllReduceSum.apply(x.sum(dims)) / count
        centred = x - mean[None, :, None, None]
        var = _AllReduceSum.apply(centred.square().sum(dims)) / count
        self._update_running_stats(mean.detach(), var.detach(), count)
        scale = (self.weight / (var + self.eps).sqrt())[None, :, None, None]
        return centred * scale + self.bias[None, :, None, None]

    @torch.no_grad()
    def _update_running_stats(self, mean, var, count) -> None:
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - momentum).add_(momentum * mean)
        self.running_var.mul_(1 - momentum).add_(momentum * var * count / (count - 1))


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step and the upstream gradient of its output (a linear loss)."""
    x = random_input((WORLD * LOCAL_BATCH, *IN_SHAPE), seed=10 + step)
    with torch.no_grad():
        out_shape = oracle.MobileOne(*STAGE_ARGS).double()(x).shape
    return x, random_input(out_shape, seed=20 + step)


def _local(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH]


def _snapshot(model: nn.Module, out: torch.Tensor, x: torch.Tensor) -> dict:
    record = {"output": out.detach().clone(), "input.grad": x.grad.clone()}
    record.update({f"{n}.grad": p.grad.clone() for n, p in model.named_parameters()})
    record.update({n: b.clone() for n, b in model.named_buffers()})
    return record


# ------------------------------------------------------------------------------------------------
# The distributed side (runs in the spawned processes).


def _ddp_model(case: str, initial_state: dict) -> tuple[nn.Module, DistributedDataParallel]:
    model = mobileone_rs.MobileOne(*STAGE_ARGS).double()
    model.load_state_dict(initial_state)
    if case == "sync_bn":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        converted = [m for m in model.modules() if type(m) is nn.SyncBatchNorm]
        assert converted and not any(type(m) is nn.BatchNorm2d for m in model.modules())
        for module in converted:
            module.__class__ = _CpuSyncBatchNorm
    return model, DistributedDataParallel(model, static_graph=True)


def _train_rank(rank: int, case: str, initial_state: dict) -> list[dict]:
    model, ddp = _ddp_model(case, initial_state)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
    records = []
    for step in range(STEPS):
        x_global, upstream = _data(step)
        x = _local(x_global, rank).clone().requires_grad_(True)
        optimizer.zero_grad()
        out = ddp(x)
        (out * _local(upstream, rank)).sum().backward()
        records.append(_snapshot(model, out, x))
        optimizer.step()
    return records


def _worker(rank: int, store: str, initial_state: dict, result_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = {case: _train_rank(rank, case, initial_state) for case in CASES}
        torch.save(results, f"{result_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Both cases in one spawn of WORLD processes; returns the initial state and per-rank records."""
    torch.manual_seed(0)
    reference = oracle.randomize_bn_stats(oracle.MobileOne(*STAGE_ARGS)).double()
    initial_state = copy.deepcopy(reference.state_dict())
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp / "store"), initial_state, str(tmp)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    return initial_state, ranks


# ------------------------------------------------------------------------------------------------
# The oracle side.


def _load(model: nn.Module, state: dict) -> nn.Module:
    model.load_state_dict(state, strict=True)
    return model


def _sgd_step(model: nn.Module) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param -= LR * param.grad


def _oracle_sync_bn(initial_state: dict) -> list[list[dict]]:
    """One process on the global batch; DDP's averaged gradient is the global-loss gradient / WORLD."""
    model = _load(oracle.MobileOne(*STAGE_ARGS).double(), initial_state)
    per_rank: list[list[dict]] = [[] for _ in range(WORLD)]
    for step in range(STEPS):
        x_global, upstream = _data(step)
        x = x_global.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        out = model(x)
        (out * upstream).sum().backward()
        for param in model.parameters():
            param.grad /= WORLD
        record = _snapshot(model, out, x)
        for rank in range(WORLD):
            mine = dict(record)
            mine["output"], mine["input.grad"] = (
                _local(record["output"], rank),
                _local(record["input.grad"], rank),
            )
            per_rank[rank].append(mine)
        _sgd_step(model)
    return per_rank


def _oracle_local_bn(initial_state: dict) -> list[list[dict]]:
    """One oracle copy per rank on its local batch; gradients averaged; rank 0's buffers broadcast."""
    models = [_load(oracle.MobileOne(*STAGE_ARGS).double(), initial_state) for _ in range(WORLD)]
    per_rank: list[list[dict]] = [[] for _ in range(WORLD)]
    for step in range(STEPS):
        x_global, upstream = _data(step)
        rank0_buffers = {name: b.clone() for name, b in models[0].named_buffers()}
        records = []
        for rank, model in enumerate(models):
            with torch.no_grad():  # DDP broadcasts rank 0's buffers before each forward
                for name, buffer in model.named_buffers():
                    buffer.copy_(rank0_buffers[name])
            x = _local(x_global, rank).clone().requires_grad_(True)
            model.zero_grad(set_to_none=True)
            out = model(x)
            (out * _local(upstream, rank)).sum().backward()
            records.append(_snapshot(model, out, x))
        grad_names = [f"{n}.grad" for n, _ in models[0].named_parameters()]
        for name in grad_names:
            mean = sum(r[name] for r in records) / WORLD
            for record in records:
                record[name] = mean
        for rank, model in enumerate(models):
            for name, param in model.named_parameters():
                param.grad = records[rank][f"{name}.grad"].clone()
            _sgd_step(model)
            per_rank[rank].append(records[rank])
    return per_rank


ORACLES = {"sync_bn": _oracle_sync_bn, "local_bn": _oracle_local_bn}


@pytest.mark.parametrize("case", CASES)
def test_ddp_matches_oracle(ddp_run, case):
    initial_state, ranks = ddp_run
    expected = ORACLES[case](initial_state)
    for rank in range(WORLD):
        for step in range(STEPS):
            got, want = ranks[rank][case][step], expected[rank][step]
            assert sorted(got) == sorted(want)
            for name, value in want.items():
                if value.is_floating_point():
                    assert_close(got[name], value, F64, f"{case} rank {rank} step {step} {name}")
                else:
                    assert torch.equal(got[name], value), f"{case} rank {rank} step {step} {name}"


def test_ranks_agree_on_parameters_gradients(ddp_run):
    """DDP's allreduce leaves every rank with bitwise the same averaged gradients."""
    _, ranks = ddp_run
    for case in CASES:
        for step in range(STEPS):
            first = ranks[0][case][step]
            for name in (n for n in first if n.endswith(".grad") and n != "input.grad"):
                assert torch.equal(ranks[1][case][step][name], first[name]), f"{case} step {step} {name}"
