"""Every Triton kernel compiles for the H100 (sm_90) — checked on a machine without a GPU.

The other tests run the kernels under the interpreter, which never lowers them; here each launch of a set of
representative calls is compiled by Triton's own compiler down to a cubin (csl_kernels/triton/compile_check.py), and
the cubins' resource usage is held to what the block sizes were chosen for: no more than a few bytes of
registers spilled (ptxas's own count).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import ROOT, skip_or_fail

from csl_kernels.triton import compile_check

KERNELS = {"_residual_features_kernel", "_pcos_features_kernel", "_pcos_group_params_kernel", "_pcos_cluster_kernel",
           "_pcos_cluster_stats_kernel", "_pcos_weight_kernel", "_trusted_mask_kernel", "_ce_forward_kernel",
           "_ce_reduce_kernel", "_ce_backward_kernel", "_confusion_kernel"}


def _nvidia_backend_available() -> bool:
    return importlib.util.find_spec("triton.backends.nvidia") is not None


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    if not _nvidia_backend_available():
        skip_or_fail("triton", "triton has no NVIDIA backend here")
    problem = compile_check.interpreter_problem()
    if problem:  # e.g. Triton 3.6 with NumPy 2.4 (a GPU machine runs the real kernels instead; CI has Triton 3.8)
        skip_or_fail("triton", f"the capture phase needs Triton's interpreter: {problem}", interpreter_only=True)
    return compile_check.check(arch=90)


def test_every_kernel_compiles_for_sm90(compiled):
    failed = [f"{r['kernel']} {r.get('constexprs')}: {r['error']}" for r in compiled if r["status"] != "ok"]
    assert not failed, "\n".join(failed)
    assert {r["kernel"] for r in compiled} == KERNELS
    # Every dtype of the logits reached the feature and loss kernels, with and without the int64-offset variant.
    for kernel in ("_residual_features_kernel", "_pcos_features_kernel", "_ce_forward_kernel", "_ce_backward_kernel"):
        dtypes = {r["signature"]["z_ptr"] for r in compiled if r["kernel"] == kernel}  # the logits
        assert dtypes == {"*fp32", "*bf16", "*fp16", "*fp64"}, (kernel, dtypes)
    assert {r["constexprs"]["WIDE"] for r in compiled if r["kernel"] == "_ce_forward_kernel"} == {"False", "True"}
    # Every class-tile width the kernels choose (powers of two up to their largest tile): the registers depend on it.
    from csl_kernels.triton import residual_features, weighted_cross_entropy

    for kernel, widest in (("_residual_features_kernel", residual_features.MAX_BLOCK_C),
                           ("_pcos_features_kernel", residual_features.MAX_BLOCK_C),
                           ("_ce_forward_kernel", weighted_cross_entropy.MAX_BLOCK_C),
                           ("_ce_backward_kernel", weighted_cross_entropy.MAX_BLOCK_C)):
        widths = {int(r["constexprs"]["BLOCK_C"]) for r in compiled if r["kernel"] == kernel}
        assert widths == {2 ** k for k in range(1, widest.bit_length())}, (kernel, widths)
    # PCOS's per-group reductions at the tiles only large inputs reach (many chunks, many groups).
    for kernel in ("_pcos_group_params_kernel", "_pcos_cluster_stats_kernel"):
        tiles = {(int(r["constexprs"]["BLOCK_GRP"]), int(r["constexprs"]["BLOCK_K"])) for r in compiled
                 if r["kernel"] == kernel}
        assert set(compile_check.large_tiles()) <= tiles, (kernel, tiles)
    # Each record says what it compiled to.
    for r in compiled:
        assert r["reg"] > 0 and r["shared_bytes"] >= 0 and r["compile_s"] >= 0


def test_every_tuning_candidate_is_compiled(compiled):
    """The launch configurations the tuner may pick (csl_kernels/triton/tuning.py) are compiled too, so the spill
    check below covers them: (pixels x 32-class tile, warps) of each candidate at C = 21."""
    from csl_kernels.triton import tuning

    def reached(kernel: str, block_c: str | None = "32") -> set[tuple[int, int]]:
        records = [r for r in compiled if r["kernel"] == kernel]
        if block_c is not None:
            records = [r for r in records if r["constexprs"]["BLOCK_C"] == block_c]
        return {(int(r["constexprs"]["BLOCK_P"]) * int(block_c or 1), r["options"]["num_warps"]) for r in records}

    def expected(name: str) -> set[tuple[int, int]]:
        return {(c.tile, c.num_warps) for c in tuning.TUNABLES[name].candidates}

    assert expected("residual_features") <= reached("_residual_features_kernel")
    assert expected("pcos_weights") <= reached("_pcos_features_kernel")
    assert expected("weighted_cross_entropy_forward") <= reached("_ce_forward_kernel")
    assert expected("weighted_cross_entropy_backward") <= reached("_ce_backward_kernel")
    assert expected("trusted_mask") <= reached("_trusted_mask_kernel", block_c=None)


def test_kernels_spill_at_most_a_few_bytes(compiled):
    spilling = compile_check.spilling(compiled)
    assert not spilling, "\n".join(spilling)


def test_cli_fails_on_a_variant_that_spills(capsys, monkeypatch):
    """Every variant compiled, one beyond the spill allowance (as Triton 3.6's ptxas gives the float64 class-group
    feature kernel at 512 pixels, 8 warps: 24 B): the command line names it and exits 1, as the test above fails."""
    record = {"kernel": "_pcos_features_kernel", "signature": {"z_ptr": "*fp64"}, "constexprs": {"BLOCK_P": "512"},
              "options": {"num_warps": 8}, "status": "ok", "reg": 128, "stack": 24, "local": 0, "shared_bytes": 0,
              "compile_s": 0.1}
    within = {**record, "spill_stores": compile_check.MAX_SPILL_BYTES}
    beyond = {**record, "spill_stores": compile_check.MAX_SPILL_BYTES + 8}
    monkeypatch.setattr(compile_check, "check", lambda arch=90: [within])
    assert compile_check.main([]) == 0
    assert "0 of them spill more than" in capsys.readouterr().out
    monkeypatch.setattr(compile_check, "check", lambda arch=90: [within, beyond])
    assert compile_check.main([]) == 1
    printed = capsys.readouterr().out
    assert "2 of 2 kernel variants compiled" in printed and "1 of them spill more than 16 B" in printed
    assert f"{compile_check.MAX_SPILL_BYTES + 8} B spill stores" in printed


def test_cli_writes_json(tmp_path, capsys, monkeypatch, compiled):
    """The module's command line prints the table and writes the records (the phases are not re-run here)."""
    monkeypatch.setattr(compile_check, "check", lambda arch=90: compiled)
    out = tmp_path / "kernels.json"
    assert compile_check.main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| _pcos_features_kernel |" in printed and f"{len(compiled)} of {len(compiled)} kernel variants" in printed
    data = json.loads(out.read_text())
    assert data["arch"] == 90 and len(data["kernels"]) == len(compiled)


