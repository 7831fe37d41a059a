"""A replica group: R runs of one configuration trained in one process, every kernel doing the work of all R.

The replicas share everything that fixes the shape of the computation (model, estimator and its options,
dataset, batch size, optimizer kind and its constants) and differ in what a sweep varies per run: the seed
(initialization, minibatch order, binarization and estimator noise), the learning rate and the weight decay.

Layout. Every parameter, buffer and optimizer statistic of the R runs is one stacked tensor with a leading
replica dimension ``[R, ...]`` (:attr:`ReplicaGroup.params`, ``buffers``, ``opt_state``). Each replica is still
an ordinary :class:`~sbn_train.state.TrainState` whose modules' parameters and buffers, and whose optimizers'
statistics, are *views* of row r of those stacks: evaluation, the variance probe, checkpoints, best models and
results.json work on a replica exactly as on a standalone run, and a replica's checkpoint is a standalone
checkpoint (a group resumes by loading each replica's checkpoint and stacking them again).

The step. Each replica draws its minibatch and then its estimator's uniforms from its own generator, in the
order the standalone run draws them (the uniforms are drawn in advance and handed to the estimator on a
:class:`~sbn_train.models.UniformTape`; :class:`~sbn_train.models.DrawRecorder` learns which draws a step
makes). The estimator then runs once for all replicas under ``torch.func.vmap``: activations are ``[R, B, H]``,
a linear map is a batched matrix product, the surrogate and the auxiliary loss are per replica, and each
replica's gradient is the gradient of its own surrogate (``torch.func.vjp``, one forward and one backward per
loss). Estimator state (moving averages) is per replica: the buffers are stacked like the parameters. The
update is a functional RMSprop or Adam with per-replica learning rates and weight decays ``[R, 1, ...]``,
element by element the arithmetic of ``torch.optim`` (checked against it in float64).

The flip passes of ``marginal`` and ``leg`` take their device route here (it reads nothing back to the host,
as a vmapped function must not) with a workspace without scratch (results cannot be written into unbatched
buffers under vmap).
"""
from __future__ import annotations

import copy
from collections import defaultdict

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from .estimators.flip_common import Workspace
from .models import DrawRecorder, UniformTape

#: optimizer statistics stacked per parameter, by optimizer class
_STATE_KEYS = {"RMSprop": ("square_avg",), "Adam": ("exp_avg", "exp_avg_sq")}


class GroupError(ValueError):
    """Runs that cannot share a replica group (the message says which setting differs)."""


class _Pair(nn.Module):
    """The model and the estimator as one module, so that ``functional_call`` can swap in one replica's
    parameters and buffers for both."""

    def __init__(self, model: nn.Module, estimator: nn.Module):
        super().__init__()
        self.model, self.estimator = model, estimator

    def forward(self, x: Tensor, draws: list[Tensor]):
        out = self.estimator(self.model, x, UniformTape(draws))
        aux = out.aux_loss if out.aux_loss is not None else out.surrogate.new_zeros(())
        return out.surrogate, aux, out.elbo, dict(out.metrics)


def _set_tensor(root: nn.Module, name: str, value: Tensor, parameter: bool) -> None:
    prefix, _, leaf = name.rpartition(".")
    module = root.get_submodule(prefix) if prefix else root
    if parameter:
        module._parameters[leaf] = value
    else:
        module._buffers[leaf] = value


def _optimizer_kind(opt: torch.optim.Optimizer) -> str:
    kind = type(opt).__name__
    if kind not in _STATE_KEYS:
        raise GroupError(f"a replica group supports RMSprop and Adam, not {kind}")
    return kind


def _constants(opt: torch.optim.Optimizer) -> tuple:
    """The optimizer settings every replica of a group must share (all but lr and weight_decay)."""
    g = opt.param_groups[0]
    return tuple(sorted((k, v) for k, v in g.items() if k not in ("params", "lr", "weight_decay")
                        and isinstance(v, (int, float, bool, tuple, str, type(None)))))


