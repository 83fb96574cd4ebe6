"""MuonAdamW: nanochat's optimizer (spec §5), single-process and split across ranks.

Matrices inside the transformer blocks are trained with Muon; embeddings, the head and the
scalars with AdamW. Read top to bottom:

1. the Muon math, as pure functions on tensors: `polar_express` and `muon_update_` (one fused
   step on K stacked same-shape matrices: Nesterov momentum -> MuonEq row equilibration ->
   Polar Express orthogonalization -> Muon+ renormalization -> NorMuon variance reduction ->
   cautious weight decay);
2. `MuonAdamW`, the `torch.optim.Optimizer` that stacks each Muon shape group and runs the fused
   step (torch.compile'd on GPU), runs AdamW through torch's fused kernel (spec §5.2's math, one
   multi-tensor call per group) and, under `torch.distributed`, splits the Muon work across ranks;
3. `nanochat_param_groups`, the one definition of nanochat's parameter groups (spec §5.1) that
   pretraining, SFT, RL and users share, and `MuonAdamWFactory` for transformers/TRL trainers.

Muon's hyperparameters reach the compiled step as 0-d CPU tensors, so LR / momentum /
weight-decay schedules never trigger a recompile (AdamW is not compiled at all). Math is fp32
whatever the parameter dtype (bf16 parameters, gradients and state are upcast and written
back); only the Polar Express iteration runs in bf16 on GPUs that support it, as in the original
(a speed choice; the iteration is designed to be stable in bf16).

Distributed design (spec §5.4, adapted to Accelerate). The original wraps nothing in DDP and
reduce-scatters gradients inside `step()`. Under Accelerate the model *is* wrapped in DDP, so
gradients arrive already averaged (the all-reduce overlaps the backward pass). The default mode
therefore skips gradient communication: every rank updates the AdamW parameters itself (cheap,
elementwise; state replicated), and for every Muon shape group of K matrices rank r
orthogonalizes only its chunk of ceil(K/W) of them, then the updated matrices are all-gathered
(asynchronously, overlapping the next group's compute). `grad_sync=True` is the original's mode
for runs without a DDP wrapper: Muon gradients are reduce-scattered (AVG) straight into each
rank's chunk and AdamW gradients all-reduced, all launched at the start of `step()`.
Either way the parameters equal a single process stepping on the same global batch.

`state_dict()` always returns the full, unsharded state (collective: every rank must call it,
which `accelerator.save_state` does) and `load_state_dict()` takes the full state and keeps this
rank's share, so checkpoints resume on any world size. Sparse gradients are not supported.

FSDP2 (`fully_shard`, Accelerate's `fsdp_version: 2`). The parameters are DTensors whose rows are
split across the ranks (`Shard(0)`, torch.chunk layout), and FSDP reduce-scatters averaged
gradient rows into each shard. Muon needs whole matrices, so for a shape group of K matrices the
ranks exchange rows with one all-to-all: rank r receives every rank's rows of the ceil(K/W)
matrices it owns (the same ownership as above), runs steps 1-6 (`muon_direction`) on whole
matrices, and a second all-to-all sends each rank the rows of the update that match its shard;
step 7 (`cautious_update_`, elementwise) then runs on the local rows. Each rank moves about
2·K·m·n/W values per group (an all-gather of the gradients would be K·m·n), Muon state stays with
the owner (1/W of it per rank), and AdamW runs on the local shards with DTensor state, as torch's
optimizers do under FSDP2. Meshes with more dimensions (HSDP) work along the sharded dimension.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.adamw import adamw as _fused_adamw_functional

try:  # FSDP2 parameters are DTensors
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch built without distributed support
    DTensor = Replicate = Shard = None

__all__ = [
    "POLAR_EXPRESS_COEFFS",
    "MuonAdamW",
    "MuonAdamWFactory",
    "dmodel_lr_scale",
    "cautious_update_",
    "muon_direction",
    "muon_update_",
    "nanochat_param_groups",
    "polar_express",
]

# Polar Express coefficients for num_iters=5, safety factor 2e-2, cushion 2
# (Amsel, Persson, Musco, Gower, https://arxiv.org/abs/2505.16932). Step i uses triple i.
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

ADAMW_DEFAULTS: dict[str, Any] = {"betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": 0.0}
MUON_DEFAULTS: dict[str, Any] = {"momentum": 0.95, "beta2": 0.9, "ns_steps": 5, "weight_decay": 0.0}


# ----------------------------------------------------------------------------------------------
# The math. Pure functions on tensors, written so torch.compile(fullgraph=True) takes them whole.


def polar_express(X: Tensor, ns_steps: int = 5) -> Tensor:
    """Approximate the polar factor U·Vᵀ of every matrix in `X` (shape (..., m, n)).

    X is first scaled so its spectral norm is below 1 (Frobenius norm · 1.01), then each step
    applies the odd polynomial p(X) = a·X + b·X(XᵀX) + c·X(XᵀX)² with the Polar Express
    coefficients, which pushes all singular values towards 1: after 5 steps they land in about
    [0.86, 1.14] whenever the input's condition number is below ~300 (not exactly 1; that is the
    method's design, and it does not hurt training). The Gram matrix is formed on the small side:
    XᵀX (n×n) for tall matrices, XXᵀ (m×m) otherwise. Runs in X's dtype.
    """
    shape = X.shape
    X = X.reshape(-1, *shape[-2:])  # baddbmm wants exactly one batch dim
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    tall = X.size(-2) > X.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        # B = b*A + c*A@A and X <- a*X + X@B (tall) or a*X + B@X, each as one fused baddbmm
        if tall:
            A = X.mT @ X
            X = torch.baddbmm(X, X, torch.baddbmm(A, A, A, beta=b, alpha=c), beta=a)
        else:
            A = X @ X.mT
            X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)
    return X.reshape(shape)


def muon_update_(
    params: Tensor,
    grads: Tensor,
    momentum_buffer: Tensor,
    second_moment: Tensor,
    momentum_t: Tensor,
    lr_t: Tensor,
    wd_t: Tensor,
    beta2_t: Tensor,
    ns_steps: int,
    polar_dtype: torch.dtype,
) -> None:
    """One Muon step on K stacked same-shape matrices, in place (spec §5.3).

    Args:
        params: (K, m, n) fp32 stacked parameters, updated in place.
        grads: (K, m, n) stacked gradients (any float dtype); used as scratch space.
        momentum_buffer: (K, m, n) momentum, updated in place (its own dtype; math in fp32).
        second_moment: (K, m, 1) if m >= n else (K, 1, n): NorMuon's factored second moment.
        momentum_t, lr_t, wd_t, beta2_t: 0-d tensors (CPU is fine); lr_t is the *effective* LR
            (group LR times the shape multiplier sqrt(max(1, m/n))).
        ns_steps: number of Polar Express steps (1..5).
        polar_dtype: dtype of the orthogonalization (bf16 on GPUs, fp32 elsewhere).

    The same as `muon_direction` (steps 1-6, which need whole matrices) followed by
    `cautious_update_` (step 7, elementwise: it also runs on row shards, as under FSDP).
    """
    lr_g = muon_direction(grads, momentum_buffer, second_moment, momentum_t, lr_t, beta2_t, ns_steps, polar_dtype)
    cautious_update_(params, lr_g, lr_t, wd_t)


def muon_direction(
    grads: Tensor,
    momentum_buffer: Tensor,
    second_moment: Tensor,
    momentum_t: Tensor,
    lr_t: Tensor,
    beta2_t: Tensor,
    ns_steps: int,
    polar_dtype: torch.dtype,
) -> Tensor:
    """Steps 1-6 of the Muon step: updates the buffers in place, returns lr * update (K, m, n) fp32.

    Arguments as in `muon_update_`; every matrix must be whole (the orthogonalization and the
    per-row/column statistics see all of it).
    """
    m, n = grads.shape[-2], grads.shape[-1]
    g = grads.float()
    mu = momentum_t.float()
    # 1. Nesterov momentum: M <- mu*M + (1-mu)*G ; g <- (1-mu)*G + mu*M.
    buf = momentum_buffer.float().lerp_(g, 1 - mu)
    if momentum_buffer.dtype != torch.float32:
        momentum_buffer.copy_(buf)
    g = g.lerp_(buf, mu)
    # 2-3. MuonEq: rescale every row to the mean row norm ||X||_F / sqrt(m), so the spectrum
    # entering the polar iteration is better conditioned. Norms in fp32 (||X||_F from the rows).
    X = g.to(polar_dtype)
    row_norm = torch.linalg.vector_norm(X, dim=-1, keepdim=True, dtype=torch.float32)
    target = row_norm.square().sum(dim=-2, keepdim=True).sqrt() / math.sqrt(m)
    X = X * (target / row_norm.clamp_min(1e-6)).to(polar_dtype)
    # 4. Orthogonalize, back to fp32.
    g = polar_express(X, ns_steps).float()
    # 5-6. Muon+ then NorMuon. Muon+ snaps ||g||_F to sqrt(min(m, n)), the norm of an exactly
    # semi-orthogonal matrix: g <- plus * g. NorMuon keeps one second-moment statistic per row
    # (m >= n) or per column (m < n) and reweights them by the inverse RMS of their EMA'd energy,
    # preserving the total Frobenius norm. Both are per-row/column scalings, so they are computed
    # from one pass of norms and applied together in one multiply.
    red_dim = -1 if m >= n else -2
    red_size = g.size(red_dim)
    norms = torch.linalg.vector_norm(g, dim=red_dim, keepdim=True)
    plus = math.sqrt(min(m, n)) / norms.square().sum(dim=(-2, -1), keepdim=True).sqrt().clamp_min(1e-6)
    v_mean = (norms * plus).square() / red_size  # mean over red_dim of (plus * g)^2
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_size).sqrt()
    vb = second_moment.float().lerp_(v_mean, 1 - beta2_t.float())
    if second_moment.dtype != torch.float32:
        second_moment.copy_(vb)
    scale = vb.clamp_min(1e-10).rsqrt()
    v_norm_new = (v_mean * red_size * scale.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return g * (plus * scale * (v_norm / v_norm_new.clamp_min(1e-10)) * lr_t.float())


def cautious_update_(params: Tensor, lr_g: Tensor, lr_t: Tensor, wd_t: Tensor) -> None:
    """Step 7: cautious weight decay (only where the update and the weight agree in sign) + update.

    P <- P - lr*g - lr*wd*P*mask, with `lr_g` = lr*g from `muon_direction`. Elementwise, so any
    row slice of (params, lr_g) gives that slice of the whole-matrix result. (lr >= 0, so
    sign(lr*g) is sign(g); at lr == 0 nothing moves.)
    """
    mask = (lr_g * params) >= 0
    params.mul_(1 - (lr_t.float() * wd_t.float()) * mask).sub_(lr_g)


_COMPILED: dict[tuple[str, str], Callable] = {}


def _fused(fn: Callable, backend: str | None) -> Callable:
    """`fn` itself (eager) or its torch.compile'd version for `backend`, compiled once per process."""
    if backend is None:
        return fn
    key = (fn.__name__, backend)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=False, fullgraph=True, backend=backend)
    return _COMPILED[key]