def test_signature_types():
    """Argument typing of the compile phase: pointers by dtype, ints by range, constexprs by the kernel's params."""
    from csl_kernels.triton.trusted_mask import _trusted_mask_kernel

    params = compile_check.kernel_params(_trusted_mask_kernel)
    names = [p.name for p in params]
    flags = {p.name: compile_check.is_constexpr(p) for p in params}
    assert flags["WIDE"] and flags["BLOCK_P"] and not flags[names[0]]
    args = {name: (True if name == "WIDE" else 256) if flags[name] else 3 for name in names}
    args[names[0]] = {"tensor": "bfloat16"}
    args[names[1]] = 2**40
    signature, constexprs = compile_check._signature(_trusted_mask_kernel, args)
    assert signature[names[0]] == "*bf16" and signature[names[1]] == "i64" and signature[names[2]] == "i32"
    assert constexprs == {name: args[name] for name in names if flags[name]}
    assert all(signature[name] == "constexpr" for name in names if flags[name])


_SPILL_SCRIPT = """
import json, sys, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from csl_kernels.triton import compile_check

@triton.jit
def heavy(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    acc = x * x
    for i in range(8):
        acc = acc * x + tl.sum(acc * x, 0)
    tl.store(y_ptr + offs, acc + x)

out = {}
for maxnreg in (0, 32):  # 2048 values on one warp: ~160 registers a thread, or spilled when capped at 32
    options = {"num_warps": 1, **({"maxnreg": maxnreg} if maxnreg else {})}
    k = triton.compile(ASTSource(heavy, {"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 2048}),
                       target=GPUTarget("cuda", int(sys.argv[1]), 32), options=options)
    out[maxnreg] = {**compile_check._resource_usage(k.asm["cubin"]), **compile_check.ptxas_spills(k.asm["ptx"])}
print(json.dumps(out))
"""


