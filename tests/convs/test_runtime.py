"""Every variant under torch.compile (no graph breaks), autocast, channels_last and DDP."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import convs

VARIANTS = sorted(convs.VARIANTS)


def small_net(variant: str) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2),
        nn.ReLU(),
        nn.Conv2d(8, 8, (1, 3), padding=(0, 1), groups=2),
    )
    convs.convert(net, variant)
    return net


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_compile_fullgraph_matches_eager(variant):
    net = small_net(variant)
    x = torch.randn(2, 3, 17, 15, requires_grad=True)
    eager = net(x)
    (gx,) = torch.autograd.grad(eager.sum(), x)
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True)  # fullgraph=True raises on any graph break
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    (gx_compiled,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(gx_compiled, gx, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_autocast(variant):
    net = small_net(variant)
    x = torch.randn(2, 3, 17, 15)
    ref = net(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("variant", VARIANTS)
def test_channels_last(variant):
    net = small_net(variant)
    x = torch.randn(2, 3, 17, 15)
    ref = net(x)
    net = net.to(memory_format=torch.channels_last)
    out = net(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _ddp_worker(rank: int, world_size: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        for variant in VARIANTS:
            net = nn.parallel.DistributedDataParallel(small_net(variant))
            torch.manual_seed(rank)  # each rank sees different data
            net(torch.randn(2, 3, 17, 15)).pow(2).mean().backward()
            grads = torch.cat([p.grad.flatten() for p in net.parameters()])
            results[(variant, rank)] = grads
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_sync_gradients(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(2, str(tmp_path / "pg"), results), nprocs=2)
        results = dict(results)
    for variant in VARIANTS:
        g0, g1 = results[(variant, 0)], results[(variant, 1)]
        assert torch.isfinite(g0).all() and g0.abs().sum() > 0
        torch.testing.assert_close(g0, g1)  # gradients are all-reduced: every parameter took part