class _StackedOptimizer:
    """The optimizer statistics of the R replicas' optimizers over one list of parameters, stacked, and the
    per-replica learning rates and weight decays; :meth:`step` updates the stacked parameters in place."""

    def __init__(self, opts: list[torch.optim.Optimizer], old_params: list[list[nn.Parameter]],
                 new_params: list[list[nn.Parameter]], stacked: list[Tensor]):
        self.kind = _optimizer_kind(opts[0])
        if any(_optimizer_kind(o) != self.kind or _constants(o) != _constants(opts[0]) for o in opts):
            raise GroupError("the replicas of a group must share the optimizer and its settings "
                             "(all but optim.lr and optim.weight_decay)")
        group = opts[0].param_groups[0]
        self.alpha, self.eps = group.get("alpha"), group["eps"]
        self.betas = group.get("betas")
        if group.get("momentum", 0) or group.get("centered", False) or group.get("amsgrad", False) \
                or group.get("maximize", False):
            raise GroupError("a replica group supports plain RMSprop and Adam (no momentum, centered, amsgrad "
                             "or maximize)")
        device = stacked[0].device if stacked else torch.device("cpu")
        self.params = stacked
        self.lr = torch.tensor([float(o.param_groups[0]["lr"]) for o in opts], dtype=torch.float64, device=device)
        self.wd = torch.tensor([float(o.param_groups[0]["weight_decay"]) for o in opts], dtype=torch.float64,
                               device=device)
        self.any_wd = any(float(o.param_groups[0]["weight_decay"]) != 0 for o in opts)
        keys = _STATE_KEYS[self.kind]
        self.state: list[dict[str, Tensor]] = []
        for i, p in enumerate(stacked):
            entry = {}
            for key in keys:
                entry[key] = torch.stack([o.state[old[i]][key].detach() if old[i] in o.state
                                          else torch.zeros_like(p[0]) for o, old in zip(opts, old_params)])
            steps = [o.state[old[i]]["step"] if old[i] in o.state else None for o, old in zip(opts, old_params)]
            like = next((s for s in steps if s is not None), torch.zeros((), device=p.device))
            entry["step"] = torch.stack([(s if s is not None else torch.zeros_like(like)).detach().clone()
                                         for s in steps])
            self.state.append(entry)
        # each replica's optimizer now holds views of the stacks
        for r, (opt, params) in enumerate(zip(opts, new_params)):
            opt.param_groups[0]["params"] = list(params)
            opt.state = defaultdict(dict, {p: {k: v[r] for k, v in self.state[i].items()}
                                           for i, p in enumerate(params)})

    def _per_replica(self, v: Tensor, like: Tensor) -> Tensor:
        return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    @torch.no_grad()
    def step(self, grads: list[Tensor]) -> None:
        """One update; ``grads`` (fresh tensors, one per stacked parameter) are used as scratch."""
        for p, g, st in zip(self.params, grads, self.state):
            lr = self._per_replica(self.lr, p)
            if self.any_wd:
                g = g.addcmul_(p, self._per_replica(self.wd, p))
            st["step"].add_(1)
            if self.kind == "RMSprop":
                sq = st["square_avg"]
                sq.mul_(self.alpha).addcmul_(g, g, value=1 - self.alpha)
                p.sub_(g.div_(sq.sqrt().add_(self.eps)).mul_(lr))
            else:
                beta1, beta2 = self.betas
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                step = self._per_replica(st["step"], p)
                bc1 = 1 - torch.pow(torch.full_like(step, beta1), step)
                bc2 = 1 - torch.pow(torch.full_like(step, beta2), step)
                denom = (v.sqrt() / bc2.sqrt()).add_(self.eps)
                p.sub_((lr / bc1) * (m / denom))


