"""Compile every Triton kernel for a GPU on a machine without one: ``python -m csl_kernels.triton.compile_check``.

The interpreter (``TRITON_INTERPRET=1``, how CI runs the kernels on CPU) executes the kernels' Python and never lowers
them, so a kernel that is right there can still fail to compile for a GPU (an op the backend does not lower, a type
the interpreter accepts, a block that needs too much shared memory). This check closes that gap:

1. *capture* (a subprocess under the interpreter): representative calls of every op — float32 / bfloat16 / float16 /
   float64 logits, every class-tile width (:data:`CLASS_COUNTS`), without validity, with a uint8 ignore map (compared
   in the kernels) and with a bool mask, image and class groups, non-contiguous and channels_last inputs — with every
   kernel launch recorded: argument types, constexpr values, ``num_warps``; then the tuned kernels again (with an
   int64 ignore map, as UniMatch gives it) under every candidate launch configuration (block sizes, warps) they may be
   tuned to;
2. *compile* (a subprocess without the interpreter, so ``USE_LIBDEVICE`` and every other GPU-only path is on): each
   distinct launch goes through Triton's own compiler for ``cuda:<arch>`` (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin
   with Triton's bundled ``ptxas``); the int64-offset variants (``WIDE``) that only giant tensors reach are compiled
   too, and the per-group reductions at the tiles only large inputs reach (:func:`large_tiles`). Registers, local
   memory and shared memory come from the cubin (``cuobjdump -res-usage``), spill stores from ``ptxas -v``
   (:func:`ptxas_spills`; at most :data:`MAX_SPILL_BYTES` pass).

Says how far it got on stderr (each phase, and the compile's count every 20 s); prints a table, writes JSON with
``--out``; exits non-zero when a kernel fails to compile or spills more than
:data:`MAX_SPILL_BYTES` (the variants are listed under the table).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time

# Lines a phase's subprocess writes to stderr that start with this are progress, passed on to the user's stderr as they
# come (the rest of the stream is kept for the error message of a failed phase).
PROGRESS = "compile_check: "
PROGRESS_EVERY_S = 20.0
# Launch options of ``kernel[grid](...)`` that are not kernel arguments.
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")
# Constexpr flags that only huge inputs switch on: compiled in both states whatever the captured calls gave.
BOTH_STATES = ("WIDE",)
# Class counts of the captured calls: one per class-tile width the kernels choose (the next power of two up to their
# largest tile: 2, 4, 8, 16, 32, and 64 for the cross-entropy), since the registers a tile takes depend on it.
CLASS_COUNTS = (2, 3, 5, 9, 21, 150)
TORCH_TO_TRITON = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int64": "i64",
                   "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


# ---------------------------------------------------------------------------------------------------------------
# 1. Capture (runs under TRITON_INTERPRET=1).


def _encode(value):
    import torch
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, tl.dtype):
        return {"tl_dtype": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


def representative_calls() -> None:
    """Calls of every public op that reach every kernel and every constexpr branch the inputs can select."""
    import torch

    import csl_kernels as ck

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for classes in CLASS_COUNTS:
            logits = (3 * torch.randn(2, classes, 7, 9, generator=g)).to(dtype)
            ignore = torch.zeros(2, 7, 9, dtype=torch.uint8)  # the trainer's maps (candidate_calls: UniMatch's int64)
            ignore[1, :, 6:] = ck.IGNORE_INDEX
            for ign in (None, ignore):
                ck.residual_features(logits, ign, backend="triton")
                ck.residual_features(logits, ign, confidence="log", backend="triton")
                for groups in ("image", "class"):
                    ck.pcos_weights(logits, ign, groups=groups, backend="triton")
                ck.pcos_weights(logits, ign, rule="released", backend="triton")
                ck.residual_features(logits, ign, rule="released", backend="triton")
                ck.threshold_weights(logits, ign, backend="triton")
                sel = ck.pcos_weights(logits, ign, backend="reference")
                leaf = logits.clone().requires_grad_(True)
                ck.weighted_cross_entropy(leaf, sel.label, sel.weight, ign, backend="triton").backward()
            mask = ignore != ck.IGNORE_INDEX  # a bool mask instead of the ignore map (IGNORE_MAP=False)
            ck.residual_features(logits, valid=mask, backend="triton")
            sel = ck.pcos_weights(logits, valid=mask, backend="triton")
            leaf = logits.clone().requires_grad_(True)
            ck.weighted_cross_entropy(leaf, sel.label, sel.weight, valid=mask, backend="triton").backward()
            odd = logits.to(memory_format=torch.channels_last)
            ck.residual_features(odd, None, backend="triton")
            strided = logits[:, :, ::2, 1:].clone().requires_grad_(True)  # rows not evenly spaced in memory
            ck.residual_features(strided.detach(), None, backend="triton")
            sel = ck.pcos_weights(strided.detach(), None, backend="reference")
            ck.pcos_weights(strided.detach(), None, backend="triton")
            ck.weighted_cross_entropy(strided, sel.label, sel.weight, None, backend="triton").backward()
        _say(f"ran the calls with {str(dtype).removeprefix('torch.')} logits")
    for dtype in (torch.float32, torch.float64):  # an image of a whole chunk: the cluster pass's widest tile
        ck.pcos_weights(torch.randn(1, 3, 32, 40, generator=g).to(dtype), None, backend="triton")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        images = torch.rand(2, 3, 20, 24, generator=g).to(dtype)
        reliable = torch.rand(2, 20, 24, generator=g) < 0.5
        ck.trusted_mask(images, reliable, block=8, generator=torch.Generator().manual_seed(1), backend="triton")
        ck.trusted_mask(images.to(memory_format=torch.channels_last), reliable, block=8,
                        generator=torch.Generator().manual_seed(1), backend="triton")
    for classes in (3, 21, 150):  # C * C below and above the histogram bins
        pred = torch.randint(0, classes, (2, 9, 11), generator=g)
        target = torch.randint(0, classes, (2, 9, 11), generator=g)
        ck.confusion_matrix(pred, target, classes, backend="triton")


def candidate_calls() -> None:
    """Calls that reach every tuned kernel with the heaviest constexpr choices (validity mask, float32, bfloat16 and
    float16 logits, :data:`CLASS_COUNTS`); :func:`capture` runs them once per launch-configuration candidate."""
    import torch

    import csl_kernels as ck

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # float64 is never tuned
        for classes in CLASS_COUNTS:
            logits = (3 * torch.randn(2, classes, 5, 7, generator=g)).to(dtype)
            ignore = torch.zeros(2, 5, 7, dtype=torch.int64)
            ignore[1, :, 6:] = ck.IGNORE_INDEX
            ck.residual_features(logits, ignore, backend="triton")
            for groups in ("image", "class"):
                sel = ck.pcos_weights(logits, ignore, groups=groups, backend="triton")
            leaf = logits.clone().requires_grad_(True)
            ck.weighted_cross_entropy(leaf, sel.label, sel.weight, ignore, backend="triton").backward()
        images = torch.rand(2, 3, 6, 8, generator=g).to(dtype)
        reliable = torch.rand(2, 6, 8, generator=g) < 0.5
        ck.trusted_mask(images, reliable, block=2, generator=torch.Generator().manual_seed(1), backend="triton")


def capture() -> list[dict]:
    """Run :func:`representative_calls` (default launch configurations) and :func:`candidate_calls` once per tuning
    candidate (csl_kernels/triton/tuning.py); return the distinct launches (module, kernel, args, options)."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: dict[str, dict] = {}
    original = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        if fn.__module__ == __package__:  # the package's own interpreter probe (csl_kernels.triton), not an op kernel
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        names = [p.name for p in kernel_params(fn)]
        values = dict(zip(names, args, strict=False))  # the constexprs usually come as keywords
        options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
        values.update(kwargs)
        record = {"module": fn.__module__, "kernel": fn.__name__,
                  "args": {k: _encode(v) for k, v in values.items()}, "options": options}
        launches.setdefault(json.dumps(record, sort_keys=True), record)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs, **options)

    from . import tuning

    InterpretedFunction.run = recording_run
    rounds = max(len(t.candidates) for t in tuning.TUNABLES.values())
    try:
        representative_calls()
        _say(f"captured the representative calls ({len(launches)} launches)")
        for index in range(1, rounds):
            with tuning.forced(index):
                candidate_calls()
            _say(f"captured the tuned kernels under launch configuration {index} of {rounds - 1}")
    finally:
        InterpretedFunction.run = original
    return list(launches.values())


