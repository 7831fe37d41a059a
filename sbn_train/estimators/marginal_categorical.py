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
  On the CPU, a layer whose reading nets are all linear takes a faster route (:func:`_layer_deltas_linear`):
  every class of every variable comes from products with exp tables of the centred weight columns (a
  factor per row and variable times one per variable and class, :class:`_LinearReader`), the re-drawn
  layer above is drawn and its entropy summed without an exp per alternative (:func:`_resimulated`), and
  its moved rows take the top layer's own differences (one variable moved), sums of columns (several), or
  the dense scoring (deeper models). Range checks read values back, so the device route keeps the rank-2
  pass; where a check fails the layer falls back to it as well.
"""
from __future__ import annotations

import torch
from torch import Tensor

import functools
import math

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


# ----- the CPU route for linear nets: every class of a variable from one small product per block -----------

# e^-margin below the largest entry of a softmax block is beneath the dtype's rounding: entries further down
# are raised to that level (changing the block's sum by less than a rounding error), which bounds the
# exponents the exp tables must hold
_MARGIN = {torch.float32: 20.0, torch.float64: 40.0}


# entries per chunk of the re-drawn layer's [K2, c, K, J, B] products: about 1 MB in float32, cache-sized
_CACHE_ELEMENTS = 1 << 18


class _LinearReader:
    """A linear map ``pre = W z_l + b`` reading a categorical layer z_l (H variables of K classes) at the sample
    (classes ``old`` ``[B, H]``). Variable i moved from its class o to class k changes ``pre`` by
    W[:, iK + k] - W[:, iK + o]; with each variable's K columns centred (``wc`` ``[H, K, h]``, which leaves the
    differences as they are),

        e^(pre + W[:, iK + k] - W[:, iK + o]) = e^pre * e^-wc[i, o] * e^wc[i, k],

    a factor per (row, variable) times a factor per (variable, class): every class of every variable comes
    from products with the table ``exp(wc)``, and no exp, gather or product is run per alternative on more
    than the entries a term needs. ``usable`` is False when the exponents would leave the dtype's range."""

    def __init__(self, weight: Tensor, H: int, K: int, old: Tensor, pre: Tensor, block_read: bool):
        w = weight.T.contiguous().view(H, K, -1)                             # [H, K, h], h innermost
        self.wc = w - w.mean(1, keepdim=True)
        spread = w.amax(1) - w.amin(1)                                      # [H, h]: the largest change
        self.spread_max = float(spread.max()) if spread.numel() else 0.0
        dtype = weight.dtype
        # block terms hold e^(clamped pre - wc[i, o]) >= e^-(3 spread + margin); x's factors lie within e^spread
        need = 3 * self.spread_max + _MARGIN.get(dtype, 0.0) if block_read else self.spread_max
        self.usable = _exp_space_ok(need, dtype) and dtype in _MARGIN
        if not self.usable:
            return
        self.spread, self.H, self.K, self.old, self.pre = spread, H, K, old, pre
        self.table = self.wc.exp()                                           # [H, K, h]

    def at_sample(self, t: Tensor, start: int = 0) -> Tensor:
        """``[B, c, h]``: entry [i, o_i] of a per-(variable, class) tensor ``t`` ``[c, K, h]`` (variables
        ``start`` to ``start + c``) for every row."""
        c = t.shape[0]
        old = self.old[:, start:start + c]
        return t.reshape(c * self.K, -1).index_select(0, (old + self.K * torch.arange(
            c, device=old.device)).view(-1)).view(*old.shape, -1)

    def class_term(self, v: Tensor) -> Tensor:
        """``[B, H, K]``: the change of v . pre for a ``v`` ``[B, h]`` that does not move (x, or the
        layer below): v . (W[:, iK + k] - W[:, iK + o])."""
        vw = (v @ self.wc.reshape(self.H * self.K, -1).T).view(-1, self.H, self.K)
        return vw - torch.gather(vw, -1, self.old[..., None])

    def bernoulli_change(self, chunk: int) -> Tensor:
        """``[B, H, K]``: sum_d softplus(pre' - pre) over x's units, as sums of log((1 - s) + s e^-wc_o e^wc_k)
        (s = sigmoid(pre); each factor within e^spread) by a log per group of entries."""
        D = self.pre.shape[-1]
        group = _largest_group(D, self.wc.dtype, functools.partial(_column_group_max, self.spread.T.contiguous()))
        one_minus_s, s = torch.sigmoid(-self.pre)[:, None, None, :], torch.sigmoid(self.pre)[:, None, :]
        inverse = self.table.reciprocal()
        out = torch.empty(self.pre.shape[0], self.H, self.K, dtype=self.pre.dtype, device=self.pre.device)
        buffer = torch.empty(self.pre.shape[0], min(chunk, self.H), self.K, D, dtype=self.pre.dtype,
                             device=self.pre.device)                         # reused: no page faults per chunk
        for a in range(0, self.H, chunk):
            e = min(self.H, a + chunk)
            scaled = s * self.at_sample(inverse[a:e], a)                     # s e^-wc[i, o], [B, c, D]
            f = torch.addcmul(one_minus_s, scaled[:, :, None, :], self.table[None, a:e], out=buffer[:, :e - a])
            out[:, a:e] = _sum_log(f, group)                                 # f [B, c, K, D]
        return out

    def blocks(self, K2: int):
        """For a ``pre`` read as softmax blocks of K2 (J blocks): (log g and g ``[B, H, J, K2]``, table
        ``[H, K, J, K2]``, s0 ``[B, J]``, n0 ``[B, J]``) with g = e^(shifted - wc[i, o]), shifted = pre less its
        block max (raised to -(2 spread + margin)), s0 = sum e^shifted and n0 = sum e^shifted * shifted: the
        alternative (i, k) has block sums sum_m table[i, k, j, m] g[b, i, j, m]."""
        B, h = self.pre.shape
        J = h // K2
        a = self.pre.view(B, J, K2)
        shifted = (a - a.amax(-1, keepdim=True)).clamp_min_(-(2 * self.spread_max + _MARGIN[a.dtype]))
        log_g = shifted.view(B, 1, h) - self.at_sample(self.wc)              # [B, H, h]
        e0 = shifted.exp()
        return (log_g.view(B, self.H, J, K2), log_g.exp().view(B, self.H, J, K2),
                self.table.view(self.H, self.K, J, K2), e0.sum(-1), (e0 * shifted).sum(-1))