class ReplicaGroup:
    """R :class:`~sbn_train.state.TrainState` s stepped as one (see the module docstring). The states keep
    working on their own (evaluation, checkpoints); their tensors become views of the group's stacks."""

    def __init__(self, states: list, vectorize: bool | None = None):
        if not states:
            raise GroupError("a replica group needs at least one run")
        self.states = list(states)
        first = states[0]
        self.batch_size = first.sampler.batch_size
        if any(s.sampler.batch_size != self.batch_size for s in states):
            raise GroupError("the replicas of a group must share train.batch_size")
        self.device = first.device
        template = _Pair(copy.deepcopy(first.model), copy.deepcopy(first.estimator))
        est = template.estimator
        flip_pass = hasattr(est, "route")
        # vmap needs the flip passes' device route (nothing read back to the host); on a CPU their own route
        # (exp tables, sparse changes) costs a fraction of it, so there the replicas take turns instead, as they
        # do for estimators that declare vmap a loss on a CPU (``Estimator.vmap_on_cpu``)
        on_cpu = self.device.type == "cpu"
        turns = on_cpu and (flip_pass or not getattr(est, "vmap_on_cpu", True))
        self.vectorize = (not turns) if vectorize is None else bool(vectorize)
        if self.vectorize and flip_pass:
            est.route = "device"
            if isinstance(getattr(est, "workspace", None), Workspace):
                est.workspace = Workspace(reuse=False)
        self.template = template
        pairs = [_Pair(s.model, s.estimator) for s in states]
        names = [n for n, _ in pairs[0].named_parameters()]
        shapes = {n: tuple(p.shape) for n, p in pairs[0].named_parameters()}
        for pair in pairs[1:]:
            if {n: tuple(p.shape) for n, p in pair.named_parameters()} != shapes:
                raise GroupError("the replicas of a group must share the model and the estimator")
        trainable_est = {id(p) for s in states for p in s.est_params}
        self.model_names = [n for n in names if n.startswith("model.")]
        self.est_names = [n for n, p in pairs[0].named_parameters() if n.startswith("estimator.")
                          and id(p) in trainable_est]
        frozen = [n for n in names if n not in self.model_names and n not in self.est_names]
        buffer_names = [n for n, _ in pairs[0].named_buffers()]
        old_model = [list(s.model.parameters()) for s in states]
        old_est = [list(s.est_params) for s in states]
        self.params: dict[str, Tensor] = {}
        for n in self.model_names + self.est_names:
            self.params[n] = torch.stack([dict(p.named_parameters())[n].detach() for p in pairs])
        self.frozen = {n: torch.stack([dict(p.named_parameters())[n].detach() for p in pairs]) for n in frozen}
        self.buffers = {n: torch.stack([dict(p.named_buffers())[n] for p in pairs]) for n in buffer_names}
        for r, pair in enumerate(pairs):               # rebind: the replica's tensors are views of row r
            for n in self.model_names + self.est_names:
                _set_tensor(pair, n, nn.Parameter(self.params[n][r]), parameter=True)
            for n in frozen:
                _set_tensor(pair, n, nn.Parameter(self.frozen[n][r], requires_grad=False), parameter=True)
            for n in buffer_names:
                _set_tensor(pair, n, self.buffers[n][r], parameter=False)
        # each replica's own parameters in the stacks' order (the looped step differentiates through them)
        self._own = [([dict(pair.named_parameters())[n] for n in self.model_names],
                      [dict(pair.named_parameters())[n] for n in self.est_names]) for pair in pairs]
        new_model = [list(s.model.parameters()) for s in states]
        for s in states:
            s.est_params = [p for p in s.estimator.parameters() if p.requires_grad]
        new_est = [list(s.est_params) for s in states]
        self.model_opt = _StackedOptimizer([s.model_opt for s in states], old_model, new_model,
                                           [self.params[n] for n in self.model_names])
        self.est_opt = None
        if self.est_names:
            if any(s.est_opt is None for s in states):
                raise GroupError("every replica of a group needs the estimator's optimizer")
            self.est_opt = _StackedOptimizer([s.est_opt for s in states], old_est, new_est,
                                             [self.params[n] for n in self.est_names])
        self.elbo_sum = torch.stack([s.elbo_sum.detach().reshape(()) for s in states]).clone()
        for r, s in enumerate(states):
            s.elbo_sum = self.elbo_sum[r]
        self.draw_batches = self._record_draws()
        self._probe_draws: dict[int, list[int]] = {}
        self._grads = vmap(self._replica_grads) if self.vectorize else self._looped_grads
        self.last_metrics: dict[str, Tensor] = {}

    @property
    def size(self) -> int:
        return len(self.states)

    def _record_draws(self) -> list[int]:
        """The batch sizes of the estimator's ``draw_uniforms`` calls in one step, and whether it has an
        auxiliary loss (from a throwaway copy, on zeros, with a throwaway generator: nothing of the replicas
        changes)."""
        first = self.states[0]
        model, est = copy.deepcopy(first.model), copy.deepcopy(first.estimator)
        est.train()                                   # as the step runs (an auxiliary loss may be train-only)
        recorder = DrawRecorder(torch.Generator(device=self.device).manual_seed(0))
        x = torch.zeros(self.batch_size, first.sampler.data.shape[1], device=self.device,
                        dtype=first.model.prior_logits.dtype)
        out = est(model, x, recorder)
        # a standalone step steps the estimator's optimizer only with an auxiliary loss (compute_grads)
        self.has_aux = out.aux_loss is not None
        del out
        return list(recorder.batches)

    def draw(self) -> tuple[Tensor, list[Tensor]]:
        """Each replica's minibatch, then its uniforms, from its own generator (the standalone run's order):
        ``[R, B, D]`` and, per draw and layer, ``[R, n, H_l]``."""
        xs = [s.sampler.next().to(s.model.prior_logits.dtype) for s in self.states]
        return torch.stack(xs), self.draw_uniforms()

    def draw_uniforms(self) -> list[Tensor]:
        """One step's uniforms of every replica from its own generator, per draw and layer ``[R, n, H_l]``."""
        per_replica = []
        for s in self.states:
            mine = []
            for n in self.draw_batches:
                mine += s.model.draw_uniforms(n, s.generator, self.device, s.model.prior_logits.dtype)
            per_replica.append(mine)
        return [torch.stack(col) for col in zip(*per_replica)]

    def gradients(self, xs: Tensor, draws: list[Tensor], train: bool = True):
        """Every replica's gradient estimate at its minibatch ``xs[r]`` and uniforms, without an update:
        (model grads ``{name: [R, ...]}``, estimator grads, ELBO ``[R, B]``, metrics ``{name: [R]}``, new
        estimator state or None). ``train=False``: eval mode (moving averages stay)."""
        self.template.train(train)
        for s in self.states:
            s.estimator.train(train)
        return self._grads(self.params, self.frozen, self.buffers, xs, draws)

    def probe_draws(self, batch_size: int) -> list[int]:
        """The batch sizes of the estimator's ``draw_uniforms`` calls of one estimate in eval mode (the variance
        probe's) on ``batch_size`` rows, recorded as :meth:`_record_draws` records a step's (cached)."""
        cache = self._probe_draws
        if batch_size not in cache:
            first = self.states[0]
            model, est = copy.deepcopy(first.model), copy.deepcopy(first.estimator)
            est.eval()
            recorder = DrawRecorder(torch.Generator(device=self.device).manual_seed(0))
            x = torch.zeros(batch_size, first.sampler.data.shape[1], device=self.device,
                            dtype=first.model.prior_logits.dtype)
            est(model, x, recorder)
            cache[batch_size] = list(recorder.batches)
        return cache[batch_size]

    def probe_uniforms(self, rows: list[int], generators: list[torch.Generator], batch_size: int) -> list[Tensor]:
        """One eval-mode estimate's uniforms of the replicas ``rows``, replica ``rows[i]``'s from
        ``generators[i]`` in the order its estimator draws them, per draw and layer ``[k, n, H_l]``."""
        per_replica = []
        for r, gen in zip(rows, generators):
            model, mine = self.states[r].model, []
            for n in self.probe_draws(batch_size):
                mine += model.draw_uniforms(n, gen, self.device, model.prior_logits.dtype)
            per_replica.append(mine)
        return [torch.stack(col) for col in zip(*per_replica)]

    def probe_gradients(self, rows: list[int], xs: Tensor, draws: list[Tensor]) -> dict[str, Tensor]:
        """The model gradients ``{name: [k, ...]}`` of the surrogates of the replicas ``rows`` (a vectorized
        group) at their minibatches ``xs`` ``[k, B, D]`` and uniforms ``draws``, the estimators in eval mode (no
        state updates, no optimizer step; the modes are restored)."""
        if not self.vectorize:
            raise RuntimeError("probe_gradients needs a vectorized replica group")
        modes = [s.estimator.training for s in self.states]
        template_mode = self.template.training
        idx = None if list(rows) == list(range(self.size)) else torch.tensor(rows, device=self.device)

        def pick(stacks: dict) -> dict:
            return stacks if idx is None else {n: t.index_select(0, idx) for n, t in stacks.items()}

        try:
            self.template.train(False)
            for s in self.states:
                s.estimator.train(False)
            g_model = self._grads(pick(self.params), pick(self.frozen), pick(self.buffers), xs, draws)[0]
        finally:
            self.template.train(template_mode)
            for s, mode in zip(self.states, modes):
                s.estimator.train(mode)
        return g_model

    def _replica_grads(self, params: dict, frozen: dict, buffers: dict, x: Tensor, draws: list[Tensor]):
        model_p = {n: params[n] for n in self.model_names}
        est_p = {n: params[n] for n in self.est_names}

        def losses(mp, ep):
            # the estimator updates its state (moving averages) in place: on copies made inside the
            # transform, returned and written back to the stacks by the caller
            state = {n: b.clone() for n, b in buffers.items()}
            surrogate, aux, elbo, metrics = functional_call(self.template, {**mp, **ep, **frozen, **state},
                                                            (x, draws))
            return (surrogate, aux), (elbo.detach(), {k: v.detach() for k, v in metrics.items()}, state)

        (surrogate, aux), pullback, (elbo, metrics, state) = vjp(losses, model_p, est_p, has_aux=True)
        one, zero = torch.ones_like(surrogate), torch.zeros_like(surrogate)
        g_model, _ = pullback((one, zero))
        g_est = pullback((zero, one))[1] if self.est_names else {}
        return g_model, g_est, elbo, metrics, state

    def _looped_grads(self, params: dict, frozen: dict, buffers: dict, xs: Tensor, draws: list[Tensor]):
        """The replicas in turn, each through its own modules (views of the stacks) with ordinary autograd
        and the flip passes' own route; results stacked as :meth:`_replica_grads` under vmap gives them.
        The estimators update their state (views of the stacked buffers) themselves."""
        g_model: dict[str, list] = {n: [] for n in self.model_names}
        g_est: dict[str, list] = {n: [] for n in self.est_names}
        elbos, metrics = [], []
        for r, s in enumerate(self.states):
            out = s.estimator(s.model, xs[r], UniformTape([u[r] for u in draws]))
            model_p, est_p = self._own[r]
            if self.est_names:
                if out.aux_loss is not None:
                    grads = torch.autograd.grad(out.aux_loss, est_p, retain_graph=True, allow_unused=True)
                else:
                    grads = [None] * len(est_p)
                for n, p, g in zip(self.est_names, est_p, grads):
                    g_est[n].append(torch.zeros_like(p) if g is None else g)
            grads = torch.autograd.grad(out.surrogate, model_p, allow_unused=True)
            for n, p, g in zip(self.model_names, model_p, grads):
                g_model[n].append(torch.zeros_like(p) if g is None else g)
            elbos.append(out.elbo.detach())
            metrics.append({k: v.detach() for k, v in out.metrics.items()})
        stack = {k: torch.stack([m[k] for m in metrics]) for k in (metrics[0] if metrics else {})}
        return ({n: torch.stack(v) for n, v in g_model.items()}, {n: torch.stack(v) for n, v in g_est.items()},
                torch.stack(elbos), stack, None)

    def step(self) -> None:
        """One update of every replica (minibatch, uniforms, estimate, gradients, optimizers, running ELBO)."""
        xs, draws = self.draw()
        self.apply(*self.gradients(xs, draws))
        for s in self.states:
            s.elbo_n += 1

    def apply(self, g_model: dict, g_est: dict, elbo: Tensor, metrics: dict, state: dict | None) -> None:
        """The update from :meth:`gradients`: the estimator state, both optimizers, the running ELBO (device
        work only: a CUDA graph captures it)."""
        if state is not None:                 # (the looped step updates the buffers in place)
            with torch.no_grad():
                for n, b in self.buffers.items():
                    b.copy_(state[n])
        self.model_opt.step([g_model[n] for n in self.model_names])
        if self.est_opt is not None and self.has_aux:
            self.est_opt.step([g_est[n] for n in self.est_names])
        with torch.no_grad():
            self.elbo_sum += elbo.mean(-1)
        self.last_metrics = metrics

    def replica_metrics(self, r: int) -> dict[str, Tensor]:
        """Replica r's estimator metrics of the last step (0-dim device tensors, as a standalone step's)."""
        return {k: v[r] for k, v in self.last_metrics.items()}


