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
:data:`ROUTE` forces either route (the tests run the device route on the CPU).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..models import SBN, bernoulli_entropy, bernoulli_log_prob, logit_of_uniform, softplus


class Workspace:
    """Scratch buffers reused across chunks and steps: fresh multi-megabyte temporaries for every
    chunk cost page faults that, on a CPU, take as long as the arithmetic.

    ``reuse=False``: no scratch at all (``get`` returns None and every operation allocates its result), for
    a pass under ``torch.func.vmap`` (a replica group), where results cannot be written into unbatched
    buffers. Only the device route takes such a workspace."""

    def __init__(self, reuse: bool = True):
        self.reuse = reuse
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor | None:
        if not self.reuse:
            return None
        n = 1
        for s in shape:
            n *= s
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(n, dtype=like.dtype, device=like.device)
            self._bufs[name] = buf
        return buf[:n].view(shape)


_WORKSPACE = Workspace()

#: which flip pass runs: "auto" (the device route for tensors off the CPU, this module's otherwise), "cpu" or
#: "device". Read where a pass starts (flip_deltas, _FlipTable), never per chunk.
ROUTE = "auto"
_ROUTES = ("auto", "cpu", "device")
#: default chunk bounds (entries per temporary): cache-sized on a CPU; on a GPU fewer, larger kernels
CPU_MAX_ELEMENTS = 1 << 21
DEVICE_MAX_ELEMENTS = 1 << 23


def on_device_route(t: Tensor, route: str | None = None) -> bool:
    """Whether a flip pass over tensors like ``t`` takes the device route (``route`` None: :data:`ROUTE`)."""
    route = ROUTE if route is None else route
    if route not in _ROUTES:
        raise ValueError(f"route must be one of {_ROUTES}, got {route!r}")
    return route == "device" or (route == "auto" and t.device.type != "cpu")


# |log| of the largest product of factors that stays a finite, normal number in each dtype
_LOG_RANGE = {torch.float32: 80.0, torch.float64: 700.0}


def _exp_space_ok(bound: float, dtype: torch.dtype) -> bool:
    """Whether factors in [e^-bound, e^bound] are themselves safely representable."""
    return bound <= _LOG_RANGE.get(dtype, 0.0)            # False for nan as well


