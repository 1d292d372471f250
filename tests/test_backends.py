"""The backend registry of csl_kernels._backends: auto choice and its log line, fallbacks, errors with reasons.

Most tests run on an isolated registry (fresh tables via monkeypatch) with a made-up op, so they do not depend on
which real backends this machine can build; the last ones check the real ops and the Triton availability rule.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from conftest import FUSED_BACKENDS, ROOT, check_outputs_of_repeated_rows, child_limit, require_backend, skip_or_fail

import csl_kernels
from csl_kernels import _backends

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only a device object: nothing runs on it


def impl_named(name):
    def fn(*args):
        return name

    return fn


@pytest.fixture
def registry(monkeypatch):
    """Empty registry tables; backend modules are not imported. Returns the implementations table."""
    impls: dict = {}
    monkeypatch.setattr(_backends, "_IMPLS", impls)
    monkeypatch.setattr(_backends, "_AVAILABILITY", {})
    monkeypatch.setattr(_backends, "_BACKEND_MODULES", {})
    monkeypatch.setattr(_backends, "_IMPORT_ERRORS", {})
    monkeypatch.setattr(_backends, "_NAMED", {})
    monkeypatch.setattr(_backends, "_AUTO_LOGGED", set())
    monkeypatch.setattr(_backends, "_FORCED_LOGGED", set())
    for backend in _backends.BACKENDS:
        _backends.register("toy_op", backend)(impl_named(backend))
    return impls


def auto_records(caplog, op):
    return [r for r in caplog.records if r.name == "csl_kernels" and f"csl_kernels.{op} " in r.getMessage()]


def test_register_and_resolve_by_name(registry):
    for backend in ("reference", "cpu"):
        name, fn = _backends.resolve("toy_op", backend, CPU)
        assert name == backend and fn() == backend
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        _backends.register("toy_op", "bogus")


def test_auto_logs_its_choice_once(registry, caplog):
    caplog.set_level(logging.INFO, logger="csl_kernels")
    assert _backends.resolve("toy_op", "auto", CPU)[0] == "cpu"
    assert _backends.resolve("toy_op", "auto", CPU)[0] == "cpu"
    records = auto_records(caplog, "toy_op")
    assert len(records) == 1
    assert records[0].levelno == logging.INFO and "'cpu'" in records[0].getMessage()
    # A new device type is a new choice, logged once as well; on CUDA devices the extension comes first.
    assert _backends.resolve("toy_op", "auto", CUDA)[0] == "cuda"
    assert _backends.resolve("toy_op", "auto", CUDA)[0] == "cuda"
    assert len(auto_records(caplog, "toy_op")) == 2


def test_csl_backend_names_the_backend_of_auto_calls(registry, fake_gpu_auto, caplog, monkeypatch):
    """CSL_BACKEND=<name>: calls with backend='auto' use that backend as if named (said once per op; an unavailable
    one raises naming CSL_BACKEND, nothing timed on a GPU); a backend named in the call wins; a name that is no
    backend is a ValueError; unset, empty or auto: auto's own choice."""
    from csl.config import ConfigError
    from csl.trainer import check_kernels_backend

    timed = []
    monkeypatch.setenv("CSL_BACKEND", "reference")
    assert _backends.resolve("toy_op", "auto", CPU)[0] == "reference"
    assert _backends.resolve("toy_op", "auto", CPU)[0] == "reference"
    assert _backends.resolve("toy_op", "cpu", CPU)[0] == "cpu"
    z = torch.zeros(2, 21, 8, 8)
    assert fake_gpu_auto.resolve("toy_op", "auto", CUDA, z, lambda impl: impl(),
                                 timer=lambda run, device: timed.append(run()) or 1.0)[0] == "reference"
    assert timed == []
    said = [r.getMessage() for r in auto_records(caplog, "toy_op")]
    assert said == ["csl_kernels.toy_op on cpu: backend='auto' uses 'reference', as CSL_BACKEND names"]
    _backends.log_choices_again()  # a new run's log names it again
    _backends.resolve("toy_op", "auto", CPU)
    assert len(auto_records(caplog, "toy_op")) == 2
    monkeypatch.setenv("CSL_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' \(named by CSL_BACKEND\) is unavailable: the cuda backend"):
        _backends.resolve("toy_op", "auto", CPU)
    with pytest.raises(ConfigError, match="CSL_BACKEND=cuda cannot run on cpu: the cuda backend"):
        check_kernels_backend("auto", CPU, ops=("toy_op",))
    monkeypatch.setenv("CSL_BACKEND", "fastest")
    with pytest.raises(ValueError, match="CSL_BACKEND must be unset, 'auto' or one of"):
        _backends.resolve("toy_op", "auto", CPU)
    for value in ("", "auto"):
        monkeypatch.setenv("CSL_BACKEND", value)
        assert _backends.resolve("toy_op", "auto", CPU)[0] == "cpu"
        check_kernels_backend("auto", CPU, ops=("toy_op",))


def test_auto_falls_back_with_a_warning_that_gives_the_reason(registry, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="csl_kernels")
    _backends.register_availability("cpu", lambda device: "the compiler exploded")
    name, fn = _backends.resolve("toy_op", "auto", CPU)
    assert name == "reference" and fn() == "reference"
    (record,) = auto_records(caplog, "toy_op")
    assert record.levelno == logging.WARNING
    assert "skipped cpu: the compiler exploded" in record.getMessage()
    # On CUDA devices: cuda missing for this op -> triton, and the warning names the skipped cuda.
    del registry["toy_op"]["cuda"]
    assert _backends.resolve("toy_op", "auto", CUDA)[0] == "triton"
    record = auto_records(caplog, "toy_op")[-1]
    assert record.levelno == logging.WARNING and "skipped cuda: the cuda backend does not implement toy_op" in (
        record.getMessage())


def test_named_unavailable_backend_raises_with_the_reason(registry):
    _backends.register_availability("cpu", lambda device: "the compiler exploded")
    with pytest.raises(RuntimeError, match="backend 'cpu' is unavailable: the compiler exploded"):
        _backends.resolve("toy_op", "cpu", CPU)
    assert not _backends.is_available("toy_op", "cpu", "cpu")
    assert _backends.is_available("toy_op", "reference", "cpu")
    with pytest.raises(RuntimeError, match="the cuda backend needs CUDA tensors"):
        _backends.resolve("toy_op", "cuda", CPU)
    with pytest.raises(RuntimeError, match="the cpu backend needs CPU tensors"):
        _backends.resolve("toy_op", "cpu", CUDA)
    del registry["toy_op"]["cuda"]
    with pytest.raises(RuntimeError, match="does not implement toy_op"):
        _backends.resolve("toy_op", "cuda", CUDA)


