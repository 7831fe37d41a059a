"""The marginal estimator's per-unit differences at element-wise cost: :func:`flip_deltas` computes
the same Delta_{l,i} = F(z with z_{l,i} flipped) - F(z) as :func:`.marginal.flip_deltas_reference`, the
definition (checked to 1e-10 in float64 by tests/test_marginal_fast.py, on every route below). In
float32 both are exact up to rounding, with one caveat shared by any two ways of computing a logit: a
re-simulated unit whose logit lies within rounding of its uniform's threshold can be decided differently
(2 of 76,800 deltas in a float32 784-200-200-200 model with large weights; neither side closer to float64).

  * A flip changes the pre-activations of the first affine map of each net that reads layer l by
    d_i W[:, i] (d_i = 1 - 2 z_{l,i}): no matrix product over the flipped layer is redone. For a
    linear net, e^(pre + d_i W[:, i]) = e^pre e^(d_i W[:, i]), so the changes of its softplus and
    sigmoid terms come from a table of exp(+-W) with no exp per entry (:class:`_FlipTable`).
  * Only terms touching the flipped unit or its re-simulated descendants are evaluated; the
    log-likelihood terms of the exp-table route come out as differences from the sampled
    configuration (no cancellation of two large sums).
  * Re-simulated layers change in few units; these are found without a pass over every flipped
    logit (:func:`_first_resimulated`), and products with the changes cost B c K, K the number of
    units that change in any branch of an example (:class:`_Changes`).
  * Sums of logs are logs of products over groups of entries, as large as the dtype's range allows
    (:func:`_sum_log`): a log costs as much as a dozen multiplications here.
  * Units are processed in cache-sized chunks with reused scratch buffers (:class:`Workspace`).
  Each fast route checks its own range (exp of the weights, group sizes, number of changed units)
  and falls back to the direct computation when the check fails.

These checks and choices read values back to the host: cheap on a CPU, a stall of the stream on a GPU.
Tensors off the CPU therefore take the device route (:mod:`.marginal_device`), which reads nothing back;
the ``route`` argument (an estimator's ``route`` attribute) forces either route (the tests run the device
route on the CPU). What both routes share is in :mod:`.flip_common`.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..models import SBN, logit_of_uniform, softplus
from .flip_common import (CPU_MAX_ELEMENTS, DEVICE_MAX_ELEMENTS, ROUTES, SampleTerms, Workspace,  # noqa: F401
                          _column_group_max, _entropy_sum, _exp_space_ok, _largest_group, _log_prob_rank1,
                          _rank1_pre, _softplus_sum, _sum_log, _uniform_group, chunked_layer, on_device_route)
from .marginal_device import flip_deltas_device




def _softplus_shift_sum(s: Tensor, one_minus_s: Tensor, e: Tensor, group: int) -> Tensor:
    """sum_j [softplus(a_j + r_j) - softplus(a_j)] over the last dim, from s = sigmoid(a), 1 - s (both
    broadcasting) and e = exp(r), which it overwrites: (1 + e^(a+r)) / (1 + e^a) = (1 - s) + s e^r.

    A multiply-add per entry and a log per group of entries (:func:`_sum_log`), and the difference comes
    out directly instead of as the difference of two large sums. Each factor lies in [e^-|r|, e^|r|];
    ``group`` must keep products of that many in range (:func:`_largest_group`)."""
    return _sum_log(torch.addcmul(one_minus_s, s, e, out=e), group)


class _FlipTable:
    """For a linear map W ``[h, H]`` reading the flipped layer z ``[B, H]``: e^(d_i W[:, i]), d_i = 1 - 2 z_i,
    the factor by which a flip of input unit i multiplies e^pre (pre = W z + b), as rows of a table of
    exp(+-W[:, i]). With s = sigmoid(pre) the flipped map's softplus and sigmoid follow with no exp:

        softplus(pre + d_i W[:, i]) - softplus(pre) = log F,   sigmoid(pre + d_i W[:, i]) = s e / F,
        F = 1 - s + s e,   e = e^(d_i W[:, i]),   F in [e^-|W|, e^|W|].
    """

    def __init__(self, w: Tensor, z: Tensor, route: str | None = None):
        self.w = w
        if on_device_route(w, route):   # the range check would read a value back: callers go direct
            self.usable = False
            return
        w_abs = w.abs()
        self.usable = _exp_space_ok(float(w_abs.max()) if w.numel() else 0.0, w.dtype)
        if not self.usable:
            return
        self.group = _largest_group(w.shape[0], w.dtype, functools.partial(_column_group_max, w_abs))
        H = w.shape[1]
        self.table = torch.empty(2 * H, w.shape[0], dtype=w.dtype, device=w.device)   # row i + H z_i
        torch.exp(w.T, out=self.table[:H])
        torch.reciprocal(self.table[:H], out=self.table[H:])
        self.rows = torch.arange(H, device=z.device) + H * z.long()      # [B, H]

    def factors(self, d: Tensor, start: int, out: Tensor) -> Tensor:
        """e^(d_j W[:, start + j]) for the chunk's units, ``[B, c, h]``, into ``out``."""
        B, c = d.shape
        rows = self.rows[:, start:start + c].reshape(-1)
        return torch.index_select(self.table, 0, rows, out=out.view(B * c, -1)).view(B, c, -1)


