"""Sigmoid belief networks (binary latents) and their categorical counterparts, with a factorized
variational posterior of the same family.

Layers are indexed 1..L, layer 1 nearest the data; ``z_0 = x`` (binary pixels, always Bernoulli).

- generative p: p(z_L) = Family(prior_logits), p(z_{l-1} | z_l) = Family(p_nets[l-1](z_l)) (Bernoulli for x)
- inference q:  q(z_l | z_{l-1}) = Family(q_nets[l-1](z_{l-1})); layer 1 sees ``x - x_mean``.

The latent family (:class:`Bernoulli`, or :class:`Categorical` with K classes) says how a layer of H
variables is sampled from H uniforms, scored and encoded for the nets that read it: a Bernoulli layer is
its H bits; a categorical layer is H one-hot blocks of K, ``[..., H*K]``, and its logits are ``[..., H*K]``
too (block i holds variable i's K logits).

Every conditional is an affine map (``first``) optionally followed by an MLP tail (``rest``). The
split lets the marginal estimator apply a one-unit flip to the pre-activations of ``first`` as a
rank-1 update instead of a matrix product.

Sampling takes explicit uniforms, one per variable, by the inverse CDF: ``z = 1[logit(u) < a]``
(equivalently ``u < sigmoid(a)``) for a bit, the first class whose cumulative probability exceeds u for a
categorical variable; so every latent is a deterministic function of (x, u) and estimators can share noise.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
from torch import Tensor, nn

#: sample rows per block of ``SBN.log_weights`` on a CPU: small enough that a block's [rows, D] temporaries
#: stay in cache (and below the allocator's mmap threshold), large enough for efficient matrix products.
#: Measured on 2 idle cores (MNIST, 200-200): 0.21 s per 25,000 sample rows against 0.30 s for whole chunks,
#: 0.52 s against 0.98 s per 65,500. (When other processes keep the cores busy, each of the many small
#: parallel ops waits for a descheduled thread and blocks lose: 2.9 s against 0.76 s; so does the training
#: step, 0.36 s against 0.026 s.)
EVAL_BLOCK_ROWS = 2048


def softplus(a: Tensor) -> Tensor:
    """log(1 + e^a), exact for every a. (``F.softplus`` returns a itself above a = 20, an absolute error of
    up to 2e-9: invisible in float32, but not in the float64 checks of the estimators.)"""
    return torch.logaddexp(a, a.new_zeros(()))


def bernoulli_log_prob(v: Tensor, logits: Tensor) -> Tensor:
    """log Bernoulli(v | sigmoid(logits)) summed over the last dim. ``v`` broadcasts against ``logits``."""
    return (v * logits).sum(-1) - softplus(logits).sum(-1)


def bernoulli_entropy(logits: Tensor) -> Tensor:
    """Entropy of Bernoulli(sigmoid(logits)) summed over the last dim: softplus(a) - sigmoid(a) * a."""
    return (softplus(logits) - torch.sigmoid(logits) * logits).sum(-1)


def logit_of_uniform(u: Tensor) -> Tensor:
    """logit(u); ``z = (logit(u) < a)`` samples Bernoulli(sigmoid(a)) from the uniform ``u``."""
    return torch.log(u) - torch.log1p(-u)


def threshold(lu: Tensor, logits: Tensor) -> Tensor:
    """The sample 1[u < sigmoid(a)] from precomputed ``lu = logit(u)``, as a float of the logits' dtype."""
    return (lu < logits).to(logits.dtype)


class Bernoulli:
    """Binary units: a layer of H variables is H bits; the encoding the next layer reads is z itself."""

    name = "bernoulli"
    classes = 2

    def width(self, variables: int) -> int:
        """Entries of a layer's encoding (and of its logits)."""
        return variables

    def prepare(self, u: Tensor) -> Tensor:
        """The form of a layer's uniforms that :meth:`sample` reads: logit(u)."""
        return logit_of_uniform(u)

    def sample(self, noise: Tensor, logits: Tensor) -> Tensor:
        """The sample (no gradient) from prepared uniforms ``[..., H]`` and logits ``[..., H]``."""
        return threshold(noise, logits)

    def log_prob(self, z: Tensor, logits: Tensor) -> Tensor:
        return bernoulli_log_prob(z, logits)

    def entropy(self, logits: Tensor) -> Tensor:
        return bernoulli_entropy(logits)

    def mean(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)

    def configurations(self, variables: int, device=None, dtype=torch.float32) -> Tensor:
        """Every value of a layer, ``[2^H, H]``, in the order of ``itertools.product``."""
        return torch.tensor(list(itertools.product([0.0, 1.0], repeat=variables)), device=device,
                            dtype=dtype).view(-1, variables)

    def __repr__(self) -> str:
        return "Bernoulli()"