# ----------------------------------------------------------------------------------------------
# The optimizer.


def _shape_lr_multiplier(shape: Sequence[int]) -> float:
    """Muon's shape LR factor sqrt(max(1, m/n)): only tall matrices (e.g. the 4C×C fc1) get more."""
    return math.sqrt(max(1.0, shape[-2] / shape[-1]))


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the block matrices, AdamW for everything else (nanochat spec §5).

    Args:
        params: parameter groups (dicts), each with `kind`:
            - `"adamw"`: `lr` (required), `betas` (0.8, 0.95), `eps` (1e-10), `weight_decay` (0);
            - `"muon"`: `lr` (required), `momentum` (0.95), `beta2` (0.9), `ns_steps` (5),
              `weight_decay` (0). Only 2-D parameters. A Muon group holding several shapes is
              split into one group per shape (sorted by shape), each stepped as one stacked
              tensor; its `name` gets the shape appended.
            Any extra keys (`name`, `initial_lr`, ...) are kept. `nanochat_param_groups(model)`
            builds nanochat's groups.
        compile: torch.compile the fused Muon step. None (default): on when the parameters are
            on CUDA. True: inductor; a string: that torch.compile backend (tests use "eager").
            AdamW always runs torch's fused kernel and needs no compiling.
        polar_dtype: dtype of the Polar Express iteration. None: bf16 on CUDA devices that
            support it, else fp32.
        distributed: split the Muon work across the ranks of `process_group`. None (default):
            when torch.distributed is initialized with more than one rank.
        process_group: the process group (default: the world).
        grad_sync: average gradients inside `step()` (reduce-scatter for Muon, all-reduce for
            AdamW) for runs *without* a DDP wrapper. Leave False under Accelerate/DDP, whose
            gradients are already averaged. (Distributed without DDP and without grad_sync
            would mix unaveraged gradients: don't.) With grad_sync every rank must have the
            same set of gradients; a missing gradient counts as zeros.

    Per-parameter state: AdamW `step` (0-d fp32 tensor), `exp_avg`, `exp_avg_sq` (param dtype); Muon
    `momentum_buffer` (m, n) and `second_momentum_buffer` (m, 1) or (1, n) (param dtype) — views
    into the stacked per-group buffers, present only for the matrices this rank owns. Parameters
    without a gradient are skipped (a Muon group is skipped when none of its matrices has one;
    missing gradients inside a stepped Muon group count as zeros).
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        *,
        compile: bool | str | None = None,
        polar_dtype: torch.dtype | None = None,
        distributed: bool | None = None,
        process_group: dist.ProcessGroup | None = None,
        grad_sync: bool = False,
    ) -> None:
        if distributed is None:
            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1
        self._process_group = process_group
        self._world_size = dist.get_world_size(process_group) if distributed else 1
        self._rank = dist.get_rank(process_group) if distributed else 0
        self._grad_sync = bool(grad_sync) and self._world_size > 1
        self._sharded_muon: dict[int, Any] = {}  # per FSDP2 group index: the update all-to-all in flight
        self._polar_dtype = polar_dtype
        # Muon state per group index: (momentum (k, m, n), second moment) for this rank's k matrices.
        self._muon_buffers: dict[int, tuple[Tensor, Tensor]] = {}
        super().__init__(params, defaults={})
        first = next((p for g in self.param_groups for p in g["params"]), None)
        if compile is None:
            compile = first is not None and first.device.type == "cuda"
        self._backend: str | None = ("inductor" if compile is True else compile) or None
        if self._backend is not None:
            # dynamic=False compiles once per Muon shape group (twice where the last rank's chunk
            # is smaller) and the recompile limit is per function: make room for all of them.
            import torch._dynamo.config as dynamo_config

            n_muon = sum(g["kind"] == "muon" for g in self.param_groups)
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 2 * n_muon + 8)
        # 0-d CPU tensors: their *values* change between steps, the compiled graph does not.
        self._muon_t = {k: torch.tensor(0.0, dtype=torch.float32) for k in ("momentum", "lr", "wd", "beta2")}
        self._params_seen = self._flat_params()

    # -- groups ---------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate a group, fill its kind's defaults and (Muon) split it into per-shape groups."""
        index = len(self.param_groups)
        label = f"group {index}" + (f" ({param_group['name']!r})" if "name" in param_group else "")
        kind = param_group.get("kind")
        if kind not in ("adamw", "muon"):
            raise ValueError(
                f"MuonAdamW {label}: kind={kind!r}; every group needs kind='adamw' or kind='muon' "
                "(build nanochat's groups with training.muon.nanochat_param_groups(model), or pass "
                "MuonAdamWFactory to a transformers/TRL Trainer)"
            )
        if "lr" not in param_group:
            raise ValueError(f"MuonAdamW {label}: missing 'lr'")
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        group = {**(ADAMW_DEFAULTS if kind == "adamw" else MUON_DEFAULTS), **param_group, "params": params}
        _validate_hyperparameters(label, group)
        if kind == "adamw" or not params:
            super().add_param_group(group)
            return
        for p in params:
            if p.ndim != 2:
                raise ValueError(
                    f"MuonAdamW {label}: Muon orthogonalizes 2-D matrices, got a {p.ndim}-D parameter of "
                    f"shape {tuple(p.shape)}; put vectors, scalars and embeddings in an 'adamw' group"
                )
        by_shape: dict[tuple, list[Tensor]] = {}
        for p in params:
            by_shape.setdefault((tuple(p.shape), str(p.dtype), str(p.device)), []).append(p)
        for (shape, dtype, device), ps in sorted(by_shape.items()):
            sub = {**group, "params": ps}
            if len(by_shape) > 1:
                sub["name"] = f"{group.get('name', 'muon')}[{shape[0]}x{shape[1]}]"
                if len({key[0] for key in by_shape}) < len(by_shape):
                    sub["name"] += f"[{dtype},{device}]"
            super().add_param_group(sub)

    # -- the step -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that has a gradient. Collective when distributed."""
        self._follow_param_swap()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sharded = {i for i, g in enumerate(self.param_groups) if g["kind"] == "muon" and _is_sharded(g["params"])}
        if sharded and self._grad_sync:
            raise ValueError("MuonAdamW: grad_sync=True is for unwrapped models; FSDP already averages the "
                             "gradients of its DTensor parameters (leave grad_sync=False)")
        pending = self._launch_grad_sync() if self._grad_sync else {}
        # FSDP2 groups: start moving every group's gradient rows to the matrices' owners at once
        exchanges = {i: self._launch_row_exchange(i, self.param_groups[i]) for i in sorted(sharded)}
        gathers, updates = [], []
        for index, group in enumerate(self.param_groups):
            if group["kind"] == "adamw":
                self._step_adamw(group, pending.get(index))
            elif index in sharded:
                update = self._step_muon_sharded(index, group, exchanges[index])
                if update is not None:
                    updates.append(update)
            else:
                gather = self._step_muon(index, group, pending.get(index))
                if gather is not None:
                    gathers.append(gather)
        for work, full, params in gathers:
            work.wait()
            torch._foreach_copy_(params, list(full[: len(params)].unbind(0)))
        for finish in updates:
            finish()
        return loss

    def _comm(self, params: list[Tensor]) -> tuple[Any, int, int]:
        """(process group, W, rank) that splits the Muon work of a group of these parameters.

        Plain tensors: the optimizer's own group (W = 1 when not distributed). FSDP2 DTensors: the
        mesh dimension their rows are sharded along (W = 1 when they are only replicated).
        """
        if not _is_sharded(params):
            return self._process_group, self._world_size, self._rank
        dim = _shard_mesh_dim(params[0])
        if dim is None:
            return None, 1, 0
        mesh = params[0].device_mesh
        return mesh.get_group(dim), mesh.size(dim), mesh.get_local_rank(dim)

    def _owned(self, k: int, world: int | None = None, rank: int | None = None) -> tuple[int, int, int]:
        """(lo, hi, chunk): this rank owns matrices [lo, hi) of a K-matrix group, chunk = ceil(K/W)."""
        world = self._world_size if world is None else world
        rank = self._rank if rank is None else rank
        chunk = -(-k // world)
        lo = min(k, rank * chunk)
        return lo, min(k, lo + chunk), chunk

    def _launch_grad_sync(self) -> dict[int, Any]:
        """grad_sync mode: start averaging every gradient (async); returns works per group index."""
        pending: dict[int, Any] = {}
        avg, pg = dist.ReduceOp.AVG, self._process_group
        for index, group in enumerate(self.param_groups):
            params = group["params"]
            if not params:
                continue
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            if group["kind"] == "adamw":
                for p, g in zip(params, grads):
                    p.grad = g
                pending[index] = [dist.all_reduce(g, op=avg, group=pg, async_op=True) for g in grads]
            else:
                _, _, chunk = self._owned(len(params))
                full = torch.zeros(chunk * self._world_size, *params[0].shape, dtype=grads[0].dtype, device=grads[0].device)
                full[: len(params)].copy_(torch.stack(grads))
                local = torch.empty_like(full[:chunk])
                work = dist.reduce_scatter_tensor(local, full, op=avg, group=pg, async_op=True)
                pending[index] = (work, local)
        return pending

    def _step_adamw(self, group: dict[str, Any], works: list | None) -> None:
        """Spec §5.2 through torch's fused AdamW kernel (CPU/CUDA/MPS; fp32 math for bf16 tensors).

        Its order of operations is the spec's: decoupled decay p·(1 - lr·wd) with the current lr,
        then the bias-corrected update. Hyperparameters go in as Python floats: nothing compiles.
        """
        for work in works or ():
            work.wait()
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif state["step"].device != p.device:  # e.g. a checkpoint loaded onto the CPU
                state["step"] = state["step"].to(p.device)
            # FSDP2: the local shards (views: the kernel's in-place writes land in the DTensors)
            if _local(state["exp_avg"]).shape != _local(p).shape:
                raise ValueError(
                    f"MuonAdamW: AdamW state of shape {tuple(_local(state['exp_avg']).shape)} for a parameter holding "
                    f"{tuple(_local(p).shape)} here (a whole-tensor state put into a sharded optimizer without "
                    "load_state_dict?)"
                )
            params.append(_local(p))
            grads.append(_local(p.grad))
            exp_avgs.append(_local(state["exp_avg"]))
            exp_avg_sqs.append(_local(state["exp_avg_sq"]))
            steps.append(state["step"])
        if params:
            beta1, beta2 = group["betas"]
            _fused_adamw_functional(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=True, amsgrad=False,
                                    beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                                    eps=group["eps"], maximize=False)

    def _step_muon(self, index: int, group: dict[str, Any], pending: tuple | None) -> tuple | None:
        """Step this rank's chunk of a shape group; returns the pending all-gather, if any."""
        params: list[Tensor] = group["params"]
        if not params or (pending is None and all(p.grad is None for p in params)):
            return None
        p0 = params[0]
        lo, hi, chunk = self._owned(len(params))
        if pending is not None:
            work, local_grads = pending
            work.wait()
            grads = local_grads[: hi - lo]
        elif hi > lo:
            grads = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params[lo:hi]])
        momentum_buffer, second_moment = self._muon_state(index, params)
        if hi > lo:
            stacked = torch.stack(params[lo:hi]).float()
            t = self._muon_t
            t["momentum"].fill_(group["momentum"])
            t["lr"].fill_(group["lr"] * _shape_lr_multiplier(p0.shape))
            t["wd"].fill_(group["weight_decay"])
            t["beta2"].fill_(group["beta2"])
            _fused(muon_update_, self._backend)(
                stacked, grads, momentum_buffer, second_moment,
                t["momentum"], t["lr"], t["wd"], t["beta2"], group["ns_steps"], self._polar_dtype_for(p0),
            )
        if self._world_size == 1:
            torch._foreach_copy_(params, list(stacked.unbind(0)))
            return None
        # Gather everyone's updated chunk into (W*chunk, m, n); this rank writes its slot in place.
        full = torch.empty(chunk * self._world_size, *p0.shape, dtype=p0.dtype, device=p0.device)
        mine = full[self._rank * chunk : (self._rank + 1) * chunk]
        mine[hi - lo :].zero_()
        if hi > lo:
            mine[: hi - lo].copy_(stacked)
        work = dist.all_gather_into_tensor(full, mine, group=self._process_group, async_op=True)
        return work, full, params

    def _launch_row_exchange(self, index: int, group: dict[str, Any]) -> tuple | None:
        """FSDP2: send each owner this rank's gradient rows of its matrices (async all-to-all).

        Layout: the send buffer is (W·chunk, rows, n), slot j holding this rank's rows (zero-padded
        to rows = ceil(m/W)) of matrix j, so destination q gets slots [q·chunk, (q+1)·chunk): its
        matrices. Returns (work, receive buffer, local row count), or None when nothing to step.
        """
        params: list[Tensor] = group["params"]
        if not params or all(p.grad is None for p in params):
            return None
        pg, world, rank = self._comm(params)
        label = group.get("name", f"group {index}")
        m, n = params[0].shape
        rows = -(-m // world)
        mine = max(0, min(m, (rank + 1) * rows) - rank * rows)
        for p in params:
            local = _local(p)
            if tuple(local.shape) != (mine, n):
                raise ValueError(
                    f"MuonAdamW {label}: a {m}x{n} parameter sharded {p.placements} holds rows of shape "
                    f"{tuple(local.shape)} on rank {rank}, expected ({mine}, {n}) (torch.chunk rows over {world} "
                    "ranks, as FSDP2's Shard(0)); other shardings are not supported"
                )
        p0 = _local(params[0])
        _, _, chunk = self._owned(len(params), world, rank)
        grad_dtype = next(p.grad.dtype for p in params if p.grad is not None)
        send = torch.zeros(world * chunk, rows, n, dtype=grad_dtype, device=p0.device)
        for j, p in enumerate(params):
            if p.grad is not None:
                send[j, :mine].copy_(_local(p.grad))
        if world == 1:
            return None, send, mine
        recv = torch.empty_like(send)
        work = dist.all_to_all_single(recv, send, group=pg, async_op=True)
        return work, recv, mine

    def _step_muon_sharded(self, index: int, group: dict[str, Any], exchange: tuple | None) -> Callable | None:
        """FSDP2: Muon steps 1-6 on the owned whole matrices, rows of the update back to their shards.

        Returns a callable that waits for the update's all-to-all and applies step 7 to the local
        rows (run after the other groups, so the communication overlaps their compute).
        """
        if exchange is None:
            return None
        params: list[Tensor] = group["params"]
        pg, world, rank = self._comm(params)
        work, recv, mine = exchange
        m, n = params[0].shape
        rows = recv.shape[1]
        lo, hi, chunk = self._owned(len(params), world, rank)
        if work is not None:
            work.wait()
        # recv slot (j, i): rank j's rows of owned matrix i -> whole matrices (chunk, W·rows, n)
        whole = recv.view(world, chunk, rows, n).transpose(0, 1).reshape(chunk, world * rows, n)[: hi - lo, :m]
        momentum_buffer, second_moment = self._muon_state(index, params)
        effective_lr = group["lr"] * _shape_lr_multiplier((m, n))
        update = torch.zeros(chunk, world * rows, n, dtype=torch.float32, device=recv.device)
        if hi > lo:
            t = self._muon_t
            t["momentum"].fill_(group["momentum"])
            t["lr"].fill_(effective_lr)
            t["beta2"].fill_(group["beta2"])
            update[: hi - lo, :m] = _fused(muon_direction, self._backend)(
                whole, momentum_buffer, second_moment, t["momentum"], t["lr"], t["beta2"], group["ns_steps"],
                self._polar_dtype_for(params[0]),
            )
        # send slot (q, i): rank q's rows of owned matrix i; receive slot (j, i): my rows of rank j's i-th
        send = update.view(chunk, world, rows, n).transpose(0, 1).contiguous()
        if world == 1:
            done, back = None, send
        else:
            back = torch.empty_like(send)
            done = dist.all_to_all_single(back, send, group=pg, async_op=True)
        # this group's own 0-d hyperparameters: the shared ones are refilled by the next group
        lr_t = torch.tensor(effective_lr, dtype=torch.float32)
        wd_t = torch.tensor(float(group["weight_decay"]), dtype=torch.float32)

        def finish() -> None:
            if done is not None:
                done.wait()
            lr_g = back.reshape(world * chunk, rows, n)[: len(params), :mine]
            locals_ = [_local(p) for p in params]
            stacked = torch.stack(locals_).float()
            _fused(cautious_update_, self._backend)(stacked, lr_g, lr_t, wd_t)
            torch._foreach_copy_(locals_, list(stacked.unbind(0)))

        return finish

    def _polar_dtype_for(self, p: Tensor) -> torch.dtype:
        if self._polar_dtype is not None:
            return self._polar_dtype
        if p.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32

    def _muon_state(self, index: int, params: list[Tensor]) -> tuple[Tensor, Tensor]:
        """This rank's stacked Muon buffers for group `index`, created as zeros on first use."""
        if index not in self._muon_buffers:
            _, world, rank = self._comm(params)
            lo, hi, _ = self._owned(len(params), world, rank)
            p0 = params[0]
            m, n = p0.shape
            kw = {"dtype": p0.dtype, "device": p0.device}
            momentum = torch.zeros(hi - lo, m, n, **kw)
            second = torch.zeros(hi - lo, m, 1, **kw) if m >= n else torch.zeros(hi - lo, 1, n, **kw)
            self._bind_muon_state(index, params, momentum, second)
        return self._muon_buffers[index]

    def _bind_muon_state(self, index: int, params: list[Tensor], momentum: Tensor, second: Tensor) -> None:
        """Keep the stacked buffers and expose per-matrix views in `self.state` (owned matrices only)."""
        _, world, rank = self._comm(params)
        lo, hi, _ = self._owned(len(params), world, rank)
        self._muon_buffers[index] = (momentum, second)
        for i, p in enumerate(params):
            if lo <= i < hi:
                self.state[p] = {"momentum_buffer": momentum[i - lo], "second_momentum_buffer": second[i - lo]}
            else:
                self.state.pop(p, None)

    # -- parameters swapped under the optimizer -------------------------------------------------

    def _flat_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _follow_param_swap(self) -> None:
        """Carry the state over when the parameters in `param_groups` were replaced, position by position.

        Accelerate's FSDP2 `prepare` shards a model whose optimizer already exists: it puts the new
        DTensor parameters into `param_groups` in place of the old ones, but `self.state` is keyed by
        parameter, so a state loaded before (e.g. SFT starting from the base run's momenta) would be
        silently dropped. Here each new parameter takes its predecessor's state: AdamW tensors are
        cut to the new shard's rows, Muon buffers re-owned if the split of the work changed.
        """
        current = self._flat_params()
        seen = self._params_seen
        if len(current) != len(seen):  # groups were added: nothing was swapped
            self._params_seen = current
            return
        if all(a is b for a, b in zip(current, seen)):
            return
        start = 0
        for index, group in enumerate(self.param_groups):
            new = group["params"]
            old = seen[start : start + len(new)]
            start += len(new)
            if all(a is b for a, b in zip(old, new)):
                continue
            label = group.get("name", f"group {index}")
            if group["kind"] == "adamw":
                for before, after in zip(old, new):
                    if before is not after and before in self.state:
                        entry = self.state.pop(before)
                        if _is_dtensor(after):
                            self._shard_like(after, entry, label)
                        self.state[after] = entry
                continue
            for before in old:
                self.state.pop(before, None)
            if index not in self._muon_buffers:
                continue
            buffers = self._muon_buffers[index]
            (pg_old, w_old, r_old), (_, w_new, r_new) = self._comm(old), self._comm(new)
            if (w_old, r_old) != (w_new, r_new):  # the matrices' owners changed: gather, keep the new share
                k = len(new)
                whole = [self._all_gather_chunks(b, k, pg_old, w_old, r_old)[:k] if w_old > 1 else b for b in buffers]
                lo, hi, _ = self._owned(k, w_new, r_new)
                buffers = tuple(b[lo:hi].clone() for b in whole)
            device = _local(new[0]).device
            self._bind_muon_state(index, new, *(b.to(device) for b in buffers))
        self._params_seen = current

    # -- checkpoints ----------------------------------------------------------------------------

    @staticmethod
    def _shard_like(p: Tensor, state: dict[str, Any], label: str) -> None:
        """Turn whole-tensor AdamW state of DTensor parameter `p` into DTensors sharded like `p`."""
        from torch.distributed.tensor import distribute_tensor

        for key, value in list(state.items()):
            if not torch.is_tensor(value) or _is_dtensor(value) or value.ndim == 0:
                continue
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"MuonAdamW.load_state_dict: {key} of a {tuple(p.shape)} parameter in {label} has shape "
                                 f"{tuple(value.shape)} (was the checkpoint written by a different model?)")
            state[key] = distribute_tensor(value.to(_local(p).device), p.device_mesh, p.placements, src_data_rank=None)

    def state_dict(self) -> dict[str, Any]:
        """The full optimizer state, independent of the world size. Collective when distributed."""
        self._follow_param_swap()
        sd = super().state_dict()
        for index, group in enumerate(self.param_groups):
            if group["kind"] != "muon" or index not in self._muon_buffers:
                continue
            pg, world, rank = self._comm(group["params"])
            if world == 1:
                continue
            k = len(group["params"])
            momentum, second = (self._all_gather_chunks(b, k, pg, world, rank)[:k] for b in self._muon_buffers[index])
            for j, packed_index in enumerate(sd["param_groups"][index]["params"]):
                sd["state"][packed_index] = {"momentum_buffer": momentum[j], "second_momentum_buffer": second[j]}
        return sd

    def _all_gather_chunks(self, local: Tensor, k: int, pg: Any, world: int, rank: int) -> Tensor:
        _, _, chunk = self._owned(k, world, rank)
        padded = torch.zeros(chunk, *local.shape[1:], dtype=local.dtype, device=local.device)
        padded[: local.shape[0]].copy_(local)
        full = torch.empty(chunk * world, *local.shape[1:], dtype=local.dtype, device=local.device)
        dist.all_gather_into_tensor(full, padded, group=pg)
        return full

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a full state (from `state_dict()` on any world size) and keep this rank's share.

        Under FSDP2 the AdamW state of a DTensor parameter may come whole (e.g. a checkpoint of a
        1-process or DDP run): each rank keeps the rows of its shard (no communication).
        """
        super().load_state_dict(state_dict)
        self._muon_buffers = {}
        for index, group in enumerate(self.param_groups):
            params = group["params"]
            if group["kind"] == "adamw":
                for p in params:
                    if _is_dtensor(p):
                        self._shard_like(p, self.state.get(p, {}), group.get("name", f"group {index}"))
                continue
            if not params:
                continue
            have = [("momentum_buffer" in self.state.get(p, {})) for p in params]
            if not any(have):
                continue
            label = group.get("name", f"group {index}")
            if not all(have):
                raise ValueError(f"MuonAdamW.load_state_dict: Muon state is missing for some matrices of {label}")
            m, n = params[0].shape
            expected = ((m, n), (m, 1) if m >= n else (1, n))
            _, world, rank = self._comm(params)
            lo, hi, _ = self._owned(len(params), world, rank)
            stacks = []
            for key, shape in zip(("momentum_buffer", "second_momentum_buffer"), expected):
                # whole matrices; a checkpoint tool may hand them over as DTensors (gathered, collective)
                entries = [_full(self.state[p][key]) for p in params]
                bad = [tuple(e.shape) for e in entries if tuple(e.shape) != shape]
                if bad:
                    raise ValueError(
                        f"MuonAdamW.load_state_dict: {key} of {label} has shape {bad[0]}, expected {shape} "
                        "(was the checkpoint written by a different model or optimizer?)"
                    )
                owned = entries[lo:hi]
                stacks.append(torch.stack(owned) if owned else torch.zeros(0, *shape, dtype=params[0].dtype,
                                                                              device=_local(params[0]).device))
            self._bind_muon_state(index, params, *stacks)
        self._params_seen = self._flat_params()


def _is_dtensor(t: Tensor | None) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _is_sharded(params: list[Tensor]) -> bool:
    """True for a group of DTensor parameters (FSDP2); mixing them with plain tensors is an error."""
    kinds = {_is_dtensor(p) for p in params}
    if len(kinds) > 1:
        raise ValueError("MuonAdamW: a Muon shape group mixes DTensor (FSDP2) and plain parameters; "
                         "shard the whole model with fully_shard (or none of it)")
    return kinds == {True}


def _shard_mesh_dim(p: Tensor) -> int | None:
    """The mesh dimension a DTensor's rows are sharded along (None: replicated everywhere)."""
    dims = [i for i, placement in enumerate(p.placements) if not isinstance(placement, Replicate)]
    if not dims:
        return None
    if len(dims) > 1 or p.placements[dims[0]] != Shard(0):
        raise ValueError(
            f"MuonAdamW: a {tuple(p.shape)} DTensor parameter has placements {p.placements}; Muon supports "
            "row sharding on one mesh dimension (FSDP2's Shard(0), optionally with Replicate, as in HSDP)"
        )
    return dims[0]


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (a view: in-place writes reach the DTensor), or the tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if _is_dtensor(t) else t


