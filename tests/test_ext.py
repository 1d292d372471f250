"""The C++/CUDA extension (csrc/): build, op registration (opcheck), gradients, confusion matrix, build failures.

The per-op tests (tests/test_<op>.py) compare the "cpu" and "cuda" backends with the float64 reference; this file
checks what is specific to the extension.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import child_deadline

import csl_kernels
from csl_kernels import _backends
from csl_kernels.confusion_matrix import confusion_matrix_reference
from csl_kernels.cpp import build
from csl_kernels.pcos_weights import pcos_weights_reference
from csl_kernels.residual_features import residual_features_reference

OPS = ("residual_features", "pcos_weights", "trusted_mask", "weighted_cross_entropy",
       "weighted_cross_entropy_backward", "confusion_matrix")


@pytest.fixture(scope="module")
def ext():
    """The loaded extension (built on first use; skipped — or failed when CSL_REQUIRE_BACKENDS names cpu — if it
    cannot be built)."""
    from conftest import require_backend

    require_backend("pcos_weights", "cpu")
    import csl_kernels.cpp as module

    module.load()
    return module


def _require_cuda_part(info) -> None:
    """Skip a check of the extension's CUDA part where it was not built; fail where CI requires that build
    (``CSL_REQUIRE_CUDA_BUILD=1``) or the cuda backend (``CSL_REQUIRE_BACKENDS``)."""
    if info.with_cuda:
        return
    reason = f"the extension was built without its CUDA part: {info.cuda_error or build.cuda_build_plan()[2]}"
    if os.environ.get("CSL_REQUIRE_CUDA_BUILD") == "1":
        pytest.fail(reason)
    from conftest import skip_or_fail

    skip_or_fail("cuda", reason)


def _logits(b=2, c=5, h=6, w=7, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, h, w, generator=g) * 3).to(dtype)


def test_build_has_every_kernel_and_cuda_when_nvcc_is_present(ext):
    info = build.load()
    assert build.load() is info  # built and loaded once per process
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"csl::{op}", "CPU"), op
    with_cuda, arch, why = build.cuda_build_plan()
    assert info.with_cuda == with_cuda, info.cuda_error or why
    if os.environ.get("CSL_REQUIRE_CUDA_BUILD") == "1":  # CI: the .cu files must compile and link for sm_90
        assert info.with_cuda, f"the CUDA part was not built: {info.cuda_error or why}"
    if with_cuda:  # nvcc and a CUDA build of torch: the CUDA kernels must be in the library, GPU or not
        assert info.cuda_arch_list == arch
        for op in OPS:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"csl::{op}", "CUDA"), op


def test_cuda_kernels_do_not_spill(ext):
    """The cubins in the built library, one set per architecture of its TORCH_CUDA_ARCH_LIST (CI builds sm_90
    without a GPU; ``TORCH_CUDA_ARCH_LIST="7.5;8.0;8.6;8.9;10.0;12.0"`` checks those): every kernel is there for every
    architecture, none spills registers to memory (a few bytes of stack would be a call frame)."""
    info = build.load()
    _require_cuda_part(info)
    from csl_kernels.triton.compile_check import resource_usage, spills

    usage = resource_usage(info.library)
    wanted = {"sm_" + entry.removesuffix("+PTX").replace(".", "") for entry in build._arch_entries(info.cuda_arch_list)}
    assert {name.split()[0] for name in usage} == wanted, (info.cuda_arch_list, sorted(usage))
    for arch in sorted(wanted):
        names = " ".join(name for name in usage if name.startswith(f"{arch} "))
        for kernel in ("residual_features_kernel", "pcos_features_kernel", "pcos_cluster_kernel", "pcos_weight_kernel",
                       "trusted_mask_kernel", "weighted_cross_entropy", "confusion"):
            assert kernel in names, (arch, kernel, sorted(usage))
    spilling = {name: u for name, u in usage.items() if spills(u)}
    assert not spilling, spilling


_SASS_INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([^;]*);", flags=re.M)
# Instructions that end a basic block of SASS; those with an address operand also start one there.
_SASS_CONTROL_FLOW = {"BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT", "BREAK", "BSSY", "BSYNC", "SSY", "SYNC", "PBK",
                      "PCNT", "CONT", "WARPSYNC", "BPT", "KILL"}


def _sass_functions(sass: str) -> list[tuple[str, str, str]]:
    """``(arch, function name, body)`` for every function of ``cuobjdump -sass``'s output, where ``arch = sm_XX``
    heads each cubin's functions."""
    prelude, *parts = re.split(r"\n\s*Function : ", sass)
    arch = (re.findall(r"^arch = (sm_\w+)", prelude, flags=re.M) or ["sm_?"])[-1]
    functions = []
    for part in parts:
        functions.append((arch, part.split("\n", 1)[0].strip(), part))
        arch = (re.findall(r"^arch = (sm_\w+)", part, flags=re.M) or [arch])[-1]  # the next cubin's header
    return functions


def _loads_before_first_add_per_block(body: str) -> list[int]:
    """For each basic block of a function's SASS that adds doubles (DADD), the global loads (LDG) it issues before
    its first addition, in code order. The blocks, not the function's first DADD: ptxas of CUDA 13.0 lays out the
    loop of the records left over after the last whole batch (one record at a time, unrolled 4 times: 24 / 40 loads)
    ahead of the batch loop for sm_100 and sm_120, and behind it for sm_75 to sm_90."""
    instructions = [(int(addr, 16), op, operands) for addr, op, operands in _SASS_INSTRUCTION.findall(body)]
    block_starts = {int(target, 16) for _, op, operands in instructions if op in _SASS_CONTROL_FLOW
                    for target in re.findall(r"0x([0-9a-f]+)", operands)}
    counts, loads, added = [], 0, False
    for addr, op, _ in instructions:
        if addr in block_starts:
            loads, added = 0, False
        if op == "LDG" and not added:
            loads += 1
        elif op == "DADD" and not added:
            counts.append(loads)
            added = True
        if op in _SASS_CONTROL_FLOW:
            loads, added = 0, False
    return counts


