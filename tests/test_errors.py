"""Bad input to crossent.cross_entropy (DESIGN.md §3): raised before any kernel runs, with the
error type and a message that names the argument, the expected form and what was given."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import crossent

N, V = 4, 5


def _logits(*shape):
    return torch.randn(*(shape or (N, V)))


def _target(*shape):
    return torch.randint(0, V, shape or (N,))


def _weight(n=V):
    return torch.rand(n) + 0.5


# (id, build the (args, kwargs) of the call, error type, regex on the message)
BAD_INPUT = [
    # --- ranks, shapes and batch dims
    (
        "logits-0d",
        lambda: ((torch.tensor(1.0), _target()), {}),
        ValueError,
        r"logits must have shape \(\.\.\., V\).*got \(\)",
    ),
    ("logits-zero-classes", lambda: ((torch.randn(N, 0), _target()), {}), ValueError, r"logits .*V >= 1.*got \(4, 0\)"),
    (
        "target-extra-dim",
        lambda: ((_logits(), _target(N, 1)), {}),
        ValueError,
        r"target must have shape \(4,\).*got \(4, 1\)",
    ),
    (
        "target-batch-mismatch",
        lambda: ((_logits(), _target(N - 1)), {}),
        ValueError,
        r"target must have shape \(4,\).*got \(3,\)",
    ),
    (
        "target-3d-batch-mismatch",
        lambda: ((_logits(2, 6, V), _target(2, 7)), {}),
        ValueError,
        r"target must have shape \(2, 6\).*got \(2, 7\)",
    ),
    (
        "target-class-dim-first",
        lambda: ((_logits(2, V, 6), _target(2, 6)), {}),
        ValueError,
        r"target must have shape \(2, 5\).*class dim is last.*got \(2, 6\)",
    ),
    (
        "soft-target-wrong-V",
        lambda: ((_logits(), torch.rand(N, V + 1)), {}),
        ValueError,
        r"soft target must have the logits' shape \(4, 5\).*got \(4, 6\)",
    ),
    (
        "soft-target-wrong-batch",
        lambda: ((_logits(), torch.rand(N + 1, V)), {}),
        ValueError,
        r"soft target must have the logits' shape \(4, 5\).*got \(5, 5\)",
    ),
    (
        "weight-wrong-V",
        lambda: ((_logits(), _target()), {"weight": _weight(V + 2)}),
        ValueError,
        r"weight must have shape \(5,\).*got \(7,\)",
    ),
    (
        "weight-2d",
        lambda: ((_logits(), _target()), {"weight": torch.rand(1, V)}),
        ValueError,
        r"weight must have shape \(5,\).*got \(1, 5\)",
    ),
    (
        "class-weight-wrong-V",
        lambda: ((_logits(), _target()), {"class_weight": _weight(V - 1)}),
        ValueError,
        r"class_weight must have shape \(5,\).*got \(4,\)",
    ),
    (
        "weight-and-class-weight",
        lambda: ((_logits(), _target()), {"weight": _weight(), "class_weight": _weight()}),
        ValueError,
        r"weight=.*class_weight=.*not both",
    ),
    # --- dtypes and types
    (
        "integer-logits",
        lambda: ((torch.randint(0, 9, (N, V)), _target()), {}),
        TypeError,
        r"logits must be a floating tensor.*got dtype torch\.int64",
    ),
    (
        "bool-logits",
        lambda: ((torch.ones(N, V, dtype=torch.bool), _target()), {}),
        TypeError,
        r"logits must be a floating tensor.*got dtype torch\.bool",
    ),
    (
        "logits-not-a-tensor",
        lambda: (([[0.0] * V] * N, _target()), {}),
        TypeError,
        r"logits must be a torch\.Tensor.*got list",
    ),
    (
        "bool-target",
        lambda: ((_logits(), torch.zeros(N, dtype=torch.bool)), {}),
        TypeError,
        r"target must hold integer class ids.*got dtype torch\.bool",
    ),
    (
        "complex-target",
        lambda: ((_logits(), torch.zeros(N, dtype=torch.complex64)), {}),
        TypeError,
        r"target must hold integer class ids.*got dtype torch\.complex64",
    ),
    (
        "target-not-a-tensor",
        lambda: ((_logits(), [0, 1, 2, 3]), {}),
        TypeError,
        r"target must be a torch\.Tensor.*got list",
    ),
    (
        "integer-weight",
        lambda: ((_logits(), _target()), {"weight": torch.ones(V, dtype=torch.int64)}),
        TypeError,
        r"weight must be a floating tensor.*got dtype torch\.int64",
    ),
    (
        "weight-not-a-tensor",
        lambda: ((_logits(), _target()), {"weight": [1.0] * V}),
        TypeError,
        r"weight must be a torch\.Tensor.*got list",
    ),
    # --- options
    (
        "label-smoothing-negative",
        lambda: ((_logits(), _target()), {"label_smoothing": -0.1}),
        ValueError,
        r"label_smoothing must be a float in \[0, 1\], got -0\.1",
    ),
    (
        "label-smoothing-above-1",
        lambda: ((_logits(), _target()), {"label_smoothing": 1.5}),
        ValueError,
        r"label_smoothing must be a float in \[0, 1\], got 1\.5",
    ),
    (
        "label-smoothing-nan",
        lambda: ((_logits(), _target()), {"label_smoothing": math.nan}),
        ValueError,
        r"label_smoothing .*got nan",
    ),
    (
        "label-smoothing-string",
        lambda: ((_logits(), _target()), {"label_smoothing": "0.1"}),
        TypeError,
        r"label_smoothing must be a float in \[0, 1\], got str",
    ),
    (
        "z-loss-negative",
        lambda: ((_logits(), _target()), {"z_loss": -1e-4}),
        ValueError,
        r"z_loss must be .*>= 0, got -0\.0001",
    ),
    (
        "z-loss-inf",
        lambda: ((_logits(), _target()), {"z_loss": math.inf}),
        ValueError,
        r"z_loss must be a finite .*got inf",
    ),
    ("z-loss-nan", lambda: ((_logits(), _target()), {"z_loss": math.nan}), ValueError, r"z_loss .*got nan"),
    (
        "softcap-zero",
        lambda: ((_logits(), _target()), {"softcap": 0.0}),
        ValueError,
        r"softcap must be .*> 0 or None, got 0\.0",
    ),
    (
        "softcap-negative",
        lambda: ((_logits(), _target()), {"softcap": -30.0}),
        ValueError,
        r"softcap must be .*got -30\.0",
    ),
    (
        "softcap-inf",
        lambda: ((_logits(), _target()), {"softcap": math.inf}),
        ValueError,
        r"softcap must be a finite .*got inf",
    ),
    (
        "logit-scale-zero",
        lambda: ((_logits(), _target()), {"logit_scale": 0.0}),
        ValueError,
        r"logit_scale must be a finite, non-zero float, got 0\.0",
    ),
    (
        "logit-scale-inf",
        lambda: ((_logits(), _target()), {"logit_scale": math.inf}),
        ValueError,
        r"logit_scale must be a finite, non-zero float, got inf",
    ),
    (
        "logit-scale-nan",
        lambda: ((_logits(), _target()), {"logit_scale": math.nan}),
        ValueError,
        r"logit_scale .*got nan",
    ),
    (
        "logit-scale-bool",
        lambda: ((_logits(), _target()), {"logit_scale": True}),
        TypeError,
        r"logit_scale must be .*got bool",
    ),
    (
        "chunk-size-zero",
        lambda: ((_logits(), _target()), {"chunk_size": 0}),
        ValueError,
        r"chunk_size must be an int >= 1 or None, got 0",
    ),
    ("chunk-size-negative", lambda: ((_logits(), _target()), {"chunk_size": -3}), ValueError, r"chunk_size .*got -3"),
    (
        "chunk-size-float",
        lambda: ((_logits(), _target()), {"chunk_size": 2.5}),
        TypeError,
        r"chunk_size must be an int .*got float 2\.5",
    ),
    (
        "reduction-unknown",
        lambda: ((_logits(), _target()), {"reduction": "avg"}),
        ValueError,
        r"reduction must be one of 'mean' \| 'sum' \| 'none', got 'avg'",
    ),
    (
        "reduction-none-object",
        lambda: ((_logits(), _target()), {"reduction": None}),
        ValueError,
        r"reduction must be one of .*got None",
    ),
    (
        "impl-unknown",
        lambda: ((_logits(), _target()), {"impl": "cuda"}),
        ValueError,
        r"impl must be one of 'auto' \| 'torch' \| 'triton', got 'cuda'",
    ),
    (
        "return-aux-int",
        lambda: ((_logits(), _target()), {"return_aux": 1}),
        TypeError,
        r"return_aux must be a bool, got int 1",
    ),
    (
        "return-aux-string",
        lambda: ((_logits(), _target()), {"return_aux": "yes"}),
        TypeError,
        r"return_aux must be a bool, got str",
    ),
    (
        "inplace-backward-none",
        lambda: ((_logits(), _target()), {"inplace_backward": None}),
        TypeError,
        r"inplace_backward must be a bool, got NoneType",
    ),
    (
        "ignore-index-float",
        lambda: ((_logits(), _target()), {"ignore_index": 1.5}),
        TypeError,
        r"ignore_index must be an int, got float",
    ),
    # --- devices
    (
        "target-on-other-device",
        lambda: ((_logits(), _target().to("meta")), {}),
        ValueError,
        r"target is on meta but logits is on cpu",
    ),
    (
        "weight-on-other-device",
        lambda: ((_logits(), _target()), {"weight": _weight().to("meta")}),
        ValueError,
        r"weight is on meta but logits is on cpu",
    ),
    (
        "soft-target-on-other-device",
        lambda: ((_logits(), torch.rand(N, V, device="meta")), {}),
        ValueError,
        r"target is on meta but logits is on cpu",
    ),
    # --- target ids outside [0, V) on CPU in eager mode
    (
        "target-too-large",
        lambda: ((_logits(), torch.tensor([0, 1, 5, 2])), {}),
        IndexError,
        r"target 5 at position \(2,\) is outside \[0, 5\)",
    ),
    (
        "target-negative",
        lambda: ((_logits(), torch.tensor([0, -1, 4, -100])), {}),
        IndexError,
        r"target -1 at position \(1,\) is outside \[0, 5\).*ignore_index=-100",
    ),
]


@pytest.mark.parametrize("build, error, pattern", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_raises(build, error, pattern):
    args, kwargs = build()
    with pytest.raises(error, match=pattern):
        crossent.cross_entropy(*args, **kwargs)


def test_the_table_covers_design_3():
    assert len(BAD_INPUT) >= 20
    assert len({c[0] for c in BAD_INPUT}) == len(BAD_INPUT)
    assert {c[2] for c in BAD_INPUT} == {ValueError, TypeError, IndexError}


def test_bad_input_raises_before_any_work():
    """A bad option after valid tensors leaves the logits untouched and builds no graph."""
    logits = torch.randn(N, V, requires_grad=True)
    with pytest.raises(ValueError, match="z_loss"):
        crossent.cross_entropy(logits * 1, _target(), z_loss=-1.0, inplace_backward=True)
    assert logits.grad is None


@pytest.mark.parametrize(
    "options, error, pattern",
    [
        ({"reduction": "avg"}, ValueError, r"reduction must be one of"),
        ({"weight": torch.rand(5), "class_weight": torch.rand(5)}, ValueError, r"not both"),
        ({"label_smoothing": 2.0}, ValueError, r"label_smoothing must be a float in \[0, 1\]"),
        ({"weight": torch.ones(5, dtype=torch.int32)}, TypeError, r"weight must be a floating tensor"),
    ],
    ids=["reduction", "both-weights", "label-smoothing", "integer-weight"],
)
def test_module_validates_at_construction(options, error, pattern):
    with pytest.raises(error, match=pattern):
        crossent.CrossEntropyLoss(**options)


def test_module_weight_of_wrong_v_fails_on_call():
    module = crossent.CrossEntropyLoss(weight=torch.rand(V + 1))
    with pytest.raises(ValueError, match=r"weight must have shape \(5,\).*got \(6,\)"):
        module(_logits(), _target())


def test_triton_on_cpu_tensors_without_the_interpreter():
    """impl="triton" on CPU tensors needs TRITON_INTERPRET=1; it is read when kernels are defined,
    so the check runs in a fresh interpreter with the variable unset."""
    script = textwrap.dedent(
        """
        import torch, crossent
        try:
            crossent.cross_entropy(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), impl="triton")
        except Exception as e:
            print(type(e).__name__ + ": " + str(e))
        else:
            print("no error")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout.strip().splitlines()[-1]
    assert out.startswith("ValueError: "), out
    assert 'impl="triton"' in out and "CUDA" in out and "cpu" in out and "TRITON_INTERPRET=1" in out, out