@pytest.mark.parametrize("arch", [90, 120])
def test_ptxas_counts_spills_that_the_stack_size_cannot_tell(tmp_path, arch):
    """The spill check reads ptxas's own count: a kernel capped at 32 registers spills, the same kernel uncapped
    does not. For sm_120 (and sm_100) Triton 3.8 compiles with its second ptxas, whose PTX version the first one
    refuses: the count comes from the one that compiled the kernel."""
    import os
    import subprocess
    import sys

    if not _nvidia_backend_available():
        skip_or_fail("triton", "triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    # The checkout under test, not whichever csl_kernels the interpreter would find from the script's folder.
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    script = tmp_path / "spill.py"  # @triton.jit needs its source in a file
    script.write_text(_SPILL_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(arch)], env=env, capture_output=True, text=True,
                          timeout=600, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    usage = json.loads(proc.stdout.strip().splitlines()[-1])
    assert usage["0"]["spill_stores"] == 0 and not compile_check.spills(usage["0"])
    assert usage["32"]["spill_stores"] > compile_check.MAX_SPILL_BYTES and usage["32"]["reg"] <= 32
    assert compile_check.spills(usage["32"])


def test_a_phase_says_how_far_it_got_and_a_failed_one_keeps_its_errors(capfd):
    """The phases run minutes: their progress lines reach stderr as they come; the rest of a phase's stderr is the
    error of a failed phase, without the progress lines."""
    import sys

    child = ("import sys; p = sys.stderr; p.write('compile_check: one\\n'); p.write('a warning\\n'); "
             "p.write('compile_check: two\\n'); p.write('Traceback: boom\\n'); sys.exit({code})")
    compile_check.run_child([sys.executable, "-c", child.format(code=0)], {}, "the test phase")
    assert capfd.readouterr().err == "compile_check: one\ncompile_check: two\n"
    with pytest.raises(RuntimeError, match=r"the test phase failed \(exit 3\):\na warning\nTraceback: boom\n$"):
        compile_check.run_child([sys.executable, "-c", child.format(code=3)], {}, "the test phase")
    assert capfd.readouterr().err == "compile_check: one\ncompile_check: two\n"


_TWO_ARCH_RES_USAGE = """
Fatbin elf code:
================
arch = sm_80
code version = [1,8]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:0
 Function _Z6kernelPf:
  REG:255 STACK:96 SHARED:0 LOCAL:0 CONSTANT[0]:360 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90
code version = [1,8]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:0
 Function _Z6kernelPf:
  REG:40 STACK:0 SHARED:17408 LOCAL:0 CONSTANT[0]:360 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_resource_usage_keeps_each_architectures_copy_of_a_kernel(tmp_path, monkeypatch):
    """A library built for several architectures (TORCH_CUDA_ARCH_LIST="8.0;9.0") holds each kernel once per
    architecture under the same name: the sm_80 copy that spills is reported, not hidden by the sm_90 one after it
    (``cuobjdump -res-usage``'s output as it prints it, from a stand-in for the tool)."""
    fake = tmp_path / "cuobjdump"
    fake.write_text(f"#!/bin/sh\ncat <<'END'\n{_TWO_ARCH_RES_USAGE}END\n")
    fake.chmod(0o755)
    monkeypatch.setattr(compile_check, "cuobjdump_path", lambda: str(fake))
    usage = compile_check.resource_usage("library.so")
    assert usage == {"sm_80 _Z6kernelPf": {"reg": 255, "stack": 96, "shared": 0, "local": 0},
                     "sm_90 _Z6kernelPf": {"reg": 40, "stack": 0, "shared": 17408, "local": 0}}
    assert [name for name, u in usage.items() if compile_check.spills(u)] == ["sm_80 _Z6kernelPf"]