def flip_log_prob_change(table: _FlipTable, sig: Tensor, one_minus_sig: Tensor, v_w: Tensor, d: Tensor,
                         start: int, out: Tensor) -> Tensor:
    """log Bern(v | map(z with unit start + j flipped)) - log Bern(v | map(z)) for the linear map of ``table``,
    ``[B, c]``, given sigmoid(pre) and sigmoid(-pre) ``[B, 1, h]``, v_w = v @ W ``[B, H]`` and scratch ``out``:

        d_j (v . W[:, j]) - sum_i log(1 - s_i + s_i e^(d_j W_ij))        (:func:`_softplus_shift_sum`)"""
    e = table.factors(d, start, out)
    return d * v_w[:, start:start + d.shape[1]] - _softplus_shift_sum(sig, one_minus_sig, e, table.group)


def _log_prob_change(table: _FlipTable, s: SampleTerms, l: int, d: Tensor, start: int, ws: Workspace) -> Tensor:
    """:func:`flip_log_prob_change` for the linear p_l and its target v = z_{l-1}."""
    B, c = d.shape
    return flip_log_prob_change(table, *s.p_sig(l), s.p_vw(l), d, start, ws.get("e", (B, c, table.w.shape[0]), d))


def _entropy_change(table: _FlipTable, s: SampleTerms, k: int, d: Tensor, start: int, ws: Workspace) -> Tensor:
    """sum_i H(q_k(z_k,i | z'_{k-1})) - H(q_k(z_k,i | z_{k-1})), ``[B, c]``, for the linear q_k after flipping
    unit start + j of layer k-1. With a = pre + d_j W[:, j] and H(a) = softplus(a) - a sigmoid(a):

        H(a) - H(pre) = log F - a sigmoid(a) + pre s

    (:class:`_FlipTable`): a gather, a few multiplications and a log per group, no exp or sigmoid."""
    B, c = d.shape
    h = table.w.shape[0]
    sig, one_minus_sig = s.q_sig(k)                                # [B, 1, h]
    e = table.factors(d, start, ws.get("e", (B, c, h), d))
    f = torch.addcmul(one_minus_sig, sig, e, out=ws.get("f", (B, c, h), d))
    flipped_sig = e.mul_(sig).div_(f)                              # sigmoid(a)
    w = table.w[:, start:start + c].T.contiguous()                 # [c, h]
    a = torch.addcmul(s.q_pre[k - 1][:, None, :], d[:, :, None], w[None], out=ws.get("a", (B, c, h), d))
    return _sum_log(f, table.group) - flipped_sig.mul_(a).sum(-1) + s.q_pre_sig(k)[:, None]