class GraphedGroup:
    """A group's step captured as one CUDA graph (``train.cuda_graph``, on for CUDA by default), as
    :class:`sbn_train.graph.GraphStep` captures a run's: ``WARMUP_STEPS`` eager steps, then the capture of
    every replica's minibatch (its permutation and position in static device tensors), uniforms, the vmapped
    estimate, both optimizers and the running ELBO, with every replica's generator registered; then replays.
    New epochs start between replays (all replicas share N and the batch size, so they start together).
    A failed capture leaves one warning line and the group steps eagerly."""

    def __init__(self, group: ReplicaGroup):
        from .graph import WARMUP_STEPS
        self.group, self.warmup = group, WARMUP_STEPS
        self.graph = None
        self.batches: list = []
        self.metrics: dict = {}
        self.warm, self.failed = 0, False

    def __call__(self) -> None:
        if self.failed or self.warm < self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.group.step()
            torch.cuda.current_stream().wait_stream(side)
            self.warm += 1
            return
        if self.graph is None:
            from .graph import _DeviceBatches
            self.batches = [_DeviceBatches(s.sampler) for s in self.group.states]
            for b in self.batches:
                b.before_step()
            if not self._capture():
                self.failed = True
                self.group.step()
                return
        else:
            for b in self.batches:
                b.before_step()
        self.graph.replay()
        for b in self.batches:
            b.after_step()
        for s in self.group.states:
            s.elbo_n += 1
        self.group.last_metrics = self.metrics

    def _capture(self) -> bool:
        import logging
        group = self.group
        graph = torch.cuda.CUDAGraph()
        try:
            for s in group.states:
                graph.register_generator_state(s.generator)
            with torch.cuda.graph(graph):
                xs = torch.stack([b.batch().to(s.model.prior_logits.dtype)
                                  for b, s in zip(self.batches, group.states)])
                group.apply(*group.gradients(xs, group.draw_uniforms()))
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to the eager step
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            logging.getLogger(__name__).warning("train.cuda_graph: capture of the replica group failed (%s); "
                                                "the group steps eagerly", first[:200])
            torch.cuda.synchronize()
            return False
        self.graph, self.metrics = graph, dict(group.last_metrics)
        return True