def test_failed_backend_import_is_the_reason(registry, monkeypatch):
    monkeypatch.setattr(_backends, "_BACKEND_MODULES", {"cpu": "csl_kernels.no_such_module"})
    reason = _backends.unavailable_reason("toy_op", "cpu", CPU)
    assert reason is not None and "importing csl_kernels.no_such_module failed: ModuleNotFoundError" in reason
    with pytest.raises(RuntimeError, match="no_such_module"):
        _backends.resolve("toy_op", "cpu", CPU)
    assert _backends.resolve("toy_op", "auto", CPU)[0] == "reference"


def test_no_backend_at_all_raises(registry):
    registry["toy_op"] = {}
    with pytest.raises(RuntimeError, match="no backend available"):
        _backends.resolve("toy_op", "auto", CPU)


def test_unknown_backend_name_raises():
    z = torch.randn(1, 3, 2, 2)
    with pytest.raises(ValueError, match="unknown backend 'fastest'; expected 'auto' or one of"):
        csl_kernels.residual_features(z, backend="fastest")
    assert csl_kernels.unavailable_reason("residual_features", "fastest", CPU).startswith("unknown backend")
    assert not csl_kernels.is_available("residual_features", "fastest", "cpu")


def test_availability_of_every_public_op_and_auto():
    """``auto`` runs every op; an op built on another op's kernels is available where they are; a device may be
    named by a string; a name that is no op with backends is said to be that."""
    for op in ("pcos_weights", "residual_features", "threshold_weights", "trusted_mask", "weighted_cross_entropy",
               "confusion_matrix"):
        assert csl_kernels.is_available(op, "auto", "cpu"), op
        assert csl_kernels.unavailable_reason(op, "reference", "cpu") is None, op
    assert csl_kernels.unavailable_reason("threshold_weights", "cpu", "cpu") == \
        csl_kernels.unavailable_reason("residual_features", "cpu", CPU)
    assert csl_kernels.unavailable_reason("pcos_weights", "cuda", "cpu") == \
        "the cuda backend needs CUDA tensors, got tensors on cpu"
    reason = csl_kernels.unavailable_reason("selection_scores", "auto", "cpu")
    assert reason is not None and reason.startswith("'selection_scores' is no op with backends; those are ")
    assert "threshold_weights" in reason and "pcos_weights" in reason


def test_real_op_auto_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(_backends, "_AUTO_LOGGED", set())
    caplog.set_level(logging.INFO, logger="csl_kernels")
    pred = torch.zeros(2, 3, dtype=torch.long)
    first = csl_kernels.confusion_matrix(pred, pred, 2)
    second = csl_kernels.confusion_matrix(pred, pred, 2)
    assert torch.equal(first, second) and first[0, 0] == 6
    records = auto_records(caplog, "confusion_matrix")
    assert len(records) == 1 and "backend='auto' uses" in records[0].getMessage()


def test_auto_log_names_the_public_op_that_runs_another_ops_kernels(monkeypatch, caplog):
    """threshold_weights runs the residual_features kernels: its auto line names it (and the kernels), once, apart
    from residual_features' own line."""
    monkeypatch.setattr(_backends, "_AUTO_LOGGED", set())
    caplog.set_level(logging.INFO, logger="csl_kernels")
    logits = torch.randn(1, 3, 4, 5)
    for _ in range(2):
        csl_kernels.threshold_weights(logits)
    (record,) = auto_records(caplog, "threshold_weights")
    assert record.getMessage().startswith("csl_kernels.threshold_weights (the residual_features kernels) on cpu: "
                                          "backend='auto' uses "), record.getMessage()
    assert auto_records(caplog, "residual_features") == []
    csl_kernels.residual_features(logits)
    assert len(auto_records(caplog, "residual_features")) == 1


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    # Import the triton package (if it imports at all) before touching the environment: Triton reads
    # TRITON_INTERPRET when a kernel is defined, and later tests must get the kernels this process was started for.
    import_error = _backends._load_backend_module("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = _backends.unavailable_reason("weighted_cross_entropy", "triton", CPU)
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        csl_kernels.confusion_matrix(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), 2,
                                     backend="triton")
    if import_error is not None:
        skip_or_fail("triton", import_error)
    # The triton package's own availability check reads the environment at call time, and compares it with the
    # value its kernels were defined under (Triton fixes it then).
    import csl_kernels.triton as triton_pkg
    from csl_kernels.triton._common import INTERPRET

    if INTERPRET:  # CI: imported under the interpreter, the variable removed since
        for device in (CPU, CUDA):
            assert "TRITON_INTERPRET is unset now but was 1 when csl_kernels.triton was imported" in (
                triton_pkg._check(device))
    else:
        assert "TRITON_INTERPRET=1" in triton_pkg._check(CPU)
        assert triton_pkg._check(CUDA) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not INTERPRET:  # a GPU machine: compiled kernels, the variable set since
        assert "TRITON_INTERPRET is 1 now but was unset" in triton_pkg._check(CPU)
        return
    # None, or why this Triton's interpreter cannot run the kernels (Triton 3.6 with NumPy 2.4+ cannot run a loop
    # over a runtime bound); Triton 3.8, as CI has, runs them.
    problem = triton_pkg._interpreter_problem()
    assert problem is None or "interpreter cannot run a loop" in problem
    assert triton_pkg._check(CPU) == problem
    assert _backends.unavailable_reason("weighted_cross_entropy", "triton", CPU) == problem
    import triton

    if tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 8):
        assert problem is None