def _sum_log(t: Tensor, group: int) -> Tensor:
    """sum_j log(t_j) over the last dim as the sum of logs of products over ``group`` consecutive
    entries (``group`` divides the width; the caller guarantees each product stays in range). One log
    covers ``group`` entries: on the CPU a log costs as much as a dozen multiplications, and a product
    over a contiguous group is a fast reduction."""
    if group == 1:
        return t.log().sum(-1)
    return t.unflatten(-1, (t.shape[-1] // group, group)).prod(-1).log_().sum(-1)


def _largest_group(width: int, dtype: torch.dtype, bound_of_group) -> int:
    """The largest divisor g of ``width`` whose products stay in range: ``bound_of_group(g)`` bounds
    |sum of the logs| over any g consecutive entries (1 if no larger g qualifies)."""
    limit = _LOG_RANGE.get(dtype, 0.0)
    return next(g for g in _divisors(width) if g == 1 or bound_of_group(g) <= limit)


@functools.lru_cache(maxsize=None)
def _divisors(width: int) -> tuple[int, ...]:
    return tuple(g for g in range(width, 0, -1) if width % g == 0)


def _uniform_group(width: int, bound: float, dtype: torch.dtype) -> int:
    """:func:`_largest_group` for factors in [e^-bound, e^bound]."""
    return _largest_group(width, dtype, lambda g: g * bound)


def _column_group_max(w_abs: Tensor, g: int) -> float:
    """max over columns j and groups G of g consecutive rows of sum_{i in G} |W_ij|, for w_abs = |W| [h, H]:
    for F_i = 1 - s_i + s_i e^(r_i) one has |log F_i| <= |r_i|, so a flip of input unit j (r = +-W[:, j])
    moves any group's sum of logs by at most this much."""
    h, H = w_abs.shape
    return float(w_abs.view(h // g, g, H).sum(1).max()) if w_abs.numel() else 0.0


_LOG2 = 0.6931471805599453


def _softplus_sum(a: Tensor, tmp: Tensor, a_sum: Tensor | None = None) -> Tensor:
    """sum_j softplus(a_j) over the last dim. ``tmp`` is scratch of a's shape and may be ``a`` itself (then
    ``a`` is overwritten); ``a_sum`` is ``a.sum(-1)`` when the caller knows it without a pass.

    softplus(a) = max(a, 0) - log(sigmoid(|a|)) and sum max(a, 0) = (sum a + sum |a|) / 2: exact for
    every a (no overflow, no threshold, sigmoid(|a|) in [1/2, 1]), in place over cache-sized chunks."""
    s = a.sum(-1) if a_sum is None else a_sum.clone()
    t = torch.abs(a, out=tmp)
    s = s.add_(t.sum(-1)).mul_(0.5)
    return s.sub_(_sum_log(t.sigmoid_(), _uniform_group(t.shape[-1], _LOG2, t.dtype)))   # in [1/2, 1]


def _softplus_shift_sum(s: Tensor, one_minus_s: Tensor, e: Tensor, group: int) -> Tensor:
    """sum_j [softplus(a_j + r_j) - softplus(a_j)] over the last dim, from s = sigmoid(a), 1 - s (both
    broadcasting) and e = exp(r), which it overwrites: (1 + e^(a+r)) / (1 + e^a) = (1 - s) + s e^r.

    A multiply-add per entry and a log per group of entries (:func:`_sum_log`), and the difference comes
    out directly instead of as the difference of two large sums. Each factor lies in [e^-|r|, e^|r|];
    ``group`` must keep products of that many in range (:func:`_largest_group`)."""
    return _sum_log(torch.addcmul(one_minus_s, s, e, out=e), group)


def _entropy_sum(a: Tensor, t1: Tensor, t2: Tensor) -> Tensor:
    """sum_j H(Bernoulli(sigmoid(a_j))): with s = sigmoid(|a|), H = -log(s) + |a| (1 - s)."""
    t1 = torch.abs(a, out=t1)
    t2 = torch.sigmoid(t1, out=t2)
    h = t1.sum(-1)
    h.sub_(t1.mul_(t2).sum(-1))
    return h.sub_(_sum_log(t2, _uniform_group(t2.shape[-1], _LOG2, t2.dtype)))


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


def _log_prob_change(table: _FlipTable, s: "_Sample", l: int, d: Tensor, start: int, ws: Workspace) -> Tensor:
    """:func:`flip_log_prob_change` for the linear p_l and its target v = z_{l-1}."""
    B, c = d.shape
    return flip_log_prob_change(table, *s.p_sig(l), s.p_vw(l), d, start, ws.get("e", (B, c, table.w.shape[0]), d))


def _entropy_change(table: _FlipTable, s: "_Sample", k: int, d: Tensor, start: int, ws: Workspace) -> Tensor:
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


def _first_resimulated(q_net, s: "_Sample", k: int, d: Tensor, start: int) -> _Changes | None:
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


def _shift_sum(r: Tensor, s: "_Sample", k: int, changes: _Changes, tmp: Tensor) -> Tensor:
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
                workspace: Workspace | None = None, route: str | None = None) -> list[Tensor]:
    """Same values as :func:`flip_deltas_reference`, at element-wise cost.

    Memory: a few scratch buffers of about ``max_elements`` entries each (None: :data:`CPU_MAX_ELEMENTS`, 8 MB
    in float32, cache-sized chunks; :data:`DEVICE_MAX_ELEMENTS` on the device route), reused from chunk to
    chunk and step to step. ``route``: "auto", "cpu" or "device" (None: :data:`ROUTE`).
    """
    ws = workspace or _WORKSPACE
    if not ws.reuse and not on_device_route(x, route):
        raise ValueError("a workspace without scratch (reuse=False) needs the device route")
    if on_device_route(x, route):
        from .marginal_device import flip_deltas_device   # imports this module
        bound = DEVICE_MAX_ELEMENTS if max_elements is None else max_elements
        return flip_deltas_device(model, x, zs, uniforms, bound, ws)
    max_elements = CPU_MAX_ELEMENTS if max_elements is None else max_elements
    L, B = model.n_layers, x.shape[0]
    if B == 0:
        return [z.new_zeros(z.shape) for z in zs]
    below = [x] + zs                                              # below[k] = z_k
    lus = [logit_of_uniform(u) for u in uniforms]                 # lus[k-1]: layer k
    # terms at the sampled configuration, shared by every branch
    s = _Sample(model, below, lus)
    deltas = []
    for l in range(1, L + 1):
        d = 1 - 2 * below[l]                                      # [B, H]: the change a flip makes
        p_table = _table(model.p_nets[l - 1], below[l])                      # p_l reads z_l
        q_table = _table(model.q_nets[l], below[l]) if l < L else None        # so does q_{l+1}
        deltas.append(_chunked_layer(
            d, model.sizes, l, max_elements,
            lambda d_sub, a2: _p_flip_term(model, s, p_table, l, d_sub, a2, ws),
            lambda delta, d_sub, a: _add_resimulated(delta, model, s, q_table, l, d_sub, a, ws)))
    return deltas


def _chunked_layer(d: Tensor, sizes: list[int], l: int, max_elements: int, p_term, add_resimulated) -> Tensor:
    """Delta of every unit of layer l, ``[B, H_l]``, in chunks of units: ``p_term(d_sub, a)`` gives the change
    of log p(z_{l-1} | z_l) for the units from ``a`` on; ``add_resimulated(delta, d_sub, a)`` adds the terms
    of the layers re-simulated above l. Chunks are sized by the widest layer re-simulated above l; the (often
    wider) layer below is handled in sub-chunks of its own size, so each operation works on large tensors."""
    B, H = d.shape
    chunk = _chunk(max_elements, B, max(sizes[l:]), H)
    out = torch.empty_like(d)
    for a in range(0, H, chunk):
        e = min(H, a + chunk)
        delta = out[:, a:e]
        sub = _chunk(max_elements, B, sizes[l - 1], e - a)
        for a2 in range(a, e, sub):
            e2 = min(e, a2 + sub)
            delta[:, a2 - a:e2 - a] = p_term(d[:, a2:e2], a2)
        add_resimulated(delta, d[:, a:e], a)
    return out


def _chunk(max_elements: int, B: int, width: int, n: int) -> int:
    return max(1, min(n, max_elements // max(1, B * width)))


def _table(net, z: Tensor) -> _FlipTable | None:
    """The exp table of a net reading the flipped layer: linear nets only, weights within exp range."""
    if not net.is_linear:
        return None
    table = _FlipTable(net.first.weight, z, route="cpu")
    return table if table.usable else None


class _Sample:
    """Quantities at the sampled configuration that the branches reuse, each computed on first use
    (``k`` numbers layers from 1 as in the paper; nets p_k and q_k)."""

    def __init__(self, model: SBN, below: list[Tensor], lus: list[Tensor]):
        self.model, self.below, self.lus = model, below, lus
        L = model.n_layers
        self.p_pre = [model.p_nets[k - 1].first(below[k]) for k in range(1, L + 1)]       # [B, H_{k-1}]
        # q_1 reads x, which no flip changes: q_pre / ent are needed from layer 2 on
        self.q_pre = [None] + [model.q_nets[k - 1].first(below[k - 1]) for k in range(2, L + 1)]
        self.ent = [None] + [bernoulli_entropy(model.q_nets[k - 1].tail(self.q_pre[k - 1])) for k in range(2, L + 1)]
        self._cache: dict = {}

    def _cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def logp(self, k: int) -> Tensor:
        """log p(z_{k-1} | z_k), ``[B]``."""
        return self._cached(("logp", k), lambda: bernoulli_log_prob(
            self.below[k - 1], self.model.p_nets[k - 1].tail(self.p_pre[k - 1])))

    def p_sig(self, k: int) -> tuple[Tensor, Tensor]:
        """sigmoid(pre) and sigmoid(-pre) = 1 - sigmoid(pre) for the first affine map of p_k, ``[B, 1, h]``."""
        return self._cached(("p_sig", k), lambda: (torch.sigmoid(self.p_pre[k - 1])[:, None, :],
                                                   torch.sigmoid(-self.p_pre[k - 1])[:, None, :]))

    def q_sig(self, k: int) -> tuple[Tensor, Tensor]:
        """sigmoid(pre) and sigmoid(-pre) for the first affine map of q_k, ``[B, 1, h]``."""
        return self._cached(("q_sig", k), lambda: (torch.sigmoid(self.q_pre[k - 1])[:, None, :],
                                                   torch.sigmoid(-self.q_pre[k - 1])[:, None, :]))

    def q_pre_sig(self, k: int) -> Tensor:
        """sum_i pre_i sigmoid(pre_i) for the first affine map of q_k, ``[B]``."""
        return self._cached(("q_pre_sig", k), lambda: (self.q_pre[k - 1] * self.q_sig(k)[0][:, 0]).sum(-1))

    def p_group_max(self, k: int, g: int) -> float:
        """:func:`_column_group_max` of the first affine map of p_k (g = 1: max |W|)."""
        w_abs = self._cached(("p_abs", k), lambda: self.model.p_nets[k - 1].first.weight.abs())
        return self._cached(("p_group_max", k, g), lambda: _column_group_max(w_abs, g))

    def w_t(self, net: str, k: int) -> Tensor:
        """First-layer weight of p_k or q_k transposed and contiguous: rows are gathered for the units a
        flip changes (gathering rows of the transposed view is ten times slower)."""
        nets = self.model.p_nets if net == "p" else self.model.q_nets
        return self._cached((net, k), lambda: nets[k - 1].first.weight.T.contiguous())

    def p_vw(self, k: int) -> Tensor:
        """v @ W for the linear p_k and its target v = z_{k-1}: v . (dz @ W.T) = dz . (v @ W), ``[B, H_k]``."""
        return self._cached(("p_vw", k), lambda: self.below[k - 1] @ self.model.p_nets[k - 1].first.weight)


def _p_flip_term(model: SBN, s: _Sample, table: _FlipTable | None, l: int, d: Tensor, start: int,
                 ws: Workspace) -> Tensor:
    """log p(z_{l-1} | z'_l) - log p(z_{l-1} | z_l) for flipping units start..start+c-1 of layer l, ``[B, c]``:
    a rank-1 change of the first affine map of p_l."""
    if table is not None:
        return _log_prob_change(table, s, l, d, start, ws)
    return _log_prob_rank1(model.p_nets[l - 1], s.below[l - 1], s.p_pre[l - 1], d, start, ws) \
        - s.logp(l)[:, None]


def _add_resimulated(delta: Tensor, model: SBN, s: _Sample, q_table: _FlipTable | None, l: int, d: Tensor,
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