def group_bytes(per_run_peak: int, per_run_state: int, replicas: int) -> int:
    """Estimated device memory of a group: R times one run's step peak (its activations under vmap scale with
    R) and R times its parameters and optimizer statistics, with a quarter added for the allocator."""
    return int(1.25 * replicas * (per_run_peak + per_run_state))


def check_fits(states: list) -> None:
    """Refuse (:class:`GroupError`, one line) a CUDA group whose estimated memory exceeds the free device
    memory; measured before the group is built, from one step of a copy of its first run (no update)."""
    first = states[0]
    if first.device.type != "cuda":
        return
    model, est = copy.deepcopy(first.model), copy.deepcopy(first.estimator)
    x = torch.zeros(first.sampler.batch_size, first.sampler.data.shape[1], device=first.device,
                    dtype=model.prior_logits.dtype)
    torch.cuda.synchronize(first.device)
    base = torch.cuda.memory_allocated(first.device)
    torch.cuda.reset_peak_memory_stats(first.device)
    out = est(model, x, torch.Generator(device=first.device).manual_seed(0))
    out.surrogate.backward()
    peak = torch.cuda.max_memory_allocated(first.device) - base
    del out, model, est
    state_bytes = 3 * sum(p.numel() * p.element_size() for p in first.model.parameters())
    need = group_bytes(peak, state_bytes, len(states))
    free, _ = torch.cuda.mem_get_info(first.device)
    if need > free:
        raise GroupError(f"a replica group of {len(states)} runs needs about {need / 2**30:.1f} GiB of GPU memory "
                         f"and {free / 2**30:.1f} GiB are free: lower train.replicas")