def test_triton_is_unavailable_on_a_gpu_its_kernels_do_not_compile_for(monkeypatch):
    """Below compute capability 7.0 (Pascal: P100, GTX 10xx) ptxas refuses the confusion matrix kernel's atomics:
    the triton backend is unavailable there with a reason that names the GPU (a named backend raises it, auto skips
    with it), instead of a PTXASError at the first launch. sm_70 and newer GPUs keep it."""
    if _backends._load_backend_module("triton") is not None:
        skip_or_fail("triton", _backends._load_backend_module("triton"))
    import csl_kernels.triton as triton_pkg
    from csl_kernels.triton._common import INTERPRET

    monkeypatch.setenv("TRITON_INTERPRET", "1" if INTERPRET else "0")
    capability = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["now"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100-PCIE-16GB")
    gpu = torch.device("cuda", 0)
    capability["now"] = (6, 0)
    reason = _backends.unavailable_reason("confusion_matrix", "triton", gpu)
    assert reason is not None and "compute capability 7.0 or newer" in reason
    assert "Tesla P100-PCIE-16GB (sm_60)" in reason
    assert triton_pkg._check(gpu) == reason
    for supported in ((7, 0), (7, 5), (8, 6), (12, 0)):
        capability["now"] = supported
        assert _backends.unavailable_reason("confusion_matrix", "triton", gpu) is None, supported


def test_threads_that_first_ask_for_the_interpreter_at_once_probe_it_once():
    """Triton's interpreter is not thread-safe: threads whose first triton calls come together must not run the
    probe side by side, where it fails and its false "cannot run a loop" is cached for the process."""
    import threading

    import csl_kernels.triton as triton_pkg
    from csl_kernels.triton._common import INTERPRET

    if not INTERPRET or triton_pkg._interpreter_problem() is not None:
        pytest.skip("the probe runs where Triton's interpreter runs the kernels (TRITON_INTERPRET=1, Triton 3.8)")
    for _ in range(10):  # the race showed in about one round of five
        triton_pkg._probe_interpreter.cache_clear()
        barrier, answers = threading.Barrier(4), []

        def ask(barrier=barrier, answers=answers):
            barrier.wait()
            answers.append(triton_pkg._interpreter_problem())

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert answers == [None] * 4


def test_the_per_call_environment_read_follows_os_environ(monkeypatch):
    # EnvEquals reads the dict behind os.environ: every way of changing the variable must show at the next call.
    from csl_kernels._env import EnvEquals

    name = "CSL_TEST_ENV_EQUALS"
    monkeypatch.delenv(name, raising=False)
    on_by_default, off_by_default = EnvEquals(name, "1", default="1"), EnvEquals(name, "1")
    assert on_by_default() and not off_by_default()
    for value in ("1", "0", "", " 1", "yes", "1"):
        monkeypatch.setenv(name, value)
        assert on_by_default() == off_by_default() == (os.environ.get(name) == "1")
    os.environ[name] = "0"
    assert not on_by_default()
    os.environ.update({name: "1"})
    assert on_by_default()
    del os.environ[name]
    assert on_by_default() and not off_by_default()


def test_auto_on_cpu_never_picks_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even when the interpreter could run it: it is far too slow
    name, _ = _backends.resolve("weighted_cross_entropy", "auto", CPU)
    assert name in ("cpu", "reference")


@pytest.mark.parametrize("backend", ["cpu", "triton", "auto"])
def test_public_op_compiles_with_fullgraph(backend):
    from conftest import require_backend

    device = CPU if backend == "auto" else require_backend("weighted_cross_entropy", backend)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 6, 7, generator=g).to(device).requires_grad_()
    label = torch.randint(0, 5, (2, 6, 7), generator=g).to(device)
    weight = torch.rand(2, 6, 7, generator=g).to(device)

    def loss_fn(z, label, weight):
        return csl_kernels.weighted_cross_entropy(z, label, weight, backend=backend)

    eager = loss_fn(z, label, weight)
    (eager_grad,) = torch.autograd.grad(eager, z)
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(z, label, weight)
    (compiled_grad,) = torch.autograd.grad(compiled, z)
    assert torch.equal(compiled.detach(), eager.detach())
    assert torch.equal(compiled_grad, eager_grad)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_pcos_and_trusted_mask_compile_over_changing_batch_sizes(backend):
    """torch.compile(fullgraph=True) while the batch size changes (a smaller last batch): with dynamic=True the float
    arguments trace as symbols, and the mask draws its cells without a ``generator=None`` argument (which Dynamo
    traces only for fixed shapes)."""
    device = CPU if backend == "reference" else require_backend("pcos_weights", backend)
    g = torch.Generator().manual_seed(0)
    torch._dynamo.reset()
    pcos = torch.compile(lambda z: csl_kernels.pcos_weights(z, alpha=2.0, backend=backend).weight, fullgraph=True,
                         dynamic=True, backend="aot_eager")
    mask = torch.compile(lambda x, r: csl_kernels.trusted_mask(x, r, block=2, fill=0.5, backend=backend),
                         fullgraph=True, backend="aot_eager")
    for batch in (2, 3, 5):
        z = torch.randn(batch, 4, 6, 7, generator=g).to(device)
        torch.testing.assert_close(pcos(z), csl_kernels.pcos_weights(z, alpha=2.0, backend=backend).weight)
        images = torch.randn(batch, 3, 6, 7, generator=g).to(device)
        reliable = (torch.rand(batch, 6, 7, generator=g) < 0.5).to(device)
        out = mask(images, reliable)
        assert not out.cover[~reliable].any()
        assert torch.equal(out.images, torch.where(out.cover.unsqueeze(1), torch.full_like(images, 0.5), images))


@pytest.mark.parametrize("op", ["pcos_weights", "residual_features", "trusted_mask", "double_backward"])
def test_fused_backends_never_return_a_silent_gradient(fused_backend, op):
    """Inputs that require grad: the fused backends raise a clear error at backward (never a None / zero gradient);
    the reference differentiates through plain PyTorch."""
    from conftest import require_backend

    device = require_backend("pcos_weights", fused_backend)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 3, 5, 6, generator=g).to(device).requires_grad_()
    if op == "pcos_weights":
        out = csl_kernels.pcos_weights(z, backend=fused_backend).weight.sum()
    elif op == "residual_features":
        out = csl_kernels.residual_features(z, backend=fused_backend)[0].sum()
    elif op == "trusted_mask":
        reliable = torch.ones(1, 5, 6, dtype=torch.bool, device=device)
        out = csl_kernels.trusted_mask(z, reliable, block=2, backend=fused_backend).images.sum()
    else:
        label = torch.randint(0, 3, (1, 5, 6), generator=g).to(device)
        loss = csl_kernels.weighted_cross_entropy(z, label, torch.ones(1, 5, 6, device=device), backend=fused_backend)
        (grad,) = torch.autograd.grad(loss, z, create_graph=True)
        out = grad.square().sum()
    name = "weighted_cross_entropy_backward" if op == "double_backward" else op
    with pytest.raises(RuntimeError, match=f"csl_kernels.{name} is not differentiable"):
        out.backward()
    assert z.grad is None


