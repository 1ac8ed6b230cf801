"""Our SyncBatchNorm (DESIGN.md, Processes): 2 gloo workers with DDP equal one process with plain
nn.BatchNorm on the concatenated batch; compiled under DDP it adds no graph break; a 1-rank group
gives nn.BatchNorm's forward, gradients and running statistics; no group is nn.BatchNorm itself.
Run with 2 gloo workers (one spawn for the module)."""
import copy
import datetime

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn
from torchvision.models.resnet import BasicBlock

from fastbyol.kernels.lars import LARS, lars_param_groups
from fastbyol.model import BYOL
from fastbyol.step import BYOLStep
from fastbyol.syncbn import SyncBatchNorm, convert_sync_batchnorm

STEPS, BATCH, SIZE = 3, 8, 16  # 4 images per rank on 2 ranks


def bn_model():
    torch.manual_seed(0)
    return BYOL("cnn4", small=True, num_classes=3, proj_hidden=32, proj_dim=16)


def global_batches():
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(BATCH, 3, SIZE, SIZE, generator=gen).contiguous(memory_format=torch.channels_last),
             torch.randn(BATCH, 3, SIZE, SIZE, generator=gen).contiguous(memory_format=torch.channels_last),
             torch.randint(0, 3, (BATCH,), generator=gen)) for _ in range(STEPS)]


def train_steps(model, net, rank=0, world=1):
    """3 steps on this rank's share of each global batch; the gradient tensors seen after each step."""
    opt = LARS(lars_param_groups(model.online_parameters(), 1e-3), weight_decay=1e-3)
    step = BYOLStep(model, opt, net)
    share, grads = BATCH // world, []
    for i, (v1, v2, y) in enumerate(global_batches()):
        part = slice(rank * share, (rank + 1) * share)
        step(v1[part], v2[part], y[part], lr=0.5, tau=0.9 + 0.03 * i)
        grads.append([p.grad for p in model.online_parameters()])
    return model.state_dict(), grads


def tiny_resnet():
    """A stem and one residual block (4 BatchNorms, 2d and 1d) for the compile check."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         BasicBlock(8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8),
                         nn.BatchNorm1d(8))


def _forward_backward(net, x):
    """Two training calls: outputs and the first conv's gradient."""
    outs = []
    for _ in range(2):
        net.zero_grad()
        y = net(x)
        y.square().sum().backward()
        outs.append((y.detach(), net.module[0].weight.grad.clone()))
    return outs


def _worker(rank, world, port, out):
    from torch._dynamo.utils import counters
    torch.set_num_threads(1)
    store = torch_dist.TCPStore("127.0.0.1", port, world, is_master=False,
                                timeout=datetime.timedelta(seconds=60))
    torch_dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    # BYOL through real DDP (gradient_as_bucket_view, as train.py builds it) and BYOLStep, eager
    model = convert_sync_batchnorm(bn_model())
    net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False,
                                              gradient_as_bucket_view=True)
    state, grads = train_steps(model, net, rank, world)
    storages = {g.untyped_storage().data_ptr() for g in grads[2]}
    results = dict(state=state, grads_kept=all(a is b for a, b in zip(grads[1], grads[2])),
                   grad_storages=len(storages), grads=len(grads[2]))
    # the tiny ResNet under DDP, eager and compiled with backend="eager" (as train.py compiles the
    # DDP module), 4 images of 16 px per rank
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))[rank::world]
    runs = []
    for compiled in (False, True):
        net = nn.parallel.DistributedDataParallel(convert_sync_batchnorm(tiny_resnet()),
                                                  broadcast_buffers=False)
        counters.clear()
        runs.append(_forward_backward(torch.compile(net, backend="eager") if compiled else net, x))
    results.update(tiny=runs, graph_breaks=dict(counters["graph_break"]),
                   frames=counters["stats"]["unique_graphs"])
    if rank == 0:
        torch.save(results, out)
    torch_dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """One spawn of 2 gloo workers; the port comes from the OS (a store bound to port 0 here)."""
    store = torch_dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False)
    out = tmp_path_factory.mktemp("syncbn") / "results.pt"
    mp.spawn(_worker, args=(2, store.port, out), nprocs=2, join=True)
    return torch.load(out)


@pytest.fixture(scope="module")
def single_process():
    model = bn_model()
    assert any(type(m) is nn.BatchNorm2d for m in model.modules())  # plain nn.BatchNorm
    return train_steps(model, None)[0]


def test_two_gloo_workers_with_syncbn_equal_one_process_on_the_concatenated_batch(two_workers,
                                                                                  single_process):
    ddp = two_workers["state"]
    assert list(ddp) == list(single_process)  # the same state_dict keys as nn.BatchNorm
    initial = bn_model().state_dict()
    for name, value in single_process.items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=1e-6, msg=name)
    moved = [n for n in single_process if "running_" in n and not torch.equal(single_process[n], initial[n])]
    assert len(moved) >= 8  # the BN running statistics really moved (and were compared)


# Where dynamo stops in DDP's own wrapper when the DDP module is compiled (as train.py does); the
# module inside it is traced whole.
DDP_WRAPPER_BREAKS = ("DistributedDataParallel._inside_ddp_forward", "set_runtime_stats_and_log")