def _validate_hyperparameters(label: str, group: dict[str, Any]) -> None:
    def check(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"MuonAdamW {label}: {what}")

    check(float(group["lr"]) >= 0, f"lr must be >= 0, got {group['lr']}")
    check(float(group["weight_decay"]) >= 0, f"weight_decay must be >= 0, got {group['weight_decay']}")
    if group["kind"] == "adamw":
        betas = group["betas"]
        check(len(betas) == 2 and all(0 <= b < 1 for b in betas), f"betas must be two values in [0, 1), got {betas}")
        check(group["eps"] > 0, f"eps must be > 0, got {group['eps']}")
    else:
        check(0 <= group["momentum"] < 1, f"momentum must be in [0, 1), got {group['momentum']}")
        check(0 <= group["beta2"] < 1, f"beta2 must be in [0, 1), got {group['beta2']}")
        steps = group["ns_steps"]
        check(isinstance(steps, int) and 1 <= steps <= len(POLAR_EXPRESS_COEFFS),
              f"ns_steps must be an int in [1, {len(POLAR_EXPRESS_COEFFS)}], got {steps!r}")


# ----------------------------------------------------------------------------------------------
# nanochat's parameter groups (spec §5.1).

# Name prefixes (after unwrapping, see _canonical_name) -> AdamW group. Everything under
# "model.layers." (attention and MLP matrices, ve_gate) goes to Muon.
_ADAMW_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("lm_head", ("lm_head",)),
    ("embed_tokens", ("model.embed_tokens",)),
    ("value_embeds", ("model.value_embeds",)),
    ("resid_lambdas", ("model.resid_lambdas",)),
    ("x0_lambdas", ("model.x0_lambdas",)),
    ("smear_backout", ("model.smear_gate", "model.smear_lambda", "model.backout_lambda")),
)
_MUON_PREFIX = "model.layers"
# Wrappers whose prefixes are stripped: DDP/FSDP ("module."), torch.compile ("_orig_mod."),
# PEFT ("base_model.model."). PEFT's own infixes (lora_A, modules_to_save, ...) stay inside the name.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")