@pytest.mark.parametrize("op", ["pcos_weights", "residual_features", "trusted_mask", "weighted_cross_entropy"])
def test_fused_backends_refuse_a_forward_mode_tangent(fused_backend, op):
    """A dual tensor of torch.autograd.forward_ad: the fused backends raise (their ops would drop the tangent, a
    silent zero derivative); the reference gives the tangent; a plain tensor inside the dual level still runs."""
    import torch.autograd.forward_ad as fwad

    device = require_backend("pcos_weights", fused_backend)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 3, 5, 6, generator=g).to(device)
    label = torch.randint(0, 3, (1, 5, 6), generator=g).to(device)
    weight = torch.rand(1, 5, 6, generator=g).to(device)
    reliable = torch.ones(1, 5, 6, dtype=torch.bool, device=device)

    def call(logits, backend):  # the other inputs follow the logits (the reference runs on CPU copies)
        if op == "pcos_weights":
            return csl_kernels.pcos_weights(logits, backend=backend).weight
        if op == "residual_features":
            return csl_kernels.residual_features(logits, backend=backend)[0]
        if op == "trusted_mask":
            gen = torch.Generator(logits.device).manual_seed(0)
            return csl_kernels.trusted_mask(logits, reliable.to(logits.device), block=2, generator=gen,
                                            backend=backend).images
        return csl_kernels.weighted_cross_entropy(logits, label.to(logits.device), weight.to(logits.device),
                                                  backend=backend)

    with fwad.dual_level():
        dual = fwad.make_dual(z, torch.ones_like(z))
        with pytest.raises(RuntimeError, match="no forward-mode derivative.*use backend='reference'"):
            call(dual, fused_backend)
        assert fwad.unpack_dual(call(dual.cpu(), "reference")).tangent is not None
        plain = call(z, fused_backend)  # a tensor without a tangent inside the dual level: the ordinary call
        assert fwad.unpack_dual(plain).tangent is None
    assert torch.equal(plain, call(z, fused_backend))
    if op == "weighted_cross_entropy":  # a dual weight too
        with fwad.dual_level(), pytest.raises(RuntimeError, match="no forward-mode derivative"):
            call_weight = fwad.make_dual(weight, torch.ones_like(weight))
            csl_kernels.weighted_cross_entropy(z, label, call_weight, backend=fused_backend)


def test_fused_backends_under_torch_func(fused_backend):
    """torch.func.vmap batches every fused op through its custom op (the reference's answer per sample);
    torch.func.grad of the fused cross-entropy is refused by name (the plain autograd path is the supported one)."""
    device = require_backend("weighted_cross_entropy", fused_backend)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 5, 6, generator=g).to(device)
    label = torch.randint(0, 4, (2, 5, 6), generator=g).to(device)
    weight = torch.rand(2, 5, 6, generator=g).to(device)
    ops = {
        "weighted_cross_entropy": lambda b, t, lab, w: csl_kernels.weighted_cross_entropy(t[None], lab[None], w[None],
                                                                                          backend=b),
        "pcos_weights": lambda b, t, lab, w: csl_kernels.pcos_weights(t[None], backend=b).weight[0],
        "residual_features": lambda b, t, lab, w: csl_kernels.residual_features(t[None], backend=b)[0][0],
        "confusion_matrix": lambda b, t, lab, w: csl_kernels.confusion_matrix(t.argmax(0), lab, 4, backend=b),
    }
    for name, op in ops.items():
        batched = torch.func.vmap(lambda t, lab, w, op=op: op(fused_backend, t, lab, w))(z, label, weight)
        expected = torch.stack([op("reference", z[i].cpu(), label[i].cpu(), weight[i].cpu()) for i in range(2)])
        torch.testing.assert_close(batched.cpu().to(expected.dtype), expected, msg=name)
    with pytest.raises(RuntimeError, match="no torch.func gradient.*use torch.autograd, or backend='reference'"):
        torch.func.grad(lambda t: csl_kernels.weighted_cross_entropy(t, label, weight, backend=fused_backend))(z)
    with pytest.raises(RuntimeError, match="no forward-mode derivative.*use backend='reference'"):  # not a 0
        torch.func.jvp(lambda t: csl_kernels.weighted_cross_entropy(t, label, weight, backend=fused_backend), (z,),
                       (torch.ones_like(z),))
    reliable = torch.ones(2, 5, 6, dtype=torch.bool, device=device)
    not_differentiable = {  # the op's own error, not PyTorch's request for an autograd.Function's setup_context
        "pcos_weights": lambda t: csl_kernels.pcos_weights(t, backend=fused_backend).weight.sum(),
        "residual_features": lambda t: csl_kernels.residual_features(t, backend=fused_backend)[0].sum(),
        "trusted_mask": lambda t: csl_kernels.trusted_mask(t, reliable, block=2, backend=fused_backend).images.sum(),
    }
    for name, op in not_differentiable.items():
        with pytest.raises(RuntimeError, match=f"csl_kernels.{name} is not differentiable"):
            torch.func.grad(op)(z)
        if name != "trusted_mask":  # its reliable map is not batched
            with pytest.raises(RuntimeError, match=f"csl_kernels.{name} is not differentiable"):
                torch.func.grad(lambda t, op=op: torch.func.vmap(op)(t[:, None]).sum())(z)


def test_the_reference_backend_under_vmap():
    """torch.func.vmap batches the reference ops too (their group sums and histograms are out of place): what
    ``auto`` falls back to keeps working under vmap, with each sample's own answer."""
    from csl_kernels.metrics import pseudo_label_counts

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    label = torch.randint(0, 4, (3, 5, 6), generator=g)
    reliable = torch.rand(3, 5, 6, generator=g) > 0.5
    ops = {
        "pcos_weights": lambda t, lab, rel: csl_kernels.pcos_weights(t[None], backend="reference").weight[0],
        "pcos_weights class groups": lambda t, lab, rel: csl_kernels.pcos_weights(
            t[None], groups="class", backend="reference").weight[0],
        "confusion_matrix": lambda t, lab, rel: csl_kernels.confusion_matrix(t.argmax(0), lab, 4, backend="reference"),
        "pseudo_label_counts": lambda t, lab, rel: pseudo_label_counts(t.argmax(0), rel, lab, 4),
    }
    for name, op in ops.items():
        batched = torch.func.vmap(op)(z, label, reliable)
        assert torch.equal(batched, torch.stack([op(z[i], label[i], reliable[i]) for i in range(3)])), name


