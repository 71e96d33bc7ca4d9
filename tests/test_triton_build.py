"""How the Triton cross_entropy kernels are built, rather than what loss they compute (that is
test_cross_entropy.py, on every backend): its two gradient modes, out-of-range targets through
the backend op itself, dispatch with the interpreter off, and compilation for a GPU.

The kernels run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set by
conftest.py before anything imports triton). Checks that need it off run in a subprocess: the
setting is read when kernels are defined.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import internals
from helpers.common import bf16, f32, needs_triton
from helpers.cross_entropy import loss_and_grad, loss_fn, make_inputs

pytestmark = needs_triton


@pytest.fixture
def kernels(monkeypatch):
    """The kernel module, with its block size and gradient mode restored after each test."""
    module = internals.triton_cross_entropy()
    monkeypatch.setattr(module, "MAX_BLOCK_V", module.MAX_BLOCK_V)
    monkeypatch.setattr(module, "GRAD_IN_FORWARD", module.GRAD_IN_FORWARD)
    return module


# --------------------------------------------------------------------------------------------
# The two gradient modes, and the backend op on targets the public function rejects
# --------------------------------------------------------------------------------------------


def test_gradient_modes_agree_bit_for_bit(kernels):
    """In forward (then scaled in backward) or recomputed in backward: the same kernel code."""
    kernels.MAX_BLOCK_V = 64
    logits, target, weight = make_inputs(12, 150, bf16, seed=3, weighted=True, ignore_fraction=0.3)
    options = dict(weight=weight, label_smoothing=0.1, z_loss=1e-3, softcap=4.0, logit_scale=0.7)
    results = []
    for mode in (True, False):
        kernels.GRAD_IN_FORWARD = mode
        results.append(loss_and_grad(loss_fn("triton"), logits, target, torch.ones(()), bf16, **options))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_out_of_range_targets_give_nan_without_reading_them(kernels):
    """Through the backend directly (the public function raises IndexError on CPU in eager)."""
    cross_entropy_op, options = internals.cross_entropy_op, internals.options_class()
    kernels.MAX_BLOCK_V = 32
    logits, target, _ = make_inputs(6, 40, f32, seed=10)
    target[1], target[4] = 40, -7
    target[2] = -100
    for mode in (True, False):
        kernels.GRAD_IN_FORWARD = mode
        x = logits.clone().requires_grad_()
        loss = cross_entropy_op(x, target, None, options(reduction="none", impl="triton"))[0]
        loss.sum().backward()
        bad = torch.tensor([False, True, False, False, True, False])
        assert bool(loss[bad].isnan().all()) and bool(loss[~bad].isfinite().all())
        assert float(loss.detach()[2]) == 0.0
        assert bool(x.grad[bad].isnan().all()) and bool(x.grad[~bad].isfinite().all())
        mean = cross_entropy_op(logits, target, None, options(impl="triton"))[0]
        assert bool(mean.isnan())


# --------------------------------------------------------------------------------------------
# Dispatch, with the interpreter off (a subprocess: the setting is read when kernels are defined)
# --------------------------------------------------------------------------------------------


def test_dispatch_without_the_interpreter():
    script = textwrap.dedent(
        """
        import sys
        import torch
        import crossent
        assert "triton" not in sys.modules, "import crossent imported triton"
        x, t = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
        auto = crossent.cross_entropy(x, t)  # impl="auto" on CPU tensors: the PyTorch backend
        assert torch.equal(auto, crossent.cross_entropy(x, t, impl="torch"))
        assert "crossent.backends.triton" not in sys.modules
        try:
            crossent.cross_entropy(x, t, impl="triton")
        except ValueError as error:
            message = str(error)
        else:
            raise AssertionError("impl='triton' on CPU tensors did not raise")
        assert "impl" in message and "CUDA" in message and "TRITON_INTERPRET" in message and "cpu" in message
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


COMPILE_FOR_GPU = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, sys.argv[1])  # the tests folder: internal modules are named in helpers.internals only
from helpers import internals

C = internals.triton_cross_entropy()

FLOATS = ("one_minus_eps", "eps_over_v", "c", "k", "s")
ROW_STRIDES = ("x_rs", "t_rs", "gx_rs")


def compile_one(kernel, *, soft, options, extra, unit, specialize=()):
    names = kernel.arg_names
    flags = dict(BLOCK_V=8192, SOFT=soft, X_UNIT=unit, T_UNIT=unit, G_UNIT=unit, LIBDEVICE=True, **extra)
    flags.update({n: options for n in names if n.startswith("HAS_")})
    flags.update({n: 1 for n in specialize})  # Triton specializes int arguments equal to 1
    flags = {k: v for k, v in flags.items() if k in names}
    signature = {}
    for n in names:
        if n in flags:
            signature[n] = "constexpr"
        elif n == "t_ptr":
            signature[n] = "*fp16" if soft else "*i64"
        elif n in ("x_ptr", "gx_ptr"):
            signature[n] = "*bf16"
        elif n.endswith("_ptr"):
            signature[n] = "*fp32"
        else:
            signature[n] = "fp32" if n in FLOATS else "i64" if n in ROW_STRIDES else "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=flags)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 16})
    assert compiled.asm["cubin"], "no cubin"


try:
    for soft in (False, True):
        for options, unit in ((False, True), (True, False)):
            compile_one(C.forward_kernel, soft=soft, options=options, unit=unit,
                        extra=dict(WANT_AUX=options, COMPUTE_GRAD=options))
            compile_one(C.backward_kernel, soft=soft, options=options, unit=unit, extra={})
    compile_one(C.forward_kernel, soft=False, options=True, unit=True, extra=dict(WANT_AUX=True, COMPUTE_GRAD=True),
                specialize=("V", "ignore_index", "x_rs", "x_cs", "t_cs", "gx_rs", "gx_cs"))
except Exception as error:
    if "ptxas" in str(error).lower() and "not found" in str(error).lower():
        print("no ptxas")
        sys.exit(3)
    raise
print("ok")
"""


def test_kernels_compile_for_a_gpu(tmp_path):
    """The interpreter runs Python, not the compiler: build the kernels for sm_90 (ptxas, no GPU
    needed) so that type errors of the compiled path show here too."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    tests = os.path.dirname(os.path.abspath(__file__))
    command = [sys.executable, "-c", COMPILE_FOR_GPU, tests]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode == 3:
        pytest.skip("Triton's ptxas is not available on this machine")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"
