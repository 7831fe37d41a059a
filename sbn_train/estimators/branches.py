"""Pieces shared by the estimators that evaluate the learning signal on more than one configuration.

- :func:`downstream_signals`: each layer's downstream learning signal (the one the likelihood-ratio
  estimators use) from the per-layer terms of a sample; :func:`layer_signal`: the same for one layer at
  any configuration.
- :func:`resimulate`: a branch that replaces layer l and re-draws the layers above from the SAME
  uniforms (common random numbers), as the antithetic and marginal estimators need.
- :func:`flipped_log_prob`: log-probabilities of a conditional with each input unit flipped in turn.
- :func:`sample_layers`: the sampled configuration with its per-layer logits and log-terms, the
  starting point of every estimator here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..models import SBN, Conditional, bernoulli_log_prob, softplus
from .base import DEFAULT_MAX_ELEMENTS
from .flip_common import on_device_route
from .marginal_fast import _FlipTable, flip_log_prob_change


@dataclass
class Sample:
    """One draw z ~ q(. | x) with the quantities every estimator needs."""
    uniforms: list[Tensor]     # u_l, [B, H_l] (one per variable)
    lus: list[Tensor]          # the family's prepared uniforms (logit(u_l) for bits, u_l for categorical)
    zs: list[Tensor]           # z_l, the layer's encoding: {0, 1} bits [B, H_l], or one-hot blocks [B, H_l*K]
    parents: list[Tensor]      # z_{l-1} (x for l = 1), [B, width of layer l-1]
    q_logits: list[Tensor]     # a_l = logits of q(z_l | z_{l-1}), [B, width of layer l]; gradients reach phi
    log_p: list[Tensor]        # [log p(z_{l-1} | z_l) for l = 1..L] + [log p(z_L)], each [B]; reach theta
    log_q: list[Tensor]        # log q(z_l | z_{l-1}), each [B]; reach phi


def sample_layers(model: SBN, x: Tensor, generator: torch.Generator | None) -> Sample:
    """Ancestral sampling as ``model.sample_q`` (same uniforms, same values); each layer's logits are
    computed once and kept with their gradients."""
    fam = model.family
    uniforms = model.draw_uniforms(x.shape[0], generator, x.device, x.dtype)
    lus = [fam.prepare(u) for u in uniforms]
    zs, q_logits, parent = [], [], x
    for l, lu in enumerate(lus, start=1):
        q_logits.append(model.q_logits(l, parent))                  # [B, H_l], reaches phi
        parent = fam.sample(lu, q_logits[-1].detach())
        zs.append(parent)
    log_q = [fam.log_prob(z, a) for z, a in zip(zs, q_logits)]
    return Sample(uniforms, lus, zs, [x] + zs[:-1], q_logits, model.log_p_layers(x, zs), log_q)


def downstream_signals(log_p: list[Tensor], log_q: list[Tensor]) -> list[Tensor]:
    """Detached [s_1, ..., s_L], s_l = log p(z_L) + sum_{k >= l} [log p(z_{k-1} | z_k) - log q(z_k | z_{k-1})],
    from log_p = [log p(z_0|z_1), ..., log p(z_{L-1}|z_L), log p(z_L)] and log_q = [log q(z_1|x), ...,
    log q(z_L|z_{L-1})], each ``[B]``. s_1 is the whole integrand log p(x, z) - log q(z | x)."""
    L = len(log_q)
    signals, acc = [None] * L, log_p[L].detach()
    for l in range(L - 1, -1, -1):
        acc = acc + (log_p[l] - log_q[l]).detach()
        signals[l] = acc
    return signals


@torch.no_grad()
def layer_signal(model: SBN, x: Tensor, zs: list[Tensor], l: int) -> Tensor:
    """s_l = log p(z_L) + sum_{k >= l} [log p(z_{k-1} | z_k) - log q(z_k | z_{k-1})], ``[B]`` (l is 1-based)."""
    below, fam = [x] + list(zs), model.family
    s = fam.log_prob(below[-1], model.prior_logits)
    for k in range(l, model.n_layers + 1):
        s = s + model.log_prob_below(k - 1, below[k - 1], model.p_nets[k - 1](below[k]))
        s = s - fam.log_prob(below[k], model.q_logits(k, below[k - 1]))
    return s


@torch.no_grad()
def resimulate(model: SBN, zs: list[Tensor], lus: list[Tensor], l: int, z_l: Tensor) -> list[Tensor]:
    """``zs`` with layer l (1-based) set to ``z_l`` and layers l+1..L re-drawn from the same ``lus``."""
    out = list(zs[:l - 1]) + [z_l]
    for k in range(l + 1, model.n_layers + 1):
        out.append(model.family.sample(lus[k - 1], model.q_logits(k, out[-1])))
    return out


@torch.no_grad()
def flipped_log_prob(net: Conditional, inp: Tensor, target: Tensor,
                     max_elements: int = DEFAULT_MAX_ELEMENTS, route: str = "auto") -> Tensor:
    """``[B, H]``: entry (b, i) = log Bern(target_b | sigmoid(net(inp_b with unit i flipped))), no gradient.

    ``inp`` is the net's binary input ``[B, H]`` (a latent layer; flipping unit i sets it to 1 - inp_i);
    ``target`` is ``[B, D]``. A flip moves the pre-activations of ``net.first`` by (1 - 2 inp_i) W[:, i],
    so the product over the other inputs is not redone; units go in chunks of at most ``max_elements``
    temporaries. For a linear net the changes come from the exp tables of the marginal estimator's fast
    path (no exp or log per entry).
    """
    # the check reads a value back to the host, a stall on a GPU: made on the CPU route only
    if not on_device_route(inp, route) and not bool(((inp == 0) | (inp == 1)).all()):
        raise ValueError("flipped_log_prob needs a binary input (a latent layer)")
    B, H = inp.shape
    if B == 0:
        return inp.new_zeros(inp.shape)
    pre = net.first(inp)                                        # [B, h]
    d = 1 - 2 * inp                                             # [B, H]: the change a flip makes
    width = max(pre.shape[-1], target.shape[-1])
    chunk = max(1, min(H, max_elements // max(1, B * width)))
    if net.is_linear:
        table = _FlipTable(net.first.weight, inp, route)
        if table.usable:                                        # exp-space route of the marginal estimator
            s, one_minus_s = torch.sigmoid(pre)[:, None, :], torch.sigmoid(-pre)[:, None, :]
            base = bernoulli_log_prob(target, pre)[:, None]     # [B, 1]
            v_w = target @ net.first.weight                     # [B, H]: target . W[:, i]
            out = torch.empty_like(d)
            scratch = torch.empty(B * chunk * pre.shape[-1], dtype=pre.dtype, device=pre.device)
            for a in range(0, H, chunk):
                e = min(H, a + chunk)
                out[:, a:e] = base + flip_log_prob_change(table, s, one_minus_s, v_w, d[:, a:e], a,
                                                          scratch[:B * (e - a) * pre.shape[-1]])
            return out
    base = (target * pre).sum(-1, keepdim=True) if net.is_linear else None       # [B, 1]
    out = []
    for s in range(0, H, chunk):
        w = net.first.weight[:, s:s + chunk].T                  # [c, h]
        flipped = torch.addcmul(pre[:, None, :], d[:, s:s + chunk, None], w[None])   # [B, c, h]
        if net.is_linear:   # target . logits' = target . pre + d_i (target . W[:, i]): a matrix product
            out.append(base + d[:, s:s + chunk] * (target @ w.T) - softplus(flipped).sum(-1))
        else:
            out.append(bernoulli_log_prob(target[:, None, :], net.tail(flipped)))  # [B, c]
    return torch.cat(out, 1)