def test_the_triton_interpreter_check_ignores_the_first_callers_context():
    """The interpreter's one-time check runs outside the torch.func transform / fake mode of the call that first
    asks: a first call under torch.func.grad does not disable the triton backend for the process."""
    import subprocess
    import sys

    if os.environ.get("TRITON_INTERPRET") != "1":
        skip_or_fail("triton", "the interpreter check runs for CPU tensors under TRITON_INTERPRET=1 only",
                     interpreter_only=True)
    require_backend("weighted_cross_entropy", "triton")
    child = ("import torch, csl_kernels\n"
             "z, y, w = torch.randn(1, 3, 4, 5), torch.randint(0, 3, (1, 4, 5)), torch.rand(1, 4, 5)\n"
             "try:\n"
             "    torch.func.grad(lambda t: csl_kernels.weighted_cross_entropy(t, y, w, backend='triton'))(z)\n"
             "except RuntimeError as e:\n"
             "    print('refused:', e)\n"
             "got = csl_kernels.residual_features(z, backend='triton')[0]\n"
             "print('plain call matches:', torch.allclose(got, csl_kernels.residual_features(z, backend='reference')[0]"
             ".float(), atol=1e-6))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True,
                          timeout=child_limit(600))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused: csl_kernels.weighted_cross_entropy: the fused backends" in proc.stdout, proc.stdout
    assert "plain call matches: True" in proc.stdout, proc.stdout


def test_an_int8_ignore_map_cannot_hold_255():
    from csl_kernels._checks import valid_mask

    z = torch.zeros(1, 3, 2, 2)
    ignore = torch.tensor([[[-1, 0], [0, 0]]], dtype=torch.int8)  # -1 wraps to 255 in a uint8 comparison
    with pytest.raises(TypeError, match="int8, which cannot hold the ignore value 255"):
        valid_mask(z, ignore)
    assert valid_mask(z, ignore.to(torch.int16)).all()  # -1 is a valid pixel's value, not the ignore value


@pytest.mark.parametrize("op", ["residual_features", "pcos_weights", "weighted_cross_entropy", "trusted_mask"])
@pytest.mark.parametrize("backend", ["reference", *FUSED_BACKENDS])
def test_a_bool_mask_is_true_wherever_its_byte_is_nonzero(backend, op):
    """A bool mask viewed from bytes other than 0 / 1 (``uint8_map.view(torch.bool)``, zero-copy from a 0 / 255 PNG
    mask) means what PyTorch's own ops take it to mean: every nonzero byte True. Outputs are the canonical mask's,
    and the bool outputs hold 0 / 1 (the C++ kernels once added the bytes up as the valid count, and used them as
    the masked images' bit mask)."""
    device = require_backend(op, backend)
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 5, 7, 9, generator=g).to(device)
    byte_choices = torch.tensor([0, 1, 2, 255], dtype=torch.uint8)
    raw = byte_choices[torch.randint(0, 4, (2, 7, 9), generator=g)].to(device)
    odd, canonical = raw.view(torch.bool), raw != 0
    assert odd.view(torch.uint8).max() == 255 and canonical.view(torch.uint8).max() == 1

    def call(mask):
        if op == "trusted_mask":
            images = torch.rand(2, 3, 7, 9, generator=g).to(device)
            gen = torch.Generator(device=device).manual_seed(9)
            return csl_kernels.trusted_mask(images, mask, block=2, rate=0.7, generator=gen, backend=backend)
        if op == "weighted_cross_entropy":
            label = z.argmax(dim=1)
            weight = torch.rand(2, 7, 9, generator=g).to(device)
            leaf = z.clone().requires_grad_()
            loss = csl_kernels.weighted_cross_entropy(leaf, label, weight, valid=mask, backend=backend)
            loss.backward()
            return loss.detach(), leaf.grad
        return getattr(csl_kernels, op)(z, valid=mask, backend=backend)

    state = g.get_state()
    expected = call(canonical)
    g.set_state(state)
    got = call(odd)
    for name, a, b in zip(range(len(expected)), got, expected, strict=True):
        if a is None:  # pcos_weights' stats, not asked for
            assert b is None
            continue
        if a.dtype == torch.bool:
            assert a.view(torch.uint8).max() <= 1, name
        assert torch.equal(a, b), name


_FRESH_PROCESS = """
import sys, threading, torch, csl_kernels
if sys.argv[1] == "compile":
    z = torch.randn(2, 5, 6, 7, requires_grad=True)
    label, w = torch.randint(0, 5, (2, 6, 7)), torch.rand(2, 6, 7)
    f = torch.compile(lambda z, l, w: csl_kernels.weighted_cross_entropy(z, l, w, backend=sys.argv[2]),
                      fullgraph=True, backend="aot_eager")
    loss = f(z, label, w)
    torch.testing.assert_close(loss, csl_kernels.weighted_cross_entropy(z, label, w, backend="reference"))
    g = torch.compile(lambda z: csl_kernels.pcos_weights(z, backend=sys.argv[2]).weight, fullgraph=True,
                      backend="aot_eager")
    print(tuple(g(z.detach()).shape))
else:
    z = torch.randn(2, 5, 6, 7)
    errors = []
    def first_call():
        try:
            csl_kernels.pcos_weights(z, backend=sys.argv[2])
        except Exception as exc:
            errors.append(repr(exc))
    threads = [threading.Thread(target=first_call) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    print(errors or "ok")
"""


@pytest.mark.parametrize("case", ["compile", "threads"])
@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_first_use_is_safe_under_compile_and_threads(case, backend):
    """In a fresh process: torch.compile(fullgraph=True) of the ops as their first use, and 8 threads making the
    first call at once, work (no Dynamo error from the backend's import, no 'does not implement')."""
    import subprocess
    import sys

    from conftest import require_backend

    if backend == "cpu":
        require_backend("pcos_weights", "cpu")  # built here, so the child only loads it
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, case, backend], env=env, capture_output=True,
                          text=True, timeout=child_limit(600))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == ("(2, 6, 7)" if case == "compile" else "ok"), proc.stdout


@pytest.fixture
def fake_gpu_auto(caplog, monkeypatch, tmp_path):
    """csl_kernels._measured on a pretend GPU ("Fake GPU", not capturing) with a private choice cache, nothing
    remembered and INFO logs captured."""
    from csl_kernels import _measured

    caplog.set_level(logging.INFO, logger="csl_kernels")
    monkeypatch.setenv("CSL_AUTO_CACHE", str(tmp_path / "auto.json"))
    monkeypatch.setattr(_measured, "_choices", None)
    monkeypatch.setattr(_measured, "_logged", set())
    monkeypatch.setattr(_measured, "_measurements", {})
    monkeypatch.setattr(_measured, "_device_name", lambda index: "Fake GPU")
    monkeypatch.setattr(_measured, "_capturing_on", lambda device: False)
    return _measured


