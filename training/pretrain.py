"""Pretraining with Accelerate (spec §6): `accelerate launch -m training.pretrain [--config recipe.yaml] [--depth N ...]`.

One dial (`--depth`) derives the model, the batch, the horizon, the learning rates and the weight
decay exactly as the original; Accelerate adds the launchers (CPU, 1-8 GPUs, multi-node, FSDP), FP8
recipes (torchao anywhere, Transformer Engine on NVIDIA) and trackers. Checkpoints are written to a
temporary folder, completed with a marker and renamed atomically; `--resume latest` continues a
killed run from the last complete checkpoint, and on CPU the resumed run is bitwise identical to an
uninterrupted one (model, optimizer, RNG, data-loader buffer and loop state are all restored).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

CHECKPOINT_MARKER = "COMPLETE"
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


@dataclass
class PretrainConfig:
    """Pretraining settings. Defaults are the original's `base_train.py` defaults (spec §6.1)."""

    # data and artifacts
    data: str = field(default="runs/data", metadata={"help": "parquet directory/glob with a `text` column (last shard = validation), or hf:<dataset id>"})
    tokenizer: str = field(default="runs/tokenizer", metadata={"help": "tokenizer folder (nanochat tokenizer train)"})
    output_dir: str = field(default="runs/base", metadata={"help": "where checkpoints/ and the final HF folder go"})
    data_sharding: str = field(default="row_groups", metadata={"help": "row_groups: each rank reads disjoint row groups (the original); replicated: every rank packs the global batch and keeps its slice (world-size invariant, resumable on another world size)"})
    # model
    depth: int = field(default=20, metadata={"help": "number of layers; width, heads, LRs, batch and horizon follow"})
    aspect_ratio: int = field(default=64, metadata={"help": "width = depth * aspect_ratio, rounded up to head_dim"})
    head_dim: int = field(default=128, metadata={"help": "attention head size"})
    max_seq_len: int = field(default=2048, metadata={"help": "context length of training rows"})
    window_pattern: str = field(default="SSSL", metadata={"help": "per-layer windows: S = quarter context, L = full; last layer always L"})
    short_window: int | None = field(default=None, metadata={"help": "override the S window (default: nanochat's rule)"})
    # horizon (precedence: num_iterations > target_flops > target_param_data_ratio)
    num_iterations: int = field(default=-1, metadata={"help": "optimizer steps (-1: derive)"})
    target_flops: float = field(default=-1.0, metadata={"help": "training FLOPs budget (-1: off)"})
    target_param_data_ratio: float = field(default=12.0, metadata={"help": "tokens per scaling parameter"})
    # batch
    device_batch_size: int = field(default=32, metadata={"help": "rows per micro-step per process"})
    total_batch_size: int = field(default=-1, metadata={"help": "tokens per optimizer step (-1: auto, power law)"})
    # optimizer
    embedding_lr: float = field(default=0.3, metadata={"help": "AdamW LR of the token embedding (value embeddings get half)"})
    unembedding_lr: float = field(default=0.008, metadata={"help": "AdamW LR of lm_head"})
    matrix_lr: float = field(default=0.02, metadata={"help": "Muon LR of the block matrices"})
    scalar_lr: float = field(default=0.5, metadata={"help": "AdamW LR of the x0 lambdas (resid lambdas get 1%)"})
    weight_decay: float = field(default=0.28, metadata={"help": "reference Muon weight decay (scaled by the T_epoch rule)"})
    warmup_steps: int = field(default=40, metadata={"help": "linear LR warmup steps"})
    warmdown_ratio: float = field(default=0.65, metadata={"help": "fraction of the run spent in linear LR warmdown"})
    final_lr_frac: float = field(default=0.05, metadata={"help": "LR multiplier at the end of the warmdown"})
    # evaluation and logging
    eval_every: int = field(default=250, metadata={"help": "validation bpb every N steps (-1: only at the end)"})
    eval_tokens: int = field(default=80 * 524288, metadata={"help": "validation tokens per evaluation"})
    sample_every: int = field(default=2000, metadata={"help": "greedy samples of 7 prompts every N steps (-1: only at the end)"})
    core_metric_every: int = field(default=2000, metadata={"help": "CORE every N steps and at the end (-1: never)"})
    core_metric_max_per_task: int = field(default=500, metadata={"help": "items per CORE task during training (-1: all)"})
    core_bundle: str = field(default="auto", metadata={"help": "CORE bundle: auto (downloaded original if cached, else the offline subset), subset, download, a folder/zip/URL"})
    log_every: int = field(default=1, metadata={"help": "console line every N steps"})
    report_to: str = field(default="none", metadata={"help": "tracker: none, wandb (offline without a key), mlflow (local store)"})
    run_name: str = field(default="dummy", metadata={"help": "tracker run name"})
    # checkpoints
    save_every: int = field(default=-1, metadata={"help": "checkpoint every N steps (-1: only at the end)"})
    keep_last: int = field(default=2, metadata={"help": "complete checkpoints to keep"})
    resume: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder to resume from"})
    # precision and speed
    fp8: bool = field(default=False, metadata={"help": "FP8 matmuls through Accelerate (torchao or Transformer Engine)"})
    fp8_backend: str = field(default="ao", metadata={"help": "ao (torchao, any device) or te (Transformer Engine, NVIDIA)"})
    compile: str = field(default="auto", metadata={"help": "torch.compile the model: auto (on CUDA), yes, no"})
    seed: int = field(default=42, metadata={"help": "global seed (model init and sampling)"})

    def __post_init__(self):
        choices = {"data_sharding": ("row_groups", "replicated"), "fp8_backend": ("ao", "te"),
                   "compile": ("auto", "yes", "no"), "report_to": ("none", "wandb", "mlflow")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("depth", "aspect_ratio", "head_dim", "max_seq_len", "device_batch_size", "keep_last"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


# --------------------------------------------------------------------------- helpers
def model_config(cfg: PretrainConfig, vocab_size: int, depth: int | None = None, special_ids: dict | None = None):
    from modeling_nanochat import NanoChatConfig

    return NanoChatConfig.from_depth(
        depth or cfg.depth, aspect_ratio=cfg.aspect_ratio, head_dim=cfg.head_dim, max_seq_len=cfg.max_seq_len,
        window_pattern=cfg.window_pattern, vocab_size=vocab_size, short_window=cfg.short_window,
        **(special_ids or {}),
    )


def peak_flops(device: torch.device) -> float:
    """bf16 dense peak of the device (spec §6.10); inf when unknown (MFU then shows 0)."""
    if device.type != "cuda":
        return float("inf")
    name = torch.cuda.get_device_name(device).lower()
    table = [
        (("gb200",), 2.5e15), (("grace blackwell",), 2.5e15), (("b200",), 2.25e15), (("b100",), 1.8e15),
        (("h200", "nvl"), 836e12), (("h200", "pcie"), 836e12), (("h200",), 989e12),
        (("h100", "nvl"), 835e12), (("h100", "pcie"), 756e12), (("h100",), 989e12),
        (("h800", "nvl"), 989e12), (("h800",), 756e12), (("a100",), 312e12), (("a800",), 312e12),
        (("a40",), 149.7e12), (("a30",), 165e12), (("l40s",), 362e12), (("l40-s",), 362e12), (("l40 s",), 362e12),
        (("l4",), 121e12), (("mi355",), 2.5e15), (("mi325",), 1.3074e15), (("mi300x",), 1.3074e15),
        (("mi300a",), 980.6e12), (("mi250x",), 383e12), (("mi250",), 362.1e12), (("5090",), 209.5e12),
        (("4090",), 165.2e12), (("3090",), 71e12),
    ]
    for keys, flops in table:
        if all(k in name for k in keys):
            return flops
    if "data center gpu max 1550" in name:
        return 512 * torch.xpu.get_device_properties(device).max_compute_units * 1300e6  # pragma: no cover
    return float("inf")


def fp8_module_filter(module: torch.nn.Module, name: str) -> bool:
    """Spec §6.12: FP8 only for Linear layers with both dims divisible by 16 and min dim >= 128."""
    if not isinstance(module, torch.nn.Linear):
        return False
    i, o = module.in_features, module.out_features
    return i % 16 == 0 and o % 16 == 0 and min(i, o) >= 128


@contextmanager
def fp8_disabled(model: torch.nn.Module):
    """Evaluate in the compute dtype: torchao's Float8Linear modules act as plain Linears meanwhile.

    The modules stay in place and only their class changes (to NanoChatLinear, whose forward is
    F.linear in the input's dtype), so wrappers holding them keep working: FSDP2 swaps the gathered
    weights into these very module objects.
    """
    try:
        from torchao.float8.float8_linear import Float8Linear
    except Exception:  # torchao absent: nothing to swap
        yield model
        return
    from modeling_nanochat.modeling_nanochat import NanoChatLinear

    swapped = [m for m in model.modules() if isinstance(m, Float8Linear)]
    for module in swapped:
        module.__class__ = NanoChatLinear
    try:
        yield model
    finally:
        for module in swapped:
            module.__class__ = Float8Linear


class ReplicatedLoader:
    """Every rank packs the same global micro-batch (world x device rows) and keeps its own slice."""

    def __init__(self, inner, rank: int, device_batch_size: int):
        self.inner, self.rank, self.device_batch_size = inner, rank, device_batch_size

    def __iter__(self):
        return self

    def __next__(self):
        inputs, targets = next(self.inner)
        sl = slice(self.rank * self.device_batch_size, (self.rank + 1) * self.device_batch_size)
        return inputs[sl], targets[sl]

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def build_loader(cfg: PretrainConfig, tokenize, bos_id: int, split: str, rank: int, world: int, device):
    from training.data import build_pretrain_loader

    if cfg.data_sharding == "replicated":
        inner = build_pretrain_loader(cfg.data, tokenize, bos_id, cfg.device_batch_size * world, cfg.max_seq_len,
                                      split=split, rank=0, world_size=1, device="cpu")
        loader = ReplicatedLoader(inner, rank, cfg.device_batch_size)
        return _ToDevice(loader, device)
    return build_pretrain_loader(cfg.data, tokenize, bos_id, cfg.device_batch_size, cfg.max_seq_len,
                                 split=split, rank=rank, world_size=world, device=device)


class _ToDevice:
    def __init__(self, loader, device):
        self.loader, self.device = loader, torch.device(device)

    def __iter__(self):
        return self

    def __next__(self):
        inputs, targets = next(self.loader)
        return inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


class PerRankState:
    """Checkpoints an object whose state differs between ranks (data position, the fetched batch).

    `accelerator.save_state` calls `state_dict()` on every rank but writes only the main process's
    result, so this gathers every rank's state into it ({"world_size", "ranks": [...]}, collective),
    and `load_state_dict` gives each rank its own. Exact resume needs the same number of processes:
    another count is refused with a clear error rather than silently feeding ranks the wrong data.
    """

    def __init__(self, obj, what: str):
        self.obj, self.what = obj, what

    def state_dict(self) -> dict:
        import torch.distributed as dist

        from eval.core import rank_world

        state = self.obj.state_dict()
        _, world = rank_world()
        states = [state]
        if world > 1:
            states = [None] * world
            dist.all_gather_object(states, state)
        return {"world_size": world, "ranks": states}

    def load_state_dict(self, state: dict) -> None:
        if "ranks" not in state:  # written before per-rank states existed: one process's
            state = {"world_size": 1, "ranks": [state]}
        from eval.core import rank_world

        rank, world = rank_world()
        if state["world_size"] != world:
            raise ValueError(
                f"--resume: the checkpoint's {self.what} was written by {state['world_size']} process(es), this run has "
                f"{world}; an exact resume (each rank continuing its own data) needs the same number of processes"
            )
        self.obj.load_state_dict(state["ranks"][rank])


@dataclass
class LoopState:
    """Everything of the loop that a resume needs besides model, optimizer, RNG and data."""

    step: int = 0
    min_val_bpb: float = float("inf")
    smooth_train_loss: float = 0.0
    total_training_time: float = 0.0
    val_bpb: float | None = None
    history: list = field(default_factory=list)  # [{"step", "train_loss", "lrm", ...}] for reports
    pending_batch: list | None = None  # the batch already fetched for the next step, saved for an exact resume

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


# --------------------------------------------------------------------------- checkpoints
def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders that finished writing (marker present), oldest first."""
    if not root.exists():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / CHECKPOINT_MARKER).exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(accelerator, root: Path, step: int, keep_last: int) -> Path:
    """save_state into `step-N.tmp`, write the marker, rename atomically, then prune old ones."""
    final = root / f"step-{step:06d}"
    tmp = root / f"step-{step:06d}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / CHECKPOINT_MARKER).write_text(json.dumps({"step": step, "time": time.time()}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find_resume_checkpoint(cfg: PretrainConfig) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "latest":
        done = complete_checkpoints(Path(cfg.output_dir) / "checkpoints")
        return done[-1] if done else None
    path = Path(cfg.resume)
    if not (path / CHECKPOINT_MARKER).exists():
        raise ValueError(f"--resume {path}: not a complete checkpoint (no {CHECKPOINT_MARKER} marker inside)")
    return path


# --------------------------------------------------------------------------- the run
def load_tokenizer(path: str):
    from transformers import PreTrainedTokenizerFast

    if not Path(path, "tokenizer.json").exists():
        raise ValueError(f"no tokenizer at {path} (expected {Path(path, 'tokenizer.json')}); "
                         "train one with `nanochat tokenizer train`")
    return PreTrainedTokenizerFast.from_pretrained(path)


def make_accelerator(cfg: PretrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import AORecipeKwargs, TERecipeKwargs

    kwargs = {}
    if cfg.fp8:
        # FP8 all-gather of weights only pays off under FSDP; elsewhere it turns the weights into tensor
        # subclasses that safetensors cannot save. NCCL only: gloo (CPU) has no float8 collectives.
        fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and torch.cuda.is_available()
        handler = (AORecipeKwargs(module_filter_func=fp8_module_filter, enable_fsdp_float8_all_gather=fsdp)
                   if cfg.fp8_backend == "ao" else TERecipeKwargs())
        kwargs = {"mixed_precision": "fp8", "kwargs_handlers": [handler]}
    log_with = None
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    if cfg.report_to == "wandb":
        if not os.environ.get("WANDB_API_KEY"):
            os.environ.setdefault("WANDB_MODE", "offline")  # logs land in <output_dir>/wandb, `wandb sync` later
        os.environ.setdefault("WANDB_DIR", str(Path(cfg.output_dir).resolve()))
        log_with = "wandb"
    elif cfg.report_to == "mlflow":  # a local file store in <output_dir>/mlruns unless MLFLOW_TRACKING_URI is set
        if "MLFLOW_TRACKING_URI" not in os.environ:
            os.environ["MLFLOW_TRACKING_URI"] = Path(cfg.output_dir, "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        log_with = "mlflow"
    return Accelerator(log_with=log_with, **kwargs)


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def save_model_folder(accelerator, model, out_dir: str | Path) -> None:
    """`save_pretrained` of the whole model from the main process; call it on every rank (collective).

    Under FSDP2 the weights are gathered from the shards first, and the save runs with the model's
    own class: fully_shard replaced it with a generated `FSDP<Name>` subclass living in torch's
    FSDP module, which save_pretrained would otherwise write into `auto_map` (and copy torch's
    source files next to the model's code).
    """
    raw = accelerator.unwrap_model(model)
    if not is_fsdp(accelerator):
        if accelerator.is_main_process:
            raw.save_pretrained(out_dir)
        return
    from torch.distributed.fsdp import FSDPModule

    full_state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        fsdp_class = type(raw)
        own_class = next(c for c in fsdp_class.__mro__ if not issubclass(c, FSDPModule))
        raw.__class__ = own_class
        try:
            raw.save_pretrained(out_dir, state_dict=full_state)
        finally:
            raw.__class__ = fsdp_class
    accelerator.wait_for_everyone()


def check_fsdp_wrapping(accelerator, model) -> None:
    """FSDP needs one dtype per sharded unit: bf16 embeddings must be units of their own."""
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ValueError(
            "pretraining with FSDP needs fsdp_version: 2 in the Accelerate config (MuonAdamW works on FSDP2's "
            "row-sharded DTensor parameters; FSDP1 flattens them); see accelerate_configs/gpu_8_fsdp.yaml"
        )
    dtypes = {p.dtype for p in model.parameters()}
    wrapped = {name.strip() for name in (plugin.transformer_cls_names_to_wrap or [])}
    if len(dtypes) > 1 and "Embedding" not in wrapped:
        raise ValueError(
            f"FSDP: the model holds {sorted(map(str, dtypes))} parameters (bf16 embeddings, spec §1.7) and FSDP needs "
            "one dtype per unit; add Embedding to fsdp_transformer_layer_cls_to_wrap (e.g. "
            "'NanoChatDecoderLayer,Embedding', as accelerate_configs/gpu_8_fsdp.yaml) or set mixed_precision"
        )


def run(cfg: PretrainConfig) -> dict:
    """Train, evaluate, checkpoint and save; returns a summary dict (also written as summary.json)."""
    from transformers import set_seed

    from eval.bpb import evaluate_bpb
    from modeling_nanochat import NanoChatForCausalLM
    from modeling_nanochat.tokenization_nanochat import encode_texts, token_bytes
    from training import scaling
    from training.muon import MuonAdamW, nanochat_param_groups

    # --- validate everything cheap before any expensive work
    tokenizer = load_tokenizer(cfg.tokenizer)
    from training.data import list_parquet_shards, split_shards

    if not cfg.data.startswith("hf:"):
        split_shards(list_parquet_shards(cfg.data), "train")
    accelerator = make_accelerator(cfg)
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    # FSDP2: parameters are row-sharded DTensors; every forward is collective, so evaluation,
    # sampling and the final save run on all ranks (see MuonAdamW for the optimizer side)
    fsdp = is_fsdp(accelerator)
    set_seed(cfg.seed)
    bos_id = tokenizer.convert_tokens_to_ids("<|bos|>")
    specials = {"bos_token_id": bos_id, "eos_token_id": tokenizer.convert_tokens_to_ids("<|assistant_end|>"),
                "pad_token_id": bos_id}
    config = model_config(cfg, len(tokenizer), special_ids=specials)
    plan = scaling.plan_training(
        config, reference_config=model_config(cfg, len(tokenizer), depth=12),
        target_param_data_ratio=cfg.target_param_data_ratio, num_iterations=cfg.num_iterations,
        target_flops=cfg.target_flops, total_batch_size=cfg.total_batch_size,
        device_batch_size=cfg.device_batch_size, world_size=world, weight_decay=cfg.weight_decay,
    )
    N, accum = plan.num_iterations, plan.grad_accum_steps
    out_dir = Path(cfg.output_dir)

    # --- model: nanochat's seeded init; bf16 embeddings on CUDA (activations follow, §1.7)
    torch.manual_seed(cfg.seed)
    model = NanoChatForCausalLM(config)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        torch.backends.cuda.matmul.allow_tf32 = True
        if not fsdp or accelerator.mixed_precision == "no":  # FSDP + mixed precision: its policy casts
            model.model.embed_tokens.to(torch.bfloat16)
            for ve in model.model.value_embeds.values():
                ve.to(torch.bfloat16)
    if fsdp:
        check_fsdp_wrapping(accelerator, model)
    model.to(device)
    groups = nanochat_param_groups(
        model, unembedding_lr=cfg.unembedding_lr, embedding_lr=cfg.embedding_lr, matrix_lr=cfg.matrix_lr,
        scalar_lr=cfg.scalar_lr, weight_decay=plan.weight_decay, batch_lr_scale=plan.batch_lr_scale,
    )
    optimizer = MuonAdamW(groups, distributed=world > 1)
    tokenize = lambda texts: encode_texts(tokenizer, texts)  # noqa: E731
    train_loader = build_loader(cfg, tokenize, bos_id, "train", rank, world, device)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    train_model = model
    if cfg.compile == "yes" or (cfg.compile == "auto" and device.type == "cuda"):
        train_model = torch.compile(model, dynamic=False)
    loop = LoopState()
    accelerator.register_for_checkpointing(PerRankState(train_loader, "data loader"), PerRankState(loop, "loop state"))
    resume_from = find_resume_checkpoint(cfg)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        accelerator.print(f"resumed from {resume_from} at step {loop.step}")
    if cfg.report_to != "none":
        accelerator.init_trackers("nanochat", config={**asdict(cfg), **asdict(plan)},
                                  init_kwargs={"wandb": {"name": cfg.run_name}, "mlflow": {"run_name": cfg.run_name}})

    tbytes = token_bytes(tokenizer).to(device)
    eval_steps = max(1, cfg.eval_tokens // (cfg.device_batch_size * cfg.max_seq_len * world))
    flops_per_step = plan.flops_per_token * plan.total_batch_size
    peak = peak_flops(device) * world
    accelerator.print(
        f"d{cfg.depth}: {sum(p.numel() for p in raw_model.parameters()):,} params, scaling params "
        f"{plan.scaling_params:,}, batch {plan.total_batch_size:,} tokens ({accum} accumulation steps x {world} "
        f"processes), {N:,} steps = {plan.total_tokens:,} tokens, {plan.total_flops:.2e} FLOPs, "
        f"LR scale {plan.batch_lr_scale:.3f}, Muon weight decay {plan.weight_decay:.4f}"
    )

    def evaluate() -> float:
        val_loader = build_loader(cfg, tokenize, bos_id, "val", rank, world, device)
        with fp8_disabled(raw_model):
            return evaluate_bpb(raw_model, val_loader, eval_steps, tbytes)

    core_bundle = None

    def core_metric() -> dict:
        """CORE on the uncompiled model in the compute dtype (spec §6.9), on every rank: items split
        across ranks (DDP), or every rank scoring every item in lockstep (FSDP's forwards are collective)."""
        nonlocal core_bundle
        from eval.cli import resolve_bundle
        from eval.core import evaluate_core

        core_bundle = core_bundle or resolve_bundle(cfg.core_bundle)
        with fp8_disabled(raw_model):
            raw_model.eval()
            result = evaluate_core(raw_model, tokenizer, core_bundle, max_per_task=cfg.core_metric_max_per_task,
                                   split_ranks=not fsdp)
            raw_model.train()
        return result

    def sample() -> list[str]:
        outs = []
        with fp8_disabled(raw_model), torch.no_grad():
            raw_model.eval()
            for prompt in SAMPLE_PROMPTS:
                ids = torch.tensor([[bos_id, *encode_texts(tokenizer, [prompt])[0]]], device=device)
                gen = raw_model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None,
                                         pad_token_id=bos_id, attention_mask=torch.ones_like(ids),
                                         synced_gpus=fsdp)
                outs.append(prompt + tokenizer.decode(gen[0, ids.shape[1]:].tolist()))
            raw_model.train()
        return outs

    from tqdm import tqdm

    bar = tqdm(total=N, initial=loop.step, desc="pretrain", unit="step", disable=not accelerator.is_main_process)
    model.train()
    if loop.pending_batch is not None:  # resumed: the batch that was fetched before the checkpoint
        inputs, targets = (t.to(device) for t in loop.pending_batch)
        loop.pending_batch = None
    else:
        inputs, targets = next(train_loader)

    def checkpoint(step: int) -> None:
        loop.pending_batch = [inputs.cpu(), targets.cpu()]
        save_checkpoint(accelerator, out_dir / "checkpoints", step, cfg.keep_last)
        loop.pending_batch = None

    while True:
        step = loop.step
        last = step == N
        if last or (cfg.eval_every > 0 and step % cfg.eval_every == 0):
            bpb = evaluate()
            loop.val_bpb, loop.min_val_bpb = bpb, min(loop.min_val_bpb, bpb)
            accelerator.print(f"step {step:05d} | val bpb {bpb:.4f}")
            accelerator.log({"val/bpb": bpb, "step": step}, step=step)
            loop.history.append({"step": step, "val_bpb": bpb})
        if cfg.core_metric_every > 0 and (last or (step > 0 and step % cfg.core_metric_every == 0)):
            core = core_metric()
            centered = {label: r["centered"] for label, r in core["tasks"].items()}
            accelerator.print(f"step {step:05d} | CORE metric {core['core']:.4f} ({core['bundle'].get('name', 'CORE')})")
            accelerator.log({"core_metric": core["core"], **{f"centered/{k}": v for k, v in centered.items()}}, step=step)
            loop.history.append({"step": step, "core_metric": core["core"], "centered_results": centered})
        if (accelerator.is_main_process or fsdp) and (
                last or (cfg.sample_every > 0 and step > 0 and step % cfg.sample_every == 0)):
            for text in sample():
                accelerator.print(f"  sample: {text!r}")
        if last:
            break
        # --- one optimizer step
        t0 = time.perf_counter()
        lrm = scaling.lr_multiplier(step, N, cfg.warmup_steps, cfg.warmdown_ratio, cfg.final_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = scaling.muon_momentum(step, N, cfg.warmdown_ratio)
                group["weight_decay"] = scaling.muon_weight_decay(step, N, plan.weight_decay)
        for micro in range(accum):
            sync = accelerator.no_sync(model) if micro < accum - 1 else nullcontext()
            with sync:
                loss = train_model(input_ids=inputs, targets=targets, use_cache=False).loss
                train_loss = loss.detach()
                accelerator.backward(loss / accum)
            inputs, targets = next(train_loader)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        train_loss_f = train_loss.item()
        dt = time.perf_counter() - t0
        if step == 0:  # the original freezes the GC after the first step
            gc.collect()
            gc.freeze()
            gc.disable()
        elif step % 5000 == 0:
            gc.collect()
        loop.step = step + 1
        loop.smooth_train_loss = 0.9 * loop.smooth_train_loss + 0.1 * train_loss_f
        debiased = loop.smooth_train_loss / (1 - 0.9**loop.step)
        if step > 10:
            loop.total_training_time += dt
        tok_per_sec = plan.total_batch_size / dt
        mfu = 100 * flops_per_step / dt / peak
        loop.history.append({"step": loop.step, "train_loss": debiased, "lrm": lrm, "dt": dt})
        bar.update(1)
        if accelerator.is_main_process and cfg.log_every > 0 and step % cfg.log_every == 0:
            bar.write(f"step {step:05d}/{N:05d} ({100 * step / N:.2f}%) | loss {debiased:.6f} | lrm {lrm:.2f} | "
                      f"dt {dt * 1000:.2f}ms | tok/sec {tok_per_sec:,.0f} | mfu {mfu:.2f} | "
                      f"time {loop.total_training_time / 60:.2f}m")
        accelerator.log({"train/loss": debiased, "train/lrm": lrm, "train/dt": dt, "train/tok_per_sec": tok_per_sec,
                         "train/mfu": mfu, "total_training_flops": flops_per_step * loop.step,
                         "total_training_time": loop.total_training_time}, step=loop.step)
        if cfg.save_every > 0 and loop.step % cfg.save_every == 0 and loop.step != N:
            checkpoint(loop.step)
    bar.close()
    gc.enable()
    checkpoint(loop.step)
    summary = {"step": loop.step, "val_bpb": loop.val_bpb, "min_val_bpb": loop.min_val_bpb,
               "total_training_time": loop.total_training_time, "plan": asdict(plan), "config": asdict(cfg),
               "distributed_type": str(accelerator.distributed_type.value), "processes": world,
               "history": loop.history}
    with fp8_disabled(raw_model):
        save_model_folder(accelerator, model, out_dir)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(out_dir)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        accelerator.print(f"saved {out_dir} | min val bpb {loop.min_val_bpb:.4f} | "
                          f"training time {loop.total_training_time / 60:.2f} min")
    accelerator.end_training()
    return summary


def parse_config(argv: list[str] | None = None) -> PretrainConfig:
    from trl import TrlParser

    (cfg,) = TrlParser((PretrainConfig,)).parse_args_and_config(argv)
    return cfg


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        run(cfg)
    except ValueError as exc:
        print(f"nanochat pretrain: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
