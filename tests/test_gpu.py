"""What only a GPU can show: CUDA-graph capture and replay of the selection + loss step, launches on the current
stream and on a non-current device, and bf16-autocast training steps of ``csl train`` with each fused backend.

Every test here is marked ``gpu`` (skipped with "needs a CUDA device" elsewhere, see conftest.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import check_outputs_of_repeated_rows, child_deadline, require_backend, same_values, variance_of_copies

import csl_kernels
from csl_kernels.confusion_matrix import confusion_matrix_reference
from csl_kernels.pcos_weights import pcos_weights_reference
from csl_kernels.weighted_cross_entropy import weighted_cross_entropy_reference

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ("triton", "cuda")


def _inputs(seed: int, device, batch=2, classes=21, height=37, width=45, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, classes, height, width, generator=g) * 3).to(device=device, dtype=dtype)
    ignore = torch.where(torch.rand(batch, height, width, generator=g) < 0.15, 255, 0).to(device=device,
                                                                                          dtype=torch.uint8)
    images = torch.randn(batch, 3, height, width, generator=g).to(device)
    return logits, ignore, images


def _selection_step(logits, ignore, images, backend):
    """The unlabeled part of a CSL step: weights, TMP on the reliable pixels, weighted CE forward + backward."""
    sel = csl_kernels.pcos_weights(logits.detach(), ignore, backend=backend)
    masked = csl_kernels.trusted_mask(images, sel.reliable, block=8, rate=0.5, backend=backend)
    loss = csl_kernels.weighted_cross_entropy(logits, sel.label, sel.weight, ignore, backend=backend)
    loss.backward()
    return sel.weight, sel.label, sel.reliable, masked.images, masked.cover, loss.detach()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_step_captures_in_a_cuda_graph_and_replays_on_new_inputs(backend):
    """The selection step has no host synchronisation, so it captures; a replay on new inputs (copied into the
    captured buffers) gives what an eager call gives on them."""
    device = require_backend("pcos_weights", backend)
    require_backend("weighted_cross_entropy", backend)
    require_backend("trusted_mask", backend)
    logits, ignore, images = _inputs(0, device)
    static_logits = logits.clone().requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile, tune and allocate outside the capture
        for _ in range(2):
            static_logits.grad = None
            _selection_step(static_logits, ignore, images, backend)
    torch.cuda.current_stream().wait_stream(side)
    static_logits.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = _selection_step(static_logits, ignore, images, backend)
    new_logits, _, new_images = _inputs(1, device)
    with torch.no_grad():
        static_logits.copy_(new_logits)
        images.copy_(new_images)
    static_logits.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    weight, label, reliable, masked_images, cover, loss = outputs
    eager_logits = new_logits.clone().requires_grad_()
    eager = _selection_step(eager_logits, ignore, new_images, backend)
    torch.testing.assert_close(weight, eager[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(label, eager[1]) and torch.equal(reliable, eager[2])
    torch.testing.assert_close(loss, eager[5], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(static_logits.grad, eager_logits.grad, rtol=1e-5, atol=1e-7)
    # The TMP grid is random (drawn inside the graph from the CUDA generator): check the contract, not the draw.
    assert not (cover & ~reliable).any()
    expected = torch.where(cover.unsqueeze(1), torch.zeros_like(new_images), new_images)
    assert torch.equal(masked_images, expected)
    ref = pcos_weights_reference(new_logits.double().cpu(), ignore.cpu() != 255, 8.0, False, False)
    torch.testing.assert_close(weight.cpu(), ref.weight.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_ops_launch_on_the_current_stream(backend):
    """Called under ``torch.cuda.stream(s)`` the kernels run on ``s``: while the default stream is still busy (a
    sleep kernel queued before the step), the step's results, copied to the host on ``s``, are the results of the same
    step run alone. A kernel launched on the default stream instead would run only after the sleep: the copies made
    on ``s`` would read its outputs before they are written."""
    device = require_backend("pcos_weights", backend)
    require_backend("weighted_cross_entropy", backend)
    require_backend("trusted_mask", backend)
    logits, ignore, images = _inputs(2, device, batch=3, height=64, width=80)
    eager_logits = logits.clone().requires_grad_()
    expected = _selection_step(eager_logits, ignore, images, backend)  # also compiles the kernels for this shape
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    # The default stream is busy for about five seconds (cycles at ~2 GHz): long enough for the step also when other
    # test processes share the GPU and slow the step (gpu_check.sh runs 14).
    torch.cuda._sleep(10_000_000_000)
    with torch.cuda.stream(side):
        # The leaf is made on side too: autograd makes the caller's stream wait for the leaves' streams.
        stream_logits = logits.clone().requires_grad_()
        got = _selection_step(stream_logits, ignore, images, backend)
        on_host = [t.detach().cpu() for t in (got[0], got[1], got[5], stream_logits.grad)]  # waits for side only
    default_still_busy = not torch.cuda.default_stream().query()
    torch.cuda.synchronize()
    assert default_still_busy, ("the default stream finished its sleep before the step's results were read on the "
                                "side stream (a device-wide synchronisation in the step?): the test shows nothing")
    torch.testing.assert_close(on_host[0], expected[0].cpu())
    assert torch.equal(on_host[1], expected[1].cpu())
    torch.testing.assert_close(on_host[2], expected[5].cpu())
    torch.testing.assert_close(on_host[3], eager_logits.grad.cpu())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_ops_on_a_non_current_device(backend):
    """Tensors on ``cuda:1`` while ``cuda:0`` is current: every launcher guards the device, so the results match
    the float64 reference (a missing guard launches on the wrong device and fails or returns garbage)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    require_backend("pcos_weights", backend)
    device = torch.device("cuda", 1)
    logits, ignore, _ = _inputs(3, device)
    with torch.cuda.device(0):
        sel = csl_kernels.pcos_weights(logits, ignore, backend=backend)
        z = logits.clone().requires_grad_()
        loss = csl_kernels.weighted_cross_entropy(z, sel.label, sel.weight, ignore, backend=backend)
        loss.backward()
        target = torch.where(ignore == 255, 255, sel.label)
        counts = csl_kernels.confusion_matrix(sel.label, target, 21, backend=backend)
    ref = pcos_weights_reference(logits.double().cpu(), ignore.cpu() != 255, 8.0, False, False)
    torch.testing.assert_close(sel.weight.cpu(), ref.weight.float(), rtol=1e-4, atol=1e-5)
    ref_loss = weighted_cross_entropy_reference(logits.double().cpu(), sel.label.cpu(), sel.weight.double().cpu(),
                                                ignore.cpu() != 255)
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-4, atol=1e-6)
    assert z.grad.device == device and torch.isfinite(z.grad).all()
    assert torch.equal(counts.cpu(), confusion_matrix_reference(sel.label.cpu(), target.cpu(), 21, 255))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_csl_train_bf16_autocast_steps(tmp_path, backend):
    """A few iterations of ``csl train`` on cuda with bf16 autocast and the backend's selection: finite losses,
    some pixels selected, a checkpoint written."""
    require_backend("pcos_weights", backend)
    from csl.cli import main
    from csl.logging_utils import read_metrics

    out = tmp_path / backend
    rc = main(["train", "--config", "demo", "device=cuda", "train.amp=bf16", "train.iters=4", "train.iters_per_epoch=4",
               "train.log_every=1", "train.progress=false", f"kernels.backend={backend}", "data.num_workers=0",
               "data.synthetic.num_val=4", f"output_dir={out}"])
    assert rc in (0, None)
    records = read_metrics(str(out / "metrics.jsonl"), "train")
    assert len(records) == 4
    for r in records:
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("loss", "loss_x", "loss_s", "loss_m", "loss_fp")), r
        assert 0 < r["mask_ratio"] <= 1, r
    assert (out / "latest.pt").exists()


