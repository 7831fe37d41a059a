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

import functools

from ..models import SBN, Categorical, softplus
from .base import DEFAULT_MAX_ELEMENTS
from .flip_common import _column_group_max, _exp_space_ok, _largest_group, _sum_log, on_device_route

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


def _above(model: SBN, l: int, z: Tensor, logits: Tensor, noise: list[Tensor],
           moved: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """sum_{m > l} [log p(z_{m-1} | z_m) + H(q(. | z_{m-1}))] + log p(z_L) for layer l (1-based, below the top)
    at the configurations ``z`` [..., W_l], given the q logits of layer l+1 that ``z`` gives; the layers above
    are re-drawn from ``noise`` (each broadcasting against the configurations' leading dims). ``moved`` =
    (old, new) columns ``[...]``: the configurations are ``z`` (the sample, broadcasting) with each one's
    variable moved from column old to column new, scored without building them."""
    fam, L = model.family, model.n_layers
    total = 0
    for m in range(l + 1, L + 1):
        if m > l + 1:
            logits = model.q_nets[m - 1](z)
        log_q = torch.log_softmax(fam.blocks(logits), -1)                   # shared by entropy and sample
        total = total - (log_q.exp() * log_q).sum((-2, -1))
        u = noise[m - 1].expand(*logits.shape[:-1], noise[m - 1].shape[-1])
        z_next = fam.one_hot(fam.index_from_log_probs(u, log_q), logits.dtype)   # as fam.sample draws it
        log_p = torch.log_softmax(fam.blocks(model.p_nets[m - 1](z_next)), -1).flatten(-2)
        if m == l + 1 and moved is not None:
            old, new = moved
            total = total + ((z * log_p).sum(-1) + torch.gather(log_p, -1, new[..., None]).squeeze(-1)
                             - torch.gather(log_p, -1, old[..., None]).squeeze(-1))
        else:
            total = total + (z * log_p).sum(-1)
        z = z_next
    return total + fam.log_prob(z, model.prior_logits)


def _upper_terms(model: SBN, l: int, x: Tensor, zs: list[Tensor], noise: list[Tensor]) -> Tensor:
    """The terms of F that depend on layer l (1-based) or the layers above it, at the sample, ``[B]``:
    log p(z_{l-1} | z_l) + sum_{m > l} [log p(z_{m-1} | z_m) + H(q(. | z_{m-1}))] + log p(z_L)."""
    below, z = ([x] + zs)[l - 1], zs[l - 1]
    first = model.log_prob_below(l - 1, below, model.p_nets[l - 1](z))
    if l == model.n_layers:
        return first + model.family.log_prob(z, model.prior_logits)
    return first + _above(model, l, z, model.q_logits(l + 1, z), noise)


def _change_table(weight: Tensor, H: int, K: int) -> Tensor:
    """``[H*K*(K-1), h]``: row (i*K + o)*(K-1) + j-1 is W[:, i*K + (o+j) mod K] - W[:, i*K + o], the change of a
    net's first-layer pre-activations when variable i moves from class o by j (``weight`` ``[h, H*K]``)."""
    wt = weight.T.reshape(H, K, -1)                                          # [H, K, h]
    o = torch.arange(K, device=weight.device)
    new = (o[:, None] + torch.arange(1, K, device=weight.device)) % K        # [K, K-1]
    return (wt[:, new] - wt[:, o, None]).reshape(H * K * (K - 1), -1)


class _ExpChange:
    """For x's log-likelihood under a linear net: with s = sigmoid(pre) and e = exp(T[row]) (T the change
    table), softplus(pre + T[row]) - softplus(pre) = log(1 - s + s e), each factor in [e^-|T|, e^|T|], so the
    sum over D is a multiply-add per entry and a log per group of entries whose product stays in range (the
    binary flip pass's exp-space route, :mod:`.marginal_fast`). ``usable`` is False where the range check
    fails, and on the device route (the check reads a value back to the host)."""

    def __init__(self, table: Tensor, pre: Tensor, route: str):
        self.usable = False
        if on_device_route(pre, route):
            return
        t_abs = table.abs()
        if not _exp_space_ok(float(t_abs.max()) if table.numel() else 0.0, table.dtype):
            return
        self.usable = True
        self.group = _largest_group(table.shape[1], table.dtype,
                                    functools.partial(_column_group_max, t_abs.T.contiguous()))
        self.exp = table.exp()                                               # [rows, D]
        self.sig, self.one_minus_sig = torch.sigmoid(pre)[:, None, :], torch.sigmoid(-pre)[:, None, :]

    def softplus_change(self, change: Tensor) -> Tensor:
        """sum_d softplus(pre + T[change]) - softplus(pre), ``change`` ``[B, c, K-1]`` of table rows."""
        B, c, k = change.shape
        e = self.exp[change.view(B, c * k)]                                   # [B, c*(K-1), D]
        return _sum_log(torch.addcmul(self.one_minus_sig, self.sig, e, out=e), self.group).view(B, c, k)


@torch.no_grad()
def categorical_deltas(model: SBN, x: Tensor, zs: list[Tensor], uniforms: list[Tensor],
                       max_elements: int | None = None, route: str = "auto") -> list[Tensor]:
    """D_{l,i,k} as :func:`categorical_deltas_reference`, one ``[B, H_l, K]`` per layer, computed with rank-2
    updates of the first layers of the nets that read layer l, in chunks of variables whose largest
    temporary has at most ``max_elements`` entries.

    Per layer l and alternative (variable i moved from its class o by j = 1..K-1):
    - the generative net below: pre-activations pre + T[i, o, j] (:func:`_change_table`), then its MLP tail
      and the log-likelihood of the layer below; for x under a linear net, x . logits is x . pre plus a
      gathered entry of x T^T, so only the softplus sum runs over the [B, alternatives, D] entries;
    - the top layer's prior: a gathered difference of its log-softmax;
    - below the top, the inference net of layer l+1 likewise (rank-2), then the layers above re-drawn
      from the same uniforms and scored densely."""
    fam = _family(model)
    K, B, L = fam.classes, x.shape[0], model.n_layers
    max_elements = max_elements or DEFAULT_MAX_ELEMENTS
    noise = [fam.prepare(u) for u in uniforms]
    def widest(l: int) -> int:
        """The widest last dim of a layer-l alternative's temporaries: the layer below and the layers above,
        and every layer of the nets that run on the alternatives."""
        nets = [model.p_nets[l - 1]] + [model.q_nets[m] for m in range(l, L)] + [model.p_nets[m] for m in range(l, L)]
        return max(model.sizes[l - 1:] + [m.out_features for net in nets for m in net.modules()
                                          if isinstance(m, torch.nn.Linear)])

    shift = torch.arange(1, K, device=x.device)                              # the K - 1 other values
    out = []
    for l, H in enumerate(model.latent_sizes, start=1):
        z_l, below = zs[l - 1], ([x] + zs)[l - 1]
        p_net, q_net = model.p_nets[l - 1], (model.q_nets[l] if l < L else None)
        base = _upper_terms(model, l, x, zs, noise)                          # [B]
        pre_p = p_net.first(z_l)                                             # [B, h_p]
        table_p = _change_table(p_net.first.weight, H, K)
        direct = l == 1 and p_net.is_linear                                  # x . logits by a gathered product
        if direct:
            x_table = x @ table_p.T                                          # [B, H*K*(K-1)]
            exp_route = _ExpChange(table_p, pre_p, route)
            if exp_route.usable:
                first_base = model.log_prob_below(0, x, pre_p)               # [B]
            else:
                x_pre = (x * pre_p).sum(-1)                                  # [B]
        if q_net is not None:
            pre_q, table_q = q_net.first(z_l), _change_table(q_net.first.weight, H, K)
        else:
            prior = torch.log_softmax(fam.blocks(model.prior_logits), -1).flatten(-2)   # [W_L]
        cls = fam.blocks(z_l).argmax(-1)                                     # [B, H]
        chunk = max(1, min(H, max_elements // max(1, B * (K - 1) * widest(l))))
        parts = []
        for a in range(0, H, chunk):
            e = min(H, a + chunk)
            old = cls[:, a:e]                                                # [B, c]
            rows = ((torch.arange(a, e, device=x.device) * K)[None, :] + old)        # [B, c]: i*K + o
            change = rows[..., None] * (K - 1) + (shift - 1)                 # [B, c, K-1]: rows of the tables
            if direct:
                x_change = torch.gather(x_table, 1, change.flatten(1)).view(change.shape)   # x . T[row]
                if exp_route.usable:
                    upper = first_base[:, None, None] + x_change - exp_route.softplus_change(change)
                else:
                    alt_p = pre_p[:, None, None, :] + table_p[change]        # [B, c, K-1, h_p]
                    upper = x_pre[:, None, None] + x_change - softplus(alt_p).sum(-1)
            else:
                alt_p = pre_p[:, None, None, :] + table_p[change]
                upper = model.log_prob_below(l - 1, below[:, None, None, :], p_net.tail(alt_p))
            new_col = rows[..., None] - old[..., None] + (old[..., None] + shift) % K   # [B, c, K-1]: i*K + new
            if q_net is None:                                                # the top layer: its prior
                upper = upper + (model.family.log_prob(z_l, model.prior_logits)[:, None, None]
                                 + prior[new_col] - prior[rows][..., None])
            else:
                # the alternatives are z_l with variable i moved from column rows to column new_col
                logits = q_net.tail(pre_q[:, None, None, :] + table_q[change])
                upper = upper + _above(model, l, z_l[:, None, None, :], logits, [n[:, None, None, :] for n in noise],
                                       moved=(rows[..., None].expand_as(new_col), new_col))
            # by class: class k is shift (k - old) mod K, and shift 0 (the sampled class) has difference 0
            padded = torch.cat([torch.zeros_like(upper[..., :1]), upper - base[:, None, None]], -1)   # [B, c, K]
            parts.append(torch.gather(padded, -1, (torch.arange(K, device=x.device) - old[..., None]) % K))
        out.append(torch.cat(parts, 1))                                      # [B, H, K]
    return out