def _block_sums(table: Tensor, g: Tensor) -> Tensor:
    """sum_m table[i, k, j, m] g[b, i, j, m], ``[H, J, K, B]``, as one batched product over (i, j) (an
    einsum takes several times longer here)."""
    H, K, J, K2 = table.shape
    B = g.shape[0]
    return torch.bmm(table.permute(0, 2, 1, 3).reshape(H * J, K, K2),
                     g.permute(1, 2, 3, 0).reshape(H * J, K2, B)).view(H, J, K, B)


def _resimulated(reader: _LinearReader, K2: int, u: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """The layer a linear inference net draws from z_l, at every class of every variable of z_l, re-drawn
    from the same uniforms ``u`` ``[B, J]``: (classes ``[B, H, K, J]``, the change of its entropy ``[B, H, K]``).

    With P_m = g_m table_m = e^(pre'_m - max) for the K2 entries m of a block, the entropy log S - N / S
    (S = sum P, N = sum P_m a'_m, a' = log g + wc[i, k]) comes from batched products over (variable, block)
    pairs. The class is the number of m < K2 - 1 with sum_{m' <= m} P_m' <= u S: the P are laid out with m
    outermost and the rows innermost, so the cumulative sums run over contiguous rows, in chunks of
    ``chunk`` variables of z_l."""
    log_g, g, table, s0, n0 = reader.blocks(K2)                              # [B, H, J, K2], [H, K, J, K2]
    H, K, (B, J) = reader.H, reader.K, u.shape
    s = _block_sums(table, g)                                                # [H, J, K, B]
    n = _block_sums(table, g * log_g) + _block_sums(table * reader.wc.view(table.shape), g)
    entropy = (s.log() - n / s).sum(1).permute(2, 0, 1) - (s0.log() - n0 / s0).sum(-1)[:, None, None]
    point = (s * u.T[None, :, None, :]).permute(0, 2, 1, 3).contiguous()     # u S, [H, K, J, B]
    g = g.permute(3, 1, 2, 0).contiguous()                                   # [K2, H, J, B]
    table = table.permute(3, 0, 1, 2).contiguous()[..., None]                # [K2, H, K, J, 1]
    classes = torch.empty(H, K, J, B, dtype=torch.uint8 if K2 < 256 else torch.int64, device=u.device)
    p = torch.empty(K2 - 1, min(chunk, H), K, J, B, dtype=g.dtype, device=g.device)   # reused
    for a in range(0, H, chunk):
        e = min(H, a + chunk)
        cum = torch.mul(table[:-1, a:e], g[:-1, a:e, None], out=p[:, :e - a])   # [K2-1, c, K, J, B]
        for m in range(1, K2 - 1):                                           # cumulative sums, in place
            cum[m].add_(cum[m - 1])
        below = (cum <= point[a:e]).view(torch.uint8)                        # the class: how many are below
        torch.sum(below, 0, dtype=classes.dtype, out=classes[a:e])
    return classes.permute(3, 0, 1, 2).contiguous().long(), entropy


def _moved(fam: Categorical, z: Tensor, b: Tensor, i: Tensor, k: Tensor) -> Tensor:
    """Rows ``b`` of the one-hot layer ``z`` with variable ``i`` set to class ``k`` (``[n, H*K]``)."""
    moved = fam.blocks(z[b]).clone()
    moved[torch.arange(b.shape[0], device=z.device), i] = (k[:, None] == torch.arange(
        fam.classes, device=z.device)).to(z.dtype)
    return moved.flatten(-2)


def _changed_dense(model: SBN, l: int, zs: list[Tensor], noise: list[Tensor], classes: Tensor,
                   b: Tensor, i: Tensor, k: Tensor, base: Tensor) -> Tensor:
    """The terms of F from log p(z_l | z_{l+1}) up, less their value at the sample, ``[n]``, for the
    alternatives (b, i, k) whose re-drawn layer l+1 took ``classes`` ``[n, H_{l+1}]``: scored densely, with
    the layers above re-drawn from the same uniforms; ``base`` ``[B]`` is their value at the sample
    (:func:`_upper_terms` of layer l+1)."""
    fam, L = model.family, model.n_layers
    z_new = fam.one_hot(classes, zs[l].dtype)                                # [n, W_{l+1}]
    value = model.log_prob_below(l, _moved(fam, zs[l - 1], b, i, k), model.p_nets[l](z_new))
    if l + 1 == L:
        value = value + fam.log_prob(z_new, model.prior_logits)
    else:
        value = value + _above(model, l + 1, z_new, model.q_logits(l + 2, z_new), [n[b] for n in noise])
    return value - base[b]


class _TopChanges:
    """:func:`_changed_dense` where layer l+1 is the top and the net p_l reading it is linear. The re-drawn top
    layer changes in few variables j, which move layer l's logits by
    cols = sum_j W[:, jK + new_j] - W[:, jK + old_j] (one sum of gathered rows per alternative: an embedding
    bag with weights +-1); the block sums then cost one exp per entry. A call returns None if the changes
    leave the exp range (the caller then scores those rows densely)."""

    def __init__(self, model: SBN, l: int, old: Tensor, up_old: Tensor, logits: Tensor):
        """``old`` ``[B, H]`` and ``up_old`` ``[B, J]``: the classes of layers l and l+1 at the sample;
        ``logits`` ``[B, H, K]``: layer l's generative logits there."""
        fam = model.family
        self.K, self.H, self.J = fam.classes, model.latent_sizes[l - 1], model.latent_sizes[l]
        self.old, self.up_old, self.logits = old, up_old, logits
        self.wt = model.p_nets[l].first.weight.T.contiguous()                # [J*K, H*K]
        self.shifted = (self.logits - self.logits.amax(-1, keepdim=True)).flatten(-2)   # [B, H*K]
        self.log_s0 = self.shifted.exp().view(-1, self.H, self.K).sum(-1).log_().sum(-1)   # [B]
        self.prior = torch.log_softmax(fam.blocks(model.prior_logits), -1).flatten(-2)   # [J*K]

    def __call__(self, classes: Tensor, b: Tensor, i: Tensor, k: Tensor) -> Tensor | None:
        K, H, J = self.K, self.H, self.J
        n = b.shape[0]
        # alternatives of one row whose top layer took the same classes share the top's terms: those are
        # computed once per distinct (row, classes), found by a hash and then checked entry by entry
        inverse, first = _distinct_rows(torch.cat([b[:, None], classes], 1))
        ub, uclasses = b.index_select(0, first), classes.index_select(0, first)
        up_old = self.up_old.index_select(0, ub)                             # [u, J]
        at = (uclasses != up_old).view(-1).nonzero().squeeze(1)              # the changed variables, row by row
        r, j = at // J, at % J
        new, gone = j * K + uclasses.view(-1)[at], j * K + up_old.view(-1)[at]
        index = torch.stack([new, gone], 1).view(-1)
        sign = torch.tensor([1.0, -1.0], dtype=self.wt.dtype, device=b.device).repeat(at.shape[0])
        counts = torch.bincount(r, minlength=ub.shape[0])
        offsets = (torch.cumsum(counts, 0) - counts) * 2
        cols = torch.nn.functional.embedding_bag(index, self.wt, offsets, mode="sum", per_sample_weights=sign)
        lo, hi = torch.aminmax(cols)
        if not _exp_space_ok(max(-float(lo), float(hi)) + math.log(K), cols.dtype):
            return None
        at_sample = torch.gather(cols.view(-1, H, K), -1, self.old.index_select(0, ub)[..., None]).sum((-2, -1))
        prior_change = torch.zeros(ub.shape[0], dtype=cols.dtype, device=b.device).index_add_(
            0, r, self.prior[new] - self.prior[gone])
        flat, logits = cols.view(-1), self.logits.reshape(-1)
        o = self.old.view(-1)[b * H + i]
        # the change of sum_blocks logit(class), z_l with variable i moved from o to k
        picked = (logits[(b * H + i) * K + k] - logits[(b * H + i) * K + o] + at_sample.index_select(0, inverse)
                  + flat[inverse * (H * K) + i * K + k] - flat[inverse * (H * K) + i * K + o])
        s = torch.add(self.shifted.index_select(0, ub), cols, out=cols).exp_().view(-1, H, K).sum(-1)   # [u, H]
        top = prior_change - (s.log_().sum(-1) - self.log_s0.index_select(0, ub))
        return picked + top.index_select(0, inverse)


def _distinct_rows(rows: Tensor) -> tuple[Tensor, Tensor]:
    """(inverse ``[n]``, first ``[u]``) for non-negative integer rows ``rows`` ``[n, w]``: row r equals row
    ``first[inverse[r]]``. Rows are told apart by a linear hash with fixed random weights below 2^40 (no
    overflow while w * max(rows) < 2^23), and every row is then compared with its representative: on a
    collision, or past that bound, each row stands for itself."""
    n, w = rows.shape
    alone = torch.arange(n, device=rows.device)
    if not n or w * int(rows.max()) >= 1 << 23:
        return alone, alone
    weights = torch.randint(0, 1 << 40, (w,), generator=torch.Generator().manual_seed(0)).to(rows.device)
    keys = (rows * weights).sum(1)
    _, inverse = torch.unique(keys, return_inverse=True)
    first = torch.empty(int(inverse.max()) + 1, dtype=torch.int64, device=rows.device).scatter_(0, inverse, alone)
    if not bool((rows.index_select(0, first).index_select(0, inverse) == rows).all()):
        return alone, alone
    return inverse, first


def _one_top_move(weight: Tensor, K: int, top_delta: Tensor, classes: Tensor, moves: Tensor, old: Tensor,
                  up_old: Tensor, upper: Tensor) -> None:
    """Adds to ``upper`` ``[B, H, K]`` the top layer's terms at the alternatives (b, i, k) whose re-drawn top
    layer moved in one variable j, to class c (``moves`` ``[B, H, K, J]``, one True per such row). D_{L, j, c}
    (``top_delta``) holds the top's terms with layer l at the sample, and z'_l differs from z_l in variable i
    only, so log p(z'_l | z'_L) - log p(z_l | z'_L) is the change of one block's logit: the sample's (already
    in ``upper``) plus W[iK+k, jK+c] - W[iK+k, jK+o_j] - (the same at o_i), ``weight`` W of the top's
    generative net."""
    B, H, _, J = moves.shape
    at = moves.view(-1).nonzero().squeeze(1)                                 # flat (b, i, k, j)
    if not at.numel():
        return
    row, j = at // J, at % J                                                 # row: flat (b, i, k)
    b, i, k = row // (H * K), row // K % H, row % K
    c, c_old, o = classes.view(-1)[at], up_old.view(-1)[b * J + j], old.view(-1)[b * H + i]
    w, width = weight.view(-1), weight.shape[1]
    top = top_delta.reshape(-1)[(b * J + j) * K + c]
    upper.view(-1)[row] += (top + w[(i * K + k) * width + j * K + c] - w[(i * K + k) * width + j * K + c_old]
                            - w[(i * K + o) * width + j * K + c] + w[(i * K + o) * width + j * K + c_old])


def _linear_route(model: SBN, l: int, route: str) -> bool:
    """Whether layer l's differences can take the CPU route for linear nets: every net that reads z_l is
    linear, and the pass may read values back (the range checks)."""
    L = model.n_layers
    return (not on_device_route(model.prior_logits, route) and model.p_nets[l - 1].is_linear
            and (l == L or model.q_nets[l].is_linear))


def _layer_deltas_linear(model: SBN, l: int, x: Tensor, zs: list[Tensor], noise: list[Tensor],
                         max_elements: int, top_delta: Tensor | None = None) -> Tensor | None:
    """D_{l,i,k} ``[B, H, K]`` for a layer whose readers are linear, or None where a range check fails.

    D = [log p(below | z') - log p(below | z)] + [H(q_{l+1}(. | z')) - H(q_{l+1}(. | z))]
        + [terms of the layers above, re-drawn] - [the same at the sample]

    The first two come from :class:`_LinearReader` and :func:`_resimulated`. Where the re-drawn layer l+1
    keeps its classes, the third is log p(z'_l | z_{l+1}) - log p(z_l | z_{l+1}), a gathered difference.
    Where it moved in one variable of the top layer, the top's own differences ``top_delta`` (D_L) give it
    (:func:`_one_top_move`); in several, sums of the top's generative columns (:class:`_TopChanges`); below
    a deeper top, or out of exp range, the alternatives are scored densely with the layers above re-drawn
    (:func:`_changed_dense`). At the top layer the third is the prior's gathered difference."""
    fam, L = model.family, model.n_layers
    K, H, B = fam.classes, model.latent_sizes[l - 1], x.shape[0]
    z_l, below = zs[l - 1], ([x] + zs)[l - 1]
    old = fam.blocks(z_l).argmax(-1)                                         # [B, H]
    p_net = model.p_nets[l - 1]
    p_reader = _LinearReader(p_net.first.weight, H, K, old, p_net.first(z_l), block_read=l > 1)
    if not p_reader.usable:
        return None
    q_reader = None
    if l < L:
        q_net = model.q_nets[l]
        q_reader = _LinearReader(q_net.first.weight, H, K, old, q_net.first(z_l), block_read=True)
        if not q_reader.usable:
            return None
    D_below = below.shape[-1]
    if l == 1:
        chunk = max(1, min(H, max_elements // max(1, B * K * D_below)))
        delta = p_reader.class_term(x) - p_reader.bernoulli_change(chunk)
    else:
        _, g, table, s0, _ = p_reader.blocks(K)
        s = _block_sums(table, g)                                            # [H, J, K, B]
        delta = p_reader.class_term(below) - (s.log().sum(1).permute(2, 0, 1) - s0.log().sum(-1)[:, None, None])
    if q_reader is None:                                                     # the top layer: its prior
        prior = torch.log_softmax(fam.blocks(model.prior_logits), -1)        # [H, K]
        delta = delta + (prior[None] - torch.gather(prior.expand(B, H, K), -1, old[..., None]))
    else:
        z_up = zs[l]
        J = model.latent_sizes[l]
        up_old = fam.blocks(z_up).argmax(-1)                                # [B, J]
        chunk = max(1, min(H, _CACHE_ELEMENTS // (B * K * J * K)))
        classes, entropy = _resimulated(q_reader, K, noise[l], chunk)   # [B, H, K, J], [B, H, K]
        logits_l = fam.blocks(model.p_nets[l](z_up))                        # [B, H, K]: p(z_l | z_{l+1})
        log_p = torch.log_softmax(logits_l, -1)
        upper = log_p - torch.gather(log_p, -1, old[..., None])
        moves = classes != up_old[:, None, None, :]                          # [B, H, K, J]
        count = moves.sum(-1, dtype=torch.uint8) if J < 256 else moves.sum(-1)
        count.masked_fill_(old[..., None] == torch.arange(K, device=x.device), 0)   # the sampled class
        if top_delta is not None:
            _one_top_move(model.p_nets[l].first.weight, K, top_delta, classes, moves & (count == 1)[..., None],
                          old, up_old, upper)
            count.masked_fill_(count == 1, 0)
        rows = count.view(-1).nonzero().squeeze(1)                           # flat (b, i, k)
        if rows.numel():
            base = _upper_terms(model, l + 1, x, zs, noise)                  # [B]
            step = max(1, max_elements // max(1, model.sizes[l] + max(model.sizes[l:])))
            top = (_TopChanges(model, l, old, up_old, logits_l) if l + 1 == L and model.p_nets[l].is_linear
                   else None)
            for a in range(0, rows.shape[0], step):
                row = rows[a:a + step]
                b, i, k = row // (H * K), row // K % H, row % K
                moved = classes.view(-1, J).index_select(0, row)             # [n, J]
                value = top(moved, b, i, k) if top is not None else None
                if value is None:
                    value = _changed_dense(model, l, zs, noise, moved, b, i, k, base)
                upper.view(-1)[row] = value
        delta = delta + entropy + upper
    sampled = old[..., None] == torch.arange(K, device=x.device)
    return delta.contiguous().masked_fill_(sampled, 0.0)                     # 0 at the sampled class


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
      from the same uniforms and scored densely.

    On the CPU route, layers whose reading nets are linear take :func:`_layer_deltas_linear` instead (the
    same numbers, to rounding). Layers are taken from the top down, so that the top layer's differences
    serve the layer below it."""
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
    out = {}
    for l in range(L, 0, -1):                                                # top down: D_L serves layer L-1
        H = model.latent_sizes[l - 1]
        if _linear_route(model, l, route):
            top_delta = out[L] if l + 1 == L and model.p_nets[l].is_linear else None
            delta = _layer_deltas_linear(model, l, x, zs, noise, max_elements, top_delta)
            if delta is not None:
                out[l] = delta
                continue
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
        out[l] = torch.cat(parts, 1)                                         # [B, H, K]
    return [out[l] for l in range(1, L + 1)]
