"""trusted_mask: every fused backend against the reference (bitwise) and against the spec (Sec. 4) directly.

cover == upsampled cells AND reliable; masked == fill where covered on every channel; images untouched elsewhere
(bitwise); the grid size rule; generator reproducibility; bad input.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import child_limit, default_dtype, layout, require_backend, same_values, skip_or_fail, spy_constexpr

import csl_kernels
from csl_kernels import _backends
from csl_kernels.trusted_mask import draw_cells, grid_size, upsample_cells

OP = "trusted_mask"


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a floating tensor (so NaN == NaN and -0.0 != 0.0)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def impl(backend: str, device: torch.device):
    return _backends.resolve(OP, backend, device)[1]


# every layout of conftest.layout (class_slice: every other channel of a larger tensor)
LAYOUTS = ("contiguous", "channels_last", "transposed", "strided", "class_slice", "batch_slice")


def make_images(seed: int, shape, dtype, kind: str, device, p_reliable: float = 0.6, nan: bool = True):
    g = torch.Generator().manual_seed(seed)
    b, k, h, w = shape
    images = torch.randn(b, k, h, w, generator=g).to(dtype)
    if nan:
        images[torch.rand(b, k, h, w, generator=g) < 0.05] = float("nan")
    reliable = torch.rand(b, h, w, generator=g) < p_reliable
    return layout(images.to(device), kind), layout(reliable.to(device), kind)


def check_against_spec(images, reliable, cells, masked, cover, fill):
    """The contract of spec Sec. 4, checked without the reference implementation."""
    b, k, h, w = images.shape
    gh, gw = cells.shape[1:]
    rows = [y * gh // h for y in range(h)]
    cols = [x * gw // w for x in range(w)]
    up = cells.cpu()[:, rows][:, :, cols]
    assert cover.dtype == torch.bool and cover.shape == (b, h, w)
    assert torch.equal(cover.cpu(), up & reliable.cpu())
    assert masked.dtype == images.dtype and masked.shape == images.shape
    hidden = cover.unsqueeze(1).expand_as(images)
    expected_fill = torch.tensor(fill, dtype=torch.float64).to(images.dtype)
    assert torch.equal(bits(masked[hidden]), bits(expected_fill.expand(int(hidden.sum())).to(masked.device)))
    assert torch.equal(bits(masked[~hidden]), bits(images[~hidden]))


@pytest.mark.parametrize("seed", range(60))
def test_random_cases_match_reference_and_spec(fused_backend, seed):
    device = require_backend(OP, fused_backend)
    rng = random.Random(seed)
    shape = (rng.randint(1, 2), rng.choice((1, 3, 4, 150)), rng.randint(1, 20), rng.randint(1, 20))
    dtype = rng.choice((torch.float32, torch.float16, torch.bfloat16, torch.float64))
    kind = rng.choice(LAYOUTS)
    block, rate = rng.choice((1, 3, 4, 8, 32)), rng.choice((0.0, 0.3, 0.7, 1.0))
    fill = rng.choice((0.0, -1.5, 0.1))
    images, reliable = make_images(seed, shape, dtype, kind, device)
    before = images.clone()
    out = {}
    for backend in ("reference", fused_backend):
        gen = torch.Generator().manual_seed(1000 + seed)
        out[backend] = csl_kernels.trusted_mask(images, reliable, block=block, rate=rate, generator=gen, fill=fill,
                                                backend=backend)
    (m_ref, c_ref), (masked, cover) = out["reference"], out[fused_backend]
    assert torch.equal(cover, c_ref) and torch.equal(bits(masked), bits(m_ref))
    cells = draw_cells(shape[0], shape[2], shape[3], block=block, rate=rate,
                       generator=torch.Generator().manual_seed(1000 + seed), device=device)
    check_against_spec(images, reliable, cells, masked, cover, fill)
    assert torch.equal(bits(images), bits(before))  # the input is not modified


@pytest.mark.parametrize("hw", [(1, 1), (7, 13), (65, 129)])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_odd_sizes_and_layouts(fused_backend, hw, kind):
    device = require_backend(OP, fused_backend)
    h, w = hw
    images, reliable = make_images(h * w, (2, 3, h, w), torch.float32, kind, device)
    g = torch.Generator().manual_seed(4)
    cells = torch.rand(2, h // 4 + 1, w // 5 + 1, generator=g).to(device) < 0.5
    masked, cover = impl(fused_backend, device)(images, cells, reliable, 0.0)
    check_against_spec(images, reliable, cells, masked, cover, 0.0)


def test_a_grid_finer_than_the_image(fused_backend):
    """gh > H and gw > W (the op takes any grid): pixel (y, x) still reads cell (y * gh // H, x * gw // W), and the
    cells no pixel falls in (some of them before cells that have pixels) are skipped."""
    device = require_backend(OP, fused_backend)
    images, reliable = make_images(5, (2, 3, 3, 4), torch.float32, "contiguous", device)
    g = torch.Generator().manual_seed(5)
    cells = (torch.rand(2, 7, 11, generator=g) < 0.5).to(device)
    assert not cells[:, :, 1].all()  # column 1 has no pixel (0 * 11 // 4 = 0, 1 * 11 // 4 = 2)
    masked, cover = impl(fused_backend, device)(images, cells, reliable, 0.0)
    check_against_spec(images, reliable, cells, masked, cover, 0.0)


def test_hand_made_grid(fused_backend):
    """H = W = 4, block 2: a 2 x 2 grid; cover and masked images written out by hand."""
    device = require_backend(OP, fused_backend)
    images = torch.arange(1, 33, dtype=torch.float32).view(1, 2, 4, 4).to(device)
    cells = torch.tensor([[[True, False], [False, True]]], device=device)
    reliable = torch.tensor([[[1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 1]]], dtype=torch.bool, device=device)
    masked, cover = impl(fused_backend, device)(images, cells, reliable, -7.0)
    expected_cover = torch.tensor([[[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]], dtype=torch.bool)
    assert torch.equal(cover.cpu(), expected_cover)
    expected = torch.arange(1, 33, dtype=torch.float32).view(1, 2, 4, 4)
    expected[:, :, expected_cover[0]] = -7.0
    assert torch.equal(masked.cpu(), expected)


def test_uneven_grid_upsampling(fused_backend):
    """H = 5 over gh = 2: rows 0-2 in cell 0 (y * 2 // 5 = 0, 0, 0), rows 3-4 in cell 1; W = 3 over gw = 3."""
    device = require_backend(OP, fused_backend)
    cells = torch.tensor([[[True, False, True], [False, True, False]]], device=device)
    reliable = torch.ones(1, 5, 3, dtype=torch.bool, device=device)
    _, cover = impl(fused_backend, device)(torch.zeros(1, 1, 5, 3, device=device), cells, reliable, 1.0)
    expected = torch.tensor([[1, 0, 1]] * 3 + [[0, 1, 0]] * 2, dtype=torch.bool)
    assert torch.equal(cover[0].cpu(), expected)
    assert torch.equal(upsample_cells(cells.cpu(), 5, 3)[0], expected)


@pytest.mark.parametrize(("height", "width", "block", "expected"), [
    (321, 321, 32, (10, 10)),  # 10.03
    (513, 513, 32, (16, 16)),  # 16.03
    (48, 16, 32, (2, 1)),  # 1.5 rounds up, 0.5 rounds up
    (47, 80, 32, (1, 3)),  # 1.47 rounds down, 2.5 rounds up
    (15, 15, 32, (1, 1)),  # 0.47 -> at least one cell
    (1, 1, 32, (1, 1)),
    (7, 13, 1, (7, 13)),
])
def test_grid_size_rule(height, width, block, expected):
    assert grid_size(height, width, block) == expected
    cells = draw_cells(2, height, width, block=block, rate=0.5, generator=torch.Generator().manual_seed(0),
                       device=torch.device("cpu"))
    assert cells.shape == (2, *expected) and cells.dtype == torch.bool


def test_rate_zero_and_one(fused_backend):
    device = require_backend(OP, fused_backend)
    images, reliable = make_images(3, (2, 3, 9, 10), torch.float32, "contiguous", device)
    masked, cover = csl_kernels.trusted_mask(images, reliable, block=2, rate=0.0, backend=fused_backend)
    assert not cover.any() and torch.equal(bits(masked), bits(images))
    masked, cover = csl_kernels.trusted_mask(images, reliable, block=2, rate=1.0, backend=fused_backend)
    assert torch.equal(cover, reliable)
    assert (masked[cover.unsqueeze(1).expand_as(masked)] == 0).all()


def test_bool_maps_whose_true_bytes_are_255_read_as_true(fused_backend):
    """A bool mask viewed from a 0 / 255 uint8 map holds the byte 255 for True: every nonzero byte of reliable and of
    cells is True (as in PyTorch's own ops), and cover is written as 0 / 1 bytes."""
    device = require_backend(OP, fused_backend)
    images, reliable = make_images(9, (2, 3, 9, 10), torch.float32, "contiguous", device)
    g = torch.Generator().manual_seed(9)
    cells = (torch.rand(2, 3, 4, generator=g) < 0.6).to(device)
    wide = [(m.to(torch.uint8) * 255).view(torch.bool) for m in (reliable, cells)]
    assert (wide[0].view(torch.uint8) == 255).any()
    masked, cover = impl(fused_backend, device)(images, wide[1], wide[0], -1.0)
    expected, expected_cover = impl(fused_backend, device)(images, cells, reliable, -1.0)
    assert expected_cover.any()
    assert torch.equal(cover.view(torch.uint8), expected_cover.view(torch.uint8))
    assert torch.equal(bits(masked), bits(expected))


@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "strided"])
def test_no_reliable_pixel_hides_nothing(fused_backend, kind):
    """An all-False reliable map (every pixel ignored or uncertain) hides nothing whatever the cells: the images come
    back bitwise, NaNs included."""
    device = require_backend(OP, fused_backend)
    images, reliable = make_images(4, (2, 3, 9, 10), torch.float16, kind, device)
    reliable = torch.zeros_like(reliable)
    masked, cover = csl_kernels.trusted_mask(images, reliable, block=2, rate=1.0, backend=fused_backend)
    assert not cover.any() and torch.equal(bits(masked), bits(images))