def test_sass_load_count_is_per_basic_block_in_every_layout():
    """The count of :func:`_loads_before_first_add_per_block` on stand-ins for ``cuobjdump -sass``: a batch loop laid
    out behind a loop of single records (sm_100 / sm_120) still shows its 96 loads; a batch loop that adds after a
    few loads shows those few, and so does one whose loads a branch target cuts off from its additions."""

    def sass(*blocks):
        lines, addr = [], 0
        for block in blocks:
            for text in block:
                lines.append(f"        /*{addr:04x}*/                   {text} ;            /* 0x000fe2000000000a */")
                addr += 0x10
        return "\n".join(lines)

    def loads(n, base="R70"):
        return [f"LDG.E.64.CONSTANT R{2 * k + 2}, desc[UR14][{base}.64+{8 * k:#x}]" for k in range(n)]

    adds = [f"DADD R{2 * q + 10}, R{2 * q + 10}, R{2 * q + 2}" for q in range(6)]
    records = 0x10 + 0x10 * (24 + 6 + 1)  # where the batch loop starts below
    blackwell = sass(["BRA.U UP0, " + hex(records)], loads(24) + adds + ["@P0 BRA 0x10"],
                     loads(96) + adds + ["BRA.U UP0, " + hex(records)], ["EXIT"])
    assert _loads_before_first_add_per_block(blackwell) == [24, 96]
    interleaved = sass(loads(24) + adds + loads(72) + adds + ["@P0 BRA 0x0"], ["EXIT"])
    assert _loads_before_first_add_per_block(interleaved) == [24]
    cut = sass(loads(96) + ["@!P1 BRA " + hex(0x10 * 97)], adds + ["EXIT"])
    assert _loads_before_first_add_per_block(cut) == [0]
    library = ("\nFatbin elf code:\n================\narch = sm_100\n\n\tcode for sm_100\n\t\tFunction : k1\n"
               + blackwell + "\n\t\t..........\n\nFatbin elf code:\n================\narch = sm_120\n\n"
               "\tcode for sm_120\n\t\tFunction : k1\n" + interleaved + "\n\t\tFunction : k2\n" + cut)
    assert [(arch, name) for arch, name, _ in _sass_functions(library)] == [
        ("sm_100", "k1"), ("sm_120", "k1"), ("sm_120", "k2")]


def test_cuda_per_group_kernels_load_a_batch_of_records_before_adding(ext):
    """In the code of PCOS's per-group kernels (one thread per group sums the group's chunk records), every load of
    a batch (sum_records_in_order: 16 records of 6 doubles, 8 of 10) is issued before its first addition, so a
    thread waits on memory once per batch, not once per few records (without __launch_bounds__(kThreads, 1), ptxas of
    CUDA 13.0 adds after 13-16 loads for sm_90, 11-15 for sm_100 / sm_120). Counted in ``cuobjdump -sass`` of the
    built library, per basic block (:func:`_loads_before_first_add_per_block`), in the code of every architecture it
    holds (CI: sm_90)."""
    import subprocess

    info = build.load()
    _require_cuda_part(info)
    from csl_kernels.triton.compile_check import cuobjdump_path

    sass = subprocess.run([cuobjdump_path(), "-sass", info.library], capture_output=True, text=True, check=True).stdout
    functions = _sass_functions(sass)
    wanted = {"sm_" + entry.removesuffix("+PTX").replace(".", "") for entry in build._arch_entries(info.cuda_arch_list)}
    for kernel, batch_loads in (("pcos_group_params_kernel", 16 * 6), ("pcos_cluster_stats_kernel", 8 * 10)):
        found = {arch for arch, name, _ in functions if kernel in name}
        assert found == wanted, (kernel, sorted(found), sorted(wanted))
        for arch, name, body in functions:
            if kernel in name:
                counts = _loads_before_first_add_per_block(body)
                assert max(counts, default=0) >= batch_loads, (arch, kernel, counts)