_REGISTER_CLASSES_CHILD = r"""
import sys, torch, csl_kernels
from torch.profiler import ProfilerActivity, profile
out, kernels = {}, set()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for classes in (2, 11, 21, 32, 33):
            for layout in ("channels_last", "contiguous"):
                g = torch.Generator().manual_seed(classes)
                z = (torch.randn(2, classes, 19, 23, generator=g) * 4).to(dtype).cuda()
                if layout == "channels_last":
                    z = z.contiguous(memory_format=torch.channels_last)
                z[0, classes // 2, 3, 4] = float("nan")
                z[0, 0, 7, 8] = float("inf")
                z[1, classes - 1, 2, 2] = float("-inf")
                z[1, :, 5, 6] = 1.5  # tied logits
                ignore = torch.where(torch.rand(2, 19, 23, generator=g) < 0.2, 255, 0).to(torch.uint8).cuda()
                key = f"{dtype}-{classes}-{layout}"
                out[key + "-features"] = tuple(csl_kernels.residual_features(z, ignore, backend="cuda"))
                out[key + "-log-features"] = tuple(csl_kernels.residual_features(z, ignore, confidence="log",
                                                                                 rule="released", backend="cuda"))
                for rule in ("paper", "released"):
                    for groups in ("image", "class"):  # class groups: the features kernel's tile path
                        got = csl_kernels.pcos_weights(z, ignore, rule=rule, groups=groups, backend="cuda",
                                                       return_stats=True)
                        out[f"{key}-pcos-{rule}-{groups}"] = (got.weight, got.label, got.reliable, *got.stats)
                        if groups == "image":
                            sel = got
                logits = z.detach().clone().requires_grad_()  # the NaN and inf pixels too
                loss = csl_kernels.weighted_cross_entropy(logits, sel.label, sel.weight, ignore, backend="cuda")
                loss.backward()
                out[key + "-ce"] = (loss.detach(), logits.grad)
    torch.cuda.synchronize()
kernels = sorted({e.name for e in prof.events() if "features_kernel" in e.name or "weighted_ce_" in e.name})
torch.save({"outputs": {k: tuple(t.cpu() for t in v) for k, v in out.items()}, "kernels": kernels}, sys.argv[1])
"""


