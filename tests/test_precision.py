"""One dtype rule for views (DESIGN.md, the Views contract): from the real TorchvisionLoader to a real
BYOLStep on the CPU, in every precision. The GPU rule (views in the step's compute dtype) is simulated
on the CPU by giving the loader the dtype the rule names for a CUDA device."""
import pytest
import torch

from fastbyol.kernels.lars import LARS, lars_param_groups
from fastbyol.model import BYOL
from fastbyol.pipelines.torchvision import TorchvisionLoader
from fastbyol.step import BYOLStep
from fastbyol.views import view_dtype

COMPUTE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # the recipe's names


def loader_to_step(folder, precision, device_for_rule):
    """Two steps on the loader's views, with the dtype the rule gives for `device_for_rule`."""
    dtype = view_dtype(precision, device_for_rule)
    loader = TorchvisionLoader(folder, batch_size=8, image_size=16, small=True, dtype=dtype)
    torch.manual_seed(0)
    model = BYOL("cnn4", small=True, num_classes=loader.num_classes, proj_hidden=32, proj_dim=16)
    before = [p.detach().clone() for p in model.online_parameters()]
    step = BYOLStep(model, LARS(lars_param_groups(model.online_parameters(), 1e-4)), precision=precision)
    metrics = []
    for views, _ in zip(loader.epoch(0), range(2)):
        assert views.v1.dtype == views.v2.dtype == dtype
        assert views.v1.is_contiguous(memory_format=torch.channels_last)
        metrics.append(step(views.v1, views.v2, views.labels, lr=0.1, tau=0.99))
    moved = any(not torch.equal(a, p) for a, p in zip(before, model.online_parameters()))
    if precision == "fp16" and not moved:  # loss scaling may skip the first steps: they then halve the scale
        moved = step.scaler.get_scale() < 2.0 ** 16
    return torch.stack(metrics), model, moved


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_views_in_the_gpu_rule_dtype_feed_the_step_of_that_precision(tiny_folder, precision):
    """On a GPU, views come in the step's compute dtype: an fp32 step gets fp32 views (bf16 ones would
    meet fp32 weights and fail), a bf16 step bf16 views. Simulated here on the CPU."""
    assert view_dtype(precision, "cuda") == COMPUTE[precision]
    metrics, model, moved = loader_to_step(tiny_folder, precision, "cuda")
    assert torch.isfinite(metrics).all() and moved
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_on_the_cpu_views_are_fp32_whatever_the_precision(tiny_folder, precision):
    assert view_dtype(precision, "cpu") == torch.float32
    metrics, _, moved = loader_to_step(tiny_folder, precision, "cpu")
    assert torch.isfinite(metrics).all() and moved