class _Changes:
    """dz = z'_k - z_k for a chunk of branches (entries in {-1, 0, 1}), ``[B, c, H]``.

    Sparse form: per example the units that change in any of its branches (``idx [B, K]``, padded with
    unchanged units) and their changes unit-major, ``units [B, K, c]`` = dz[b, :, idx[b]].T: products with
    dz then cost B c K instead of B c H multiply-adds. A flip re-simulates few units (on MNIST about 1-2%
    of the layer above), so K is mostly far below H. Dense form (``idx`` None): ``dz`` itself.
    (Unit-major, because a batched product with a row vector on the left is ten times faster than the
    matrix-vector product the other way round.)"""

    def __init__(self, dz: Tensor | None = None, idx: Tensor | None = None, units: Tensor | None = None):
        self.dz, self.idx, self.units = dz, idx, units

    @classmethod
    def from_dense(cls, dz: Tensor, scratch: Tensor) -> "_Changes":
        # sparse on the CPU only: on a GPU the dense product is cheap, and the size check would add a
        # host synchronization per chunk
        if dz.device.type == "cpu":
            B, c, H = dz.shape
            changed = torch.abs(dz, out=scratch).amax(1).ne_(0)   # [B, H]
            K = int(changed.sum(1).max())
            if 4 * K <= H:
                idx = torch.topk(changed.to(dz.dtype), K, dim=1, sorted=False).indices          # [B, K]
                units = torch.gather(dz, 2, idx[:, None, :].expand(B, c, K)).transpose(1, 2).contiguous()
                return cls(idx=idx, units=units)
        return cls(dz=dz)

    def max_count(self) -> float | None:
        """The most units any branch changes (sparse form only; None for the dense form)."""
        if self.idx is None:
            return None
        return float(self.units.abs().sum(1).max()) if self.units.numel() else 0.0

    def times(self, w_t: Tensor, out: Tensor) -> Tensor:
        """dz @ w_t, ``[B, c, h]``, for ``w_t [H, h]`` (a first-layer weight reading this layer, transposed
        and contiguous: gathering rows of the transpose view is ten times slower)."""
        if self.idx is None:
            B, c, H = self.dz.shape
            return torch.mm(self.dz.view(B * c, H), w_t, out=out.view(B * c, -1)).view(B, c, -1)
        B, K = self.idx.shape
        if K == 0:
            return out.zero_()
        rows = torch.index_select(w_t, 0, self.idx.reshape(-1)).view(B, K, -1)          # [B, K, h]
        return torch.bmm(self.units.transpose(1, 2), rows, out=out)

    def dot(self, v: Tensor) -> Tensor:
        """dz . v over the last dim, ``[B, c]``, for ``v [B, H]`` (one vector per example)."""
        if self.idx is None:
            return torch.bmm(v[:, None, :], self.dz.transpose(1, 2)).squeeze(1)
        return torch.bmm(v.gather(1, self.idx)[:, None, :], self.units).squeeze(1)

    def dot_rows(self, t: Tensor, scratch: Tensor) -> Tensor:
        """dz . t over the last dim, ``[B, c]``, for ``t [B, c, H]`` (one vector per branch)."""
        if self.idx is None:
            return torch.mul(self.dz, t, out=scratch).sum(-1)
        B, K, c = self.units.shape
        return (self.units * torch.gather(t, 2, self.idx[:, None, :].expand(B, c, K)).transpose(1, 2)).sum(1)


def _first_resimulated(q_net, s: SampleTerms, k: int, d: Tensor, start: int) -> _Changes | None:
    """Sparse changes of z'_k when layer k-1 = l had its units start..start+c-1 flipped (q_k linear),
    without a pass over all B c H_k flipped logits.

    A flip moves the logit of unit i by at most m_i = max_j |W_ij| over the flipped units, so only units
    with |logit(u_i) - a_i| <= m_i (plus rounding slack) can change; only their flipped logits are formed
    and compared with logit(u_i). None when too many units qualify, and off the CPU (then the dense path
    runs)."""
    if d.device.type != "cpu":
        return None
    w = q_net.first.weight[:, start:start + d.shape[1]]           # [H_k, c]
    m = w.abs().amax(1)                                            # [H_k]
    lu, pre, z = s.lus[k - 1], s.q_pre[k - 1], s.below[k]
    slack = 4 * torch.finfo(pre.dtype).eps * (lu.abs() + pre.abs() + m)
    maybe = (lu - pre).abs_().le_(m + slack)                       # [B, H_k]
    (B, c), H = d.shape, pre.shape[1]
    K = int(maybe.sum(1).max())
    if 4 * K > H:
        return None
    idx = torch.topk(maybe.to(pre.dtype), K, dim=1, sorted=False).indices                 # [B, K]
    # the candidates' logits, unit-major [B, K, c] (a short last dim makes element-wise ops crawl)
    w_k = torch.index_select(w.contiguous(), 0, idx.reshape(-1)).view(B, K, c)
    logits = torch.addcmul(pre.gather(1, idx)[:, :, None], d[:, None, :], w_k)
    z_new = torch.lt(lu.gather(1, idx)[:, :, None], logits).to(pre.dtype)
    return _Changes(idx=idx, units=z_new.sub_(z.gather(1, idx)[:, :, None]))