def test_generator_reproducibility(fused_backend):
    device = require_backend(OP, fused_backend)
    images, reliable = make_images(5, (2, 3, 32, 32), torch.float32, "contiguous", device, p_reliable=1.0)

    def run(gen):
        return csl_kernels.trusted_mask(images, reliable, block=4, rate=0.5, generator=gen, backend=fused_backend)

    a = run(torch.Generator().manual_seed(7))
    b = run(torch.Generator().manual_seed(7))
    assert torch.equal(a[1], b[1]) and torch.equal(bits(a[0]), bits(b[0]))
    gen = torch.Generator().manual_seed(7)
    first, second = run(gen)[1], run(gen)[1]  # the generator advances
    assert torch.equal(first, a[1]) and not torch.equal(first, second)
    assert not torch.equal(run(torch.Generator().manual_seed(8))[1], a[1])
    # The covered fraction of an all-reliable image follows the rate (64 cells per image).
    cover = run(torch.Generator().manual_seed(9))[1]
    assert 0.3 < cover.float().mean().item() < 0.7


def test_triton_custom_op():
    device = require_backend(OP, "triton")
    from csl_kernels.triton.trusted_mask import trusted_mask_triton

    images, reliable = make_images(6, (2, 3, 5, 6), torch.float32, "contiguous", device, nan=False)  # NaN != NaN
    cells = torch.rand(2, 2, 3, generator=torch.Generator().manual_seed(0)).to(device) < 0.5
    torch.library.opcheck(torch.ops.csl_triton.trusted_mask, (images, cells, reliable, 0.5))
    compiled = torch.compile(lambda x: trusted_mask_triton(x, cells, reliable, 0.5), fullgraph=True,
                             backend="aot_eager")
    m_c, c_c = compiled(images)
    m_e, c_e = trusted_mask_triton(images, cells, reliable, 0.5)
    assert torch.equal(c_c, c_e) and torch.equal(bits(m_c), bits(m_e))