def _run_register_classes_children(settings: dict[str, str], tmp_path) -> dict[str, subprocess.CompletedProcess]:
    """One child per ``CSL_CUDA_REGISTER_CLASSES`` value (read once per process), all at once, killed
    ``child_deadline(300)`` after their start; name -> finished run, its output saved to
    ``tmp_path / f"out{name}.pt"``."""
    children = {}
    for name, setting in settings.items():
        env = {**os.environ, "CSL_CUDA_REGISTER_CLASSES": setting}
        command = [sys.executable, "-c", _REGISTER_CLASSES_CHILD, str(tmp_path / f"out{name}.pt")]
        children[name] = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done, time_left = {}, child_deadline(300)
    try:
        for name, child in children.items():
            stdout, stderr = child.communicate(timeout=time_left())
            done[name] = subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
    return done


def test_register_classes_give_the_plain_loops_outputs_bitwise(tmp_path):
    """The CUDA kernels of the features, PCOS features and CE forward load a pixel's C <= 32 logits together into
    registers (PixelLogits, csl_math.h); with ``CSL_CUDA_REGISTER_CLASSES=0`` they read them class by class. Both do
    the same arithmetic in the same order, so features (both confidences), PCOS weights and statistics (both rules;
    image groups, and class groups, whose Gram sums take the features kernel's tile path) and the CE with its
    gradient are equal, NaN for NaN (C = 2 to 33; fp32 / bf16 / fp16 / fp64; channels_last and contiguous; NaN, +-inf
    and tied logits). The kernels that ran (profiler) show that each setting took effect."""
    require_backend("pcos_weights", "cuda")
    results = {}
    for setting, done in _run_register_classes_children({"1": "1", "0": "0"}, tmp_path).items():
        assert done.returncode == 0, done.stderr[-3000:]
        results[setting] = torch.load(tmp_path / f"out{setting}.pt")
    held, plain = results["1"]["kernels"], results["0"]["kernels"]
    for name in ("residual_features_kernel", "pcos_features_kernel", "weighted_ce_forward_kernel"):
        assert any(name in k and ", 32>" in k for k in held), (name, held)
        assert not any(name in k and ", 32>" in k for k in plain), (name, plain)
        assert any(name in k and ", 0>" in k for k in plain), (name, plain)
    outputs = results["1"]["outputs"]
    assert outputs.keys() == results["0"]["outputs"].keys() and len(outputs) == 4 * 5 * 2 * 7
    for key, tensors in outputs.items():
        for got, other in zip(tensors, results["0"]["outputs"][key], strict=True):
            assert same_values(got, other), key


@pytest.mark.cpp_error_path  # a TORCH_CHECK in the extension: crashed csl's processes on the H200 of 2026-12-04
def test_register_classes_setting_refuses_an_unknown_value(tmp_path):
    require_backend("pcos_weights", "cuda")
    done = _run_register_classes_children({"": "yes"}, tmp_path)[""]
    assert done.returncode == 1 and "CSL_CUDA_REGISTER_CLASSES must be 0 or 1, got 'yes'" in done.stderr, \
        (done.returncode, done.stderr[-3000:])


# Launch paths no small input reaches (a read-through of the CUDA sources, checked there by running the kernels'
# source rewritten for the host): the grid-y split of PCOS's chunk passes (B > 65535), chunks of several tiles (class
# groups at C = 150 beyond 5.7 M pixels), the CE finish kernel over many partial sums, the confusion matrix's
# grid-stride loop.

def _stats(out):
    return (*out[:3], *out.stats)


