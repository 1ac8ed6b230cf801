"""The step: compiled once (no recompiles as lr and tau move), equal to eager, fused equal to twins."""

import copy

import torch

from fastbyol.kernels.lars import LARS, lars_param_groups
from fastbyol.model import BYOL
from fastbyol.step import BYOLStep


def tiny_model():
    torch.manual_seed(0)
    return BYOL("cnn4", small=True, num_classes=4, proj_hidden=32, proj_dim=16)


def batches(n=4, size=16, batch=8):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, size, size, generator=gen).contiguous(memory_format=torch.channels_last),
             torch.randn(batch, 3, size, size, generator=gen).contiguous(memory_format=torch.channels_last),
             torch.randint(0, 4, (batch,), generator=gen)) for _ in range(n)]


def run(model, steps, **kwargs):
    opt = LARS(lars_param_groups(model.online_parameters(), 1e-4), weight_decay=1e-4,
               foreach=kwargs.get("fused", True))
    step = BYOLStep(model, opt, **kwargs)
    metrics = [step(v1, v2, y, lr=0.5 + 0.1 * i, tau=0.9 + 0.02 * i)
               for i, (v1, v2, y) in enumerate(steps)]
    return step, torch.stack(metrics)


def test_compiled_step_with_static_marking_compiles_once_and_matches_the_twin():
    """reduce-overhead: the momentum buffers, lr, tau and the BN buffers marked static (for CUDA
    graphs); on the CPU inductor compiles without graphs, and the result must still be the plain
    per-parameter eager step's."""
    from torch._dynamo.utils import counters
    data = batches()
    twin_model, compiled_model = tiny_model(), tiny_model()
    _, twin = run(twin_model, data, compile="off", fused=False)
    counters.clear()
    step, compiled = run(compiled_model, data, compile="reduce-overhead")
    # two functions (forward+loss, update), each compiled once over 4 steps with moving lr and tau:
    # the static marks' identity guards held
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    marked = [step.lr, step.tau, *(b for _, _, bufs in step.groups for b in bufs)]
    assert all(getattr(t, "_dynamo_static_input_type", None) for t in marked)
    torch.testing.assert_close(compiled[:, :2], twin[:, :2], rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(compiled_model.state_dict().items(), twin_model.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-3, atol=1e-4, msg=name)


def test_each_update_sees_only_its_own_steps_gradients():
    """The first step starts with no gradients; step 2's update must see step 2's gradients alone
    (none left over from step 1): one plain backward from the weights step 2 started from."""
    data = batches(n=2)
    model = tiny_model()
    step = BYOLStep(model, LARS(lars_param_groups(model.online_parameters(), 1e-4), weight_decay=1e-4))
    assert all(p.grad is None for p in model.parameters())
    step(*data[0], lr=0.5, tau=0.9)
    start = copy.deepcopy(model)
    for p in start.parameters():
        p.grad = None
    step(*data[1], lr=0.5, tau=0.9)
    start(*data[1])[0].backward()
    for a, b in zip(model.online_parameters(), start.online_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_fused_step_equals_the_plain_reference_step():
    data = batches(n=3)
    a, b = tiny_model(), tiny_model()
    run(a, data, fused=True)
    run(b, data, fused=False)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_autocast_step_runs_and_keeps_fp32_master_weights():
    model = tiny_model()
    _, metrics = run(model, batches(n=2), precision="bf16")
    assert torch.isfinite(metrics).all()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fp16_step_scales_the_loss_and_skips_overflowing_steps():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step, metrics = run(model, batches(n=3), precision="fp16")
    assert torch.isfinite(metrics).all()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert step.scaler.get_scale() <= 2.0 ** 16  # halved on overflow, never grown in 3 steps
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