def test_opcheck_every_op(ext):
    z = _logits()
    valid = torch.rand(2, 6, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    label = torch.randint(0, 5, (2, 6, 7))
    weight = torch.rand(2, 6, 7)
    ops = torch.ops.csl
    torch.library.opcheck(ops.residual_features.default, (z, valid, False))
    torch.library.opcheck(ops.residual_features.default, (z.contiguous(memory_format=torch.channels_last), None, True))
    torch.library.opcheck(ops.pcos_weights.default, (z, valid, 8.0, False, False))
    torch.library.opcheck(ops.pcos_weights.default, (z.to(torch.bfloat16), None, 8.0, True, True))
    images = torch.randn(2, 3, 6, 7)
    cells = torch.rand(2, 2, 3) < 0.5
    torch.library.opcheck(ops.trusted_mask.default, (images, cells, valid, 0.0))
    torch.library.opcheck(ops.weighted_cross_entropy.default, (z.clone().requires_grad_(), label, weight, valid))
    torch.library.opcheck(ops.weighted_cross_entropy.default, (z.double().requires_grad_(), label, weight, None))
    _, lse, count = ops.weighted_cross_entropy(z, label, weight, valid)
    assert count.dtype == torch.int64 and int(count) == int(valid.sum())
    torch.library.opcheck(ops.weighted_cross_entropy_backward.default,
                          (torch.tensor(1.0), z, label, weight, valid, lse, count))
    torch.library.opcheck(ops.confusion_matrix.default, (label, label.flip(0), 5, 255))
    ignore = torch.where(valid, label, 255).to(torch.uint8)  # an integer ignore map as valid: compared in the kernels
    torch.library.opcheck(ops.residual_features.default, (z, ignore.short(), False))
    torch.library.opcheck(ops.pcos_weights.default, (z, ignore, 8.0, False, True))
    torch.library.opcheck(ops.weighted_cross_entropy.default, (z.clone().requires_grad_(), label, weight, ignore))
    torch.library.opcheck(ops.weighted_cross_entropy_backward.default,
                          (torch.tensor(1.0), z, label, weight, ignore.long(), lse, count))


def test_weighted_cross_entropy_float64_gradcheck(ext):
    z = _logits(1, 4, 3, 5, torch.float64).requires_grad_()
    label = torch.randint(0, 4, (1, 3, 5), generator=torch.Generator().manual_seed(2))
    weight = torch.rand(1, 3, 5, dtype=torch.float64)
    weight[0, 0, :2] = 0
    valid = torch.ones(1, 3, 5, dtype=torch.bool)
    valid[0, 2, 1:3] = False

    def loss(logits):
        return torch.ops.csl.weighted_cross_entropy(logits, label, weight, valid)[0]

    assert torch.autograd.gradcheck(loss, (z,))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_weighted_cross_entropy_backward_reads_a_float64_grad_loss_in_full(ext, device):
    """A float64 ``grad_loss`` (a direct op call can pass one) scales float64 gradients without being rounded to
    float32 first: 1 + 2**-40 is 1 in float32."""
    if device == "cuda":
        _require_cuda_part(build.load())
    z = _logits(2, 5, 3, 4, torch.float64).to(device)
    g = torch.Generator().manual_seed(4)
    label = torch.randint(0, 5, (2, 3, 4), generator=g).to(device)
    weight = torch.rand(2, 3, 4, generator=g, dtype=torch.float64).to(device)
    valid = (torch.rand(2, 3, 4, generator=g) > 0.25).to(device)
    ops = torch.ops.csl
    _, lse, count = ops.weighted_cross_entropy(z, label, weight, valid)
    scale = 1 + 2.0**-40
    unit = ops.weighted_cross_entropy_backward(torch.tensor(1.0, dtype=torch.float64, device=device), z, label,
                                               weight, valid, lse, count)
    scaled = ops.weighted_cross_entropy_backward(torch.tensor(scale, dtype=torch.float64, device=device), z, label,
                                                 weight, valid, lse, count)
    assert unit.abs().max() > 0 and not torch.equal(scaled, unit)
    torch.testing.assert_close(scaled, unit * scale, rtol=1e-15, atol=0)


def test_weighted_cross_entropy_unused_pixels_are_exact_zeros(ext):
    z = _logits(1, 3, 2, 3)
    z[0, :, 0, 0] = float("nan")  # ignored pixel
    z[0, 1, 0, 1] = float("inf")  # weight-0 pixel
    label = torch.randint(0, 3, (1, 2, 3))
    label[0, 0, 0] = 255
    weight = torch.rand(1, 2, 3) + 0.1
    weight[0, 0, 1] = 0
    valid = torch.ones(1, 2, 3, dtype=torch.bool)
    valid[0, 0, 0] = False
    z.requires_grad_()
    loss = csl_kernels.weighted_cross_entropy(z, label, weight, valid=valid, backend="cpu")
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(z.grad[0, :, 0, :2], torch.zeros(3, 2))
    assert torch.isfinite(z.grad).all()
    ref = csl_kernels.weighted_cross_entropy(z.detach(), label, weight, valid=valid, backend="reference")
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("num_classes", [1, 2, 21, 1000])
def test_confusion_matrix_matches_reference(ext, num_classes):
    g = torch.Generator().manual_seed(num_classes)
    shape = (3, 37, 53)
    # Out-of-range predictions included: the op skips them (the public call refuses those at scored pixels).
    pred = torch.randint(-1, num_classes + 1, shape, generator=g)
    target = torch.randint(0, num_classes, shape, generator=g)
    target[torch.rand(shape, generator=g) < 0.2] = 255
    expected = confusion_matrix_reference(pred, target, num_classes, 255)
    got = torch.ops.csl.confusion_matrix(pred, target, num_classes, 255)
    assert got.dtype == torch.int64 and torch.equal(got, expected)
    # Narrow integer dtypes and non-contiguous views.
    got = torch.ops.csl.confusion_matrix(pred.int().transpose(1, 2), target.transpose(1, 2), num_classes, 255)
    assert torch.equal(got, expected)
    in_range = pred.clamp(0, num_classes - 1)
    got = csl_kernels.confusion_matrix(in_range, target, num_classes, backend="cpu")
    assert torch.equal(got, confusion_matrix_reference(in_range, target, num_classes, 255))


def test_the_ops_default_to_the_papers_rule(ext):
    """released=False is the schema default of csl::pcos_weights and csl::residual_features: a call without it is the
    paper's rule, bit for bit, and not the released code's."""
    z = _logits(c=7)
    ops = torch.ops.csl
    for paper, released, default in (
            (ops.pcos_weights(z, None, 8.0, False, False, False), ops.pcos_weights(z, None, 8.0, False, False, True),
             ops.pcos_weights(z, None, 8.0, False, False)),
            (ops.residual_features(z, None, False, False), ops.residual_features(z, None, False, True),
             ops.residual_features(z, None, False))):
        assert not all(torch.equal(a, b) for a, b in zip(paper, released, strict=True))
        for a, b in zip(default, paper, strict=True):
            assert torch.equal(a, b)


@pytest.mark.cpp_error_path
def test_confusion_matrix_edge_cases(ext):
    empty = torch.empty(0, 5, dtype=torch.long)
    got = csl_kernels.confusion_matrix(empty, empty, 7, backend="cpu")
    assert torch.equal(got, torch.zeros(7, 7, dtype=torch.long))
    target = torch.full((2, 3), 255, dtype=torch.uint8)
    pred = torch.zeros(2, 3, dtype=torch.long)
    assert csl_kernels.confusion_matrix(pred, target, 4, backend="cpu").sum() == 0  # all ignored
    got = csl_kernels.confusion_matrix(pred, torch.ones(2, 3, dtype=torch.long), 4, ignore_index=1, backend="cpu")
    assert got.sum() == 0  # a custom ignore index
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.csl.confusion_matrix(pred, target[:1], 4, 255)


def test_pcos_is_reproducible_across_thread_counts(ext):
    z = _logits(2, 21, 45, 61, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.csl.pcos_weights(z, None, 8.0, False, True)
        torch.set_num_threads(max(2, before))
        many = torch.ops.csl.pcos_weights(z, None, 8.0, False, True)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many, strict=True):
        assert torch.equal(a, b)


def test_pcos_cluster_variance_keeps_its_digits(ext):
    # A confident cluster: pmax ~ 0.95 with variance ~ 1e-4, where E[x^2] - mu^2 in float32 would lose most digits.
    g = torch.Generator().manual_seed(4)
    b, c, h, w = 1, 21, 64, 64
    z = torch.randn(b, c, h, w, generator=g) * 0.05
    z[:, 0] += 6.0 + 0.2 * torch.randn(b, h, w, generator=g)
    ref = pcos_weights_reference(z, None, 8.0, False, False)
    got = torch.ops.csl.pcos_weights(z, None, 8.0, False, False)
    assert torch.equal(got[5], ref[5])  # counts
    torch.testing.assert_close(got[3], ref[3], rtol=1e-6, atol=1e-9)  # means
    assert ref[4][0, :, 0].min() < 1e-3
    torch.testing.assert_close(got[4], ref[4], rtol=1e-4, atol=1e-12)  # variances
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)


