import copy

import numpy as np
import pytest
import torch
from torch import nn

from fastbyol.kernels.ema import ema_reference
from fastbyol.kernels.lars import LARS, lars_param_groups

SHAPES = [(16, 8), (4, 3, 3, 3), (8,), (), (5, 7), (6,)]


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    with torch.no_grad():
        params[4].zero_()  # ||w|| = 0: trust falls back to 1
    return params


def numpy_lars(ws, grads_per_step, lrs, wd, momentum, eta):
    """The recipe's formula in float64, written independently of the module under test."""
    ws = [w.astype(np.float64).copy() for w in ws]
    ms = [np.zeros_like(w) for w in ws]
    for grads, lr in zip(grads_per_step, lrs):
        for i, (w, g) in enumerate(zip(ws, grads)):
            g = g.astype(np.float64)
            if w.ndim > 1:
                g = g + wd * w
                wn, gn = np.linalg.norm(w.ravel()), np.linalg.norm(g.ravel())
                g = g * (eta * wn / gn if wn > 0 and gn > 0 else 1.0)
            ms[i] = momentum * ms[i] + lr * g
            ws[i] = w - ms[i]
    return ws


def test_lars_matches_float64_formula_over_several_steps():
    params = make_params()
    start = [p.detach().numpy().copy() for p in params]
    opt = LARS(lars_param_groups(params, weight_decay=1e-2), momentum=0.9, weight_decay=1e-2,
               trust_coef=1e-3)
    gen = torch.Generator().manual_seed(1)
    grads_per_step, lrs = [], [0.5, 1.0, 2.0, 1.5, 0.25, 3.0]
    for step, lr in enumerate(lrs):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        if step == 2:
            grads[2].zero_()  # a 1-d parameter with a zero gradient
        for p, g in zip(params, grads):
            p.grad = g.clone()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        grads_per_step.append([g.numpy() for g in grads])
    expected = numpy_lars(start, grads_per_step, lrs, wd=1e-2, momentum=0.9, eta=1e-3)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-5, atol=1e-6)


def test_lars_excludes_ndim_le_1_from_decay_and_adaptation():
    params = make_params()
    groups = lars_param_groups(params, weight_decay=0.5)
    assert {p.ndim for p in groups[0]["params"]} <= {2, 4} and groups[0]["adapt"]
    assert {p.ndim for p in groups[1]["params"]} == {0, 1} and not groups[1]["adapt"]
    assert groups[1]["weight_decay"] == 0.0
    bias = groups[1]["params"][0]
    before = bias.detach().clone()
    bias.grad = torch.ones_like(bias)
    opt = LARS(groups, momentum=0.0, weight_decay=0.5)
    for group in opt.param_groups:
        group["lr"] = 0.1
    opt.step()  # plain SGD for the bias: no trust ratio, no decay
    torch.testing.assert_close(bias.detach(), before - 0.1)


def test_lars_state_dict_round_trip():
    params = make_params()
    opt = LARS(lars_param_groups(params, 1e-3))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    clone = make_params()
    with torch.no_grad():
        for c, p in zip(clone, params):
            c.copy_(p)
    opt2 = LARS(lars_param_groups(clone, 1e-3))
    held = [opt2.state[p]["momentum_buffer"] for p in clone]
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if read from a file
    assert all(opt2.state[p]["momentum_buffer"] is buf for p, buf in zip(clone, held))
    for ps in (params, clone):
        for p in ps:
            p.grad = torch.full_like(p, 0.5)
    opt.step(), opt2.step()
    for a, b in zip(params, clone):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def two_nets():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    target = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    online.train()(torch.randn(16, 4))  # give the online BN non-default running statistics
    return online, target


def test_ema_tau_one_changes_nothing_and_tau_zero_copies():
    online, target = two_nets()
    before = [t.detach().clone() for t in target.parameters()]
    ema_reference(target, online, tau=1.0)
    for t, b in zip(target.parameters(), before):
        assert torch.equal(t, b)
    ema_reference(target, online, tau=0.0)
    for t, o in zip(target.parameters(), online.parameters()):
        assert torch.equal(t, o)


def test_ema_formula_and_buffer_policy():
    online, target = two_nets()
    expected = [0.9 * t.detach() + 0.1 * o.detach() for t, o in zip(target.parameters(), online.parameters())]
    ema_reference(target, online, tau=0.9)
    for t, e in zip(target.parameters(), expected):
        torch.testing.assert_close(t, e)
    # buffers (BN running statistics, batch counter) are copied from the online network
    for (name, t), o in zip(target.named_buffers(), online.buffers()):
        assert torch.equal(t, o), name
    assert target[1].num_batches_tracked.item() == 1