class Categorical:
    """Variables of ``classes`` (K) values: a layer of H variables is encoded as H one-hot blocks of K,
    ``[..., H*K]``, and its logits are ``[..., H*K]`` (K per variable, softmax within a block).

    A variable is drawn from one uniform by the inverse CDF: the class k with
    F(k - 1) <= u < F(k), F the cumulative softmax, i.e. k = #{j < K - 1 : F(j) <= u}."""

    name = "categorical"

    def __init__(self, classes: int):
        if int(classes) < 2:
            raise ValueError(f"a categorical variable needs at least 2 classes, got {classes}")
        self.classes = int(classes)

    def width(self, variables: int) -> int:
        return variables * self.classes

    def blocks(self, t: Tensor) -> Tensor:
        """``[..., H*K]`` as ``[..., H, K]``."""
        return t.unflatten(-1, (-1, self.classes))

    def prepare(self, u: Tensor) -> Tensor:
        return u

    def index(self, u: Tensor, logits: Tensor) -> Tensor:
        """The class of each variable, ``[..., H]`` (int64), from uniforms ``[..., H]``."""
        return self.index_from_log_probs(u, torch.log_softmax(self.blocks(logits), -1))

    @staticmethod
    def index_from_log_probs(u: Tensor, log_probs: Tensor) -> Tensor:
        """:meth:`index` from the blocks' log-probabilities ``[..., H, K]`` (for a caller that needs them too:
        the same operations, so the same classes)."""
        cdf = log_probs.exp().cumsum(-1)[..., :-1]                                  # [..., H, K-1]
        return (cdf <= u.unsqueeze(-1)).sum(-1)

    def one_hot(self, index: Tensor, dtype) -> Tensor:
        """``[..., H]`` classes as ``[..., H*K]`` one-hot blocks (a comparison, so it works under vmap)."""
        ks = torch.arange(self.classes, device=index.device)
        return (index.unsqueeze(-1) == ks).to(dtype).flatten(-2)

    def sample(self, noise: Tensor, logits: Tensor) -> Tensor:
        with torch.no_grad():
            return self.one_hot(self.index(noise, logits.detach()), logits.dtype)

    def log_prob(self, z: Tensor, logits: Tensor) -> Tensor:
        """log q summed over the layer's variables; ``z`` one-hot (or relaxed) ``[..., H*K]`` broadcasts."""
        return (z * torch.log_softmax(self.blocks(logits), -1).flatten(-2)).sum(-1)

    def entropy(self, logits: Tensor) -> Tensor:
        logp = torch.log_softmax(self.blocks(logits), -1)
        return -(logp.exp() * logp).sum((-2, -1))

    def mean(self, logits: Tensor) -> Tensor:
        return torch.softmax(self.blocks(logits), -1).flatten(-2)

    def configurations(self, variables: int, device=None, dtype=torch.float32) -> Tensor:
        """Every value of a layer as one-hot blocks, ``[K^H, H*K]``."""
        index = torch.tensor(list(itertools.product(range(self.classes), repeat=variables)),
                             device=device, dtype=torch.int64).view(-1, variables)
        return self.one_hot(index, dtype)

    def __repr__(self) -> str:
        return f"Categorical({self.classes})"


FAMILIES = ("bernoulli", "categorical")


def latent_family(name: str = "bernoulli", classes: int = 2) -> "Bernoulli | Categorical":
    """The family called ``name`` ("bernoulli", or "categorical" with ``classes`` K >= 2)."""
    if name == "bernoulli":
        return Bernoulli()
    if name == "categorical":
        return Categorical(classes)
    raise ValueError(f"unknown latent family {name!r}; use one of {', '.join(FAMILIES)}")


