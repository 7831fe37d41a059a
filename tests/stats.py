"""Statistical helpers: thresholds derived from a stated false-alarm rate, never picked by hand."""
from __future__ import annotations

import torch
from scipy import stats


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1)
                      for p in model.parameters()])


def sample_gradients(estimator, model, x, n, seed) -> torch.Tensor:
    """``n`` independent gradient estimates of the batch-mean negative ELBO, ``[n, P]``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        model.zero_grad(set_to_none=True)
        estimator(model, x, g).surrogate.backward()
        out.append(flat_grad(model))
    model.zero_grad(set_to_none=True)
    return torch.stack(out)


def bonferroni_z(alpha: float, n_tests: int) -> float:
    """Two-sided z threshold such that P(any |z_i| > threshold) <= alpha under the null."""
    return float(stats.norm.isf(alpha / (2 * n_tests)))


def unbiasedness_z(samples: torch.Tensor, exact: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-coordinate |mean - exact| / standard error, and a mask of coordinates with nonzero spread."""
    n = samples.shape[0]
    se = samples.std(0) / n ** 0.5
    live = se > 1e-12 * (1 + exact.abs())
    z = torch.where(live, (samples.mean(0) - exact).abs() / se.clamp_min(1e-300), torch.zeros_like(se))
    return z, live


def randomize_estimator(est, seed=5):
    """Random baseline / control-variate nets, temperatures, eta and moving averages, in eval mode:
    unbiasedness must not depend on them."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in est.parameters():
            p.normal_(0.0, 1.0)
        for name, b in est.named_buffers():
            if b.is_floating_point():
                b.normal_(0.0, 3.0).abs_() if "var" in name else b.normal_(0.0, 3.0)
    return est.eval()
