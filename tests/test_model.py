import pytest
import torch
import torchvision

from fastbyol import InputError
from fastbyol.model import BYOL, build_encoder, regression_loss, small_stem


def test_symmetric_loss_equals_its_expansion():
    torch.manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(8, 16) for _ in range(4))
    expanded = 0
    for p, z in ((p1, z2), (p2, z1)):
        pn, zn = p / p.norm(dim=1, keepdim=True), z / z.norm(dim=1, keepdim=True)
        expanded = expanded + ((pn - zn) ** 2).sum(1)  # ||p/|p| - z/|z| ||^2 = 2 - 2 cos
    ours = regression_loss(p1, z2) + regression_loss(p2, z1)
    torch.testing.assert_close(ours, expanded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, 4 - 2 * torch.cosine_similarity(p1, z2) - 2 * torch.cosine_similarity(p2, z1))


def test_gradient_flows_only_through_the_online_branch():
    torch.manual_seed(0)
    model = BYOL("cnn4", small=True, num_classes=3, proj_hidden=32, proj_dim=16)
    v1, v2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    loss, byol, _, _ = model(v1, v2, torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert all(p.grad is None for p in model.target.parameters())
    assert all(not p.requires_grad for p in model.target.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.predictor.parameters())
    assert model.online["encoder"][0].weight.grad.abs().sum() > 0
    # the probe sees a detached representation: its loss alone gives the encoder no gradient
    model.zero_grad(set_to_none=True)
    _, _, probe_loss, _ = model(v1, v2, torch.tensor([0, 1, 2, 0]))
    y = model.online["encoder"](v1)
    torch.nn.functional.cross_entropy(model.probe(y.detach()), torch.tensor([0, 1, 2, 0])).backward()
    assert model.online["encoder"][0].weight.grad is None


def test_batchnorm_statistics_are_per_view():
    """Each view goes through the network alone: the loss of (v1, v2) does not depend on the other
    view's batch statistics, so scaling v2 by a constant leaves view 1's representation unchanged."""
    torch.manual_seed(0)
    model = BYOL("cnn4", small=True, num_classes=2, proj_hidden=32, proj_dim=16)
    enc = model.online["encoder"]
    v1 = torch.randn(8, 3, 16, 16)
    seen = []
    handle = enc.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    model(v1, torch.randn(8, 3, 16, 16), torch.zeros(8, dtype=torch.long))
    model(v1, 10 * torch.randn(8, 3, 16, 16), torch.zeros(8, dtype=torch.long))
    handle.remove()
    torch.testing.assert_close(seen[0], seen[2])


@pytest.mark.parametrize("arch,small", [("resnet18", True), ("resnet18", False), ("resnet50", True)])
def test_exported_backbone_loads_into_torchvision(arch, small):
    model = BYOL(arch, small=small, num_classes=10, proj_hidden=64, proj_dim=32)
    reference = getattr(torchvision.models, arch)()
    if small:
        small_stem(reference)
    result = reference.load_state_dict(model.backbone_state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    reference.fc = torch.nn.Identity()
    reference.eval(), model.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(reference(x), model.online["encoder"](x))


def test_small_stem_and_dims():
    net, dim = build_encoder("resnet18", small=True)
    assert dim == 512 and net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    assert build_encoder("resnet50", small=False)[1] == 2048
    with pytest.raises(InputError, match="resnet9"):
        build_encoder("resnet9", small=False)
