"""Batched torch augmentation (fedssl.data.batch_augment): each operation against a
reference written another way, per-image draws, seeds, and the same views on every
device (the CUDA cases run where a GPU is present)."""

import numpy as np
import pytest
import torch

from fedssl.data import batch_augment as ba
from fedssl.data.batch_augment import TorchAugment

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def images(n=8, channels=1, size=16, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def weak_candidates(image: np.ndarray, shift: int) -> list[np.ndarray]:
    """Every flip + whole-pixel translation of a (C, H, W) image, borders reflected
    without repeating the edge (numpy's "reflect", OpenCV's REFLECT_101)."""
    padded = np.pad(image, ((0, 0), (shift, shift), (shift, shift)), mode="reflect")
    h, w = image.shape[1:]
    out = []
    for dy in range(-shift, shift + 1):
        for dx in range(-shift, shift + 1):
            crop = padded[:, shift - dy : shift - dy + h, shift - dx : shift - dx + w]
            out += [crop, crop[:, :, ::-1]]
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_a_weak_view_is_a_flip_and_a_whole_pixel_translation_with_reflected_borders(device):
    x = images(12, channels=3)
    out = TorchAugment("weak", seed=1)(x.to(device)).cpu()
    assert out.dtype == torch.uint8 and out.shape == x.shape
    shift = round(ba.WEAK_SHIFT * 16)
    for image, view in zip(x.numpy(), out.numpy()):
        assert any(np.array_equal(view, c) for c in weak_candidates(image, shift))
    assert len({view.tobytes() for view in TorchAugment("weak", seed=1)(x[:1].expand(12, -1, -1, -1)).numpy()}) > 6  # per image


@pytest.mark.parametrize("kind", ["weak", "strong"])
def test_a_seed_repeats_the_views_and_another_seed_changes_them(kind):
    x = images()
    first, again, other = TorchAugment(kind, 5)(x), TorchAugment(kind, 5)(x), TorchAugment(kind, 6)(x)
    assert torch.equal(first, again) and not torch.equal(first, other)
    augment = TorchAugment(kind, 5)
    augment(x)
    augment.reseed(5)  # as a client's round restarts it
    assert torch.equal(augment(x), first)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["weak", "strong"])
def test_every_device_draws_the_views_the_cpu_draws(kind, device):
    x = images(64, channels=3, size=24)
    on_cpu = TorchAugment(kind, 11)(x)
    here = TorchAugment(kind, 11)(x.to(device)).cpu()
    assert here.device.type == "cpu" and here.dtype == torch.uint8
    if device == "cpu" or kind == "weak":  # a gather: exact everywhere
        assert torch.equal(here, on_cpu)
    else:  # the GPU's float kernels round differently in blends and bilinear sampling
        differ = (here.int() - on_cpu.int()).abs()
        assert (differ > 1).float().mean() < 0.01