def _canonical_name(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def dmodel_lr_scale(model_dim: int) -> float:
    """nanochat's width scaling of the AdamW LRs: (C / 768) ** -0.5 (1.0 at d12, 0.7071 at d24)."""
    return (model_dim / 768) ** -0.5


def _model_dim(model: nn.Module) -> int:
    seen = model
    while seen is not None:
        config = getattr(seen, "config", None)
        if getattr(config, "hidden_size", None):
            return int(config.hidden_size)
        seen = getattr(seen, "module", None)
    raise ValueError("nanochat_param_groups: the model has no config.hidden_size; pass model_dim=")


def nanochat_param_groups(
    model: nn.Module,
    *,
    unembedding_lr: float = 0.004,
    embedding_lr: float = 0.2,
    matrix_lr: float = 0.02,
    scalar_lr: float = 0.5,
    weight_decay: float = 0.0,
    batch_lr_scale: float = 1.0,
    smear_lr: float = 0.2,
    muon_momentum: float = 0.95,
    muon_beta2: float = 0.9,
    ns_steps: int = 5,
    model_dim: int | None = None,
) -> list[dict[str, Any]]:
    """nanochat's optimizer groups for a NanoChat model (spec §5.1), for `MuonAdamW`.

    Defaults are the original's `setup_optimizer` defaults (what RL uses); pretraining passes its
    CLI values and `batch_lr_scale` (spec §6.3: sqrt(B / 2**19), see training.scaling), SFT its
    inherited LRs. Groups, in order (absent parameters' groups are left out):

    | name          | kind  | lr                                              | betas        | wd    |
    |---------------|-------|-------------------------------------------------|--------------|-------|
    | lm_head       | adamw | unembedding_lr · dmodel_scale · batch_lr_scale  | (0.8, 0.96)  | 0.01  |
    | embed_tokens  | adamw | embedding_lr · dmodel_scale · batch_lr_scale    | (0.8, 0.995) | 0.001 |
    | value_embeds  | adamw | embedding_lr · dmodel_scale · 0.5 · batch_scale | (0.8, 0.995) | 0.01  |
    | resid_lambdas | adamw | scalar_lr · 0.01 · batch_lr_scale               | (0.8, 0.95)  | 0.05  |
    | x0_lambdas    | adamw | scalar_lr · batch_lr_scale                      | (0.96, 0.95) | 0.0   |
    | smear_backout | adamw | smear_lr (0.2, never scaled)                    | (0.8, 0.95)  | 0.0   |
    | matrices      | muon  | matrix_lr · batch_lr_scale (MuonAdamW splits it per shape) | momentum, beta2, ns_steps | weight_decay |

    dmodel_scale = (hidden_size / 768) ** -0.5; AdamW eps 1e-10. Every group carries `name` and
    `initial_lr` (= lr; schedules multiply it). Only trainable parameters are grouped; prefixes
    of DDP (`module.`), torch.compile (`_orig_mod.`) and PEFT (`base_model.model.`) wrappers are
    stripped, so a LoRA model's adapter matrices inside the blocks go to Muon.

    Raises:
        ValueError: a trainable parameter belongs to no group (named, with its shape), one tensor
            is registered under two names (tied weights), or a non-matrix sits inside the blocks.
    """
    dscale = dmodel_lr_scale(model_dim if model_dim is not None else _model_dim(model))
    specs: dict[str, dict[str, Any]] = {
        "lm_head": {"lr": unembedding_lr * dscale * batch_lr_scale, "betas": (0.8, 0.96), "weight_decay": 0.01},
        "embed_tokens": {"lr": embedding_lr * dscale * batch_lr_scale, "betas": (0.8, 0.995), "weight_decay": 0.001},
        "value_embeds": {"lr": embedding_lr * dscale * 0.5 * batch_lr_scale, "betas": (0.8, 0.995),
                         "weight_decay": 0.01},
        "resid_lambdas": {"lr": scalar_lr * 0.01 * batch_lr_scale, "betas": (0.8, 0.95), "weight_decay": 0.05},
        "x0_lambdas": {"lr": scalar_lr * batch_lr_scale, "betas": (0.96, 0.95), "weight_decay": 0.0},
        "smear_backout": {"lr": smear_lr, "betas": (0.8, 0.95), "weight_decay": 0.0},
    }
    members: dict[str, list[Tensor]] = {name: [] for name in [*specs, "matrices"]}
    owner: dict[int, str] = {}
    unassigned, problems = [], []
    for raw_name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        name = _canonical_name(raw_name)
        if id(p) in owner:
            problems.append(f"{raw_name} is the same tensor as {owner[id(p)]} (tied weights; nanochat's are untied)")
            continue
        owner[id(p)] = raw_name
        group = next((g for g, prefixes in _ADAMW_GROUPS if any(_under(name, x) for x in prefixes)), None)
        if group is None and _under(name, _MUON_PREFIX):
            group = "matrices"
            if p.ndim != 2:
                problems.append(f"{raw_name} {tuple(p.shape)} is inside the blocks but not a matrix (Muon takes 2-D only)")
                continue
        if group is None:
            unassigned.append(f"{raw_name} {tuple(p.shape)}")
            continue
        members[group].append(p)
    if unassigned:
        problems.append(
            "no optimizer group for trainable parameter(s): " + ", ".join(unassigned)
            + f" (known: {', '.join(x for _, xs in _ADAMW_GROUPS for x in xs)}, {_MUON_PREFIX}.*)"
        )
    if problems:
        raise ValueError("nanochat_param_groups: " + "; ".join(problems))
    groups: list[dict[str, Any]] = []
    for name, spec in specs.items():
        if members[name]:
            groups.append({"kind": "adamw", "name": name, "params": members[name], "eps": 1e-10,
                           "initial_lr": spec["lr"], **spec})
    if members["matrices"]:
        lr = matrix_lr * batch_lr_scale
        groups.append({"kind": "muon", "name": "matrices", "params": members["matrices"], "lr": lr,
                       "initial_lr": lr, "momentum": muon_momentum, "beta2": muon_beta2, "ns_steps": ns_steps,
                       "weight_decay": weight_decay})
    counted = sum(len(g["params"]) for g in groups)
    if counted != len(owner):  # guards the invariant above against future edits
        raise AssertionError(f"nanochat_param_groups grouped {counted} of {len(owner)} trainable parameters")
    return groups


_OPTIMIZER_KWARGS = ("compile", "polar_dtype", "distributed", "process_group", "grad_sync")


class MuonAdamWFactory:
    """Builds `MuonAdamW(nanochat_param_groups(model, ...))` for transformers/TRL trainers.

    `SFTTrainer(..., optimizer_cls_and_kwargs=(MuonAdamWFactory, {"matrix_lr": 0.02, ...}))`: the
    Trainer sees a class that is not an Optimizer, so it calls `MuonAdamWFactory()(model, **kwargs)`.
    Keyword arguments named like `MuonAdamW`'s (compile, polar_dtype, distributed, process_group,
    grad_sync) go to the optimizer, the rest to `nanochat_param_groups`. The Trainer's own
    `learning_rate` is then unused: each group has its own LR, and its scheduler multiplies them.
    """

    def __call__(self, model: nn.Module, **kwargs: Any) -> MuonAdamW:
        optimizer_kwargs = {k: kwargs.pop(k) for k in _OPTIMIZER_KWARGS if k in kwargs}
        return MuonAdamW(nanochat_param_groups(model, **kwargs), **optimizer_kwargs)