def test_residual_features_non_finite_and_layouts(ext):
    z = _logits(2, 5, 6, 7, seed=5)
    z[0, 2, 1, 1] = float("nan")
    z[1, 0, 3, 4] = -float("inf")
    ref = residual_features_reference(z, None, False)
    strided = torch.zeros(2, 5, 6, 14)
    strided[..., ::2] = z
    for layout in (z, z.contiguous(memory_format=torch.channels_last), strided[..., ::2]):
        f0, v, label = torch.ops.csl.residual_features(layout, None, False)
        torch.testing.assert_close(f0, ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v, ref[1], rtol=1e-5, atol=1e-6)
        assert torch.equal(label, ref[2])
        assert f0[0, 1, 1] == 0 and v[1, 3, 4] == 0


@pytest.mark.cpp_error_path
def test_clear_errors_from_the_cpp_checks(ext):
    ops = torch.ops.csl
    with pytest.raises(RuntimeError, match="at least 2 classes"):
        ops.residual_features(torch.randn(1, 1, 2, 2), None, False)
    with pytest.raises(RuntimeError, match="valid must have shape"):
        ops.pcos_weights(torch.randn(1, 3, 2, 2), torch.ones(1, 2, 3, dtype=torch.bool), 8.0, False, False)
    with pytest.raises(RuntimeError, match="label 7 of a used pixel"):
        ops.weighted_cross_entropy(torch.randn(1, 3, 1, 1), torch.full((1, 1, 1), 7), torch.ones(1, 1, 1), None)
    z = torch.randn(1, 3, 2, 2)
    with pytest.raises(TypeError, match="int8 ignore map, which cannot hold the ignore value 255"):
        ops.pcos_weights(z, torch.zeros(1, 2, 2, dtype=torch.int8), 8.0, False, False)
    with pytest.raises(TypeError, match=r"bool mask \(True = valid\) or an integer ignore map .* got Float"):
        ops.residual_features(z, torch.zeros(1, 2, 2), False)
    with pytest.raises(TypeError, match="got Float"):
        ops.weighted_cross_entropy(z, torch.zeros(1, 2, 2, dtype=torch.long), torch.ones(1, 2, 2),
                                   torch.zeros(1, 2, 2))
    label, weight = torch.zeros(1, 2, 2, dtype=torch.long), torch.ones(1, 2, 2)
    _, lse, count = ops.weighted_cross_entropy(z, label, weight, None)
    with pytest.raises(RuntimeError, match=r"count \(the forward's number of valid pixels\) must hold one int64 value"):
        ops.weighted_cross_entropy_backward(torch.tensor(1.0), z, label, weight, None, lse, count.double())
    with pytest.raises(RuntimeError, match="grad_loss must hold one value on cpu, got shape \\[2\\]"):
        ops.weighted_cross_entropy_backward(torch.ones(2), z, label, weight, None, lse, count)
    assert lse.shape == (1, 2, 2, 2) and lse.dtype == torch.float32  # max logit, log1p of the rest, per pixel
    for wrong in (lse[..., 0], lse.long()):  # a float64 lse = max + log1p(rest) of an older build; integer parts
        with pytest.raises(RuntimeError, match=r"lse \(the forward's log-sum-exp parts\) must be a floating tensor of "
                                               r"shape B x H x W x 2 = \[1, 2, 2, 2\], got"):
            ops.weighted_cross_entropy_backward(torch.tensor(1.0), z, label, weight, None, wrong, count)
    # a label equal to C on a used pixel (the first one out of range), in the forward and in a direct backward call
    with pytest.raises(RuntimeError, match=r"label 3 of a used pixel is outside \[0, 3\)"):
        ops.weighted_cross_entropy(z, torch.full((1, 2, 2), 3), weight, None)
    with pytest.raises(RuntimeError, match=r"label 3 of a used pixel is outside \[0, 3\)"):
        ops.weighted_cross_entropy_backward(torch.tensor(1.0), z, torch.full((1, 2, 2), 3), weight, None, lse, count)
    # trusted_mask called directly: a fill its dtype cannot hold (written as inf), a dtype it has no kernel for
    cells, reliable = torch.ones(1, 1, 1, dtype=torch.bool), torch.ones(1, 2, 2, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"fill=1e\+06 does not fit the images' dtype Half \(largest finite value "
                                           r"65504\)"):
        ops.trusted_mask(z.half(), cells, reliable, 1e6)
    assert torch.isnan(ops.trusted_mask(z.half(), cells, reliable, float("nan"))[0]).all()  # NaN is written as such
    largest = torch.finfo(torch.bfloat16).max  # fits exactly; the next representable double above it does not
    assert (ops.trusted_mask(z.bfloat16(), cells, reliable, largest)[0] == largest).all()
    with pytest.raises(RuntimeError, match="does not fit the images' dtype BFloat16"):
        ops.trusted_mask(z.bfloat16(), cells, reliable, math.nextafter(largest, math.inf))
    with pytest.raises(RuntimeError, match="images must be a float16, bfloat16, float32 or float64 B x K x H x W "
                                           "tensor, got Float8_e4m3fn"):
        ops.trusted_mask(z.to(torch.float8_e4m3fn), cells, reliable, 0.0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_ops_read_an_ignore_map_as_its_mask(ext, device):
    """``valid`` given as the integer ignore map (255 = ignored) itself, of every dtype a map may have and not
    contiguous, gives bitwise what its bool mask gives: every op, forward and backward."""
    if device == "cuda":
        from conftest import require_backend

        require_backend("pcos_weights", "cuda")  # skips, or fails where CSL_REQUIRE_BACKENDS names cuda
    g = torch.Generator().manual_seed(3)
    z = _logits(2, 5, 9, 11, seed=3).to(device)
    label = torch.randint(0, 5, (2, 9, 11), generator=g).to(device)
    weight = torch.rand(2, 9, 11, generator=g).to(device)
    ignore = torch.randint(0, 5, (2, 9, 11), generator=g)
    ignore[torch.rand(2, 9, 11, generator=g) < 0.3] = 255
    ops = torch.ops.csl
    for dtype in (torch.uint8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64):
        ignore_map = ignore.to(dtype)
        if dtype != torch.uint8:  # only 255 is ignored, not values that narrowing to a byte turns into 255
            ignore_map[0, 0, :2] = torch.tensor([511, 256 if dtype.is_signed is False else -1]).to(dtype)
        wide = torch.zeros(2, 9, 22, dtype=dtype)
        wide[..., ::2] = ignore_map
        ignore_map = wide.to(device)[..., ::2]  # strided
        mask = ignore_map != 255
        assert not ignore_map.is_contiguous() and 0 < int(mask.sum()) < mask.numel()
        for a, b in zip(ops.residual_features(z, ignore_map, False), ops.residual_features(z, mask, False),
                        strict=True):
            assert torch.equal(a, b)
        for a, b in zip(ops.pcos_weights(z, ignore_map, 8.0, False, True), ops.pcos_weights(z, mask, 8.0, False, True),
                        strict=True):
            assert torch.equal(a, b)
        loss, lse, count = ops.weighted_cross_entropy(z, label, weight, ignore_map)
        loss_mask, lse_mask, count_mask = ops.weighted_cross_entropy(z, label, weight, mask)
        assert torch.equal(loss, loss_mask) and torch.equal(lse, lse_mask) and loss > 0
        assert int(count) == int(count_mask) == int(mask.sum())
        one = torch.ones((), dtype=loss.dtype, device=device)
        grad = ops.weighted_cross_entropy_backward(one, z, label, weight, ignore_map, lse, count)
        assert torch.equal(grad, ops.weighted_cross_entropy_backward(one, z, label, weight, mask, lse, count))
        assert torch.all(grad.permute(0, 2, 3, 1)[~mask] == 0) and torch.any(grad != 0)


def test_ahead_of_time_build_must_match_sources_flags_torch_python_and_gpus(tmp_path, monkeypatch):
    import sysconfig

    from csl_kernels.cpp import sources

    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    (tmp_path / f"_C{suffix}").write_bytes(b"")
    (tmp_path / "_C.cpython-399-x86_64-linux-gnu.so").write_bytes(b"")  # another Python's build beside it
    meta = {"source_hash": "abc", "flags_hash": sources.flags_hash(), "with_cuda": False,
            "torch_version": torch.__version__, "ext_suffix": suffix}
    (tmp_path / "_C_build.json").write_text(json.dumps(meta))
    assert build._aot_library("abc", False, tmp_path) == str(tmp_path / f"_C{suffix}")
    assert build._aot_library("abd", False, tmp_path) is None  # sources changed
    assert build._aot_library("abc", True, tmp_path) is None  # CUDA part wanted, not built
    for key, value in (("flags_hash", "0" * 64), ("flags_hash", None), ("torch_version", "2.0.0"),
                       ("torch_version", None), ("ext_suffix", ".cpython-399-x86_64-linux-gnu.so"),
                       ("ext_suffix", None)):
        (tmp_path / "_C_build.json").write_text(json.dumps({**meta, key: value}))
        assert build._aot_library("abc", False, tmp_path) is None, (key, value)
    # a CUDA build for sm_90 only: not for a visible A100 (sm_80); with PTX it runs on a newer GPU (sm_100)
    (tmp_path / "_C_build.json").write_text(json.dumps({**meta, "with_cuda": True, "cuda_arch_list": "9.0"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for cap, arch, ok in (((9, 0), "9.0", True), ((8, 0), "9.0", False), ((10, 0), "9.0", False),
                          ((10, 0), "9.0+PTX", True), ((8, 6), "8.0;9.0", True), ((8, 0), "8.6", False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0, cap=cap: cap)
        (tmp_path / "_C_build.json").write_text(json.dumps({**meta, "with_cuda": True, "cuda_arch_list": arch}))
        assert (build._aot_library("abc", True, tmp_path) is not None) is ok, (cap, arch)


@pytest.mark.parametrize(("arch", "cap", "ok"), [
    ("9.0a", (9, 0), True), ("9.0a", (10, 0), False), ("9.0a+PTX", (10, 0), False),  # arch-specific: that GPU only
    ("10.0f", (10, 3), True), ("10.0f", (12, 0), False), ("10.0f", (9, 0), False),  # family: same major, newer minor
    ("8.0 9.0a", (8, 6), True), ("", (9, 0), False), ("sm90", (9, 0), False),
])
def test_arch_list_entries_with_suffixes(arch, cap, ok):
    assert build.arch_covers(arch, cap) is ok


def test_cuda_backend_unavailable_for_a_gpu_its_build_has_no_kernel_image_for(monkeypatch):
    """A TORCH_CUDA_ARCH_LIST left over from another machine: the cuda backend says which GPU it cannot run on
    instead of failing at its first launch with "no kernel image is available"."""
    from csl_kernels.cpp import _check_cuda

    monkeypatch.setattr(csl_kernels.cpp, "_check_cpu", lambda device: None)
    monkeypatch.setattr(build, "load", lambda: build.BuildInfo("x.so", True, "8.0;8.6", built=False))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    reason = _check_cuda(torch.device("cuda", 0))
    assert reason is not None and "TORCH_CUDA_ARCH_LIST='8.0;8.6'" in reason and "NVIDIA H200 (sm_90)" in reason
    monkeypatch.setattr(build, "load", lambda: build.BuildInfo("x.so", True, "8.0;9.0", built=False))
    assert _check_cuda(torch.device("cuda", 0)) is None
    # torch also takes arch names ("Hopper"), which only its own table resolves: not judged, not refused
    monkeypatch.setattr(build, "load", lambda: build.BuildInfo("x.so", True, "Ampere;Hopper", built=False))
    assert _check_cuda(torch.device("cuda", 0)) is None
    assert build.arch_list_understood("8.0;9.0a;10.0f+PTX") and not build.arch_list_understood("Hopper")


@pytest.fixture
def broken_build(tmp_path, monkeypatch):
    """A fresh loader state whose sources fail to compile (restored after the test)."""
    src = tmp_path / "csrc"
    (src / "cpu").mkdir(parents=True)
    (src / "csl_math.h").write_text("#pragma once\n")
    (src / "broken.cpp").write_text('#error "csl forced build failure"\n')
    monkeypatch.setenv("CSL_EXT_SOURCE_DIR", str(src))
    monkeypatch.setenv("CSL_EXT_CUDA", "0")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    monkeypatch.setattr(build, "_info", None)
    monkeypatch.setattr(build, "_error", None)
    monkeypatch.setattr(_backends, "_AUTO_LOGGED", set())
    monkeypatch.setattr(_backends, "_NAMED", {})  # availability found earlier in this process
    import csl_kernels.cpp  # noqa: F401 - registers the cpu backend

    return tmp_path


def test_failed_build_falls_back_for_auto_and_raises_for_cpu(broken_build, caplog):
    z = _logits(1, 4, 3, 3)
    with caplog.at_level(logging.INFO, logger="csl_kernels"):
        f0, _, _ = csl_kernels.residual_features(z, backend="auto")
        csl_kernels.residual_features(z, backend="auto")
    torch.testing.assert_close(f0, residual_features_reference(z, None, False)[0])
    fallbacks = [r.getMessage() for r in caplog.records if "skipped cpu" in r.getMessage()]
    assert len(fallbacks) == 1, fallbacks  # said once
    assert "uses 'reference'" in fallbacks[0] and "csl forced build failure" in fallbacks[0]  # compiler's last lines
    with pytest.raises(RuntimeError, match="build.log") as err:
        csl_kernels.residual_features(z, backend="cpu")
    log_path = str(err.value).split("full log: ")[1].split()[0].rstrip(";")
    assert "csl forced build failure" in open(log_path).read()


def test_failed_cuda_part_keeps_the_cpu_kernels(broken_build, monkeypatch):
    """A broken CUDA toolkit (the .cu part fails to compile): the CPU part is built alone and works; the cuda
    backend is unavailable with the compiler's reason."""
    from csl_kernels.cpp import _check_cuda

    src = broken_build / "csrc"
    (src / "broken.cpp").unlink()
    (src / "fine.cpp").write_text("int csl_test_fine() { return 1; }\n")
    calls = []

    def fake_build_in_cache(root, src_hash, with_cuda, arch, why):
        calls.append(with_cuda)
        if with_cuda:
            raise build.ExtensionBuildError("building the csl C++ extension (CPU + CUDA) failed; nvcc: unsupported "
                                            "GNU version")
        return build.BuildInfo("cpu.so", False, None, built=True)

    monkeypatch.setattr(build, "cuda_build_plan", lambda: (True, "9.0", "nvcc in /fake"))
    monkeypatch.setattr(build, "_build_in_cache", fake_build_in_cache)
    monkeypatch.setattr(csl_kernels.cpp.ops, "register_python_parts", lambda: None)
    info = build.load()
    assert calls == [True, False] and not info.with_cuda and "unsupported GNU version" in info.cuda_error
    assert "unsupported GNU version" in _check_cuda(torch.device("cuda"))


def test_complete_build_loads_from_a_read_only_cache_and_a_failed_one_says_why(broken_build, monkeypatch, capfd):
    """A build with its stamp is loaded without the builder (which needs a writable lock file); a build that fails
    where no log can be written still reports the compiler's message."""
    root = build.csrc_dir()
    src_hash = build.source_hash(root)
    name = build.build_name(root, src_hash, False, None)
    cache = broken_build / "build" / name
    cache.mkdir(parents=True)
    library = cache / f"{name}.so"
    library.write_bytes(b"\x7fELF a complete library")
    (cache / f"{name}.ok").write_text(json.dumps(build._library_stamp(library)))
    loaded = []
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    info = build._build_in_cache(root, src_hash, False, None, "test")
    assert loaded == [str(library)] and not info.built

    # A library cut short under its stamp (a crash before it reached the disk) is never passed to dlopen (which can
    # die of SIGBUS on it): its outputs go and it is built again, and the new stamp vouches for the new library.
    from torch.utils import cpp_extension

    library.write_bytes(b"\x7fELF a compl")
    (cache / "residual_features.o").write_bytes(b"object")
    built = []

    def rebuild(**kwargs):
        assert not library.exists() and not (cache / "residual_features.o").exists()  # nothing left to trust
        built.append(kwargs["name"])
        library.write_bytes(b"\x7fELF rebuilt")
        return str(library)

    monkeypatch.setattr(cpp_extension, "load", rebuild)
    loaded.clear()
    info = build._build_in_cache(root, src_hash, False, None, "test")
    assert built == [name] and loaded == [] and info.built
    assert build._stamp_matches(library, cache / f"{name}.ok")
    said = capfd.readouterr().err  # a build is said with how long it may take, and how long it took
    assert "building the C++ extension (CPU only (test))" in said and "a minute or more" in said
    assert re.search(r"csl_kernels: built the C\+\+ extension in \d+ s", said)

    def failing_load(**kwargs):
        raise RuntimeError("Error building extension: csl forced build failure")

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    (cache / f"{name}.ok").unlink()
    real_write = Path.write_text

    def read_only(self, *args, **kwargs):
        if self.name == "build.log":
            raise OSError(30, "Read-only file system")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    with pytest.raises(build.ExtensionBuildError, match="csl forced build failure") as err:
        build._build_in_cache(root, src_hash, False, None, "test")
    assert "no log written" in str(err.value) and "TORCH_EXTENSIONS_DIR" in str(err.value)


@pytest.mark.gpu
def test_cuda_kernels_match_cpu_and_are_reproducible(ext):
    _require_cuda_part(build.load())
    z = _logits(2, 21, 33, 47, seed=6)
    gen = torch.Generator().manual_seed(6)  # fixed inputs: a failure repeats
    valid = torch.rand(2, 33, 47, generator=gen) > 0.2
    for class_groups in (False, True):
        cpu = torch.ops.csl.pcos_weights(z, valid, 8.0, False, class_groups)
        run1 = torch.ops.csl.pcos_weights(z.cuda(), valid.cuda(), 8.0, False, class_groups)
        run2 = torch.ops.csl.pcos_weights(z.cuda(), valid.cuda(), 8.0, False, class_groups)
        for a, b, c in zip(cpu, run1, run2, strict=True):
            assert torch.equal(b, c)  # bitwise reproducible
            if a.is_floating_point():
                torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(b.cpu(), a)
    label = torch.randint(0, 21, (2, 33, 47), generator=gen)
    weight = torch.rand(2, 33, 47, generator=gen)
    zc = z.cuda().requires_grad_()
    zz = z.clone().requires_grad_()
    loss_c = torch.ops.csl.weighted_cross_entropy(zc, label.cuda(), weight.cuda(), valid.cuda())[0]
    loss = torch.ops.csl.weighted_cross_entropy(zz, label, weight, valid)[0]
    loss_c.backward()
    loss.backward()
    torch.testing.assert_close(loss_c.cpu(), loss)
    torch.testing.assert_close(zc.grad.cpu(), zz.grad)
    target = label.clone()
    target[~valid] = 255
    for num_classes in (21, 1000):
        assert torch.equal(torch.ops.csl.confusion_matrix(label.cuda(), target.cuda(), num_classes, 255).cpu(),
                           confusion_matrix_reference(label, target, num_classes, 255))


_ISA_SCRIPT = """
import sys, torch
import csl_kernels as ck
g = torch.Generator().manual_seed(7)
z = torch.randn(2, 21, 19, 23, generator=g) * 4
z[0, :, 0, :5] = float("nan")
ignore = torch.rand(2, 19, 23, generator=g) < 0.2
label = torch.randint(0, 21, (2, 19, 23), generator=g)
weight = torch.rand(2, 19, 23, generator=g)
out = {"features": tuple(ck.residual_features(z, valid=~ignore, backend="cpu")),
       "pcos": tuple(ck.pcos_weights(z, valid=~ignore, backend="cpu")[:3]),
       "pcos_bf16": tuple(ck.pcos_weights(z.bfloat16().contiguous(memory_format=torch.channels_last), None,
                                          groups="class", backend="cpu")[:3])}
zz = z.nan_to_num().requires_grad_()
loss = ck.weighted_cross_entropy(zz, label, weight, valid=~ignore, backend="cpu")
loss.backward()
out["ce"] = (loss.detach(), zz.grad)
torch.save(out, sys.argv[1])
print(torch.ops.csl.cpu_isa())
"""


def _cpu_has(flag: str) -> bool:
    """Whether /proc/cpuinfo lists ``flag`` (x86 Linux; elsewhere False)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return False


def test_cpu_isa_copies_give_bitwise_equal_results(ext, tmp_path):
    """The CPU kernels are compiled for baseline x86-64, AVX2 and AVX-512 and picked at run time: same bits. The
    default is the widest copy the CPU runs: on a CPU without AVX-512 (this project's CI machine) it is the AVX2 copy,
    so there the comparison is baseline against AVX2 and the AVX-512 copy is compiled but not run."""
    import subprocess
    import sys

    from conftest import same_values

    results, ran, time_left = {}, {}, child_deadline(600)
    for isa in ("default", "baseline", "avx2"):
        env = dict(os.environ)
        if isa != "default":
            env["CSL_CPU_ISA"] = isa
        path = tmp_path / f"{isa}.pt"
        done = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path)], env=env, check=True,
                              capture_output=True, text=True, timeout=time_left())
        ran[isa] = done.stdout.strip().splitlines()[-1]
        results[isa] = torch.load(path, weights_only=True)
    # Each run used the copy asked for (CSL_CPU_ISA took effect), and the default is the widest this CPU runs.
    assert ran["baseline"] == "baseline" and ran["avx2"] == ("avx2" if _cpu_has("avx2") else "baseline")
    assert ran["default"] == ("avx512" if _cpu_has("avx512f") else "avx2" if _cpu_has("avx2") else "baseline")
    for isa in ("baseline", "avx2"):
        for key, tensors in results["default"].items():
            for ref, got in zip(tensors, results[isa][key], strict=True):
                assert same_values(ref, got), (isa, key)


def test_two_checkouts_get_their_own_build_folders(tmp_path):
    """Same sources, different folders: different build folders (a shared one would be rebuilt at every switch);
    the same folder keeps its name, however it is reached (a symlink, a path with ..)."""
    import shutil

    from csl_kernels.cpp import sources

    here = sources.csrc_dir()
    other = tmp_path / "checkout2" / "csrc"
    shutil.copytree(here, other)
    h = sources.source_hash(here)
    assert sources.source_hash(other) == h  # identical sources
    link = tmp_path / "link_to_checkout2"
    link.symlink_to(other.parent, target_is_directory=True)
    for same in (link / "csrc", other / ".." / "csrc"):
        assert build.build_name(same, h, False, None) == build.build_name(other, h, False, None), same
    assert build.build_name(other, h, False, None) != build.build_name(here, h, False, None)
    assert build.build_name(here, h, True, "9.0") != build.build_name(here, h, False, None)


_CLASS_LOOPS_CHECK = r"""
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "csl_ce.h"

using namespace csl;

template <typename T>
bool same(T a, T b) { return std::memcmp(&a, &b, sizeof(T)) == 0; }

template <typename scalar_t, typename acc_t>
void compare(std::mt19937& gen, long& cases, long& mismatches) {
  std::normal_distribution<float> normal(0.0f, 3.0f);
  const float specials[] = {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN()};
  for (int classes = 2; classes <= kRegisterClasses; ++classes) {
    for (int t = 0; t < 300; ++t) {
      const int stride = 1 + t % 3;
      // exactly the pixel's elements, on the heap: a read past them is an AddressSanitizer error
      std::vector<scalar_t> z((classes - 1) * stride + 1);
      for (auto& value : z) value = static_cast<scalar_t>(normal(gen) * (t % 5 == 0 ? 0.01f : 1.0f));
      if (t % 7 == 0) z[(t % classes) * stride] = static_cast<scalar_t>(specials[(t / 7) % 3]);
      if (t % 11 == 0) for (int k = 0; k < classes; ++k) z[k * stride] = static_cast<scalar_t>(2.5f);  // ties
      for (int flags = 0; flags < 4; ++flags) {
        const auto a = pixel_features<scalar_t, acc_t, 0>(z.data(), stride, classes, flags & 1, flags & 2);
        const auto b = pixel_features<scalar_t, acc_t, kRegisterClasses>(z.data(), stride, classes, flags & 1,
                                                                         flags & 2);
        ++cases;
        mismatches += !(same(a.f0, b.f0) && same(a.v, b.v) && a.label == b.label && a.finite == b.finite);
      }
      const PixelLogits<scalar_t, acc_t, 0> plain(z.data(), stride, classes);
      const PixelLogits<scalar_t, acc_t, kRegisterClasses> held(z.data(), stride, classes);
      acc_t max0, log_sum0, max1, log_sum1;
      pixel_logsumexp(plain, classes, max0, log_sum0);
      pixel_logsumexp(held, classes, max1, log_sum1);
      for (const auto& [x, y] : {std::pair{max0, max1}, std::pair{log_sum0, log_sum1}}) {
        ++cases;
        mismatches += !(same(x, y) || (std::isnan(x) && std::isnan(y)));
      }
      for (int k = 0; k < classes; ++k) {
        const acc_t x = plain.at(k, classes), y = held.at(k, classes);
        ++cases;
        mismatches += !(same(x, y) || (std::isnan(x) && std::isnan(y)));
      }
    }
  }
}

// sum_records_in_order against the plain loop over the records: n = 0-60 records (full batches and a tail), strides
// from Q up, values of mixed magnitudes (so another order of the additions would round differently), +-inf, NaN, -0.
template <int Q, int kBatch>
void compare_record_sums(std::mt19937& gen, long& cases, long& mismatches) {
  std::normal_distribution<double> normal(0.0, 1.0);
  const double specials[] = {std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity(),
                             std::numeric_limits<double>::quiet_NaN(), -0.0};
  for (int n = 0; n <= 60; ++n) {
    for (int t = 0; t < 12; ++t) {
      const int stride = Q + (t % 3) * (t % 2 == 0 ? 1 : Q + 3);
      // exactly the records' elements, on the heap: a read past them is an AddressSanitizer error
      std::vector<double> records(n > 0 ? (n - 1) * stride + Q : 0);
      for (auto& value : records) value = normal(gen) * std::pow(10.0, static_cast<int>(gen() % 33) - 16);
      if (t % 4 == 3 && !records.empty()) records[gen() % records.size()] = specials[(t / 4 + n) % 4];
      double plain[Q], batched[Q];
      for (int q = 0; q < Q; ++q) plain[q] = batched[q] = t % 2 == 0 ? 0.0 : normal(gen);
      for (int k = 0; k < n; ++k) {
        for (int q = 0; q < Q; ++q) plain[q] += records[k * stride + q];
      }
      sum_records_in_order<Q, kBatch>(records.data(), stride, n, batched);
      for (int q = 0; q < Q; ++q) {
        ++cases;
        mismatches += !(same(plain[q], batched[q]) || (std::isnan(plain[q]) && std::isnan(batched[q])));
      }
    }
  }
}

int main() {
  std::mt19937 gen(0);
  long cases = 0, mismatches = 0;
  compare<float, float>(gen, cases, mismatches);
  compare<double, double>(gen, cases, mismatches);
  compare<c10::BFloat16, float>(gen, cases, mismatches);
  compare<c10::Half, float>(gen, cases, mismatches);
  compare_record_sums<kGramStats, 16>(gen, cases, mismatches);
  compare_record_sums<2 * kClusterStats, 8>(gen, cases, mismatches);
  compare_record_sums<kGramStats, 3>(gen, cases, mismatches);
  std::printf("cases %ld mismatches %ld\n", cases, mismatches);
  return 0;
}
"""


def test_register_loops_match_the_plain_loops_on_the_host(tmp_path):
    """The CUDA kernels' loops that load ahead into registers, compiled for the host against the plain loops. The
    per-pixel math with a pixel's classes held in registers (``N = kRegisterClasses``: loops over the constant bound,
    unrolled on the device) and with the plain class loop (``N = 0``): features, log-sum-exp and the logit at a
    run-time class are bitwise equal for C = 2-32 (fp32, fp64, bf16, fp16; strides 1-3, +-inf and NaN logits, ties,
    tiny logits). The per-group sums of chunk records read in batches (``sum_records_in_order``, the batch sizes of
    the PCOS kernels and another) equal the plain loop's bit for bit (0-60 records, mixed magnitudes, +-inf, NaN, -0).
    None reads past its input (AddressSanitizer, where the compiler has it). On a GPU tests/test_gpu.py compares the
    two per-pixel kernels."""
    import shutil
    import subprocess

    from torch.utils.cpp_extension import include_paths

    from csl_kernels.cpp import sources
    from csl_kernels.cpp.sources import CXX_FLAGS

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        pytest.skip(f"no C++ compiler ({compiler}) to build the check")
    source = tmp_path / "class_loops.cpp"
    source.write_text(_CLASS_LOOPS_CHECK)
    torch_lib = Path(torch.__file__).parent / "lib"
    cmd = [compiler, "-std=c++20", *[f for f in CXX_FLAGS if f != "-fopenmp"], *[f"-I{p}" for p in include_paths()],
           f"-I{sources.csrc_dir()}", str(source), "-o", str(tmp_path / "check"), f"-L{torch_lib}", "-lc10",
           f"-Wl,-rpath,{torch_lib}"]
    time_left = child_deadline(600)
    done = subprocess.run([*cmd, "-fsanitize=address"], capture_output=True, text=True, timeout=time_left())
    if done.returncode != 0:  # a compiler without AddressSanitizer: the comparison alone
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=time_left())
    assert done.returncode == 0, done.stderr[-3000:]
    out = subprocess.run([str(tmp_path / "check")], capture_output=True, text=True, timeout=time_left())
    assert out.returncode == 0, out.stderr
    cases, mismatches = (int(x) for x in out.stdout.split()[1::2])
    assert cases > 100_000 and mismatches == 0, out.stdout


def test_an_unknown_csl_ext_cuda_value_is_refused(monkeypatch):
    """``yes`` is not ``1``, and not unset either (which builds without the CUDA part where no GPU is visible)."""
    monkeypatch.setenv("CSL_EXT_CUDA", "yes")
    with pytest.raises(ValueError, match="CSL_EXT_CUDA must be 0, 1 or unset, got 'yes'"):
        build.cuda_build_plan()
    monkeypatch.setenv("CSL_EXT_CUDA", "0")
    assert build.cuda_build_plan() == (False, None, "CSL_EXT_CUDA=0")
