"""The marginal estimator's differences for categorical latents: every variable's K values.

With z_{l,i} drawn from one uniform by the inverse CDF, hold all other uniforms fixed and sum z_{l,i} out:

    E_{u_{l,i}}[F] = sum_k q_{l,i}(k) F(z_{l,i} = k),

where F(z_{l,i} = k) re-simulates the layers above l from the SAME uniforms (common random numbers). The
estimator's layer term is H(q(. | z_{l-1})) + sum_{i,k} q_{l,i}(k) D_{l,i,k} with the differences

    D_{l,i,k} = F(z_{l,i} = k, layers above re-simulated) - F(z)          (0 at the sampled class)

held constant, so the gradient reaching the logits is sum_k dq(k) F(k), the local expectation, exactly as the
binary estimator's mu (F(1) - F(0)) (Bernoulli is the case K = 2). F is :meth:`SBN.objective` (log p(x, z)
plus the layers' analytic conditional entropies).

- :func:`categorical_deltas_reference`: the definition, B*H*K rows through the whole model per layer.
- :func:`categorical_deltas`: the same numbers with each of the K - 1 alternatives of a variable applied to
  the nets that read its layer as a change of two columns of their first weight matrix (e_new - e_old: a
  rank-2 update of the pre-activations, as a binary flip is rank-1), so the product over the other inputs
  is not redone; only the layers above (re-simulated) and the nets' MLP tails are run on the alternatives.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..models import SBN, Categorical
from .base import DEFAULT_MAX_ELEMENTS

__all__ = ["categorical_deltas", "categorical_deltas_reference"]


def _family(model: SBN) -> Categorical:
    if not isinstance(model.family, Categorical):
        raise ValueError(f"categorical differences need a categorical model, got {model.family!r}")
    return model.family


@torch.no_grad()
def categorical_deltas_reference(model: SBN, x: Tensor, zs: list[Tensor], uniforms: list[Tensor]) -> list[Tensor]:
    """D_{l,i,k}, one ``[B, H_l, K]`` per layer, by brute force: for every variable i and value k a copy of the
    sample with z_{l,i} = k, the layers above re-drawn from the same uniforms, F evaluated in full."""
    fam = _family(model)
    K, B = fam.classes, x.shape[0]
    f_sampled = model.objective(x, zs)                                       # [B]
    noise = [fam.prepare(u) for u in uniforms]
    out = []
    for l, H in enumerate(model.latent_sizes, start=1):
        cls = fam.blocks(zs[l - 1]).argmax(-1)                               # [B, H]
        alt = cls[:, None, None, :].repeat(1, H, K, 1)                       # [B, i, k, H]
        i, k = torch.arange(H, device=x.device)[:, None], torch.arange(K, device=x.device)[None, :]
        alt[:, i, k, i] = k                                                  # variable i set to k
        rows = B * H * K
        branch = [z.repeat_interleave(H * K, 0) for z in zs[:l - 1]]
        branch.append(fam.one_hot(alt.reshape(rows, H), x.dtype))
        for m in range(l + 1, model.n_layers + 1):                           # re-simulate, same uniforms
            branch.append(fam.sample(noise[m - 1].repeat_interleave(H * K, 0), model.q_logits(m, branch[-1])))
        f = model.objective(x.repeat_interleave(H * K, 0), branch)
        out.append(f.view(B, H, K) - f_sampled[:, None, None])
    return out


def _upper_terms(model: SBN, l: int, below: Tensor, z_l: Tensor, pre_p: Tensor, pre_q: Tensor | None,
                 noise: list[Tensor]) -> Tensor:
    """The terms of F that depend on layer l (1-based) and the layers above it, for configurations of layer l
    given as ``z_l`` [..., W_l] with the first-layer pre-activations of the two nets that read it (``pre_p``
    of p_nets[l-1], ``pre_q`` of q_nets[l], None for the top layer), the layers above re-drawn from ``noise``:

        log p(z_{l-1} | z_l) + sum_{m > l} [log p(z_{m-1} | z_m) + H(q(. | z_{m-1}))] + log p(z_L).   [...]
    """
    fam, L = model.family, model.n_layers
    total = model.log_prob_below(l - 1, below, model.p_nets[l - 1].tail(pre_p))
    z = z_l
    for m in range(l + 1, L + 1):
        logits = model.q_nets[m - 1].tail(pre_q) if m == l + 1 else model.q_nets[m - 1](z)
        total = total + fam.entropy(logits)
        z_next = fam.sample(noise[m - 1].expand(*logits.shape[:-1], noise[m - 1].shape[-1]), logits)
        total = total + fam.log_prob(z, model.p_nets[m - 1](z_next))
        z = z_next
    return total + fam.log_prob(z, model.prior_logits)


@torch.no_grad()
def categorical_deltas(model: SBN, x: Tensor, zs: list[Tensor], uniforms: list[Tensor],
                       max_elements: int | None = None) -> list[Tensor]:
    """D_{l,i,k} as :func:`categorical_deltas_reference`, one ``[B, H_l, K]`` per layer, computed with rank-2
    updates of the first layers of the nets that read layer l, in chunks of variables whose largest
    temporary has at most ``max_elements`` entries."""
    fam = _family(model)
    K, B, L = fam.classes, x.shape[0], model.n_layers
    max_elements = max_elements or DEFAULT_MAX_ELEMENTS
    noise = [fam.prepare(u)[:, None, :] for u in uniforms]                   # [B, 1, H_m]: broadcast over branches
    below_all = [x] + list(zs)
    widest = max(model.sizes + [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)])
    out = []
    for l, H in enumerate(model.latent_sizes, start=1):
        z_l, below = zs[l - 1], below_all[l - 1]
        p_net, q_net = model.p_nets[l - 1], (model.q_nets[l] if l < L else None)
        pre_p = p_net.first(z_l)                                             # [B, h_p]
        pre_q = q_net.first(z_l) if q_net is not None else None
        base = _upper_terms(model, l, below, z_l, pre_p, pre_q, [n[:, 0] for n in noise])   # [B]
        cls = fam.blocks(z_l).argmax(-1)                                     # [B, H]
        shift = torch.arange(1, K, device=x.device)                          # the K - 1 other values
        columns = torch.arange(z_l.shape[-1], device=x.device)
        chunk = max(1, min(H, max_elements // max(1, B * (K - 1) * widest)))
        parts = []
        for a in range(0, H, chunk):
            e = min(H, a + chunk)
            old = cls[:, a:e]                                                # [B, c]
            new = (old[..., None] + shift) % K                               # [B, c, K-1]
            offset = (torch.arange(a, e, device=x.device) * K)[None, :]
            old_col, new_col = (offset + old)[..., None], offset[..., None] + new   # [B, c, 1], [B, c, K-1]
            # z_l with variable i moved from its class to the new one (comparisons, not scatters: vmap-able)
            z_alt = (z_l[:, None, None, :] - (columns == old_col[..., None]).to(z_l.dtype)
                     + (columns == new_col[..., None]).to(z_l.dtype))        # [B, c, K-1, W_l]
            wt_p = p_net.first.weight.T                                      # [W_l, h_p]
            alt_p = pre_p[:, None, None, :] + (wt_p[new_col] - wt_p[old_col])
            alt_q = None
            if q_net is not None:
                wt_q = q_net.first.weight.T
                alt_q = pre_q[:, None, None, :] + (wt_q[new_col] - wt_q[old_col])
            upper = _upper_terms(model, l, below[:, None, None, :], z_alt, alt_p, alt_q, [n[:, None] for n in noise])
            # by class: class k is shift (k - old) mod K, and shift 0 (the sampled class) has difference 0
            padded = torch.cat([torch.zeros_like(upper[..., :1]), upper - base[:, None, None]], -1)   # [B, c, K]
            parts.append(torch.gather(padded, -1, (torch.arange(K, device=x.device) - old[..., None]) % K))
        delta = torch.cat(parts, 1)                                          # [B, H, K]
        out.append(delta)
    return out