@pytest.mark.parametrize("groups", ["image", "class"])
def test_pcos_images_past_the_first_grid_y_launch(groups):
    """B = 65535 + 300: the chunk passes run two launches (grid y <= 65535). Every image here is one chunk of 1024
    pixels whatever B, so the last 300 images must give bitwise what they give alone."""
    device = require_backend("pcos_weights", "cuda")
    g = torch.Generator().manual_seed(0)
    b = 65535 + 300
    z = (torch.randn(b, 3, 2, 3, generator=g) * 3).to(device)
    ignore = torch.where(torch.rand(b, 2, 3, generator=g) < 0.2, 255, 0).to(device=device, dtype=torch.uint8)
    z[-1, 1, 0, 0] = float("nan")
    whole = csl_kernels.pcos_weights(z, ignore, groups=groups, backend="cuda", return_stats=True)
    tail = csl_kernels.pcos_weights(z[-300:], ignore[-300:], groups=groups, backend="cuda", return_stats=True)
    for a, t in zip(_stats(whole), _stats(tail), strict=True):
        assert torch.equal(a[-300:], t)
    assert int(whole.stats.n_nonfinite[-1]) == 1 and int(whole.stats.n_nonfinite[:-1].sum()) == 0


@pytest.mark.slow
def test_pcos_class_groups_over_chunks_of_several_tiles():
    """C = 150 class groups on 2400 x 2400 pixels: the chunk is 2048 pixels (two tiles; records would pass 64 MiB with
    1024), so the class sums accumulate tile after tile. The logits repeat one row (stride 0 along H): every
    statistic is H times the row's (counts exactly), and every row gets the row's labels and weights."""
    device = require_backend("pcos_weights", "cuda")
    g = torch.Generator().manual_seed(1)
    h = w = 2400
    row = (torch.randn(1, 150, 1, w, generator=g) * 3).to(device)
    row[:, 7] += 4.0  # a dominant class: populated groups with two clusters
    z = row.expand(1, 150, h, w)
    whole = csl_kernels.pcos_weights(z, groups="class", backend="cuda", return_stats=True)
    one = csl_kernels.pcos_weights(row, groups="class", backend="cuda", return_stats=True)
    assert torch.equal(whole.label, one.label.expand(1, h, w))
    assert torch.equal(whole.stats.count, one.stats.count * h)
    assert int(whole.stats.count.sum()) == h * w
    torch.testing.assert_close(whole.stats.mu, one.stats.mu, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(whole.stats.var, variance_of_copies(one.stats.var, one.stats.count, h), rtol=1e-6,
                               atol=1e-12)
    assert (whole.weight == whole.weight[:, :1]).all()  # identical rows, identical weights


@pytest.mark.slow
def test_ops_past_2_to_the_31_logit_elements():
    """C = 3 bf16 logits of 24000 x 30000 pixels: 2.16e9 elements, so the offsets of the second and third class pass
    2^31 (the pixel indices stay below it). The rows repeat one row (stride 0 along H), so the first and the last row
    must give the row's features, labels, weights and gradient. The backends run one after the other (about 25 GB of
    GPU memory each)."""
    height, width = 24000, 30000
    assert 3 * height * width > 2**31 > height * width
    for backend in GPU_BACKENDS:
        device = require_backend("pcos_weights", backend)
        check_outputs_of_repeated_rows(backend, device, 3, height, width, torch.bfloat16)
        torch.cuda.empty_cache()


def test_ce_over_many_blocks_matches_cpu():
    """2 x 21 x 513 x 513: 515 forward blocks, so the one-block finish kernel adds several partial sums per thread."""
    device = require_backend("weighted_cross_entropy", "cuda")
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 21, 513, 513, generator=g) * 3
    label = torch.randint(0, 21, (2, 513, 513), generator=g)
    weight = torch.rand(2, 513, 513, generator=g)
    ignore = torch.where(torch.rand(2, 513, 513, generator=g) < 0.1, 255, 0).to(torch.uint8)
    losses, grads = [], []
    for dev, backend in ((torch.device("cpu"), "cpu"), (device, "cuda")):
        zz = z.to(dev).requires_grad_()
        loss = csl_kernels.weighted_cross_entropy(zz, label.to(dev), weight.to(dev), ignore.to(dev), backend=backend)
        loss.backward()
        losses.append(loss.detach().cpu())
        grads.append(zz.grad.cpu())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("num_classes", [21, 64, 65, 150])
def test_confusion_matrix_grid_stride(num_classes):
    """10^7 pixels: 1024 blocks, each thread loops over ~38 pixels (shared histogram up to 64 classes, global above)."""
    device = require_backend("confusion_matrix", "cuda")
    g = torch.Generator().manual_seed(num_classes)
    pred = torch.randint(-1, num_classes + 1, (10_000_000,), generator=g)
    target = torch.randint(-1, num_classes + 1, (10_000_000,), generator=g)
    target[torch.rand(10_000_000, generator=g) < 0.1] = 255
    # The op itself: it skips the out-of-range predictions the public call refuses where the target is a class.
    got = torch.ops.csl.confusion_matrix(pred.to(device), target.to(device), num_classes, 255)
    assert torch.equal(got.cpu(), confusion_matrix_reference(pred, target, num_classes, 255))
