"""The marginal estimator of Tokui & Sato (2017), "Evaluating the variance of likelihood-ratio
gradient estimators" (ICML; arXiv 1611.01239 "Reparameterization trick for discrete variables").

With z_{l,i} = 1[u_{l,i} < mu_{l,i}], hold all other uniforms fixed and integrate z_{l,i} out:

    E_{u_{l,i}}[F] = mu_{l,i} F(z_{l,i}=1) + (1 - mu_{l,i}) F(z_{l,i}=0)        (paper, eq. 7-8)

where F(z_{l,i}=v) re-simulates the descendants z_{l+1..L} from the SAME uniforms. The inference
gradient is sum_{l,i} dmu_{l,i}/dphi [F(1) - F(0)] plus the direct dependence of F on phi. F is the
ELBO integrand with analytic conditional entropies,

    F(z) = sum_l log p(z_{l-1} | z_l) + log p(z_L) + sum_l H(q(. | z_{l-1})),

and generative parameters get the pathwise gradient of log p(x, z).

Two implementations of the per-unit differences Delta_{l,i} = F(z with z_{l,i} flipped) - F(z):

- :func:`flip_deltas_reference`: the definition. B*H_l flipped copies as rows, every layer above
  re-run in full. Readable, slow.
- :func:`flip_deltas` (:mod:`.marginal_fast`): the same numbers at element-wise cost.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..models import SBN, bernoulli_entropy, bernoulli_log_prob, logit_of_uniform, threshold
from .base import Estimate, Estimator
from .marginal_fast import flip_deltas

__all__ = ["Marginal", "flip_deltas", "flip_deltas_reference", "objective_terms"]


def objective_terms(model: SBN, x: Tensor, zs: list[Tensor]) -> Tensor:
    """F(z) = log p(x, z) + sum_l H(q(. | z_{l-1})), ``[B]``."""
    return model.log_joint(x, zs) + torch.stack(model.entropy_layers(x, zs)).sum(0)


@torch.no_grad()
def flip_deltas_reference(model: SBN, x: Tensor, zs: list[Tensor], uniforms: list[Tensor]) -> list[Tensor]:
    """Delta_{l,i} = F(flip z_{l,i}, re-simulate above) - F(z), one ``[B, H_l]`` per layer, by brute force."""
    f_sampled = objective_terms(model, x, zs)                    # [B]
    deltas = []
    for l, H in enumerate(model.latent_sizes, start=1):
        B = x.shape[0]
        rows = torch.arange(B * H, device=x.device)
        flipped = [z.repeat_interleave(H, 0) for z in zs[:l]]    # [B*H, H_k], row b*H + i flips unit i
        flipped[-1][rows, rows % H] = 1 - flipped[-1][rows, rows % H]
        for k in range(l + 1, model.n_layers + 1):               # re-simulate with the same uniforms
            lu = logit_of_uniform(uniforms[k - 1]).repeat_interleave(H, 0)
            flipped.append(threshold(lu, model.q_logits(k, flipped[-1])))
        f_flipped = objective_terms(model, x.repeat_interleave(H, 0), flipped).view(B, H)
        deltas.append(f_flipped - f_sampled[:, None])
    return deltas


class Marginal(Estimator):
    """Tokui & Sato's marginal ("RAM") estimator: every unit of every layer marginalized, descendants
    re-simulated with common random numbers. Unbiased; exact (zero variance) with one latent unit.

    Args:
        max_elements: bound on the size of per-chunk temporaries (memory ~ 4 bytes x this x a few).
        implementation: ``"fast"`` (rank-1 updates, :func:`flip_deltas`) or ``"reference"``.
        n_samples: K independent noise draws per example; the estimate (and the reported ELBO) is the
            mean of the K single-draw estimates, so it stays unbiased with K times less variance.
    """

    def __init__(self, model: SBN | None = None, max_elements: int = 1 << 21, implementation: str = "fast",
                 n_samples: int = 1):
        super().__init__(model)
        if implementation not in ("fast", "reference"):
            raise ValueError(f"implementation must be 'fast' or 'reference', got {implementation!r}")
        if max_elements <= 0:
            raise ValueError(f"max_elements must be positive, got {max_elements}")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        self.max_elements = int(max_elements)
        self.implementation = implementation
        self.n_samples = int(n_samples)

    def deltas(self, model: SBN, x: Tensor, zs: list[Tensor], uniforms: list[Tensor]) -> list[Tensor]:
        if self.implementation == "reference":
            return flip_deltas_reference(model, x, zs, uniforms)
        return flip_deltas(model, x, zs, uniforms, self.max_elements)

    def forward(self, model: SBN, x: Tensor, generator: torch.Generator | None = None) -> Estimate:
        B, K = x.shape[0], self.n_samples
        x = x.repeat(K, 1) if K > 1 else x                      # [K*B, D], sample-major
        uniforms = model.draw_uniforms(x.shape[0], generator, x.device, x.dtype)
        q_logits, zs = [], []                 # ancestral sampling as model.sample_q; logits keep grads to phi
        for l, u in enumerate(uniforms, start=1):
            q_logits.append(model.q_logits(l, zs[-1] if zs else x))
            zs.append(threshold(logit_of_uniform(u), q_logits[-1].detach()))
        deltas = self.deltas(model, x, zs, uniforms)
        log_p = model.log_p_layers(x, zs)                                           # grads reach theta
        objective = torch.stack(log_p).sum(0)
        for logits, z, delta in zip(q_logits, zs, deltas):
            # F(1) - F(0) = (1 - 2z) * Delta, a constant; d mu carries the gradient
            objective = objective + bernoulli_entropy(logits) + (torch.sigmoid(logits) * ((1 - 2 * z) * delta)).sum(-1)
        with torch.no_grad():
            log_q = sum(bernoulli_log_prob(z, lg) for z, lg in zip(zs, q_logits))
            elbo = (torch.stack(log_p).sum(0) - log_q).view(K, B).mean(0)
        # the mean over K*B rows is the mean over the K draws of the batch-mean objective
        return Estimate(surrogate=-objective.mean(), elbo=elbo.detach())