def random_shapes(seed, n=24):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(), (1,), (7,)]
    for _ in range(n - len(shapes)):
        ndim = int(torch.randint(0, 5, (1,), generator=gen))
        shapes.append(tuple(int(d) for d in torch.randint(1, 9, (ndim,), generator=gen)))
    return shapes


@pytest.mark.parametrize("seed", [0, 1])
def test_foreach_lars_equals_its_twin_over_100_steps(seed):
    shapes = random_shapes(seed)
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in shapes]
    with torch.no_grad():
        init[-1].zero_()  # a zero-norm weight takes the trust = 1 branch
    pa = [nn.Parameter(t.clone()) for t in init]
    pb = [nn.Parameter(t.clone()) for t in init]
    fused = LARS(lars_param_groups(pa, 1e-4), momentum=0.9, weight_decay=1e-4, foreach=True)
    twin = LARS(lars_param_groups(pb, 1e-4), momentum=0.9, weight_decay=1e-4, foreach=False)
    for step in range(100):
        lr = 0.5 * (1 + step % 7)
        for a, b in zip(pa, pb):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        for opt, lr_value in ((fused, torch.tensor(lr)), (twin, lr)):  # the fused one takes a tensor lr
            for group in opt.param_groups:
                group["lr"] = lr_value
            opt.step()
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_foreach_ema_equals_its_twin_over_100_steps():
    from fastbyol.kernels.ema import ema_foreach
    online, _ = two_nets()
    target_a, target_b = copy.deepcopy(online), copy.deepcopy(online)
    gen = torch.Generator().manual_seed(3)
    for step in range(100):
        with torch.no_grad():
            for p in online.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
        online(torch.randn(16, 4, generator=gen))  # moves the BN buffers
        tau = 0.99 + 0.01 * step / 100
        ema_foreach(target_a, online, torch.tensor(tau))
        ema_reference(target_b, online, tau)
    for a, b in zip(target_a.state_dict().values(), target_b.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, o in zip(target_a.buffers(), online.buffers()):
        assert torch.equal(a, o)


def test_fused_updates_never_read_a_device_value_back():
    """On meta tensors any .item() or data-dependent branch raises: the multi-tensor EMA and LARS must
    run there, which is what 'no host sync inside a step' means for them on a GPU."""
    from fastbyol.kernels.ema import ema_foreach
    from fastbyol.kernels.lars import lars_foreach
    online = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)).to("meta")
    target = copy.deepcopy(online)
    ema_foreach(target, online, torch.tensor(0.99, device="meta"))
    params = list(online.parameters())
    for adapt in (True, False):
        lars_foreach(params, [torch.empty_like(p) for p in params], [torch.empty_like(p) for p in params],
                     lr=torch.tensor(0.1, device="meta"), weight_decay=1e-6, momentum=0.9,
                     trust_coef=1e-3, adapt=adapt)


class RandomShapes(nn.Module):
    """Parameters of random shapes, 0-d and 1-d included, and a buffer."""

    def __init__(self, values_seed, shapes_seed=5):
        super().__init__()
        gen = torch.Generator().manual_seed(values_seed)
        self.params = nn.ParameterList(nn.Parameter(torch.randn(s, generator=gen))
                                       for s in random_shapes(shapes_seed))
        self.register_buffer("stat", torch.randn(5, generator=gen))


def test_foreach_ema_on_random_shapes_tau_one_and_zero():
    from fastbyol.kernels.ema import ema_foreach
    online, target = RandomShapes(0), RandomShapes(1)
    twin = copy.deepcopy(target)
    for step in range(100):
        tau = 0.9 + 0.1 * step / 99
        ema_foreach(target, online, torch.tensor(tau))
        ema_reference(twin, online, tau)
    for a, b in zip(target.state_dict().values(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    before = copy.deepcopy(target.state_dict())
    ema_foreach(target, online, torch.tensor(1.0))
    assert all(torch.equal(target.params[i], before[f"params.{i}"]) for i in range(len(target.params)))
    ema_foreach(target, online, torch.tensor(0.0))
    assert all(torch.equal(t, o) for t, o in zip(target.parameters(), online.parameters()))