@pytest.mark.parametrize(("images", "reliable", "kwargs", "error", "match"), [
    (torch.zeros(2, 3, 4, dtype=torch.float32), torch.ones(2, 3, 4, dtype=torch.bool), {}, ValueError, "images"),
    (torch.zeros(2, 3, 4, 4, dtype=torch.int64), torch.ones(2, 4, 4, dtype=torch.bool), {}, ValueError, "images"),
    (torch.zeros(2, 3, 4, 4), torch.ones(2, 4, 4, dtype=torch.uint8), {}, TypeError, "reliable"),
    (torch.zeros(2, 3, 4, 4), torch.ones(2, 4, 5, dtype=torch.bool), {}, ValueError, "reliable"),
    (torch.zeros(2, 3, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool), {}, ValueError, "reliable"),
    (torch.zeros(2, 3, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool), {"block": 0}, ValueError, "block"),
    (torch.zeros(2, 3, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool), {"block": 2.5}, ValueError, "block"),
    (torch.zeros(2, 3, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool), {"block": True}, ValueError, "block"),
    (torch.zeros(2, 3, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool), {"block": np.int64(32)}, ValueError,
     r"block must be a positive int, got .*numpy.int64"),
    (torch.zeros(2, 3, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool), {"rate": True}, ValueError, "rate"),
    (torch.zeros(2, 3, 4, 4, dtype=torch.float8_e4m3fn), torch.ones(2, 4, 4, dtype=torch.bool), {}, ValueError,
     "float8_e4m3fn"),
    (torch.zeros(2, 3, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool), {"rate": 1.5}, ValueError, "rate"),
    (torch.zeros(2, 3, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool), {"rate": -0.1}, ValueError, "rate"),
    # out of float16's range (unchecked, it would be inf in the fused backends and an overflow error in the reference)
    (torch.zeros(2, 3, 4, 4, dtype=torch.float16), torch.ones(2, 4, 4, dtype=torch.bool), {"fill": 1e5}, ValueError,
     "fill=100000.0 does not fit"),
    (torch.zeros(2, 3, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool), {"fill": float("nan")}, ValueError, "fill"),
    (torch.zeros(2, 3, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool), {"fill": "0"}, ValueError, "fill"),
    (torch.zeros(2, 3, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool), {"generator": 0}, TypeError,
     "generator must be a torch.Generator"),
])
@pytest.mark.parametrize("backend", ["auto", *_backends.BACKENDS])
def test_bad_input_errors(backend, images, reliable, kwargs, error, match):
    """The checks run at the public entry, before a backend is chosen: every backend name, available here or not,
    gets the same clear error."""
    with pytest.raises(error, match=match):
        csl_kernels.trusted_mask(images, reliable, backend=backend, **kwargs)


