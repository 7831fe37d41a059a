"""The device route of the marginal estimator's flip pass: the same Delta_{l,i} as
:func:`.marginal.flip_deltas_reference` (checked to 1e-10 in float64 by tests/test_marginal_device_route.py),
with no value read back to the host. On a GPU each such read stalls the stream until every queued kernel
has run, and a step that reads one cannot be captured in a CUDA graph.

The CPU route (:mod:`.marginal_fast`) reads the data to pick the cheapest safe computation: exp tables when
the weights allow, log groups as large as the range allows, sparse changes when few units change. Here
nothing is chosen from data:

  * A flip moves the pre-activations of a linear map by r = d_j W[:, j] (or dz @ W.T above), and

        softplus(pre + r) - softplus(pre) = log(sigmoid(pre) e^r + sigmoid(-pre))
                                          = logaddexp(r + log sigmoid(pre), log sigmoid(-pre)),

    one addcmul and one logaddexp per entry, exact for any weights (no exp of a weight, so no range to
    check), and each difference is taken before the sum (no two large sums cancel).
  * Entropy changes of a linear q are per-entry differences H(a') - H(a) against the sample's entries.
  * Re-simulated layers are dense: dz = z' - z ``[B, c, H]``, and products with dz are matrix products
    (on a GPU these are cheap; counting the changed units would need a read).
  * Chunk sizes come from shapes only. Nonlinear nets take the CPU route's dense formulas, which read
    nothing either.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..models import SBN, logit_of_uniform, softplus
from .flip_common import SampleTerms, Workspace, _entropy_sum, _log_prob_rank1, _rank1_pre, _softplus_sum, chunked_layer


class _DeviceSample(SampleTerms):
    """:class:`.SampleTerms` plus the per-entry terms the device route subtracts entry by entry."""

    def log_sig(self, k: int) -> tuple[Tensor, Tensor]:
        """log sigmoid(pre) and log sigmoid(-pre) for the first affine map of p_k, ``[B, 1, h]``."""
        return self._cached(("log_sig", k), lambda: (-softplus(-self.p_pre[k - 1])[:, None, :],
                                                     -softplus(self.p_pre[k - 1])[:, None, :]))

    def q_entropy(self, k: int) -> Tensor:
        """H(q_k(z_k,i | z_{k-1})) entry by entry for a linear q_k, ``[B, 1, H_k]``."""
        def make():
            a = self.q_pre[k - 1]
            return (softplus(a) - torch.sigmoid(a) * a)[:, None, :]
        return self._cached(("q_entropy", k), make)


def _softplus_change_sum(x: Tensor, s: _DeviceSample, k: int, ws: Workspace) -> Tensor:
    """sum_i softplus(pre_i + r_i) - softplus(pre_i), ``[B, c]``, from x = r + log sigmoid(pre) ``[B, c, h]``
    (overwritten when ``ws`` has scratch), pre the first-layer pre-activations of p_k at the sample."""
    return torch.logaddexp(x, s.log_sig(k)[1], out=x if ws.reuse else None).sum(-1)


def _entropy_change_sum(a: Tensor, s: _DeviceSample, k: int, t1: Tensor | None, t2: Tensor | None) -> Tensor:
    """sum_i H(a_i) - H(pre_i), ``[B, c]``, for the flipped logits a ``[B, c, H_k]`` of a linear q_k (kept)."""
    sig = torch.sigmoid(a, out=t1)
    h = torch.logaddexp(a, a.new_zeros(()), out=t2)                 # softplus(a)
    if t2 is None:                                                  # no scratch (vmap): no in-place addcmul
        return (h - a * sig - s.q_entropy(k)).sum(-1)
    return h.addcmul_(a, sig, value=-1).sub_(s.q_entropy(k)).sum(-1)


def _dense_p_flip_term(model: SBN, s: _DeviceSample, l: int, d: Tensor, start: int, ws: Workspace) -> Tensor:
    """log p(z_{l-1} | z'_l) - log p(z_{l-1} | z_l) for flipping units start..start+c-1 of layer l, ``[B, c]``."""
    net = model.p_nets[l - 1]
    if not net.is_linear:
        return _log_prob_rank1(net, s.below[l - 1], s.p_pre[l - 1], d, start, ws) - s.logp(l)[:, None]
    B, c = d.shape
    w = net.first.weight[:, start:start + c]                        # [h, c]
    # r + log sigmoid(pre) with r = d_j W[:, j], in one pass (contiguous rows broadcast fastest)
    x = torch.addcmul(s.log_sig(l)[0], d[:, :, None], w.T.contiguous()[None],
                      out=ws.get("a", (B, c, w.shape[0]), d))          # [B, c, h]
    # v . (pre + r) - v . pre = d_j (v . W[:, j]): a matrix product
    return d * (s.below[l - 1] @ w) - _softplus_change_sum(x, s, l, ws)


def _dense_add_resimulated(delta: Tensor, model: SBN, s: _DeviceSample, l: int, d: Tensor, start: int,
                     ws: Workspace) -> None:
    """Adds to ``delta [B, c]`` the terms of the layers above l after flipping units start..start+c-1 of
    layer l and re-simulating z'_{l+1..L} densely from the same uniforms (as marginal_fast._add_resimulated)."""
    L = model.n_layers
    B, c = d.shape
    j = torch.arange(c, device=d.device)
    dz_below = None                                                 # z'_{k-1} - z_{k-1}, [B, c, H_{k-1}], k > l+1
    dz = None
    for k in range(l + 1, L + 1):
        q_net = model.q_nets[k - 1]
        shape = (B, c, q_net.first.out_features)
        if k == l + 1:                                              # rank-1 change
            q_pre = _rank1_pre(q_net, s.q_pre[k - 1], d, start, ws.get("a", shape, d))
        else:
            q_pre = _times(dz_below, s.w_t("q", k), ws.get("a", shape, d)).add_(s.q_pre[k - 1][:, None, :])
        if q_net.is_linear:
            q_logits = q_pre
            delta += _entropy_change_sum(q_logits, s, k, ws.get("b", shape, d), ws.get("c", shape, d))
        else:
            q_logits = q_net.tail(q_pre)
            delta += _entropy_sum(q_logits, ws.get("b", q_logits.shape, d), ws.get("c", q_logits.shape, d)) \
                - s.ent[k - 1][:, None]
        if ws.reuse:
            dz = torch.lt(s.lus[k - 1][:, None, :], q_logits, out=ws.get(f"z{k % 2}", q_logits.shape, d))
        else:
            dz = torch.lt(s.lus[k - 1][:, None, :], q_logits).to(q_logits.dtype)
        dz = torch.sub(dz, s.below[k][:, None, :], out=dz if ws.reuse else None)   # [B, c, H_k] in {-1, 0, 1}
        delta += _p_resimulated(model, s, k, dz, dz_below, d, start, j, ws)
        dz_below = dz
    b = model.prior_logits
    if l == L:   # only unit i of the prior changes: (z' - z) * b_i
        delta += d * b[start:start + c]
    else:        # log p(z'_L) - log p(z_L) = (z'_L - z_L) . b
        delta += torch.matmul(dz, b)


def _times(dz: Tensor, w_t: Tensor, out: Tensor | None) -> Tensor:
    """dz @ w_t, ``[B, c, h]``, for dz ``[B, c, H]`` and w_t ``[H, h]``, into ``out`` (None: a new tensor)."""
    if out is None:
        return torch.matmul(dz, w_t)
    B, c, H = dz.shape
    return torch.mm(dz.view(B * c, H), w_t, out=out.view(B * c, -1)).view(B, c, -1)


def _p_resimulated(model: SBN, s: _DeviceSample, k: int, dz: Tensor, dz_below: Tensor | None, d: Tensor,
                   start: int, j: Tensor, ws: Workspace) -> Tensor:
    """log p(z'_{k-1} | z'_k) - log p(z_{k-1} | z_k), ``[B, c]``, for k > l: z'_k = z_k + dz, and z'_{k-1} =
    z_{k-1} + dz_below (for k = l+1: unit start + j of layer l flipped by d_j)."""
    p_net, p_pre = model.p_nets[k - 1], s.p_pre[k - 1]
    B, c, _ = dz.shape
    r = _times(dz, s.w_t("p", k), ws.get("r", (B, c, p_pre.shape[1]), d))          # [B, c, h]
    if p_net.is_linear:
        # v' . (pre + r) - v . pre = v . r + dv . (pre + r), and v . r = dz . (v @ W)
        if dz_below is None:
            dv = d * (p_pre[:, start + j] + r[:, j, start + j])
        else:
            dv = torch.bmm(p_pre[:, None, :], dz_below.transpose(1, 2)).squeeze(1) \
                + torch.mul(dz_below, r, out=ws.get("b", r.shape, d)).sum(-1)
        v_r = torch.bmm(s.p_vw(k)[:, None, :], dz.transpose(1, 2)).squeeze(1)
        return v_r + dv - _softplus_change_sum(r.add_(s.log_sig(k)[0]), s, k, ws)
    p_logits = p_net.tail(r.add_(p_pre[:, None, :]))              # [B, c, H_{k-1}]
    vdot = torch.mul(p_logits, s.below[k - 1][:, None, :], out=ws.get("b", p_logits.shape, d)).sum(-1)
    if dz_below is None:
        vdot += d * p_logits[:, j, start + j]
    else:
        vdot += torch.mul(dz_below, p_logits, out=ws.get("b", p_logits.shape, d)).sum(-1)
    return vdot - _softplus_sum(p_logits, ws.get("c", p_logits.shape, d)) - s.logp(k)[:, None]


def flip_deltas_device(model: SBN, x: Tensor, zs: list[Tensor], uniforms: list[Tensor], max_elements: int,
                       ws: Workspace) -> list[Tensor]:
    """:func:`.marginal_fast.flip_deltas` with nothing read back to the host (see the module docstring)."""
    L, B = model.n_layers, x.shape[0]
    if B == 0:
        return [z.new_zeros(z.shape) for z in zs]
    below = [x] + zs                                              # below[k] = z_k
    s = _DeviceSample(model, below, [logit_of_uniform(u) for u in uniforms])
    deltas = []
    for l in range(1, L + 1):
        d = 1 - 2 * below[l]                                      # [B, H]: the change a flip makes
        deltas.append(chunked_layer(
            d, model.sizes, l, max_elements,
            lambda d_sub, a2: _dense_p_flip_term(model, s, l, d_sub, a2, ws),
            lambda delta, d_sub, a: _dense_add_resimulated(delta, model, s, l, d_sub, a, ws)))
    return deltas