def _shift_sum(r: Tensor, s: SampleTerms, k: int, changes: _Changes, tmp: Tensor) -> Tensor:
    """sum_j [softplus(pre_j + r_j) - softplus(pre_j)], ``[B, c]``, for pre the first-layer pre-activations
    of p_k at the sample and r = dz @ W.T (``changes``); overwrites ``r [B, c, h]``. Falls back to the
    direct sums when |r| may be too large for exp space."""
    width = r.shape[-1]
    count = changes.max_count()
    if count is not None:   # r = sum of at most `count` columns +-W[:, u]: bounds per column, times count
        bound = count * s.p_group_max(k, 1)
        group = _largest_group(width, r.dtype, lambda g: count * s.p_group_max(k, g))
    else:
        lo, hi = torch.aminmax(r)
        bound = max(-float(lo), float(hi))
        group = _uniform_group(width, bound, r.dtype)
    if _exp_space_ok(bound, r.dtype):
        return _softplus_shift_sum(*s.p_sig(k), torch.exp(r, out=r), group)
    pre = s.p_pre[k - 1]
    return _softplus_sum(r.add_(pre[:, None, :]), tmp) - softplus(pre).sum(-1)[:, None]


@torch.no_grad()
def flip_deltas(model: SBN, x: Tensor, zs: list[Tensor], uniforms: list[Tensor], max_elements: int | None = None,
                workspace: Workspace | None = None, route: str | None = "auto") -> list[Tensor]:
    """Same values as :func:`flip_deltas_reference`, at element-wise cost.

    Memory: a few scratch buffers of about ``max_elements`` entries each (None: :data:`CPU_MAX_ELEMENTS`, 8 MB
    in float32, cache-sized chunks; :data:`DEVICE_MAX_ELEMENTS` on the device route), reused from chunk to
    chunk and step to step (None: fresh ones for this call; an estimator passes its own). ``route``: "auto",
    "cpu" or "device" (None: "auto").
    """
    ws = Workspace() if workspace is None else workspace
    if not ws.reuse and not on_device_route(x, route):
        raise ValueError("a workspace without scratch (reuse=False) needs the device route")
    if on_device_route(x, route):
        bound = DEVICE_MAX_ELEMENTS if max_elements is None else max_elements
        return flip_deltas_device(model, x, zs, uniforms, bound, ws)
    max_elements = CPU_MAX_ELEMENTS if max_elements is None else max_elements
    L, B = model.n_layers, x.shape[0]
    if B == 0:
        return [z.new_zeros(z.shape) for z in zs]
    below = [x] + zs                                              # below[k] = z_k
    lus = [logit_of_uniform(u) for u in uniforms]                 # lus[k-1]: layer k
    # terms at the sampled configuration, shared by every branch
    s = SampleTerms(model, below, lus)
    deltas = []
    for l in range(1, L + 1):
        d = 1 - 2 * below[l]                                      # [B, H]: the change a flip makes
        p_table = _table(model.p_nets[l - 1], below[l])                      # p_l reads z_l
        q_table = _table(model.q_nets[l], below[l]) if l < L else None        # so does q_{l+1}
        deltas.append(chunked_layer(
            d, model.sizes, l, max_elements,
            lambda d_sub, a2: _p_flip_term(model, s, p_table, l, d_sub, a2, ws),
            lambda delta, d_sub, a: _add_resimulated(delta, model, s, q_table, l, d_sub, a, ws)))
    return deltas


def _table(net, z: Tensor) -> _FlipTable | None:
    """The exp table of a net reading the flipped layer: linear nets only, weights within exp range."""
    if not net.is_linear:
        return None
    table = _FlipTable(net.first.weight, z, route="cpu")
    return table if table.usable else None


def _p_flip_term(model: SBN, s: SampleTerms, table: _FlipTable | None, l: int, d: Tensor, start: int,
                 ws: Workspace) -> Tensor:
    """log p(z_{l-1} | z'_l) - log p(z_{l-1} | z_l) for flipping units start..start+c-1 of layer l, ``[B, c]``:
    a rank-1 change of the first affine map of p_l."""
    if table is not None:
        return _log_prob_change(table, s, l, d, start, ws)
    return _log_prob_rank1(model.p_nets[l - 1], s.below[l - 1], s.p_pre[l - 1], d, start, ws) \
        - s.logp(l)[:, None]