_HUGE_CHANNEL_STRIDE = """
import sys, torch, csl_kernels
backend, device = sys.argv[1], torch.device(sys.argv[2])
stride_c = 2**30 + 16  # channel 2 starts past 2^31 elements: (K - 1) * stride(1) does not fit in int32
try:
    base = torch.empty(2 * stride_c + 64, dtype=torch.float16, device=device)  # 4 GiB; a few pages are touched
except (RuntimeError, MemoryError) as exc:  # a machine that reserves memory up front (no overcommit)
    print("skip: cannot reserve 4 GiB:", exc)
    sys.exit(0)
images = base.as_strided((1, 3, 4, 5), (3 * stride_c, stride_c, 5, 1))
g = torch.Generator().manual_seed(0)
for k in range(3):
    base[k * stride_c: k * stride_c + 20] = torch.rand(20, generator=g).half().to(device)
reliable = (torch.rand(1, 4, 5, generator=g) < 0.6).to(device)
run = lambda b, x: csl_kernels.trusted_mask(x, reliable, block=2, generator=torch.Generator().manual_seed(1), backend=b)
out, ref = run(backend, images), run("reference", images.contiguous())
assert out.cover.any() and not out.cover.all()
assert torch.equal(out.cover, ref.cover) and torch.equal(out.images, ref.images), (out.images, ref.images)
print("ok")
"""


def test_channel_offsets_past_int32(fused_backend):
    """An image whose channels lie 2^30 elements apart (a view of a 4 GiB buffer, almost all of it never touched):
    the channel offsets need int64. In a subprocess: an int32 offset would read before the buffer and crash."""
    import subprocess
    import sys

    device = require_backend(OP, fused_backend)
    proc = subprocess.run([sys.executable, "-c", _HUGE_CHANNEL_STRIDE, fused_backend, str(device)],
                          capture_output=True, text=True, timeout=child_limit(300))
    if proc.returncode == 0 and proc.stdout.startswith("skip:"):
        skip_or_fail(fused_backend, proc.stdout.strip())
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]


def test_triton_int64_offsets_path(monkeypatch):
    """Huge images switch the kernel to int64 indices; forced here on a small input."""
    device = require_backend(OP, "triton")
    from csl_kernels.triton import trusted_mask as module

    monkeypatch.setattr(module, "wide", lambda *args, **kwargs: True)
    launched = spy_constexpr(monkeypatch, module, "_trusted_mask_kernel", "WIDE")
    images, reliable = make_images(8, (2, 3, 9, 7), torch.float32, "strided", device)
    cells = torch.rand(2, 3, 2, generator=torch.Generator().manual_seed(1)).to(device) < 0.5
    masked, cover = impl("triton", device)(images, cells, reliable, 0.25)
    check_against_spec(images, reliable, cells, masked, cover, 0.25)
    assert launched and all(launched)  # (a GPU that tunes launches once per candidate)


