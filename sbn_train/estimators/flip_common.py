"""What both routes of the marginal estimator's flip pass share (:mod:`.marginal_fast`, the CPU route, and
:mod:`.marginal_device`, the device route): the route choice, scratch buffers, exact sums of softplus and
entropy terms, rank-1 pre-activation changes, the terms at the sampled configuration, and the chunk loop
over the units of a layer. Neither route imports the other."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..models import SBN, bernoulli_entropy, bernoulli_log_prob, softplus

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


#: the flip passes' routes: "auto" (the device route for tensors off the CPU, the CPU route otherwise), "cpu"
#: or "device"; an estimator holds its own choice (``route``), read where a pass starts, never per chunk
ROUTES = ("auto", "cpu", "device")
#: default chunk bounds (entries per temporary): cache-sized on a CPU; on a GPU fewer, larger kernels
CPU_MAX_ELEMENTS = 1 << 21
DEVICE_MAX_ELEMENTS = 1 << 23


def set_route(estimator, route: str) -> None:
    """Make every flip pass of ``estimator`` (and of its submodules) take ``route``."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    for module in estimator.modules():
        if hasattr(module, "route"):
            module.route = route


def on_device_route(t: Tensor, route: str | None = "auto") -> bool:
    """Whether a flip pass over tensors like ``t`` takes the device route (None: "auto")."""
    route = "auto" if route is None else route
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
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


def chunked_layer(d: Tensor, sizes: list[int], l: int, max_elements: int, p_term, add_resimulated) -> Tensor:
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


class SampleTerms:
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