ACTIVATIONS = {"tanh": nn.Tanh, "leaky_relu": nn.LeakyReLU}


class UniformTape:
    """Uniforms drawn in advance and handed out, in order, by :meth:`SBN.draw_uniforms` (one call takes one
    ``[B, H_l]`` tensor per layer). A replica group draws each replica's uniforms from that replica's own
    generator, in the order the standalone run draws them, and hands the estimator a tape instead of the
    generator; :func:`record_draws` learns that order."""

    def __init__(self, draws: Sequence[Tensor]):
        self.draws, self.pos = list(draws), 0

    def take(self, batch: int, sizes: Sequence[int]) -> list[Tensor]:
        out = self.draws[self.pos:self.pos + len(sizes)]
        if len(out) != len(sizes) or any(tuple(u.shape) != (batch, h) for u, h in zip(out, sizes)):
            raise RuntimeError(f"the uniform tape does not hold the draw asked for ([{batch}, H] for H in "
                               f"{list(sizes)}) at position {self.pos}")
        self.pos += len(sizes)
        return out


class DrawRecorder:
    """Stands in for a generator and records the batch size of every :meth:`SBN.draw_uniforms` call (the
    uniforms come from ``generator``), so that a replica group can draw the same calls in advance."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator, self.batches = generator, []


class Conditional(nn.Module):
    """Logits of a factorized distribution given its parent: ``rest(first(v))``.

    ``n_hidden = 0``: one affine map (the linear SBN). ``n_hidden = k``: ``k`` tanh hidden layers as wide
    as the input, then an affine output layer (the paper's nonlinear SBN uses k = 2). ``hidden``: the hidden
    layers' widths instead (e.g. [512, 256]), with ``activation`` ("tanh" or "leaky_relu") after each.
    """

    def __init__(self, in_dim: int, out_dim: int, n_hidden: int = 0, hidden: Sequence[int] | None = None,
                 activation: str = "tanh"):
        super().__init__()
        widths = [int(w) for w in hidden] if hidden else [in_dim] * n_hidden
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}")
        self.first = nn.Linear(in_dim, widths[0] if widths else out_dim)
        tail: list[nn.Module] = []
        for k, width in enumerate(widths):
            tail.append(ACTIVATIONS[activation]())
            tail.append(nn.Linear(width, widths[k + 1] if k + 1 < len(widths) else out_dim))
        self.rest = nn.Sequential(*tail)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def is_linear(self) -> bool:
        return len(self.rest) == 0

    def forward(self, v: Tensor) -> Tensor:
        return self.rest(self.first(v))

    def tail(self, pre: Tensor) -> Tensor:
        """Logits from pre-activations of ``first``; works on any leading shape."""
        if self.is_linear:
            return pre
        lead = pre.shape[:-1]
        out = self.rest(pre.reshape(-1, pre.shape[-1]))
        return out.reshape(*lead, out.shape[-1])


class SBN(nn.Module):
    """A sigmoid belief network (or its categorical counterpart) and its inference network.

    Args:
        x_dim: number of visible units.
        latent_sizes: variables per latent layer, layer 1 (nearest the data) first.
        n_hidden: tanh hidden layers in every conditional (0 = linear SBN).
        x_mean: training-set mean of x, subtracted from the input of the first inference layer.
        family: the latents' family, "bernoulli" or "categorical" (with ``classes`` K values per variable).
        hidden: hidden widths of every inference conditional, input side first (generative conditionals use
            them reversed), e.g. [512, 256]; replaces ``n_hidden``.
        activation: the hidden layers' nonlinearity, "tanh" or "leaky_relu".
        learn_prior: False fixes the top layer's prior logits at 0 (a uniform prior, a buffer).
    """

    def __init__(self, x_dim: int, latent_sizes: Sequence[int], n_hidden: int = 0,
                 x_mean: Tensor | None = None, family: str = "bernoulli", classes: int = 2,
                 hidden: Sequence[int] | None = None, activation: str = "tanh", learn_prior: bool = True):
        super().__init__()
        latent_sizes = [int(h) for h in latent_sizes]
        if int(x_dim) <= 0:
            raise ValueError(f"x_dim must be positive, got {x_dim}")
        if not latent_sizes or any(h <= 0 for h in latent_sizes):
            raise ValueError(f"latent_sizes must be a non-empty list of positive ints, got {latent_sizes}")
        if n_hidden < 0:
            raise ValueError(f"n_hidden must be >= 0, got {n_hidden}")
        hidden = [int(w) for w in hidden] if hidden else []
        if any(w <= 0 for w in hidden):
            raise ValueError(f"hidden widths must be positive, got {hidden}")
        self.family = latent_family(family, classes)
        self.x_dim = int(x_dim)
        self.latent_sizes = latent_sizes
        self.n_hidden = len(hidden) if hidden else int(n_hidden)
        #: entries of each latent layer's encoding (= latent_sizes for binary units, H*K one-hot entries)
        self.widths = [self.family.width(h) for h in latent_sizes]
        sizes = [self.x_dim] + self.widths
        self.sizes = sizes
        self.q_nets = nn.ModuleList(Conditional(sizes[l], sizes[l + 1], n_hidden, hidden, activation)
                                    for l in range(len(latent_sizes)))
        self.p_nets = nn.ModuleList(Conditional(sizes[l + 1], sizes[l], n_hidden, hidden[::-1], activation)
                                    for l in range(len(latent_sizes)))
        if learn_prior:
            self.prior_logits = nn.Parameter(torch.zeros(sizes[-1]))
        else:
            self.register_buffer("prior_logits", torch.zeros(sizes[-1]))
        self.register_buffer("x_mean", torch.zeros(self.x_dim) if x_mean is None else x_mean.detach().clone().float())

    @property
    def n_configurations(self) -> int:
        """Joint latent configurations (what exact enumeration visits): 2^N, or K^N for N categorical variables."""
        return self.family.classes ** sum(self.latent_sizes)

    @property
    def n_layers(self) -> int:
        return len(self.latent_sizes)

    def inference_parameters(self) -> list[nn.Parameter]:
        return list(self.q_nets.parameters())

    def generative_parameters(self) -> list[nn.Parameter]:
        prior = [self.prior_logits] if isinstance(self.prior_logits, nn.Parameter) else []
        return list(self.p_nets.parameters()) + prior

    # ----- inference network ---------------------------------------------------------------
    def q_input(self, l: int, parent: Tensor) -> Tensor:
        """Input of inference layer ``l`` (1-based): the parent, mean-centred for layer 1."""
        return parent - self.x_mean.to(parent.dtype) if l == 1 else parent

    def q_logits(self, l: int, parent: Tensor) -> Tensor:
        """Logits of q(z_l | z_{l-1}=parent); ``l`` is 1-based."""
        return self.q_nets[l - 1](self.q_input(l, parent))

    def draw_uniforms(self, batch: int, generator: "torch.Generator | UniformTape | None" = None,
                      device=None, dtype=None) -> list[Tensor]:
        """One uniform per latent unit, as a list of ``[B, H_l]`` tensors: drawn from ``generator``, or the
        next ones of a :class:`UniformTape` (uniforms drawn in advance, e.g. per replica of a group)."""
        if isinstance(generator, UniformTape):
            return generator.take(batch, self.latent_sizes)
        if isinstance(generator, DrawRecorder):
            generator.batches.append(int(batch))
            generator = generator.generator
        p = self.prior_logits
        return [torch.rand(batch, h, generator=generator, device=device or p.device, dtype=dtype or p.dtype)
                for h in self.latent_sizes]

    def sample_q(self, x: Tensor, uniforms: Sequence[Tensor]) -> list[Tensor]:
        """Sample z_1..z_L ~ q(. | x) from explicit uniforms ``[B, H_l]``; returns 0/1 floats (no gradient),
        each layer's encoding ``[B, widths[l]]``."""
        zs, parent, fam = [], x, self.family
        with torch.no_grad():
            for l, u in enumerate(uniforms, start=1):
                z = fam.sample(fam.prepare(u), self.q_logits(l, parent))
                zs.append(z)
                parent = z
        return zs

    def log_q_layers(self, x: Tensor, zs: Sequence[Tensor]) -> list[Tensor]:
        """[log q(z_l | z_{l-1}) for l = 1..L], each ``[B]``."""
        parents = [x] + list(zs[:-1])
        return [self.family.log_prob(z, self.q_logits(l, p)) for l, (p, z) in enumerate(zip(parents, zs), start=1)]

    def entropy_layers(self, x: Tensor, zs: Sequence[Tensor]) -> list[Tensor]:
        """[H(q(. | z_{l-1})) for l = 1..L], each ``[B]`` (depends on the parents only)."""
        parents = [x] + list(zs[:-1])
        return [self.family.entropy(self.q_logits(l, p)) for l, p in enumerate(parents, start=1)]

    def log_q(self, x: Tensor, zs: Sequence[Tensor]) -> Tensor:
        """log q(z_1..z_L | x), ``[B]``."""
        return torch.stack(self.log_q_layers(x, zs)).sum(0)

    # ----- generative network -------------------------------------------------------------
    def log_p_layers(self, x: Tensor, zs: Sequence[Tensor]) -> list[Tensor]:
        """[log p(z_{l-1} | z_l) for l = 1..L] + [log p(z_L)], each ``[B]``."""
        below = [x] + list(zs[:-1])
        terms = [self.log_prob_below(l, v, self.p_nets[l](z)) for l, (v, z) in enumerate(zip(below, zs))]
        terms.append(self.family.log_prob(zs[-1], self.prior_logits))
        return terms

    def log_prob_below(self, l: int, v: Tensor, logits: Tensor) -> Tensor:
        """log p(z_l = v | logits) for the layer the generative net ``p_nets[l]`` predicts: x (l = 0, Bernoulli)
        or latent layer l (the family's)."""
        return bernoulli_log_prob(v, logits) if l == 0 else self.family.log_prob(v, logits)

    def log_joint(self, x: Tensor, zs: Sequence[Tensor]) -> Tensor:
        """log p(x, z_1..z_L), ``[B]``."""
        return torch.stack(self.log_p_layers(x, zs)).sum(0)

    def objective(self, x: Tensor, zs: Sequence[Tensor]) -> Tensor:
        """F(z) = log p(x, z) + sum_l H(q(. | z_{l-1})), ``[B]``: the ELBO integrand with each layer's log q
        replaced by its analytic conditional entropy (E_q[F] is the ELBO). Differentiable through ``zs``."""
        return self.log_joint(x, zs) + torch.stack(self.entropy_layers(x, zs)).sum(0)

    @torch.no_grad()
    def sample_p(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, list[Tensor]]:
        """Ancestral samples: returns (mean of x given z_1 ``[n, D]``, [z_1..z_L])."""
        p, fam = self.prior_logits, self.family
        if isinstance(fam, Bernoulli):     # the draws and operations of the binary model as they were
            z = (torch.rand(n, p.numel(), generator=generator, device=p.device, dtype=p.dtype)
                 < torch.sigmoid(p)).to(p.dtype)
            zs = [z]
            for l in range(self.n_layers - 1, 0, -1):
                probs = torch.sigmoid(self.p_nets[l](zs[0]))
                zs.insert(0, (torch.rand(probs.shape, generator=generator, device=p.device, dtype=p.dtype)
                              < probs).to(p.dtype))
            return torch.sigmoid(self.p_nets[0](zs[0])), zs
        logits = p.expand(n, p.numel())
        zs = []
        for l in range(self.n_layers, 0, -1):
            u = torch.rand(n, self.latent_sizes[l - 1], generator=generator, device=p.device, dtype=p.dtype)
            zs.insert(0, fam.sample(fam.prepare(u), logits))
            logits = self.p_nets[l - 1](zs[0])
        return torch.sigmoid(logits), zs

    # ----- bounds ---------------------------------------------------------------------------
    @torch.no_grad()
    def log_weights(self, x: Tensor, samples: int, generator: torch.Generator | None = None) -> Tensor:
        """log p(x, z) - log q(z | x) for ``samples`` draws z ~ q(. | x) per row of ``x`` ``[B, D]``: ``[samples, B]``.

        The draws are those of ``sample_q(x.repeat(samples, 1), draw_uniforms(samples * B))`` and every value
        is computed by the same operations on the same operands, so the result is the same as that
        ``log_joint - log_q`` (bitwise, on MNIST's shapes); only the work is arranged differently: each data
        row's first inference layer is computed once, each layer's q logits are kept for log q instead of
        recomputed, and on a CPU the sample rows go in blocks of about ``EVAL_BLOCK_ROWS``.
        (A matrix product may round a row differently when its number of rows changes, so on other shapes
        than those measured, MNIST's, the result can differ from that definition in the last bits.)
        """
        B = x.shape[0]
        us = self.draw_uniforms(samples * B, generator, x.device, x.dtype)   # [samples*B, H_l], sample-major
        a1 = self.q_logits(1, x)                                              # [B, H_1]
        per_block = samples if x.device.type != "cpu" else max(1, min(samples, EVAL_BLOCK_ROWS // max(B, 1)))
        out = x.new_empty(samples, B)
        for s0 in range(0, samples, per_block):
            s1 = min(samples, s0 + per_block)
            block = [u[s0 * B:s1 * B] for u in us]
            out[s0:s1] = self._block_log_weights(x, a1.repeat(s1 - s0, 1), block).view(s1 - s0, B)
        return out

    def _block_log_weights(self, x: Tensor, a1: Tensor, uniforms: Sequence[Tensor]) -> Tensor:
        """``log_weights`` of one block: ``a1`` ``[s*B, H_1]`` (x's first-layer logits, repeated s times) and the
        block's uniforms; ``[s*B]``."""
        logits, zs, a, fam = [], [], a1, self.family
        for l, u in enumerate(uniforms, start=1):
            if l > 1:
                a = self.q_logits(l, zs[-1])
            logits.append(a)
            zs.append(fam.sample(fam.prepare(u), a))
        px = self.p_nets[0](zs[0])                                            # [s*B, D]
        s, B = px.shape[0] // x.shape[0], x.shape[0]
        # bernoulli_log_prob(x.repeat(s, 1), px) without the repeated copy of x
        terms = [(px.view(s, B, -1) * x).sum(-1).view(-1) - softplus(px).sum(-1)]
        terms += [fam.log_prob(v, self.p_nets[l](z)) for l, (v, z) in enumerate(zip(zs[:-1], zs[1:]), start=1)]
        terms.append(fam.log_prob(zs[-1], self.prior_logits))
        log_q = torch.stack([fam.log_prob(z, a) for z, a in zip(zs, logits)]).sum(0)
        return torch.stack(terms).sum(0) - log_q

    @torch.no_grad()
    def elbo(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Single-sample ELBO estimate log p(x, z) - log q(z | x), ``[B]``."""
        return self.log_weights(x, 1, generator)[0]

    @torch.no_grad()
    def iwae_bound(self, x: Tensor, k: int, generator: torch.Generator | None = None,
                   max_rows: int = 65536) -> Tensor:
        """K-sample importance-weighted bound log (1/K) sum_k p(x, z_k) / q(z_k | x), ``[B]``.

        The K samples are drawn in chunks of at most ``max_rows`` rows so memory stays bounded
        for large K; chunks are combined with a running logsumexp.
        """
        B = x.shape[0]
        per_chunk = max(1, max_rows // max(B, 1))
        total = torch.full((B,), -math.inf, device=x.device, dtype=x.dtype)
        done = 0
        while done < k:
            c = min(per_chunk, k - done)
            w = self.log_weights(x, c, generator)                           # [c, B]
            total = torch.logaddexp(total, torch.logsumexp(w, 0))
            done += c
        return total - math.log(k)


def family_hparams(model_cfg) -> dict:
    """The HParams a model config adds for its latent family: none for binary units (as before families),
    ``family`` and ``classes`` for categorical ones. (Kept out of cli.py: a task function that joblib or
    submitit pickles by value must not read an attribute named like a submodule of torch, e.g. ``classes``.)"""
    if model_cfg.family == "bernoulli":
        return {}
    return {"family": model_cfg.family, "classes": int(model_cfg.classes)}


def build_model(model_cfg, x_dim: int, x_mean: Tensor | None = None) -> SBN:
    """The :class:`SBN` a ``model`` config section (:class:`sbn_train.config.ModelConfig`) describes."""
    return SBN(x_dim, list(model_cfg.latent_sizes), int(model_cfg.n_hidden), x_mean=x_mean,
               family=model_cfg.family, classes=int(model_cfg.classes), hidden=list(model_cfg.hidden),
               activation=model_cfg.activation, learn_prior=bool(model_cfg.learn_prior))
