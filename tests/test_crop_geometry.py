"""Crop geometry against torchvision (issue 13, item 2): the reference loader's views, crop_and_flip and
crop_resize equal torchvision's resized_crop + horizontal_flip called here with each sample's box, on
asymmetric images where a swapped axis or a vertical flip shows. The helper lives in tests/geometry.py
so that every later loader's geometry is held to the same call."""
import pytest
import torch
import torchvision.transforms.v2.functional as F

import fastbyol.pipelines.torchvision as tvp
from fastbyol.kernels.crop_resize import crop_and_flip, crop_resize, pack_images
from fastbyol.views import byol_view_specs, sample_view_params
from geometry import (ASYMMETRIC_SIZES, assert_views_match_torchvision, asymmetric_folder,
                      asymmetric_image, unnormalize)

SIZE = 24


def params_for(images, view=0, seed=5, epoch=1, scale=(0.08, 1.0)):
    spec = byol_view_specs(SIZE, small=True, scale=scale)[view]
    heights = torch.tensor([img.shape[1] for img in images])
    widths = torch.tensor([img.shape[2] for img in images])
    return sample_view_params(seed, epoch, torch.arange(len(images)), view, spec, heights, widths)


def mixed_images(n=16):
    return [asymmetric_image(*ASYMMETRIC_SIZES[i % len(ASYMMETRIC_SIZES)], seed=i) for i in range(n)]


def test_crop_and_flip_is_torchvisions_resized_crop_and_flip():
    images = mixed_images()
    params = params_for(images)
    assert params.flip.any() and not params.flip.all()  # both branches are exercised
    views = torch.stack([crop_and_flip(img, box, flip, SIZE) for img, box, flip in
                         zip(images, params.crop.tolist(), params.flip.tolist())])
    assert_views_match_torchvision(views, images, params.crop, params.flip, SIZE)


def test_crop_resize_of_a_packed_batch_is_torchvisions():
    images = mixed_images()
    params = params_for(images, view=1, seed=6)
    views = crop_resize(pack_images(images), params.crop, params.flip, SIZE)
    assert views.dtype == torch.uint8
    assert_views_match_torchvision(views, images, params.crop, params.flip, SIZE)


def test_the_helper_sees_a_vertical_flip_and_swapped_axes():
    images = mixed_images(4)
    params = params_for(images)
    good = crop_resize(pack_images(images), params.crop, params.flip, SIZE)
    with pytest.raises(AssertionError):
        assert_views_match_torchvision(F.vertical_flip(good), images, params.crop, params.flip, SIZE)
    with pytest.raises(AssertionError):
        assert_views_match_torchvision(good.transpose(2, 3), images, params.crop, params.flip, SIZE)
    with pytest.raises(AssertionError):
        assert_views_match_torchvision(good, images, params.crop, ~params.flip, SIZE)


def test_reference_loader_views_are_torchvisions_geometry(tmp_path, monkeypatch):
    """Through the real TorchvisionLoader (decode, keyed params, epoch order, normalisation), with its
    colour stage made the identity so that only geometry is left."""
    root = asymmetric_folder(tmp_path / "data")
    monkeypatch.setitem(tvp.PHOTOMETRIC, "batched", lambda crops, params, spec: crops)
    seed, epoch = 3, 2
    loader = tvp.TorchvisionLoader(root, batch_size=4, image_size=SIZE, small=True, seed=seed,
                                   workers=0, device="cpu", dtype=torch.float32)
    specs = byol_view_specs(SIZE, small=True)
    seen = 0
    for views in loader.epoch(epoch):
        index = views.index.tolist()
        images = [tvp.decode_image(loader.samples[i][0]) for i in index]
        heights = torch.tensor([img.shape[1] for img in images])
        widths = torch.tensor([img.shape[2] for img in images])
        for view, spec, got in ((0, specs[0], views.v1), (1, specs[1], views.v2)):
            params = sample_view_params(seed, epoch, index, view, spec, heights, widths)
            # float32 normalisation round trip: within 1e-3 of a level before rounding
            assert (unnormalize(got) - unnormalize(got).round()).abs().max() < 1e-3
            assert_views_match_torchvision(unnormalize(got), images, params.crop, params.flip, SIZE)
        seen += len(index)
    assert seen == len(loader) * 4 == 8
