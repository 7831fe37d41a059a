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
- :func:`flip_deltas`: the same numbers. A flip changes the pre-activations of the first affine
  map of each net that reads layer l by (v - z_{l,i}) * W[:, i] (a rank-1 update), so no matrix
  product over the flipped layer's inputs is redone; only terms touching the flipped unit or its
  re-simulated descendants are evaluated; units are processed in chunks to bound memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models import SBN, bernoulli_entropy, bernoulli_log_prob, logit_of_uniform, threshold
from .base import Estimate, Estimator


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


class Workspace:
    """Scratch buffers reused across chunks and steps: fresh multi-megabyte temporaries for every
    chunk cost page faults that, on a CPU, take as long as the arithmetic."""

    def __init__(self):
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        n = 1
        for s in shape:
            n *= s
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(n, dtype=like.dtype, device=like.device)
            self._bufs[name] = buf
        return buf[:n].view(shape)


_WORKSPACE = Workspace()


def _sum_log_half_to_one(t: Tensor) -> Tensor:
    """sum_j log(t_j) over the last dim for entries in [1/2, 1], destroying ``t``.

    Multiplies halves in place up to four times, so each log covers a product of up to 16 entries
    (>= 2^-16: no underflow) and 16x fewer logs are taken; log dominates the cost otherwise."""
    for _ in range(4):
        h = t.shape[-1]
        if h % 2:
            break
        lo = t[..., : h // 2]
        lo.mul_(t[..., h // 2:])
        t = lo
    return t.log_().sum(-1)


def _softplus_sum(a: Tensor, tmp: Tensor, a_sum: Tensor | None = None) -> Tensor:
    """sum_j softplus(a_j) over the last dim. ``tmp`` is scratch of a's shape and may be ``a`` itself (then
    ``a`` is overwritten); ``a_sum`` is ``a.sum(-1)`` when the caller knows it without a pass.

    softplus(a) = max(a, 0) - log(sigmoid(|a|)) and sum max(a, 0) = (sum a + sum |a|) / 2: exact for
    every a (no overflow, no threshold, sigmoid(|a|) >= 1/2), in place over cache-sized chunks."""
    s = a.sum(-1) if a_sum is None else a_sum.clone()
    t = torch.abs(a, out=tmp)
    s = s.add_(t.sum(-1)).mul_(0.5)
    return s.sub_(_sum_log_half_to_one(t.sigmoid_()))


def _entropy_sum(a: Tensor, t1: Tensor, t2: Tensor) -> Tensor:
    """sum_j H(Bernoulli(sigmoid(a_j))): with s = sigmoid(|a|), H = -log(s) + |a| (1 - s)."""
    torch.abs(a, out=t1)
    torch.sigmoid(t1, out=t2)
    h = t1.sum(-1)
    h.sub_(t1.mul_(t2).sum(-1))
    return h.sub_(_sum_log_half_to_one(t2))


def _rank1_pre(net, pre: Tensor, d: Tensor, start: int, out: Tensor) -> Tensor:
    """Pre-activations of ``net.first`` after flipping input unit start + j: pre + d_j W[:, start + j]."""
    # contiguous rows: a strided (transposed) operand makes this broadcast 3x slower
    w = net.first.weight[:, start:start + d.shape[1]].T.contiguous()        # [c, h]
    return torch.addcmul(pre[:, None, :], d[:, :, None], w[None], out=out)  # [B, c, h]


def _log_prob_rank1(net, v: Tensor, pre: Tensor, d: Tensor, start: int, ws: Workspace) -> Tensor:
    """sum_j log Bern(v_j | logits'_j), ``[B, c]``, where logits' come from ``pre [B, h]`` (pre-activations of
    ``net.first`` at the sampled input) after flipping input unit start + j (``d [B, c]``)."""
    shape = (d.shape[0], d.shape[1], pre.shape[1])
    flipped = _rank1_pre(net, pre, d, start, ws.get("a", shape, pre))       # [B, c, h]
    if net.is_linear:
        # sums of logits' against v and against 1 are matrix products, not [B, c, h] passes:
        # v . logits' = v . pre + d_j (v . W[:, j]),  1 . logits' = 1 . pre + d_j (1 . W[:, j])
        w = net.first.weight[:, start:start + d.shape[1]]                   # [h, c]
        linear = (v * pre).sum(-1, keepdim=True) + d * (v @ w)
        total = pre.sum(-1, keepdim=True) + d * w.sum(0)
        return linear - _softplus_sum(flipped, flipped, a_sum=total)
    return bernoulli_log_prob(v[:, None, :], net.tail(flipped))


@torch.no_grad()
def flip_deltas(model: SBN, x: Tensor, zs: list[Tensor], uniforms: list[Tensor],
                max_elements: int = 1 << 21, workspace: Workspace | None = None) -> list[Tensor]:
    """Same values as :func:`flip_deltas_reference`, at element-wise cost.

    Memory: a few scratch buffers of about ``max_elements`` entries each (8 MB in float32 by
    default: cache-sized chunks of flipped units), reused from chunk to chunk and step to step.
    """
    ws = workspace or _WORKSPACE
    L, B = model.n_layers, x.shape[0]
    below = [x] + zs                                              # below[k] = z_k
    lus = [logit_of_uniform(u) for u in uniforms]                 # lus[k-1]: layer k
    # terms at the sampled configuration, reused by every branch
    p_pre = [model.p_nets[k - 1].first(below[k]) for k in range(1, L + 1)]            # [B, h]
    logp = [bernoulli_log_prob(below[k - 1], model.p_nets[k - 1].tail(p_pre[k - 1])) for k in range(1, L + 1)]
    q_pre = [model.q_nets[k - 1].first(model.q_input(k, below[k - 1])) for k in range(1, L + 1)]
    ent = [bernoulli_entropy(model.q_nets[k - 1].tail(q_pre[k - 1])) for k in range(1, L + 1)]
    prior = bernoulli_log_prob(below[L], model.prior_logits)
    widest = max(model.sizes)
    deltas = []
    for l in range(1, L + 1):
        H = model.sizes[l]
        d = 1 - 2 * below[l]                                      # [B, H]: the change a flip makes
        chunk = max(1, min(H, max_elements // max(1, B * widest)))
        out = torch.empty_like(d)
        for s in range(0, H, chunk):
            e = min(H, s + chunk)
            out[:, s:e] = _branch(model, below, lus, p_pre, q_pre, logp, ent, prior, l, d[:, s:e], s, ws)
        deltas.append(out)
    return deltas


def _branch(model: SBN, below, lus, p_pre, q_pre, logp, ent, prior, l: int, d: Tensor, start: int,
            ws: Workspace) -> Tensor:
    """Delta for flipping units start..start+c-1 of layer l, ``[B, c]``."""
    L = model.n_layers
    B, c = d.shape
    j = torch.arange(c, device=d.device)
    # log p(z_{l-1} | z'_l): rank-1 update of the first affine map of p_l
    delta = _log_prob_rank1(model.p_nets[l - 1], below[l - 1], p_pre[l - 1], d, start, ws) - logp[l - 1][:, None]
    parent = None                                                  # z'_{k-1} as [B, c, H], when materialized
    for k in range(l + 1, L + 1):                                  # re-simulate z'_k with the same uniforms
        net, H_k, H_below = model.q_nets[k - 1], model.sizes[k], model.sizes[k - 1]
        if k == l + 1:                                             # rank-1 update again
            q_logits = net.tail(_rank1_pre(net, q_pre[k - 1], d, start, ws.get("a", (B, c, net.first.out_features), d)))
        else:
            q_logits = net(parent)
        delta += _entropy_sum(q_logits, ws.get("b", q_logits.shape, d), ws.get("c", q_logits.shape, d)) \
            - ent[k - 1][:, None]
        z_k = torch.lt(lus[k - 1][:, None, :], q_logits, out=ws.get(f"z{k % 2}", q_logits.shape, d))  # [B, c, H_k]
        p_net = model.p_nets[k - 1]
        if p_net.is_linear:
            p_logits = torch.addmm(p_net.first.bias, z_k.view(-1, H_k), p_net.first.weight.T,
                                   out=ws.get("a", (B * c, H_below), d)).view(B, c, H_below)
        else:
            p_logits = p_net(z_k)                                  # [B, c, H_{k-1}]
        if parent is None:   # z'_l differs from z_l in unit start + j only
            vdot = torch.bmm(p_logits, below[l][:, :, None]).squeeze(-1) + d * p_logits[:, j, start + j]
        else:
            vdot = torch.mul(p_logits, parent, out=ws.get("b", p_logits.shape, d)).sum(-1)
        delta += vdot - _softplus_sum(p_logits, ws.get("c", p_logits.shape, d)) - logp[k - 1][:, None]
        parent = z_k
    if l == L:   # only unit i of the prior changes: (z' - z) * b_i
        delta += d * model.prior_logits[start:start + c]
    else:
        b = model.prior_logits
        delta += parent @ b - F.softplus(b).sum() - prior[:, None]
    return delta


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
        zs = model.sample_q(x, uniforms)
        deltas = self.deltas(model, x, zs, uniforms)
        parents = [x] + zs[:-1]
        q_logits = [model.q_logits(l, p) for l, p in enumerate(parents, start=1)]   # grads reach phi
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
