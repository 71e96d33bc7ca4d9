"""How the Triton backend of linear_cross_entropy is built and dispatched.

The loss itself, on the Triton backend under the interpreter, is judged with the PyTorch
backend's in tests/test_linear_cross_entropy.py (``impl`` parametrised). Here: the op reads
nothing back to the host, ``impl="auto"`` picks the PyTorch backend on CPU tensors, and, with the
interpreter off (a subprocess: the setting is read when kernels are defined), the dispatch error
and the compiled (GPU) build of the vocabulary-block kernels.

Internal modules are reached through :mod:`helpers.internals` only.
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import crossent
from helpers import internals
from helpers.common import gen, needs_triton

pytestmark = needs_triton

#: the tests folder, for the subprocess to import helpers from
TESTS = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------
# With the interpreter on: host syncs and the dispatch of impl="auto"
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["token", "vocab"])
def test_no_host_sync_and_no_nonzero(monkeypatch, schedule):
    """The op (forward with gradients, and the recomputing backward) reads nothing back to the
    host: every way a tensor's value reaches Python raises while it runs."""
    L = internals.triton_linear()

    g = gen(f"sync-{schedule}")
    hidden, weight, bias = torch.randn(7, 6, generator=g), torch.randn(30, 6, generator=g), torch.randn(30, generator=g)
    target = torch.randint(0, 30, (7,), generator=g)
    target[2] = -100
    cw = torch.rand(30, generator=g) + 0.5
    L.mixed_products("cpu")  # the product probe runs once per process, before the guard

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync")

    for name in ("item", "tolist", "nonzero", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "nonzero", forbidden)
    numbers = dict(label_smoothing=0.1, z_loss=1e-3, softcap=3.0, logit_scale=0.75)
    chunk = 4 if schedule == "token" else 16
    config = internals.op_config(
        backend="triton", schedule=schedule, chunk_size=chunk, want_aux=True, needs=(True, True, True), **numbers
    )
    out = L.forward(hidden, weight, bias, target, cw, config)
    upstream = torch.rand(7, generator=g)
    none = dataclasses.replace(config, reduction="none")
    back = L.backward(upstream, hidden, weight, bias, target, cw, *out[1:3], none)
    monkeypatch.undo()
    assert out[0].isfinite() and all(t.isfinite().all() for t in out[4:7] + back)


def test_auto_picks_torch_on_cpu():
    """impl="auto" on CPU tensors is the PyTorch backend, even with the interpreter on."""
    triton_backend = internals.triton_package().BACKEND
    autograd = internals.autograd()

    def forbidden(*args, **kwargs):
        raise AssertionError('impl="auto" ran the Triton backend on CPU tensors')

    autograd.register_backend(dataclasses.replace(triton_backend, linear_forward=forbidden, linear_backward=forbidden))
    try:
        hidden, weight = torch.randn(4, 6), torch.randn(20, 6)
        target = torch.tensor([1, 2, -100, 19])
        auto = crossent.linear_cross_entropy(hidden, weight, target)
        assert torch.equal(auto, crossent.linear_cross_entropy(hidden, weight, target, impl="torch"))
    finally:
        autograd.register_backend(triton_backend)


# --------------------------------------------------------------------------------------------
# With the interpreter off (a subprocess: the setting is read when kernels are defined): the
# dispatch, then the compiled (GPU) path of the new kernels — the interpreter runs Python, not
# the compiler
# --------------------------------------------------------------------------------------------

INTERPRETER_OFF = """
import sys
import torch
import crossent

sys.path.insert(0, sys.argv[1])  # the tests folder: internal modules through helpers.internals
from helpers import internals  # imports no crossent module

assert "triton" not in sys.modules, "import crossent imported triton"
h, w, t = torch.randn(4, 6), torch.randn(20, 6), torch.tensor([1, 2, -100, 4])
auto = crossent.linear_cross_entropy(h, w, t)  # impl="auto" on CPU tensors: the PyTorch backend
assert torch.equal(auto, crossent.linear_cross_entropy(h, w, t, impl="torch"))
assert internals.triton_package_name() not in sys.modules
try:
    crossent.linear_cross_entropy(h, w, t, impl="triton")
except ValueError as error:
    message = str(error)
else:
    raise AssertionError("impl='triton' on CPU tensors did not raise")
assert "impl" in message and "CUDA" in message and "TRITON_INTERPRET" in message and "cpu" in message
print("dispatch ok", flush=True)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

L = internals.triton_linear()

FLOATS = ("one_minus_eps", "eps_over_v", "c", "k", "s")


def compile_one(kernel, *, options, unit, wide):
    names = kernel.arg_names
    flags = dict(BLOCK_V=8192, X_UNIT=unit, G_UNIT=unit, LIBDEVICE=True, WANT_AUX=options)
    flags.update({n: options for n in names if n.startswith("HAS_")})
    flags = {k: v for k, v in flags.items() if k in names}
    signature = {}
    for n in names:
        if n in flags:
            signature[n] = "constexpr"
        elif n == "t_ptr":
            signature[n] = "*i64"
        elif n in ("x_ptr", "gx_ptr"):
            signature[n] = "*bf16"
        elif n == "best_ptr":
            signature[n] = "*i32"
        elif n.endswith("_ptr"):
            signature[n] = "*fp32"
        elif n in FLOATS:
            signature[n] = "fp32"
        else:
            signature[n] = "i64" if wide and n in ("x_rs", "gx_rs", "col0", "t_rs") else "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=flags)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 16})
    assert compiled.asm["cubin"], "no cubin"


try:
    for options, unit, wide in ((False, True, False), (True, False, True)):
        compile_one(L.block_stats_kernel, options=options, unit=unit, wide=wide)
        compile_one(L.block_gradient_kernel, options=options, unit=unit, wide=wide)
except Exception as error:
    if "ptxas" in str(error).lower() and "not found" in str(error).lower():
        print("no ptxas")
        sys.exit(3)
    raise
print("compile ok")
"""


def test_dispatch_and_gpu_build_without_the_interpreter(tmp_path):
    """impl="auto" picks torch on CPU tensors and impl="triton" raises the DESIGN.md §3 error
    there; ``import crossent`` imports no Triton. Then the vocabulary-block kernels are built for
    sm_90 (ptxas, no GPU needed), so that type errors of the compiled path show here too (the
    token schedule's kernel is cross_entropy's, built in test_triton)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    script = [sys.executable, "-c", INTERPRETER_OFF, str(TESTS)]
    done = subprocess.run(script, env=env, capture_output=True, text=True, timeout=300)
    lines = done.stdout.split()
    assert done.stdout.startswith("dispatch ok"), done.stderr[-3000:]
    if done.returncode == 3:
        pytest.skip("Triton's ptxas is not available on this machine (the dispatch checks passed)")
    assert done.returncode == 0, done.stderr[-3000:]
    assert lines[-2:] == ["compile", "ok"]