def test_strong_views_draw_two_different_operations_and_a_cutout_per_image():
    x = torch.full((200, 1, 16, 16), 40, dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    chosen = torch.rand(200, len(ba.OPS), generator=generator).argsort(1)[:, : ba.OPS_PER_IMAGE]
    assert (chosen[:, 0] != chosen[:, 1]).all() and len(set(chosen.flatten().tolist())) == len(ba.OPS)
    out = TorchAugment("strong", 0)(x)
    assert ((out == ba.GRAY).flatten(1).any(1)).all()  # every image has its hole (no op turns 40 into 127)


def test_cutout_makes_one_gray_rectangle_of_at_most_half_the_side():
    x = torch.zeros(50, 2, 20, 20)
    out = ba.cutout(x.clone(), torch.Generator().manual_seed(3))
    for hole in (out == ba.GRAY):
        assert torch.equal(hole[0], hole[1])  # every channel
        rows, cols = hole[0].any(1).nonzero().flatten(), hole[0].any(0).nonzero().flatten()
        tall, wide = len(rows), len(cols)
        assert 1 <= tall <= 10 and 1 <= wide <= 10
        assert int(hole[0].sum()) == tall * wide and rows[-1] - rows[0] + 1 == tall and cols[-1] - cols[0] + 1 == wide


@pytest.mark.parametrize("device", DEVICES)
def test_photometric_operations_match_their_definitions(device):
    x = images(4, channels=3).float().to(device)
    low = torch.zeros(4, device=device)
    assert torch.equal(ba.solarize(x, low), 255 - x)  # threshold 0: every pixel inverted
    assert torch.equal(ba.solarize(x, torch.full_like(low, 0.999)), torch.where(x >= 0.999 * 255, 255 - x, x))
    assert torch.equal(ba.posterize(x, low), (x / 16).floor() * 16)  # 4 bits kept
    assert torch.equal(ba.posterize(x, torch.full_like(low, 0.99)), x)  # 8 bits
    stretched = ba.autocontrast(x / 2 + 50, low)
    assert torch.allclose(stretched.amin((2, 3)), torch.zeros(4, 3, device=device))
    assert torch.allclose(stretched.amax((2, 3)), torch.full((4, 3), 255.0, device=device))
    assert torch.allclose(ba.brightness(x, torch.full_like(low, 0.5)), x)  # factor 1
    assert torch.allclose(ba.contrast(x, torch.full_like(low, 0.5)), x, atol=1e-4)
    two_levels = torch.tensor([10.0, 20.0]).repeat(32).view(1, 1, 8, 8).to(device)
    assert set(ba.equalize(two_levels, low[:1]).unique().tolist()) == {0.0, 255.0}
    flat = torch.full((1, 1, 8, 8), 77.0, device=device)
    assert torch.equal(ba.equalize(flat, low[:1]), flat)


@pytest.mark.parametrize("device", DEVICES)
def test_geometric_operations_at_magnitude_zero_leave_the_image_and_otherwise_move_it(device):
    x = images(4, channels=1).float().to(device)
    middle = torch.full((4,), 0.5, device=device)  # the middle of each range: no motion
    for name in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y"):
        assert torch.allclose(ba._OPS[name](x, middle), x, atol=1e-3), name
        assert not torch.allclose(ba._OPS[name](x, torch.ones(4, device=device)), x, atol=1), name
    # translate_x by the full 30% (side 20: 6 whole pixels), the border mirrored (edge pixel repeated)
    ramp = torch.arange(20.0, device=device).repeat(20).view(1, 1, 20, 20)
    moved = ba._OPS["translate_x"](ramp, torch.ones(1, device=device))[0, 0, 0]
    assert torch.allclose(moved[:14], ramp[0, 0, 0, 6:], atol=1e-3)
    assert torch.allclose(moved[14:], ramp[0, 0, 0, 19 - torch.arange(6, device=device)], atol=1e-3)


def test_an_unknown_kind_and_a_wrong_batch_are_refused():
    with pytest.raises(ValueError, match="unknown augmentation"):
        TorchAugment("medium")
    with pytest.raises(ValueError, match="uint8"):
        TorchAugment("weak", 0)(torch.zeros(2, 1, 8, 8))


@pytest.mark.parametrize("backend", ["torch", "albumentations"])
def test_a_clients_views_come_from_seed_round_and_client_with_either_backend(tiny_recipe, backend):
    """The unlabeled views of a client's round: the same when the round is drawn
    again (a resumed run, another order of clients), different for another client."""
    from fedssl.config.load import load_recipe
    from fedssl.engine.federation import Federation

    cfg = load_recipe(tiny_recipe, ["algorithm.name=fixmatch", "data.labels.mode=client", "data.labels.per_class=2",
                                    f"data.augment_backend={backend}", "data.augment=strong"])
    federation = Federation.build(cfg)
    learner = federation.trainer.learner

    def first_batch(client_id: int):
        client = federation.data.clients[client_id]
        payload = federation.algorithm.payload(1, federation.initial_state(), client_id)
        data = federation.trainer.client_data(client_id, client.labeled, client.unlabeled, payload)
        data.begin(learner)
        return next(iter(data.train_dataloader()))

    first, again, other = first_batch(0), first_batch(0), first_batch(1)
    assert set(first) == {"x", "y", "u_weak", "u_strong", "u_index"}
    for key in first:
        assert torch.equal(first[key], again[key]), key
    assert first["u_weak"].dtype == torch.float32 and -1 <= float(first["u_weak"].min()) < float(first["u_weak"].max()) <= 1
    assert not torch.equal(first["u_weak"], first["u_strong"])
    assert not torch.equal(first["u_strong"][: len(other["u_strong"])], other["u_strong"][: len(first["u_strong"])])
