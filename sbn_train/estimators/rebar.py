"""REBAR (Tucker, Mnih, Maddison, Lawson & Sohl-Dickstein, "REBAR: low-variance, unbiased gradient
estimates for discrete latent variable models", NIPS 2017) and RELAX (Grathwohl, Choi, Wu, Roeder &
Duvenaud, "Backpropagation through the void: optimizing control variates for black-box gradient
estimation", ICLR 2018, its estimator for discrete variables).

One layer, logits a, theta = sigmoid(a), a logistic variable z = a - logit(u) with b = H(z) = 1[u < theta],
and z~ ~ p(z | b) reparameterized by a conditional uniform v with b held fixed (u~ = theta v for b = 1,
theta + (1 - theta) v for b = 0, z~ = a - logit(u~)). With a control variate c,

    g = [f(b) - c(z~)] d log p(b) + d c(z) - d c(z~)

is unbiased for d E[f(b)] whatever c is, as long as c does not depend on the layer's own noise. As in
the published RELAX code, v is computed from the same u (z~ equals z in value, not in its derivative).

- REBAR: c(z) = eta f(sigma_lambda(z)), the objective at the concrete relaxation sigma(z / lambda).
- RELAX: c(z) = eta f(sigma_lambda(z)) + r_rho(sigma_lambda(z), z_{l-1}), with r a small MLP per layer
  (here also given the layer's parent as context; the parent is fixed given the layer's noise).

The estimator is stated for one layer of binary units; here each layer l gets its own, with f = s_l, its
downstream learning signal (``score_function``). Its control variate f(sigma_lambda(z_l)) is s_l along a
relaxed chain: layer l relaxed, each layer above relaxed as sigma((f_k(relaxed z_{k-1}) - logit(u_k)) /
lambda_k) from the SAME uniforms as the sample. Those uniforms are independent of layer l's noise, so
c stays a valid control variate, and at low temperature the chain tracks the sampled layers above.

eta and log lambda (one each per layer) and RELAX's nets are the estimator's parameters, fitted as in
both papers by minimizing the variance of the inference-gradient estimate: in train() mode ``aux_loss``
is ||g||^2 built with create_graph=True, whose gradient w.r.t. these parameters is that of the variance
(E[g] does not depend on them). Generative parameters get the pathwise gradient of log p(x, z) at the
sample. One sample of z; the surrogate's inference part is linear in phi with the estimate as its slope.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import SBN, bernoulli_log_prob
from .base import Estimate, Estimator, elbo_of
from .branches import Sample, downstream_signals, sample_layers


def conditional_logistic(a: Tensor, u: Tensor, b: Tensor) -> Tensor:
    """z~ ~ p(z | b) with z = a - logit(u), from the conditional uniform v of ``u`` given b; differentiable
    in ``a`` with v and b fixed. Logs are taken in a form that stays finite when theta is close to 0 or 1."""
    with torch.no_grad():
        theta = torch.sigmoid(a)
        v = torch.where(b > 0, u / theta, (u - theta) / (1 - theta))
        eps = torch.finfo(a.dtype).eps
        v = torch.nan_to_num(v, nan=0.5).clamp(eps, 1 - eps)
    logit_u1 = F.logsigmoid(a) + torch.log(v) - torch.log1p(-torch.sigmoid(a) * v)               # u~ = theta v
    logit_u0 = torch.log1p(-torch.sigmoid(-a) * (1 - v)) - F.logsigmoid(-a) - torch.log1p(-v)   # theta + (1-theta) v
    return a - torch.where(b > 0, logit_u1, logit_u0)


class REBAR(Estimator):
    """REBAR per stochastic layer; ``neural_cv=True`` adds RELAX's learned control-variate nets.

    (A CPU replica group takes turns: 4 runs of sbn_2layer vmapped gave 0.75x (REBAR) and 0.77x (RELAX) one run's
    steps/s, taking turns 1.02x and 0.99x.)

    Args:
        temperature: initial lambda of every layer.
        eta: initial scale of the relaxed-objective control variate.
        neural_cv: add an MLP r_l([relaxed z_l, parent]) -> scalar to each layer's control variate.
        cv_hidden: tanh units of that MLP.
    """

    vmap_on_cpu = False

    def __init__(self, model: SBN | None = None, temperature: float = 0.5, eta: float = 1.0,
                 neural_cv: bool = False, cv_hidden: int = 100):
        super().__init__(model)
        if model is None:
            raise ValueError("REBAR/RELAX need the model to size their per-layer parameters")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        L = model.n_layers
        self.log_temperature = nn.Parameter(torch.full((L,), math.log(temperature)))
        self.eta = nn.Parameter(torch.full((L,), float(eta)))
        self.cv_nets = nn.ModuleList()
        if neural_cv:
            for l in range(L):
                self.cv_nets.append(nn.Sequential(nn.Linear(model.sizes[l + 1] + model.sizes[l], cv_hidden),
                                                  nn.Tanh(), nn.Linear(cv_hidden, 1)))

    def relaxed_signal(self, model: SBN, s: Sample, l: int, zeta: Tensor) -> Tensor:
        """s_l along the relaxed chain that starts from ``zeta`` at layer l, ``[R]``; ``zeta`` is ``[R, H_l]``
        with R a multiple of the batch (stacked copies share the sample's parent and uniforms)."""
        reps = zeta.shape[0] // s.zs[0].shape[0]
        temps = self.log_temperature.exp()
        out = bernoulli_log_prob(s.parents[l - 1].repeat(reps, 1), model.p_nets[l - 1](zeta)) \
            - bernoulli_log_prob(zeta, s.q_logits[l - 1].repeat(reps, 1))
        prev = zeta
        for k in range(l + 1, model.n_layers + 1):
            a_k = model.q_logits(k, prev)
            z_k = torch.sigmoid((a_k - s.lus[k - 1].repeat(reps, 1)) / temps[k - 1])     # [R, H_k]
            out = out + bernoulli_log_prob(prev, model.p_nets[k - 1](z_k)) - bernoulli_log_prob(z_k, a_k)
            prev = z_k
        return out + bernoulli_log_prob(prev, model.prior_logits)

    def control(self, model: SBN, s: Sample, l: int, logistic: Tensor) -> Tensor:
        """c_l at logistic variables ``[R, H_l]`` (R a multiple of the batch), ``[R]``."""
        zeta = torch.sigmoid(logistic / self.log_temperature[l - 1].exp())
        c = self.eta[l - 1] * self.relaxed_signal(model, s, l, zeta)
        if len(self.cv_nets):
            context = model.q_input(l, s.parents[l - 1]).repeat(zeta.shape[0] // s.zs[0].shape[0], 1)
            c = c + self.cv_nets[l - 1](torch.cat([zeta, context], -1)).squeeze(-1)
        return c

    def inference_gradient(self, model: SBN, s: Sample, signals: list[Tensor]) -> list[Tensor]:
        """g = d(batch-mean ELBO)/d phi estimated as in the module docstring; differentiable in the
        estimator's parameters when ``self.training``."""
        B = s.zs[0].shape[0]
        slopes, c_diff = [], s.q_logits[0].new_zeros(())
        for l, (a, z, u) in enumerate(zip(s.q_logits, s.zs, s.uniforms), start=1):
            # z = a - logit(u) and z~ ~ p(z | b) stacked, so c is evaluated in one pass
            logistic = torch.cat([a - s.lus[l - 1], conditional_logistic(a, u, z)])      # [2B, H_l]
            c_z, c_cond = self.control(model, s, l, logistic).view(2, B)
            # d log p(b) / d a = b - theta; the weight f(b) - c(z~) is a constant for phi
            slopes.append((signals[l - 1] - c_cond)[:, None] * (z - torch.sigmoid(a).detach()) / B)
            c_diff = c_diff + (c_z - c_cond).sum() / B
        phi = model.inference_parameters()
        return list(torch.autograd.grad([*s.q_logits, c_diff], phi, [*slopes, torch.ones_like(c_diff)],
                                        create_graph=self.training))

    def forward(self, model: SBN, x: Tensor, generator: torch.Generator | None = None) -> Estimate:
        s = sample_layers(model, x, generator)
        signals = downstream_signals(s.log_p, s.log_q)
        g = self.inference_gradient(model, s, signals)
        aux = sum((gi ** 2).sum() for gi in g) if self.training else None
        linear = sum((gi.detach() * p).sum() for gi, p in zip(g, model.inference_parameters()))
        surrogate = -torch.stack(s.log_p).sum(0).mean() - linear
        metrics = {}
        if self.training:   # 0-dim tensors on the device, read by the training loop when it logs;
            # a copy of eta, so they hold this step's values, not those after the optimizer step
            temperatures, eta = self.log_temperature.detach().exp(), self.eta.detach().clone()
            metrics = {f"temperature{l}": t for l, t in enumerate(temperatures, 1)}
            metrics.update({f"eta{l}": e for l, e in enumerate(eta, 1)})
        return Estimate(surrogate=surrogate, elbo=elbo_of(model, x, s.zs, s.log_p, s.log_q), aux_loss=aux,
                        metrics=metrics)


class RELAX(REBAR):
    """RELAX: REBAR's control variate plus a learned MLP per layer."""

    def __init__(self, model: SBN | None = None, temperature: float = 0.5, eta: float = 1.0, cv_hidden: int = 100):
        super().__init__(model, temperature=temperature, eta=eta, neural_cv=True, cv_hidden=cv_hidden)