def test_compiled_syncbn_under_ddp_has_no_graph_break_and_equals_eager(two_workers):
    ours = {reason: n for reason, n in two_workers["graph_breaks"].items()
            if not any(name in reason for name in DDP_WRAPPER_BREAKS)}
    assert ours == {}, ours
    assert two_workers["frames"] >= 1  # the module was really compiled
    eager, compiled = two_workers["tiny"]
    for (y, grad), (y_c, grad_c) in zip(eager, compiled):
        torch.testing.assert_close(y_c, y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad_c, grad, rtol=1e-5, atol=1e-5)


def test_ddp_gradients_stay_bucket_views_across_steps(two_workers):
    """BYOLStep sets p.grad to None before each backward; DDP (gradient_as_bucket_view) points it
    back at the same bucket view tensors, a few buckets for all the parameters."""
    assert two_workers["grads_kept"]
    assert two_workers["grad_storages"] < two_workers["grads"] / 4


def _modules():
    torch.manual_seed(3)
    bns = [nn.BatchNorm2d(6), nn.BatchNorm1d(6), nn.BatchNorm1d(6, momentum=None)]
    for bn in bns:
        nn.init.normal_(bn.weight)
        nn.init.normal_(bn.bias)
    return zip(bns, [(8, 6, 5, 5), (8, 6), (8, 6, 3)])


def _compare(plain, ours, shape, exact):
    """3 training calls, then one in eval mode: outputs, input and weight gradients, buffers."""
    check = torch.testing.assert_close if not exact else (lambda a, b, **_: torch.equal(a, b) or
                                                          pytest.fail("not bit-identical"))
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        x = 3 * torch.randn(shape, generator=gen) + 2
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [m(xi) for m, xi in zip((plain, ours), xs)]
        upstream = torch.randn(ys[0].shape, generator=gen)
        for y in ys:
            (y * upstream).sum().backward()
        check(ys[1], ys[0], rtol=1e-5, atol=1e-5)
        check(xs[1].grad, xs[0].grad, rtol=1e-5, atol=1e-5)
        check(ours.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)
        check(ours.bias.grad, plain.bias.grad, rtol=1e-5, atol=1e-5)
        if x.dim() == 4:
            assert ys[1].is_contiguous(memory_format=torch.channels_last)
    for (name, a), b in zip(ours.state_dict().items(), plain.state_dict().values()):
        check(a, b, rtol=1e-5, atol=1e-6, msg=name)
    plain.eval(), ours.eval()
    x = torch.randn(shape, generator=gen)
    check(ours(x), plain(x), rtol=1e-5, atol=1e-6)


def test_one_rank_group_equals_batchnorm_forward_gradients_and_running_stats():
    """The synced path itself (all_reduce and its backward), on a 1-rank gloo group."""
    store = torch_dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    torch_dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        for plain, shape in _modules():
            ours = convert_sync_batchnorm(copy.deepcopy(plain))
            assert type(ours) is SyncBatchNorm
            assert list(ours.state_dict()) == list(plain.state_dict())
            _compare(plain, ours, shape, exact=False)
    finally:
        torch_dist.destroy_process_group()


def test_without_a_group_it_is_batchnorm_exactly():
    assert not torch_dist.is_initialized()
    for plain, shape in _modules():
        _compare(plain, convert_sync_batchnorm(copy.deepcopy(plain)), shape, exact=True)


def test_convert_keeps_parameters_buffers_mode_and_nested_modules():
    model = bn_model()
    gen = torch.Generator().manual_seed(4)
    for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        for tensor in (bn.weight, bn.bias, bn.running_mean, bn.running_var):  # none at its default
            tensor.data.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
        bn.num_batches_tracked.fill_(5)
    model.eval()
    converted = convert_sync_batchnorm(copy.deepcopy(model))
    kinds = [type(m) for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds and set(kinds) == {SyncBatchNorm}
    for (name, a), (other, b) in zip(converted.state_dict().items(), model.state_dict().items()):
        assert name == other and torch.equal(a, b)
    assert not any(m.training for m in converted.online.modules())
    assert all(m.training for m in converted.target.modules())  # BYOL's target stays in train mode


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_rank_nccl_group_equals_batchnorm_on_the_gpu(dtype):
    """The most one GPU can show: our synced path over NCCL against nn.BatchNorm (cuDNN), forward and
    gradients, fp32 and under bf16 autocast. Several GPUs over NCCL are untested."""
    device = torch.device("cuda", torch.cuda.current_device())
    store = torch_dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    torch_dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=device)
    try:
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
                              nn.Linear(16 * 14 * 14, 32), nn.BatchNorm1d(32)).to(device)
        ours = convert_sync_batchnorm(copy.deepcopy(plain))
        x = torch.randn(32, 3, 16, 16, device=device).contiguous(memory_format=torch.channels_last)
        outs = []
        for net in (plain, ours):
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                y = net(x)
            y.float().square().mean().backward()
            outs.append((y.float(), net[0].weight.grad, net[1].weight.grad, net[4].weight.grad,
                         net[1].running_var, net[5].running_mean))
        for a, b in zip(*outs):
            if dtype == torch.float32:
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
            else:  # bf16 rounds at different places in cuDNN and in ours: a relative-norm bound
                assert (b - a).norm() <= 2e-2 * a.norm(), ((b - a).norm(), a.norm())
    finally:
        torch_dist.destroy_process_group()
