"""Seeded randomness, dtypes and the backends present on this machine."""

from __future__ import annotations

import zlib

import pytest
import torch

from . import internals

f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


def gen(key: str) -> torch.Generator:
    """A generator seeded from ``key``: every case draws its own inputs, reproducibly."""
    return torch.Generator().manual_seed(zlib.crc32(key.encode()))


def output_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a loss computed from inputs of ``dtype``: float64 stays, the rest is float32."""
    return f64 if dtype == f64 else f32


def triton_ready() -> bool:
    """Whether the Triton backend can run here: the package is installed and its interpreter on
    (the tests run the kernels on CPU tensors)."""
    return internals.triton_available() and internals.interpreter_on()


#: Skip marker for tests of the Triton backend when it cannot run here.
needs_triton = pytest.mark.skipif(not triton_ready(), reason="needs the triton package and TRITON_INTERPRET=1")

#: ``impl=`` values to parametrise a suite over: the PyTorch backend, and Triton under the
#: interpreter (marked, so a machine without Triton reports a skip, not a silent absence).
BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=needs_triton)]


def _param_id(value) -> str:
    """A short test id for one parameter value: a dtype's name, a case's ``id``, else ``str``."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(getattr(value, "id", value))


def per_backend(values: dict[str, list]) -> list:
    """``pytest.param(impl, *value)`` for each value of each backend's own list, Triton's marked
    as in :data:`BACKENDS`. A backend gets its own list where the Triton interpreter (about 100×
    slower than the PyTorch backend) can afford only a subset, or smaller sizes; a tuple value
    spreads over several arguments."""
    marks = {p.id: p.marks for p in BACKENDS}
    params = []
    for impl, items in values.items():
        for item in items:
            args = item if isinstance(item, tuple) else (item,)
            test_id = "-".join(_param_id(v) for v in (impl, *args))
            params.append(pytest.param(impl, *args, id=test_id, marks=marks[impl]))
    return params
