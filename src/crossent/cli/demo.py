"""``crossent demo`` (what ``make demo`` runs), in parts that read top to bottom.

1. the seed's walkthrough: every step of the log-sum-exp on three tokens;
2. the stability table: textbook softmax-then-log and ``lse − x_t`` on extreme logits, beside
   crossent and the float64 truth;
3. the memory demonstration: the fused classifier + loss at a 128k vocabulary beside eager PyTorch.
"""

from __future__ import annotations

import math

import torch

from ..seed import SEED_LOGITS, SEED_TARGETS

RULE = "=" * 100


def _textbook(x: torch.Tensor, t: int) -> float:
    """softmax, then log: what a first implementation writes (overflows and underflows)."""
    p = torch.exp(x) / torch.exp(x).sum()
    return float(-torch.log(p[t]))


def _lse_minus_target(x: torch.Tensor, t: int) -> float:
    """``lse − x_t`` at the input's precision: safe from overflow, but it cancels."""
    return float(torch.logsumexp(x, dim=-1) - x[t])


def _fmt(v: float) -> str:
    if math.isnan(v) or math.isinf(v):
        return f"{v!s:>12}"
    return f"{v:12.4f}"


def stability_cases() -> list[tuple[str, torch.Tensor, int]]:
    """(description, logits row, target) for the stability table."""
    noise = torch.randn(8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return [
        ("[1000, 0, -1000] float32, target 0", torch.tensor([1000.0, 0.0, -1000.0]), 0),
        ("[1000, 0, -1000] float32, target 1", torch.tensor([1000.0, 0.0, -1000.0]), 1),
        ("[65504, 65000, 0] float16, target 1", torch.tensor([65504.0, 65000.0, 0.0]).half(), 1),
        ("-1e30 + noise (8 words) float32, target 3", (-1e30 + noise).float(), 3),
    ]


def walkthrough() -> None:
    from ..reference import explain

    print(RULE)
    print("crossent demo — part 1: the seed's walkthrough (`crossent explain`)")
    print(RULE)
    print(explain(torch.tensor(SEED_LOGITS, dtype=torch.float64), torch.tensor(SEED_TARGETS)))


def stability_table() -> None:
    from ..functional import cross_entropy
    from ..reference import cross_entropy as reference_cross_entropy

    print(RULE)
    print("part 2: why the maximum is subtracted — extreme logits, loss of the marked target")
    print(RULE)
    header = f"{'input':<44}{'softmax→log':>12}{'lse − x_t':>12}{'crossent':>12}{'float64':>12}"
    print(header)
    print("-" * len(header))
    for name, x, t in stability_cases():
        target = torch.tensor([t])
        truth = float(reference_cross_entropy(x.unsqueeze(0), target))
        ours = float(cross_entropy(x.unsqueeze(0), target))
        print(f"{name:<44}{_fmt(_textbook(x, t))}{_fmt(_lse_minus_target(x, t))}{_fmt(ours)}{_fmt(truth)}")
    print(
        "\nsoftmax→log overflows (inf/inf = nan) or underflows (0/0 = nan); lse − x_t cancels when"
        "\n|M| ≫ log S (in the −1e30 row lse and x_t share all their digits); crossent keeps"
        "\n(x_t − M) − log S, and its answer is the float64 one."
    )


def memory_demo(n_tokens: int = 512, hidden_size: int = 256, vocab_size: int = 128256) -> None:
    """The fused classifier + loss beside eager PyTorch at a Llama-3-sized vocabulary."""
    import torch.nn.functional as F

    from ..functional import linear_cross_entropy
    from ..measure import peak_extra_rss, timed

    print(RULE)
    print(f"part 3: classifier + loss fused — N={n_tokens} tokens, D={hidden_size}, V={vocab_size}, float32")
    print(RULE)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n_tokens, hidden_size, generator=g).requires_grad_()
    weight = (torch.randn(vocab_size, hidden_size, generator=g) / hidden_size**0.5).requires_grad_()
    target = torch.randint(0, vocab_size, (n_tokens,), generator=g)

    def eager():
        loss = F.cross_entropy(hidden @ weight.T, target)
        loss.backward()
        return loss.detach()

    def fused():
        loss = linear_cross_entropy(hidden, weight, target)
        loss.backward()
        return loss.detach()

    print(f"{'method':<34}{'loss':>10}{'time (s)':>10}{'peak extra memory':>20}")
    for name, fn in (("F.cross_entropy(hidden @ W.T)", eager), ("crossent.linear_cross_entropy", fused)):
        hidden.grad = weight.grad = None
        (loss, seconds), peak = peak_extra_rss(lambda fn=fn: timed(fn))
        print(f"{name:<34}{float(loss):10.4f}{seconds:10.2f}{peak / 2**20:16.0f} MiB")
    logits_mib = n_tokens * vocab_size * 4 / 2**20
    grad_mib = vocab_size * hidden_size * 4 / 2**20
    print(
        f"\nThe logits alone are {logits_mib:.0f} MiB, and eager PyTorch also keeps their softmax and their"
        f"\ngradient; crossent holds one chunk of them at a time. Both peaks include the weight's"
        f"\ngradient ({grad_mib:.0f} MiB), which any method needs."
    )


def run_demo() -> int:
    walkthrough()
    print()
    stability_table()
    print()
    memory_demo()
    print(
        "\nNext: run `crossent bench --quick` for the measured tables and plots (time and memory against"
        "\nF.cross_entropy, torch.compile and the matmul floor), and read docs/guide.md for the API."
    )
    return 0