# ---------------------------------------------------------------------------------------------------------------
# 2. Compile (runs without the interpreter).


def kernel_params(kernel) -> list[inspect.Parameter]:
    """The parameters of a ``@triton.jit`` kernel, compiled or interpreted (``TRITON_INTERPRET=1``)."""
    return list(inspect.signature(getattr(kernel, "fn", kernel)).parameters.values())


def is_constexpr(param: inspect.Parameter) -> bool:
    annotation = param.annotation
    return annotation is not inspect.Parameter.empty and "constexpr" in str(annotation)


def _signature(kernel, args: dict) -> tuple[dict, dict]:
    import triton.language as tl

    signature, constexprs = {}, {}
    for param in kernel_params(kernel):
        name = param.name
        if name not in args:
            if param.default is not inspect.Parameter.empty:
                args = {**args, name: _encode(param.default)}
            else:
                raise KeyError(f"{getattr(kernel, '__name__', kernel)}: argument {name!r} was not recorded")
        value = args[name]
        if isinstance(value, dict) and "tl_dtype" in value:
            value = tl.dtype(value["tl_dtype"])
        if name == "USE_LIBDEVICE":
            value = True  # what a GPU run passes (the interpreter has no libdevice)
        if is_constexpr(param):
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, dict) and "tensor" in value:
            signature[name] = "*" + TORCH_TO_TRITON[value["tensor"]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value is None:
            signature[name] = "constexpr"
            constexprs[name] = None
        else:
            raise TypeError(f"cannot type argument {name!r} = {value!r}")
    return signature, constexprs


def cuobjdump_path() -> str:
    """The ``cuobjdump`` that ships with Triton's NVIDIA backend (no CUDA toolkit needed)."""
    from triton.backends.nvidia import __file__ as nvidia_init

    return os.path.join(os.path.dirname(nvidia_init), "bin", "cuobjdump")


def resource_usage(path: str) -> dict[str, dict[str, int]]:
    """Per kernel and architecture of a cubin or of a library's embedded fatbin: registers, stack (spills), shared
    and local memory in bytes, from ``cuobjdump -res-usage`` (:func:`parse_resource_usage`)."""
    out = subprocess.run([cuobjdump_path(), "-res-usage", path], capture_output=True, text=True, check=False)
    return parse_resource_usage(out.stdout)


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """``{"sm_XX function": {"reg": .., "stack": .., "shared": .., "local": ..}}`` from ``cuobjdump -res-usage``'s
    output. A library built for several architectures holds each kernel once per architecture (``arch = sm_XX``
    heads each cubin's section), so the key names both: keyed by the function alone, the last architecture's figures
    would hide every other's."""
    usage, function, arch = {}, None, "sm_?"
    for line in text.splitlines():
        arch_line = re.match(r"\s*arch = (\S+)", line)
        named = re.match(r"\s*Function (\S+):", line)
        if arch_line:
            arch = arch_line.group(1)
        elif named:
            function = named.group(1)
        elif function is not None and "REG:" in line:
            usage[f"{arch} {function}"] = {k.lower(): int(v)
                                            for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            function = None
    return usage


# Bytes of per-thread stack a kernel may use where only the cubin is at hand (the extension's kernels): a few bytes
# can be a call frame, more means registers spilled to memory. Triton kernels are judged by ptxas's spill count.
MAX_STACK_BYTES = 16
# Bytes of spill stores per thread a Triton kernel may have (ptxas's count): up to four 4-byte values. With Triton 3.8
# (ptxas 12.9) 34 of the 2133 variants spill that much and no more: the class-group PCOS feature and cluster kernels
# at 8 warps (4-16 B) and the CE kernels at 8 warps (4-8 B), where ptxas caps the registers at 64 / 128 for occupancy.
# More than this is a tile that does not fit its registers (the image-group cluster kernel at 1024 pixels spilled 36 B
# with int64 lanes, and keeps them int32; the candidates that spilled 20-24 B at a 16-class tile were dropped).
MAX_SPILL_BYTES = 16


def spills(usage: dict[str, int]) -> bool:
    """Whether a kernel's resource usage shows registers spilled beyond the allowance: spill stores counted by
    ``ptxas`` above :data:`MAX_SPILL_BYTES` (:func:`ptxas_spills`, Triton kernels), else local memory or a stack
    beyond a call frame (cubin only)."""
    if "spill_stores" in usage:
        return usage["spill_stores"] > MAX_SPILL_BYTES or usage.get("local", 0) > 0
    return usage.get("stack", 0) > MAX_STACK_BYTES or usage.get("local", 0) > 0


def ptxas_path(arch: int = 90) -> str:
    """The ``ptxas`` that ships with Triton's NVIDIA backend and compiled the cubins for ``cuda:<arch>``: Triton 3.8
    compiles sm_100 and newer with a second, newer one (``ptxas-blackwell``, whose PTX the first refuses:
    "Unsupported .version")."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:  # a Triton with one ptxas
        from triton.backends.nvidia import __file__ as nvidia_init

        return os.path.join(os.path.dirname(nvidia_init), "bin", "ptxas")
    return get_ptxas(arch).path


def ptxas_spills(ptx: str) -> dict[str, int]:
    """``{"spill_stores": bytes, "spill_loads": bytes}`` of the one kernel in ``ptx``, from ``ptxas -v`` for the
    PTX's own target. The cubin's stack size cannot tell a call frame from spilled registers; ptxas's count can."""
    target = re.search(r"^\s*\.target\s+(\w+)", ptx, re.MULTILINE)
    if target is None:
        raise ValueError("the PTX names no .target")
    with tempfile.TemporaryDirectory() as folder:
        src = os.path.join(folder, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        arch = int(re.match(r"sm_(\d+)", target.group(1)).group(1))
        proc = subprocess.run([ptxas_path(arch), f"-arch={target.group(1)}", "-v", src, "-o",
                               os.path.join(folder, "kernel.cubin")], capture_output=True, text=True, check=False)
    found = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stdout + proc.stderr)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"ptxas -v failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-500:]}")
    return {"spill_stores": int(found.group(1)), "spill_loads": int(found.group(2))}


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        (usage,) = resource_usage(f.name).values()  # a Triton cubin holds one kernel
    return usage


def large_tiles() -> tuple[tuple[int, int], ...]:
    """(BLOCK_GRP, BLOCK_K) tiles of PCOS's per-group reductions that only large inputs reach (many chunks per image,
    many groups), compiled whatever the captured calls gave: one group by the most chunks, the largest tile both
    ways."""
    from .pcos_weights import GROUP_TILE, MAX_BLOCK_K

    return (1, MAX_BLOCK_K), (GROUP_TILE // MAX_BLOCK_K, MAX_BLOCK_K), (GROUP_TILE, 1)


def _variants(record: dict):
    yield record
    for flag in BOTH_STATES:
        value = record["args"].get(flag)
        if isinstance(value, bool):
            yield {**record, "args": {**record["args"], flag: not value}}
    if {"BLOCK_GRP", "BLOCK_K"} <= record["args"].keys():
        for groups, chunks in large_tiles():
            yield {**record, "args": {**record["args"], "BLOCK_GRP": groups, "BLOCK_K": chunks}}


def compile_all(records: list[dict], arch: int) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    variants = list({json.dumps(r, sort_keys=True): r for base in records for r in _variants(base)}.values())
    results, start = [], time.monotonic()
    said = start
    for done, record in enumerate(variants):
        if time.monotonic() - said >= PROGRESS_EVERY_S:
            said = time.monotonic()
            _say(f"compiled {done} of {len(variants)} kernel variants ({said - start:.0f} s)")
        jit_fn = getattr(importlib.import_module(record["module"]), record["kernel"])
        result = {"kernel": record["kernel"], "module": record["module"], "options": record["options"]}
        t0 = time.perf_counter()
        try:
            signature, constexprs = _signature(jit_fn, record["args"])
            result["signature"] = {k: v for k, v in signature.items() if v != "constexpr"}
            result["constexprs"] = {k: str(v) for k, v in constexprs.items()}
            compiled = triton.compile(ASTSource(jit_fn, signature, constexprs), target=target,
                                      options=dict(record["options"]))
            usage = _resource_usage(compiled.asm["cubin"])
            # A stack frame may hold spilled registers: ptxas says how many bytes (none without a frame).
            spilled = ptxas_spills(compiled.asm["ptx"]) if usage.get("stack", 0) > 0 else {
                "spill_stores": 0, "spill_loads": 0}
            result.update(status="ok", shared_bytes=int(compiled.metadata.shared), **usage, **spilled)
        except Exception as exc:  # noqa: BLE001 - every failure is reported with its kernel and constexprs
            message = str(exc).strip().splitlines()
            result.update(status="error", error=f"{type(exc).__name__}: {' | '.join(message[-6:])}")
        result["compile_s"] = round(time.perf_counter() - t0, 3)
        results.append(result)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Driver.


def _say(message: str) -> None:
    """A progress line on stderr, which the driver passes on as it comes (:func:`run_child`)."""
    print(PROGRESS + message, file=sys.stderr, flush=True)


def run_child(cmd: list[str], env: dict, what: str) -> None:
    """Run ``cmd``; its progress lines (:data:`PROGRESS`) go to stderr as they come, the rest of its stderr is kept and
    ends the error of a failed run."""
    with subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        kept = collections.deque(maxlen=200)
        for line in proc.stderr:
            if line.startswith(PROGRESS):
                print(line, end="", file=sys.stderr, flush=True)
            else:
                kept.append(line)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{''.join(kept)[-4000:]}")


def _run_phase(phase: str, arch: int, payload_path: str, interpret: bool) -> None:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "csl_kernels.triton.compile_check", "--phase", phase, "--arch", str(arch),
           "--payload", payload_path]
    run_child(cmd, env, f"the {phase} phase")


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels here (so the capture phase cannot run), or None."""
    code = "from csl_kernels.triton import _interpreter_problem as p; print(p() or '', end='')"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return f"the interpreter check failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
    return proc.stdout or None


def check(arch: int = 90) -> list[dict]:
    """Capture the launches under the interpreter and compile each for ``cuda:<arch>``; returns one record per
    compiled kernel variant (``status`` ok / error, registers, local and shared memory, compile seconds)."""
    problem = interpreter_problem()
    if problem:
        raise RuntimeError(f"compile_check captures the launches under Triton's interpreter, which cannot run here: "
                           f"{problem}")
    with tempfile.TemporaryDirectory() as tmp:
        launches, compiled = os.path.join(tmp, "launches.json"), os.path.join(tmp, "compiled.json")
        start = time.monotonic()
        _say("capturing every op's kernel launches under Triton's interpreter")
        _run_phase("capture", arch, launches, interpret=True)
        _say(f"captured the launches in {time.monotonic() - start:.0f} s; compiling each for cuda:{arch}")
        os.replace(launches, compiled + ".in")
        _run_phase("compile", arch, compiled, interpret=False)
        _say(f"done in {time.monotonic() - start:.0f} s")
        with open(compiled) as f:
            return json.load(f)


def format_table(results: list[dict]) -> str:
    lines = ["| kernel | constexprs | warps | regs | spill stores B | local B | shared B | compile s | status |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        consts = ", ".join(f"{k}={v}" for k, v in r.get("constexprs", {}).items())
        lines.append(f"| {r['kernel']} | {consts} | {r['options'].get('num_warps', '')} | {r.get('reg', '')} | "
                     f"{r.get('spill_stores', '')} | {r.get('local', '')} | {r.get('shared_bytes', '')} | "
                     f"{r['compile_s']} | "
                     f"{r['status'] if r['status'] == 'ok' else r['error']} |")
    return "\n".join(lines)


def spilling(results: list[dict]) -> list[str]:
    """One line per compiled variant whose registers spill beyond the allowance (:func:`spills`)."""
    return [f"{r['kernel']} {r['signature']} {r['constexprs']} warps={r['options'].get('num_warps')}: "
            f"{r['reg']} registers, {r['stack']} B stack, {r.get('spill_stores', '?')} B spill stores, "
            f"{r.get('local', 0)} B local" for r in results if r["status"] == "ok" and spills(r)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m csl_kernels.triton.compile_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90 = H100 / H200)")
    parser.add_argument("--out", help="write the per-kernel records as JSON")
    parser.add_argument("--phase", choices=("capture", "compile"), help=argparse.SUPPRESS)
    parser.add_argument("--payload", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase == "capture":
        with open(args.payload, "w") as f:
            json.dump(capture(), f)
        return 0
    if args.phase == "compile":
        with open(args.payload + ".in") as f:
            records = json.load(f)
        with open(args.payload, "w") as f:
            json.dump(compile_all(records, args.arch), f)
        return 0
    results = check(args.arch)
    print(format_table(results))
    failed = [r for r in results if r["status"] != "ok"]
    print(f"\n{len(results) - len(failed)} of {len(results)} kernel variants compiled for cuda:{args.arch}")
    spilled = spilling(results)
    print(f"{len(spilled)} of them spill more than {MAX_SPILL_BYTES} B of registers per thread"
          + "".join(f"\n  {line}" for line in spilled))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"arch": args.arch, "kernels": results}, f, indent=1)
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