def test_the_defaults_are_the_papers_block_32_and_rate_0_7():
    """Spec Sec. 4: 32-pixel blocks, each hidden with probability 0.7, filled with 0."""
    images = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    reliable = torch.ones(4, 96, 96, dtype=torch.bool)

    def masked(**settings) -> torch.Tensor:
        return csl_kernels.trusted_mask(images, reliable, generator=torch.Generator().manual_seed(1),
                                        backend="reference", **settings).images

    default = masked()
    assert torch.equal(default, masked(block=32, rate=0.7, fill=0.0))
    for other in ({"block": 16}, {"rate": 0.5}, {"fill": 1.0}):  # each setting changes this draw
        assert not torch.equal(default, masked(**other)), other


def test_the_grid_does_not_depend_on_the_default_dtype():
    """One seed draws one block grid, with or without a generator, whatever ``torch.get_default_dtype()`` is (a
    float64 default would draw other numbers from the same generator state)."""
    def grids():
        torch.manual_seed(0)
        unseeded = draw_cells(3, 40, 40, block=4, rate=0.5, generator=None, device=torch.device("cpu"))
        seeded = draw_cells(3, 40, 40, block=4, rate=0.5, generator=torch.Generator().manual_seed(0),
                            device=torch.device("cpu"))
        return unseeded, seeded

    expected = grids()
    with default_dtype(torch.float64):
        drawn = grids()
    assert all(torch.equal(a, b) for a, b in zip(expected, drawn, strict=True))


def test_a_grid_drawn_by_a_generator_on_another_device_moves_to_the_images_device():
    """A CPU generator with images elsewhere (a CUDA run seeding a CPU torch.Generator; meta stands in for the GPU
    here): the grid is drawn on the generator's device and then moved to the images' device, where the backends
    read it."""
    g = torch.Generator().manual_seed(0)
    cells = draw_cells(2, 8, 8, block=4, rate=0.5, generator=g, device=torch.device("meta"))
    assert cells.device.type == "meta" and cells.shape == (2, 2, 2) and cells.dtype == torch.bool
    out = csl_kernels.trusted_mask(torch.zeros(2, 3, 8, 8, device="meta"),
                                   torch.ones(2, 8, 8, dtype=torch.bool, device="meta"), block=4,
                                   generator=torch.Generator().manual_seed(0), backend="reference")
    assert out.images.device.type == "meta" and out.cover.device.type == "meta"
    assert out.cover.shape == (2, 8, 8)


@pytest.mark.parametrize("shape", [(46342, 1), (1, 46342)])
def test_triton_cell_products_past_int32_use_int64(shape):
    """With block=1 an image 46342 pixels tall (or wide) has as many cells, and y * gh (x * gw) of its last pixel
    passes 2^31 although the image has only 46342 pixels: the kernel must take its int64 path for these products
    (wide()'s extra terms), or the pixel lands in a wrapped cell."""
    device = require_backend("trusted_mask", "triton")
    images = torch.randn(1, 2, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    reliable = torch.ones(1, *shape, dtype=torch.bool, device=device)
    outs = [csl_kernels.trusted_mask(images, reliable, block=1, rate=0.5, generator=torch.Generator().manual_seed(3),
                                     backend=b) for b in ("reference", "triton")]
    assert torch.equal(outs[0].cover.cpu(), outs[1].cover.cpu())
    assert torch.equal(outs[0].images.cpu(), outs[1].images.cpu())


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu", "cuda"])
@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "strided", "class_slice"])
def test_the_masked_images_keep_the_memory_format_of_the_input(backend, kind):
    """Every backend returns the masked images in the layout ``torch.empty_like(images)`` has: channels_last stays
    channels_last, so a channels_last model gets channels_last inputs whichever backend ``auto`` picked (the
    reference's masked_fill returned NCHW), and a view that is not dense comes back contiguous."""
    device = require_backend(OP, backend)
    images, reliable = make_images(0, (2, 3, 6, 7), torch.float32, kind, device)
    out = csl_kernels.trusted_mask(images, reliable, block=2, generator=torch.Generator().manual_seed(0),
                                   backend=backend)
    assert out.images.stride() == torch.empty_like(images).stride()
    assert same_values(out.images, torch.where(out.cover.unsqueeze(1), 0.0, images))