def test_auto_on_cuda_times_both_fused_backends_once_per_shape_class(registry, fake_gpu_auto, caplog, monkeypatch,
                                                                   tmp_path):
    """pcos_weights / weighted_cross_entropy with backend='auto' on CUDA: both fused backends are timed on the call's
    inputs, the faster is used and cached (per GPU model and shape class), the log gives both timings; no timing
    inside a CUDA-graph capture, and a named backend is never timed."""
    _measured = fake_gpu_auto
    speed = {"cuda": 0.5, "triton": 0.2}
    timed = []

    def timer(run, device):
        name = run()
        timed.append(name)
        return speed[name]

    z = torch.zeros(2, 21, 8, 8)
    name, fn = _measured.resolve("toy_op", "auto", CUDA, z, lambda impl: impl(), timer=timer)
    # TIMING_ROUNDS rounds, the backends taking turns (the order reversed every round).
    assert name == "triton" and fn() == "triton" and timed == ["cuda", "triton", "triton", "cuda", "cuda", "triton"]
    (record,) = [r for r in caplog.records if "measured" in r.getMessage()]
    assert "uses 'triton', measured triton 0.200 ms, cuda 0.500 ms" in record.getMessage()
    assert json.loads((tmp_path / "auto.json").read_text()) == {"toy_op | Fake GPU | float32 C21 px2^7": "triton"}
    # What was taken, read back without timing (csl_bench.bench_auto_choice reports it so).
    assert _measured.last_choice("toy_op", CUDA, z) == "triton" and len(timed) == 6
    assert _measured.last_choice("toy_op", CUDA, torch.zeros(2, 21, 8, 9)) is None
    assert _measured.last_measurement("toy_op", CUDA, z) == {
        "shape_class": "float32 C21 px2^7", "median_ms": {"cuda": 0.5, "triton": 0.2},
        "rounds_ms": {"cuda": [0.5] * 3, "triton": [0.2] * 3}, "failed": {}, "chosen": "triton"}
    # Same shape class: cached, not timed again (also in a new process, from the file).
    monkeypatch.setattr(_measured, "_choices", None)
    assert _measured.resolve("toy_op", "auto", CUDA, torch.zeros(2, 21, 7, 9), lambda impl: impl(), timer=timer)[0] \
        == "triton" and len(timed) == 6
    # A new run's log (csl.logging_utils.setup_logging) names the cached choice at its next use, without timing.
    caplog.clear()
    csl_kernels.log_backend_choices_again()  # the public name of _backends.log_choices_again
    assert _measured.resolve("toy_op", "auto", CUDA, z, lambda impl: impl(), timer=timer)[0] == "triton"
    assert len(timed) == 6 and [r.getMessage() for r in caplog.records] == [
        "csl_kernels.toy_op on Fake GPU (float32 C21 px2^7): backend='auto' uses 'triton' (measured earlier, cached in "
        f"{tmp_path / 'auto.json'})"]
    assert _measured.resolve("toy_op", "auto", CUDA, z, lambda impl: impl(), timer=timer)[0] == "triton"
    assert len(caplog.records) == 1  # once
    # Another shape class: timed afresh; inside a capture: the static order, nothing timed.
    speed.update(cuda=0.1)
    assert _measured.resolve("toy_op", "auto", CUDA, torch.zeros(2, 81, 8, 8), lambda impl: impl(), timer=timer)[0] \
        == "cuda"
    # The first shape class with another variant (an option that changes the cost): timed and cached apart.
    assert _measured.resolve("toy_op", "auto", CUDA, z, lambda impl: impl(), timer=timer, variant="class-groups")[0] \
        == "cuda" and len(timed) == 18
    assert _measured.last_choice("toy_op", CUDA, z, "class-groups") == "cuda"
    assert json.loads((tmp_path / "auto.json").read_text())["toy_op | Fake GPU | float32 C21 px2^7 class-groups"] \
        == "cuda"
    assert _measured.resolve("toy_op", "auto", CUDA, z, lambda impl: impl(), timer=timer)[0] == "triton"
    monkeypatch.setattr(_measured, "_capturing_on", lambda device: device == CUDA)
    assert _measured.resolve("toy_op", "auto", CUDA, torch.zeros(1, 3, 8, 8), lambda impl: impl(), timer=timer)[0] \
        == "cuda" and len(timed) == 18
    # A named backend, or a CPU device: never timed.
    assert _measured.resolve("toy_op", "triton", CUDA, z, lambda impl: impl(), timer=timer)[0] == "triton"
    assert _measured.resolve("toy_op", "auto", CPU, z, lambda impl: impl(), timer=timer)[0] == "cpu"
    assert len(timed) == 18


def test_auto_on_cuda_takes_the_median_of_interleaved_rounds(registry, fake_gpu_auto, caplog):
    """One fast outlier round does not decide: Triton timed 0.2 ms once and 0.5 ms twice loses to the extension's
    steady 0.3 ms; the log gives the medians."""
    _measured = fake_gpu_auto
    times = {"cuda": [0.3, 0.3, 0.3], "triton": [0.2, 0.5, 0.5]}

    def timer(run, device):
        return times[run()].pop(0)

    name, _ = _measured.resolve("toy_op", "auto", CUDA, torch.zeros(2, 21, 8, 8), lambda impl: impl(), timer=timer)
    assert name == "cuda" and times == {"cuda": [], "triton": []}
    assert any("uses 'cuda', measured cuda 0.300 ms, triton 0.500 ms" in r.getMessage() for r in caplog.records)


def test_auto_on_cuda_skips_a_backend_that_cannot_take_the_call(registry, fake_gpu_auto, caplog, monkeypatch, tmp_path):
    """A fused backend that raises on the call (e.g. Triton's grid limit on a batch of 65536 images) is skipped with a
    WARNING naming its error, the other is used, and the choice is not cached; when none runs, a clear error."""
    _measured = fake_gpu_auto

    def too_many_images():
        raise ValueError("at most 65535 images per call")

    registry["toy_op"]["triton"] = too_many_images
    z = torch.zeros(2, 21, 8, 8)

    def timer(run, device):
        run()
        return 1.0

    name, fn = _measured.resolve("toy_op", "auto", CUDA, z, lambda impl: impl(), timer=timer)
    assert name == "cuda" and fn() == "cuda"
    (record,) = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "uses 'cuda', measured cuda 1.000 ms; skipped triton: ValueError: at most 65535 images" in message
    assert not (tmp_path / "auto.json").exists()
    registry["toy_op"]["cuda"] = too_many_images
    monkeypatch.setattr(_measured, "_by_shape", {})
    with pytest.raises(RuntimeError, match="found no backend that runs this call: cuda: ValueError.*; triton: "):
        _measured.resolve("toy_op", "auto", CUDA, torch.zeros(3, 21, 8, 8), lambda impl: impl(), timer=timer)