def _add_resimulated(delta: Tensor, model: SBN, s: SampleTerms, q_table: _FlipTable | None, l: int, d: Tensor,
                     start: int, ws: Workspace) -> None:
    """Adds to ``delta [B, c]`` the terms of the layers above l after flipping units start..start+c-1 of
    layer l and re-simulating z'_{l+1..L} from the same uniforms: entropies of q_{l+1..L}, log p(z'_{k-1} |
    z'_k) for k > l, and the prior."""
    L = model.n_layers
    below = s.below
    B, c = d.shape
    j = torch.arange(c, device=d.device)
    changes = None                                                 # _Changes of z'_{k-1}, k > l+1
    for k in range(l + 1, L + 1):                                  # re-simulate z'_k with the same uniforms
        q_net = model.q_nets[k - 1]
        shape = (B, c, q_net.first.out_features)
        q_logits, new = None, None
        if k == l + 1 and q_table is not None:                     # rank-1 change of a linear q_k
            delta += _entropy_change(q_table, s, k, d, start, ws)
            new = _first_resimulated(q_net, s, k, d, start)
            if new is None:
                q_logits = _rank1_pre(q_net, s.q_pre[k - 1], d, start, ws.get("a", shape, d))
        else:
            if k == l + 1:                                         # rank-1 change again
                q_pre = _rank1_pre(q_net, s.q_pre[k - 1], d, start, ws.get("a", shape, d))
            else:                                                  # the few units of z'_{k-1} that changed
                q_pre = changes.times(s.w_t("q", k), ws.get("a", shape, d)).add_(s.q_pre[k - 1][:, None, :])
            q_logits = q_net.tail(q_pre)
            delta += _entropy_sum(q_logits, ws.get("b", q_logits.shape, d), ws.get("c", q_logits.shape, d)) \
                - s.ent[k - 1][:, None]
        if new is None:
            z_k = torch.lt(s.lus[k - 1][:, None, :], q_logits, out=ws.get(f"z{k % 2}", q_logits.shape, d))
            new = _Changes.from_dense(torch.sub(z_k, below[k][:, None, :], out=z_k), ws.get("b", z_k.shape, d))
        # log p(z'_{k-1} | z'_k): first affine map of p_k at z'_k = its value at z_k + r
        p_net = model.p_nets[k - 1]
        p_pre = s.p_pre[k - 1]
        r = new.times(s.w_t("p", k), ws.get("r", (B, c, p_pre.shape[1]), d))        # [B, c, h]
        # v' . logits' with v = z_{k-1}, v' = z'_{k-1} = v + dv: v . logits' + dv . logits'
        if p_net.is_linear:
            # v' . (pre + r) - v . pre = v . r + dv . pre + dv . r, and v . r = dz . (v @ W)
            if changes is None:   # dv: unit start + j of layer l, by d_j
                dv = d * (p_pre[:, start + j] + r[:, j, start + j])
            else:
                dv = changes.dot(p_pre) + changes.dot_rows(r, ws.get("b", r.shape, d))
            delta += new.dot(s.p_vw(k)) + dv - _shift_sum(r, s, k, new, ws.get("c", r.shape, d))
        else:
            p_logits = p_net.tail(r.add_(p_pre[:, None, :]))      # [B, c, H_{k-1}]
            vdot = torch.mul(p_logits, below[k - 1][:, None, :], out=ws.get("b", p_logits.shape, d)).sum(-1)
            if changes is None:
                vdot += d * p_logits[:, j, start + j]
            else:
                vdot += changes.dot_rows(p_logits, ws.get("b", p_logits.shape, d))
            delta += vdot - _softplus_sum(p_logits, ws.get("c", p_logits.shape, d)) - s.logp(k)[:, None]
        changes = new
    b = model.prior_logits
    if l == L:   # only unit i of the prior changes: (z' - z) * b_i
        delta += d * b[start:start + c]
    else:        # log p(z'_L) - log p(z_L) = (z'_L - z_L) . b
        delta += changes.dot(b.expand(B, -1))
