"""Shared test settings: the Triton interpreter, seeded randomness and the hypothesis CI profile."""

import os

# Triton reads TRITON_INTERPRET when a kernel is defined, so it is set before anything can import
# triton: every test process then runs the kernels on CPU tensors, whatever the order in which
# test modules are imported. Tests that need it off run in a subprocess with it removed.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402  (after the environment variable, on purpose)
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