def test_forget_choices_reads_another_cache_file(registry, fake_gpu_auto, caplog, monkeypatch, tmp_path):
    """The cache file is read once per process; after forget_choices() the next call reads CSL_AUTO_CACHE again:
    a choice of another file is not used (the call is timed and stored in the new file), and back on the first file
    its choice is used untimed."""
    _measured = fake_gpu_auto
    monkeypatch.setattr(_measured, "_by_shape", {})
    speed = {"cuda": 0.5, "triton": 0.2}
    timed = []

    def timer(run, device):
        timed.append(run())
        return speed[timed[-1]]

    z = torch.zeros(2, 21, 8, 8)
    assert _measured.resolve("toy_op", "auto", CUDA, z, lambda impl: impl(), timer=timer)[0] == "triton"
    assert len(timed) == 2 * _measured.TIMING_ROUNDS
    other = tmp_path / "other.json"
    monkeypatch.setenv("CSL_AUTO_CACHE", str(other))
    speed.update(cuda=0.1)
    assert _measured.resolve("toy_op", "auto", CUDA, z, lambda impl: impl(), timer=timer)[0] == "triton"
    assert len(timed) == 2 * _measured.TIMING_ROUNDS and not other.exists()  # the first file's choice, remembered
    _measured.forget_choices()
    assert _measured.resolve("toy_op", "auto", CUDA, z, lambda impl: impl(), timer=timer)[0] == "cuda"
    assert len(timed) == 4 * _measured.TIMING_ROUNDS
    assert json.loads(other.read_text()) == {"toy_op | Fake GPU | float32 C21 px2^7": "cuda"}
    monkeypatch.setenv("CSL_AUTO_CACHE", str(tmp_path / "auto.json"))
    _measured.forget_choices()
    caplog.clear()
    assert _measured.resolve("toy_op", "auto", CUDA, z, lambda impl: impl(), timer=timer)[0] == "triton"
    assert len(timed) == 4 * _measured.TIMING_ROUNDS
    assert [r.getMessage() for r in caplog.records] == [
        "csl_kernels.toy_op on Fake GPU (float32 C21 px2^7): backend='auto' uses 'triton' (measured earlier, cached in "
        f"{tmp_path / 'auto.json'})"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_repeated_rows_give_the_rows_outputs(fused_backend, dtype):
    """Logits that repeat one row (stride 0 along H) give the row's features, labels and weights in every row, PCOS
    statistics that scale with the row count, and the row's loss with its gradient spread over the rows (on a GPU
    test_gpu.py runs the same check past 2^31 logit elements)."""
    device = require_backend("pcos_weights", fused_backend)
    check_outputs_of_repeated_rows(fused_backend, device, 3, 16, 129, dtype)


def test_triton_batch_slices_stay_within_the_grid_limit():
    """CUDA allows 65535 program rows in grid y, where Triton's kernels put the images: larger batches are launched
    in slices of at most that many images."""
    from csl_kernels.triton import _common

    assert _common.MAX_GRID_Y == 65535
    assert _common.batch_slices(65535) is None
    assert _common.batch_slices(65536) == [slice(0, 65535), slice(65535, 65536)]
    assert _common.batch_slices(2 * 65535 + 1) == [slice(0, 65535), slice(65535, 131070), slice(131070, 131071)]


@pytest.mark.parametrize("op", ["pcos_weights", "residual_features", "weighted_cross_entropy", "trusted_mask"])
def test_triton_batch_past_the_grid_limit_runs_in_slices(op, monkeypatch):
    """A batch above the images one launch takes (the limit lowered to 2 here) gives what one launch gives: per-image
    outputs and statistics equal, the CE's loss to float rounding (its slices' sums are added in float64) and its
    gradient equal (every slice divides by the whole batch's count)."""
    device = require_backend(op, "triton")
    from csl_kernels.triton import _common

    gen = torch.Generator().manual_seed(0)
    z = (3 * torch.randn(5, 4, 3, 7, generator=gen)).to(device)
    ignore = torch.randint(0, 2, (5, 3, 7), generator=gen).to(device) * 255
    ignore[2] = 255  # an image without a valid pixel: its slice's count is 0
    if op == "pcos_weights":
        def call():
            out = csl_kernels.pcos_weights(z, ignore, groups="class", backend="triton", return_stats=True)
            return [*out[:3], *out.stats]
    elif op == "residual_features":
        def call():
            return list(csl_kernels.residual_features(z, ignore, backend="triton"))
    elif op == "weighted_cross_entropy":
        label = torch.randint(0, 4, (5, 3, 7), generator=gen).to(device)
        weight = torch.rand(5, 3, 7, generator=gen).to(device)

        def call():
            logits = z.clone().requires_grad_(True)
            loss = csl_kernels.weighted_cross_entropy(logits, label, weight, ignore, backend="triton")
            loss.backward()
            return [loss.detach(), logits.grad]
    else:
        images = torch.randn(5, 3, 12, 14, generator=gen).to(device)
        reliable = torch.rand(5, 12, 14, generator=gen).to(device) > 0.3

        def call():
            return list(csl_kernels.trusted_mask(images, reliable, block=4, rate=0.7,
                                                 generator=torch.Generator(device=device).manual_seed(3),
                                                 backend="triton"))
    whole = call()
    monkeypatch.setattr(_common, "MAX_GRID_Y", 2)
    sliced = call()
    assert len(whole) == len(sliced) and all(a.shape == b.shape for a, b in zip(whole, sliced, strict=True))
    if op == "weighted_cross_entropy":
        assert whole[0] > 0
        torch.testing.assert_close(sliced[0], whole[0], rtol=1e-6, atol=0)
        whole, sliced = whole[1:], sliced[1:]
    for a, b in zip(whole, sliced, strict=True):
        assert torch.equal(a, b)


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The operator namespaces a block dispatches (aten for allocations, csl / csl_triton for the fused ops), and
    each aten op with the number of elements of its largest tensor argument."""

    def __init__(self):
        super().__init__()
        self.namespaces = set()
        self.aten = []
        self.in_kernel = False  # inside a Triton kernel run by the interpreter (its own copies are not recorded)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.namespaces.add(func.namespace)
        if func.namespace == "aten" and not self.in_kernel:
            tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            self.aten.append((func.__name__.split(".")[0], max((t.numel() for t in tensors), default=0)))
        return func(*args, **(kwargs or {}))

    def logits_sized_work(self, numel: int) -> set[str]:
        """aten ops other than allocations and views that took a tensor of ``numel`` elements or more: each would
        be a pass over the logits beside the fused kernels."""
        free = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "reshape",
                "_reshape_alias", "as_strided", "unbind", "split_with_sizes", "detach", "alias"}
        return {name for name, n in self.aten if n >= numel and name not in free}


@pytest.mark.parametrize("op", ["pcos_weights", "weighted_cross_entropy"])
def test_an_eager_triton_call_launches_without_the_custom_op(op, monkeypatch):
    """Eager calls go straight to the launchers (csl_bench/bench_host_overhead.py: the custom-op layers cost more host
    time than the kernels take), also the CE's forward + backward; they give the op's results bitwise. A PCOS call
    autograd must record goes through the op (whose formula raises on backward). No aten op beside the kernels
    passes over the logits."""
    from conftest import require_backend

    device = require_backend(op, "triton")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 5, 6, generator=g).to(device)
    label = torch.randint(0, 4, (2, 5, 6), generator=g).to(device)
    weight = torch.rand(2, 5, 6, generator=g).to(device)
    eager = _RecordOps()
    if device.type == "cpu":  # the interpreter copies a kernel's tensors in and out: not what a GPU launch does
        from triton.runtime.interpreter import InterpretedFunction

        launcher_of = InterpretedFunction.__getitem__

        def launch_unrecorded(self, grid):
            launch = launcher_of(self, grid)

            def run(*args, **kwargs):
                eager.in_kernel = True
                try:
                    return launch(*args, **kwargs)
                finally:
                    eager.in_kernel = False
            return run

        monkeypatch.setattr(InterpretedFunction, "__getitem__", launch_unrecorded)
    if op == "pcos_weights":
        with eager:
            out = csl_kernels.pcos_weights(z, backend="triton", return_stats=True)
        assert "csl_triton" not in eager.namespaces and "aten" in eager.namespaces
        assert not eager.logits_sized_work(z.numel())
        expected = torch.ops.csl_triton.pcos_weights(z, None, 8.0, False, False, False)
        got = (out.weight, out.label, out.reliable, *out.stats)
        for name, a, b in zip(range(9), got, expected, strict=True):
            assert torch.equal(a, b), name
        with _RecordOps() as recorded:
            csl_kernels.pcos_weights(z.clone().requires_grad_(True), backend="triton")
        assert "csl_triton" in recorded.namespaces
        return
    leaf = z.clone().requires_grad_(True)
    with eager:
        loss = csl_kernels.weighted_cross_entropy(leaf, label, weight, backend="triton")
        (grad,) = torch.autograd.grad(loss, leaf)
    assert "csl_triton" not in eager.namespaces
    # Beside its kernels the forward + backward only allocates (the H200 profile of an earlier version showed a
    # logits-sized elementwise kernel in every backward).
    assert not eager.logits_sized_work(z.numel())
    leaf_op = z.clone().requires_grad_(True)
    loss_op = torch.ops.csl_triton.weighted_cross_entropy(leaf_op, label, weight, None)[0]
    (grad_op,) = torch.autograd.grad(loss_op, leaf_op)
    assert torch.equal(loss.detach(), loss_op.detach())
    assert torch.equal(grad, grad_op) and grad.abs().sum() > 0


# Append to tests/test_backends.py: uses its `registry` and `fake_gpu_auto` fixtures.





def test_a_named_triton_call_on_cpu_that_ran_is_refused_once_the_interpreter_is_unset(monkeypatch):
    """The named-backend lookup (_backends._NAMED) remembers a backend that could run; for triton on CPU tensors the
    remembered entry must depend on TRITON_INTERPRET, so that a call after the variable is removed is refused as
    test_triton_on_cpu_needs_the_interpreter expects of a first call, not launched through the stale entry."""
    require_backend("confusion_matrix", "triton")
    pred = torch.zeros(4, dtype=torch.long)
    if torch.cuda.is_available():
        pytest.skip("triton runs on CUDA tensors here: no interpreter lookup to go stale")
    assert csl_kernels.confusion_matrix(pred, pred, 2, backend="triton").sum() == 4  # remembered as available
    monkeypatch.delenv("TRITON_INTERPRET")
    assert _backends.unavailable_reason("confusion_matrix", "triton", "cpu") is not None
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        csl_kernels.confusion_matrix(pred, pred, 2, backend="triton")


def test_auto_on_cuda_measures_again_where_the_cache_file_names_no_fused_backend(registry, fake_gpu_auto, tmp_path):
    """The choice cache is a file a user or another version may have written: an entry that names no candidate of
    the measured choice ('reference', a misspelt name) is ignored and the call is timed, not run on that backend
    (or failing with a KeyError for a name without implementations)."""
    _measured = fake_gpu_auto
    z = torch.zeros(2, 21, 8, 8)
    (tmp_path / "auto.json").write_text(json.dumps({"toy_op | Fake GPU | float32 C21 px2^7": "reference",
                                                    "toy_op | Fake GPU | float32 C81 px2^7": "fastest"}))
    speed = {"cuda": 0.5, "triton": 0.2}
    timed = []

    def timer(run, device):
        timed.append(run())
        return speed[timed[-1]]

    assert _measured.resolve("toy_op", "auto", CUDA, z, lambda impl: impl(), timer=timer)[0] == "triton"
    assert _measured.resolve("toy_op", "auto", CUDA, torch.zeros(2, 81, 8, 8), lambda impl: impl(),
                             timer=timer)[0] == "triton"
    assert len(timed) == 2 * 2 * _measured.TIMING_ROUNDS
    assert json.loads((tmp_path / "auto.json").read_text())["toy_op | Fake GPU | float32 C21 px2^7"] == "triton"


def test_a_new_runs_log_names_the_measured_choice_of_a_shape_already_called(registry, fake_gpu_auto, caplog):
    """log_backend_choices_again (a new run's log) must reach the next call of a shape resolved before in this
    process too, not only of a shape first read from the file: the per-shape fast lookup is dropped with the logged
    keys, or the second run's train.log never names the backend its calls use."""
    _measured = fake_gpu_auto
    z = torch.zeros(2, 21, 8, 8)

    def timer(run, device):
        return {"cuda": 0.5, "triton": 0.2}[run()]

    assert _measured.resolve("toy_op", "auto", CUDA, z, lambda impl: impl(), timer=timer)[0] == "triton"
    assert _measured.resolve("toy_op", "auto", CUDA, z, lambda impl: impl(), timer=timer)[0] == "triton"
    caplog.clear()
    csl_kernels.log_backend_choices_again()
    assert _measured.resolve("toy_op", "auto", CUDA, z, lambda impl: impl(), timer=lambda run, device: 1 / 0)[0] \
        == "triton"
    said = [r.getMessage() for r in caplog.records if "toy_op" in r.getMessage()]
    assert len(said) == 1 and "uses 'triton' (measured earlier" in said[0]
