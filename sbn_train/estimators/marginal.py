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

``top_prior_at_mean=True`` (config ``marginal_paper_code``) computes what the authors' published code
(github beam2d/sbn, Chainer) computes. There, in every flipped branch, the prior term log p(z'_L) is
evaluated at q's mean of the branch's top layer instead of its binary value:

    log p(z'_L)  ->  sum_i [m'_i b_i - softplus(b_i)],     m' = sigmoid(q logits of layer L given z'_{L-1}),

b the prior logits; F at the sampled configuration keeps the sample. When layer L itself is flipped,
z'_{L-1} is the sampled layer, so m' = sigmoid(a_L) of the sample whatever unit flips: the flipped value
does not enter the prior term at all (in that code the flipped copies of the top layer keep the top
layer's logits, and the mean is taken from those). With b = 0 both forms of log p(z_L) are -H_L log 2
and the estimator equals the marginal one exactly. Otherwise the top layer's estimate is biased: for a
flip of unit i the difference gains (m - z_L) . b - d_i b_i (d_i = 1 - 2 z_{L,i}), whose mean given the
parent is -b_i (1 - 2 s_i (1 - s_i)), s = sigmoid(a_L). The expected gradient of the surrogate (the
negative ELBO) w.r.t. a_{L,i} is therefore off by

    s_i (1 - s_i) (1 - 2 s_i (1 - s_i)) b_i      per row (divided by the batch size for the batch mean).

Below the top layer the added (m' - z'_L) . b has mean 0 over the top layer's uniforms, so those layers
stay unbiased. The fast path adds (m' - z'_L) . b, from a re-simulation of the layers above l through q
only (rank-1 for layer l+1, as in :mod:`.marginal_fast`), to the fast deltas.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..models import SBN, Categorical, bernoulli_entropy, logit_of_uniform, threshold
from .base import DEFAULT_MAX_ELEMENTS, check_max_elements
from .branches import Sample
from .layerwise import LayerwiseEstimator
from .marginal_categorical import categorical_deltas, categorical_deltas_reference
from .marginal_fast import Workspace, flip_deltas

__all__ = ["Marginal", "flip_deltas", "flip_deltas_reference", "top_prior_mean_shift"]


def _prior_mean_shift(model: SBN, top_parent: Tensor, z_top: Tensor) -> Tensor:
    """(m - z_L) . b, ``[R]``: log p(z_L) evaluated at m = sigmoid(q logits of layer L given ``top_parent``)
    minus log p(z_L) at ``z_top``."""
    m = torch.sigmoid(model.q_logits(model.n_layers, top_parent))
    return ((m - z_top) * model.prior_logits).sum(-1)


@torch.no_grad()
def flip_deltas_reference(model: SBN, x: Tensor, zs: list[Tensor], uniforms: list[Tensor],
                          top_prior_at_mean: bool = False) -> list[Tensor]:
    """Delta_{l,i} = F(flip z_{l,i}, re-simulate above) - F(z), one ``[B, H_l]`` per layer, by brute force.
    ``top_prior_at_mean``: the flipped branches' prior term at q's mean of their top layer (module docstring)."""
    f_sampled = model.objective(x, zs)                           # [B]
    deltas = []
    for l, H in enumerate(model.latent_sizes, start=1):
        B = x.shape[0]
        rows = torch.arange(B * H, device=x.device)
        flipped = [z.repeat_interleave(H, 0) for z in zs[:l]]    # [B*H, H_k], row b*H + i flips unit i
        flipped[-1][rows, rows % H] = 1 - flipped[-1][rows, rows % H]
        for k in range(l + 1, model.n_layers + 1):               # re-simulate with the same uniforms
            lu = logit_of_uniform(uniforms[k - 1]).repeat_interleave(H, 0)
            flipped.append(threshold(lu, model.q_logits(k, flipped[-1])))
        xr = x.repeat_interleave(H, 0)
        f_flipped = model.objective(xr, flipped)
        if top_prior_at_mean:
            f_flipped = f_flipped + _prior_mean_shift(model, ([xr] + flipped)[-2], flipped[-1])
        deltas.append(f_flipped.view(B, H) - f_sampled[:, None])
    return deltas


@torch.no_grad()
def top_prior_mean_shift(model: SBN, x: Tensor, zs: list[Tensor], uniforms: list[Tensor],
                         max_elements: int = DEFAULT_MAX_ELEMENTS) -> list[Tensor]:
    """(m' - z'_L) . b for every branch (flip of unit i of layer l, layers above re-simulated from the same
    uniforms), one ``[B, H_l]`` per layer: what ``top_prior_at_mean`` adds to each Delta_{l,i}.

    Only the inference net is run on the branches: a flip moves the pre-activations of q_{l+1} by
    d_i W[:, i] (rank-1, as in the fast path), the layers above are re-simulated densely, in chunks of
    units with at most ``max_elements`` entries per layer."""
    L, b, B = model.n_layers, model.prior_logits, x.shape[0]
    lus = [logit_of_uniform(u) for u in uniforms]
    out = []
    for l in range(1, L):
        H, q_next = model.sizes[l], model.q_nets[l]              # q_{l+1} reads z_l
        d = 1 - 2 * zs[l - 1]                                    # [B, H]: the change a flip makes
        pre = q_next.first(zs[l - 1])                            # [B, h]
        chunk = max(1, min(H, max_elements // max(1, B * max(model.sizes[l + 1:]))))
        shift = torch.empty_like(d)
        for a in range(0, H, chunk):
            e = min(H, a + chunk)
            w = q_next.first.weight[:, a:e].T.contiguous()       # [c, h]
            logits = q_next.tail(torch.addcmul(pre[:, None, :], d[:, a:e, None], w[None]))   # [B, c, H_{l+1}]
            for k in range(l + 2, L + 1):                        # z'_{k-1}, then the logits of layer k
                logits = model.q_nets[k - 1](threshold(lus[k - 2][:, None, :], logits))
            z_top = threshold(lus[L - 1][:, None, :], logits)    # [B, c, H_L]
            shift[:, a:e] = ((torch.sigmoid(logits) - z_top) * b).sum(-1)
        out.append(shift)
    # a flip in layer L leaves its parent, hence m, as sampled; only z_L moves, by d_i at unit i
    d = 1 - 2 * zs[-1]
    out.append(_prior_mean_shift(model, ([x] + zs)[-2], zs[-1])[:, None] - d * b)
    return out


class Marginal(LayerwiseEstimator):
    """Tokui & Sato's marginal ("RAM") estimator: every unit of every layer marginalized, descendants
    re-simulated with common random numbers. Unbiased; exact (zero variance) with one latent unit.
    On a categorical model every variable's K values are summed out (:mod:`.marginal_categorical`).

    Args:
        max_elements: bound on the size of per-chunk temporaries (memory ~ 4 bytes x this x a few); None:
            the flip pass's default for the tensors' device (:data:`.base.DEFAULT_MAX_ELEMENTS` on a CPU).
        implementation: ``"fast"`` (rank-1 updates, :func:`flip_deltas`) or ``"reference"``.
        n_samples: K independent noise draws per example; the estimate (and the reported ELBO) is the
            mean of the K single-draw estimates, so it stays unbiased with K times less variance.
        top_prior_at_mean: the flipped branches' prior term at q's mean of their top layer, as the
            authors' published code computes it (module docstring). Biased unless the prior logits are 0.
    """

    families = ("bernoulli", "categorical")

    @classmethod
    def supported_families(cls, options) -> tuple[str, ...]:
        return ("bernoulli",) if options.get("top_prior_at_mean") else cls.families

    def __init__(self, model: SBN | None = None, max_elements: int | None = None,
                 implementation: str = "fast", n_samples: int = 1, top_prior_at_mean: bool = False):
        self._options = {"top_prior_at_mean": top_prior_at_mean}
        super().__init__(model)
        if implementation not in ("fast", "reference"):
            raise ValueError(f"implementation must be 'fast' or 'reference', got {implementation!r}")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        self.max_elements = None if max_elements is None else check_max_elements(max_elements)
        self.implementation = implementation
        self.n_samples = self.q_samples = int(n_samples)
        self.top_prior_at_mean = bool(top_prior_at_mean)
        self.unbiased = not self.top_prior_at_mean
        #: the flip pass's route ("auto", "cpu", "device") and its scratch, owned by this estimator (a
        #: replica group sets the device route and a workspace without scratch)
        self.route = "auto"
        self.workspace = Workspace()

    def deltas(self, model: SBN, x: Tensor, zs: list[Tensor], uniforms: list[Tensor]) -> list[Tensor]:
        if self.implementation == "reference":
            return flip_deltas_reference(model, x, zs, uniforms, self.top_prior_at_mean)
        deltas = flip_deltas(model, x, zs, uniforms, self.max_elements, self.workspace, self.route)
        if self.top_prior_at_mean:
            shifts = top_prior_mean_shift(model, x, zs, uniforms, self.max_elements or DEFAULT_MAX_ELEMENTS)
            deltas = [delta + shift for delta, shift in zip(deltas, shifts)]
        return deltas

    def layer_terms(self, model: SBN, x: Tensor, s: Sample) -> tuple[list[Tensor], None]:
        """t_l = H(q(. | z_{l-1})) + sum_i mu_{l,i} (F(z_{l,i}=1) - F(z_{l,i}=0)), the differences constant."""
        if isinstance(model.family, Categorical):
            return self.categorical_terms(model, x, s), None
        deltas = self.deltas(model, x, s.zs, s.uniforms)
        # F(1) - F(0) = (1 - 2z) * Delta; d mu carries the gradient
        return [bernoulli_entropy(a) + (torch.sigmoid(a) * ((1 - 2 * z) * delta)).sum(-1)
                for a, z, delta in zip(s.q_logits, s.zs, deltas)], None

    def categorical_terms(self, model: SBN, x: Tensor, s: Sample) -> list[Tensor]:
        """t_l = H(q(. | z_{l-1})) + sum_{i,k} q_{l,i}(k) D_{l,i,k}, the differences constant."""
        fam = model.family
        if self.implementation == "reference":
            deltas = categorical_deltas_reference(model, x, s.zs, s.uniforms)
        else:
            deltas = categorical_deltas(model, x, s.zs, s.uniforms, self.max_elements, self.route)
        return [fam.entropy(a) + (torch.softmax(fam.blocks(a), -1) * delta).sum((-2, -1))
                for a, delta in zip(s.q_logits, deltas)]
