"""Chat SFT with TRL's `SFTTrainer` (spec §7): `nanochat sft [--config recipe.yaml] [--base runs/base ...]`.

A base model becomes a chat model the TRL way: a conversational `messages` dataset (training.tasks'
mixture), `assistant_only_loss=True` (the chat template's `{% generation %}` blocks mark exactly
nanochat's supervised tokens: assistant text, python calls, `<|assistant_end|>`; never tool outputs),
`packing=True` with best-fit-decreasing packing (one padding-free `[1, total]` row per micro-batch with
`position_ids` restarting per conversation; NanoChat keeps conversations apart in attention and in the
smear), and optionally LoRA through PEFT. What makes it nanochat's recipe:

- learning rates, context length, device batch and total batch are inherited from the base run's
  `summary.json` (spec §7.1; raw CLI values, no batch LR scaling), weight decay 0;
- `MuonAdamW` with nanochat's parameter groups, built by `SFTOptimizerFactory` through the Trainer's
  `optimizer_cls_and_kwargs`; the base run's optimizer state (momentum buffers) is loaded from its last
  complete checkpoint when present, then every LR is multiplied by `init_lr_frac` (0.8);
- LR multiplier by progress (constant, then linear warmdown over the last 50% to 0) and Muon momentum
  0.85 -> 0.95 over 300 steps (spec §7.2), by `NanoChatSFTSchedule`.

Differences from the original, on purpose: packing is best-fit-decreasing over the whole dataset (TRL's
`bfd`) rather than over a 100-conversation buffer, and the loss is normalized by the supervised tokens of
the whole accumulated batch (transformers' `num_items_in_batch`) rather than per micro-batch.

Guards against TRL's silent failure modes (each raises with what to fix): the base folder must be a
nanochat-hf model with nanochat's chat tokenizer; the template's masks must equal `render_conversation`'s
on the first conversations; `<|assistant_end|>` must be supervised; packing must keep every supervised
token (same counts, labels aligned with inputs); a micro-batch without supervised tokens stops training.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import IntervalStrategy, SaveStrategy
from trl import SFTConfig, SFTTrainer

from training.muon import MuonAdamW, MuonAdamWFactory

# spec §7.1 fallbacks when the base run left no summary.json
FALLBACKS = {"max_seq_len": 2048, "device_batch_size": 32, "total_batch_size": 524288, "embedding_lr": 0.3,
             "unembedding_lr": 0.004, "matrix_lr": 0.02}
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
CHECK_CONVERSATIONS = 16  # conversations whose template masks are compared with render_conversation


@dataclass
class NanoChatSFTConfig(SFTConfig):
    """TRL's `SFTConfig` with nanochat's SFT defaults (spec §7.1-7.2) and a few nanochat fields.

    Changed TRL defaults: `assistant_only_loss=True`, `packing=True` (bfd), `max_length=None` (= the base
    run's context), `activation_checkpointing=False`, `bf16=False` (NanoChat follows its embedding dtype, bf16
    on CUDA, so no autocast), `weight_decay=0`, `logging_steps=1`, `save_strategy="no"` (the final model is
    saved), `eval_strategy="steps"` every 200 steps, `report_to="none"`, `output_dir="runs/sft"`.
    """

    output_dir: str | None = field(default="runs/sft", metadata={"help": "where the chat model folder is written"})
    # data
    base: str = field(default="runs/base", metadata={"help": "base model folder (nanochat pretrain output or any nanochat-hf folder)"})
    mixture: str = field(default="nanochat", metadata={"help": "task mixture preset: nanochat (the original's, Hub data) or demo (offline)"})
    identity_file: str | None = field(default=None, metadata={"help": "identity conversations JSONL (default: a generated set naming --model-name)"})
    model_name: str = field(default="nanochat", metadata={"help": "the model's name in the generated identity conversations"})
    mmlu_epochs: int = field(default=3, metadata={"help": "epochs of MMLU in the mixture"})
    gsm8k_epochs: int = field(default=4, metadata={"help": "epochs of GSM8K in the mixture"})
    identity_epochs: int = field(default=2, metadata={"help": "epochs of the identity conversations in the mixture"})
    max_conversations: int | None = field(default=None, metadata={"help": "train on the first N conversations of the shuffled mixture (smoke runs)"})
    # inherited from the base run when None (spec §7.1)
    device_batch_size: int | None = field(default=None, metadata={"help": "rows per micro-batch per process (sets per_device_*_batch_size); None: the base run's"})
    total_batch_size: int | None = field(default=None, metadata={"help": "tokens per optimizer step (sets gradient_accumulation_steps); None: the base run's"})
    embedding_lr: float | None = field(default=None, metadata={"help": "AdamW LR of the embeddings; None: the base run's"})
    unembedding_lr: float | None = field(default=None, metadata={"help": "AdamW LR of lm_head; None: the base run's"})
    matrix_lr: float | None = field(default=None, metadata={"help": "Muon LR of the block matrices; None: the base run's"})
    scalar_lr: float = field(default=0.5, metadata={"help": "AdamW LR of the residual scalars"})
    init_lr_frac: float = field(default=0.8, metadata={"help": "every LR is multiplied by this at the start"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of the run with a linear LR warmup"})
    warmdown_ratio: float = field(default=0.5, metadata={"help": "fraction of the run with a linear LR warmdown"})
    final_lr_frac: float = field(default=0.0, metadata={"help": "LR multiplier at the end of the warmdown"})
    load_optimizer: bool = field(default=True, metadata={"help": "load the base run's optimizer state (momenta) from its last checkpoint"})
    # LoRA (PEFT)
    lora: bool = field(default=False, metadata={"help": "train a LoRA adapter instead of all weights (saved to <output_dir>/adapter, merged into <output_dir>)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS), metadata={"help": "module names LoRA wraps (default: attention and MLP projections)"})
    # TRL / transformers defaults changed for nanochat
    assistant_only_loss: bool = field(default=True, metadata={"help": "train only on the assistant's tokens (the chat template's generation blocks)"})
    packing: bool = field(default=True, metadata={"help": "best-fit packing of conversations into padding-free rows"})
    max_length: int | None = field(default=None, metadata={"help": "tokens per packed row; None: the base run's context length"})
    activation_checkpointing: bool | None = field(default=False, metadata={"help": "recompute activations in the backward pass"})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "deprecated alias of --activation_checkpointing"})
    bf16: bool | None = field(default=False, metadata={"help": "autocast to bf16 (NanoChat already runs in its embedding dtype)"})
    weight_decay: float = field(default=0.0, metadata={"help": "unused by MuonAdamW's groups (spec §7.1: 0)"})
    logging_steps: float = field(default=1, metadata={"help": "log every N steps"})
    save_strategy: SaveStrategy | str = field(default="no", metadata={"help": "intermediate Trainer checkpoints (the final model is always saved)"})
    eval_strategy: IntervalStrategy | str = field(default="steps", metadata={"help": "validation loss schedule: no, steps, epoch"})
    eval_steps: float | None = field(default=200, metadata={"help": "validation loss every N steps"})
    chatcore_every: int = field(default=200, metadata={"help": "ChatCORE every N steps and at the last step (-1: never)"})
    chatcore_max_problems: int = field(default=24, metadata={"help": "problems per ChatCORE task during training"})
    chatcore_tasks: str | None = field(default=None, metadata={"help": "ChatCORE tasks separated by | (default: all six)"})
    chatcore_max_new_tokens: int = field(default=256, metadata={"help": "tokens per generated ChatCORE answer"})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "trackers: none, wandb, mlflow, trackio, ..."})

    def __post_init__(self):
        super().__post_init__()
        from training.tasks import PRESETS

        if self.mixture not in PRESETS:
            raise ValueError(f"--mixture must be one of {', '.join(PRESETS)}, got {self.mixture!r}")
        for name in ("mmlu_epochs", "gsm8k_epochs", "identity_epochs", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("device_batch_size", "total_batch_size", "max_length", "max_conversations"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name} must be in [0, 1], got {getattr(self, name)}")
        if self.warmup_ratio + self.warmdown_ratio > 1.0:
            raise ValueError(f"--warmup_ratio + --warmdown_ratio must be <= 1, got {self.warmup_ratio} + {self.warmdown_ratio}")
        if self.init_lr_frac <= 0:
            raise ValueError(f"--init_lr_frac must be positive, got {self.init_lr_frac}")


# --------------------------------------------------------------------------- schedules (spec §7.2)
def sft_lr_multiplier(progress: float, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.5,
                      final_lr_frac: float = 0.0) -> float:
    """LR multiplier at training progress p in [0, 1]: warmup, constant, then linear to final_lr_frac."""
    if progress < warmup_ratio:
        return (progress + 1e-8) / warmup_ratio
    if progress <= 1.0 - warmdown_ratio:
        return 1.0
    decay = (progress - (1.0 - warmdown_ratio)) / warmdown_ratio
    return (1.0 - decay) + decay * final_lr_frac


def sft_muon_momentum(step: int, ramp_steps: int = 300) -> float:
    """Muon momentum 0.85 -> 0.95 linearly over the first `ramp_steps` steps, then 0.95."""
    frac = min(step / ramp_steps, 1.0)
    return (1.0 - frac) * 0.85 + frac * 0.95


class NanoChatSFTSchedule(torch.optim.lr_scheduler.LambdaLR):
    """lr = initial_lr x sft_lr_multiplier(step / num_training_steps); also ramps Muon momentum.

    The Trainer steps it once per optimizer step, so progress is exact (the original estimates it from
    the data loader); the lambda sees the step the next optimizer update will run at.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, num_training_steps: int, warmup_ratio: float = 0.0,
                 warmdown_ratio: float = 0.5, final_lr_frac: float = 0.0, momentum_ramp: bool = True):
        self.num_training_steps = max(1, num_training_steps)
        self.momentum_ramp = momentum_ramp
        super().__init__(optimizer, lambda step: sft_lr_multiplier(
            step / self.num_training_steps, warmup_ratio, warmdown_ratio, final_lr_frac))

    def step(self, epoch: int | None = None) -> None:
        super().step()
        if self.momentum_ramp:
            for group in self.optimizer.param_groups:
                if group.get("kind") == "muon":
                    group["momentum"] = sft_muon_momentum(self.last_epoch)


# --------------------------------------------------------------------------- optimizer
def latest_optimizer_state(base: str | Path) -> Path | None:
    """The optimizer state of the base run's last complete checkpoint (training.pretrain's layout), or None:
    `optimizer.bin` (1 process / DDP) or the `optimizer_0` folder of an FSDP run (torch.distributed.checkpoint)."""
    from training.pretrain import complete_checkpoints

    done = complete_checkpoints(Path(base) / "checkpoints")
    if not done:
        return None
    return next((p for p in (done[-1] / "optimizer.bin", done[-1] / "optimizer_0") if p.exists()), None)


def load_optimizer_state(path: str | Path) -> dict[str, Any]:
    """A full optimizer state in torch's format ({"state": {index: ...}, "param_groups": [...]}) from
    `optimizer.bin` or from an FSDP run's sharded `optimizer_0` folder (gathered into whole tensors; that
    format keys states and group members by parameter name, which become positions in group order)."""
    path = Path(path)
    if not path.is_dir():
        return torch.load(path, map_location="cpu", weights_only=True)
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, Path(tmp, "optimizer.pt"))
        saved = torch.load(Path(tmp, "optimizer.pt"), map_location="cpu", weights_only=True).get("optimizer", {})
    if not isinstance(saved.get("param_groups"), list) or not isinstance(saved.get("state"), dict):
        raise ValueError(f"optimizer state {path}: not an optimizer checkpoint written by training.pretrain under FSDP")
    position: dict[str, int] = {}
    groups = []
    for group in saved["param_groups"]:
        groups.append({**group, "params": [position.setdefault(name, len(position)) for name in group["params"]]})
    unknown = sorted(set(saved["state"]) - set(position))
    if unknown:
        raise ValueError(f"optimizer state {path}: state for parameters in no group: {unknown[:3]}")
    return {"state": {position[name]: entry for name, entry in saved["state"].items()}, "param_groups": groups}


class SFTOptimizerFactory(MuonAdamWFactory):
    """`MuonAdamWFactory` + the SFT start (spec §7.1): optionally load the base run's optimizer state, keep
    the freshly computed LRs (loading overwrites every group hyperparameter; the other loaded values, e.g.
    Muon's end-of-pretraining weight decay, persist as in the original), then multiply every LR by
    `init_lr_frac`. Pass it as `optimizer_cls_and_kwargs=(SFTOptimizerFactory, {..., "init_lr_frac": 0.8,
    "optimizer_state": path_or_None})`; the other kwargs are `nanochat_param_groups`'s / `MuonAdamW`'s.
    """

    def __call__(self, model: torch.nn.Module, init_lr_frac: float = 1.0, optimizer_state: str | None = None,
                 **kwargs: Any) -> MuonAdamW:
        optimizer = super().__call__(model, **kwargs)
        fresh = [group["lr"] for group in optimizer.param_groups]
        if optimizer_state is not None:
            state = load_optimizer_state(optimizer_state)
            names = [g.get("name") for g in optimizer.param_groups]
            saved = [g.get("name") for g in state.get("param_groups", [])]
            if names != saved:
                raise ValueError(f"optimizer state {optimizer_state} has groups {saved}, this model has {names}: "
                                 "was it written for another model? (pass --load_optimizer false to start fresh)")
            optimizer.load_state_dict(state)
        for group, lr in zip(optimizer.param_groups, fresh):
            group["lr"] = group["initial_lr"] = lr * init_lr_frac
        return optimizer


# --------------------------------------------------------------------------- guards
class SFTDataError(ValueError):
    """The prepared SFT data would train something other than nanochat's supervised tokens."""


def supervision_stats(ds, assistant_end_id: int) -> dict[str, int]:
    """Counts over a tokenized dataset (`input_ids`, `labels` with -100 = ignored): examples, tokens,
    supervised tokens, supervised `<|assistant_end|>`, and supervised labels that differ from their input id."""
    import numpy as np

    stats = dict.fromkeys(("examples", "tokens", "supervised", "assistant_end", "misaligned"), 0)
    for batch in ds.select_columns(["input_ids", "labels"]).with_format("arrow").iter(batch_size=10_000):
        ids = np.asarray(batch.column("input_ids").combine_chunks().flatten())
        labels = np.asarray(batch.column("labels").combine_chunks().flatten())
        supervised = labels != -100
        stats["examples"] += batch.num_rows
        stats["tokens"] += len(ids)
        stats["supervised"] += int(supervised.sum())
        stats["assistant_end"] += int((labels == assistant_end_id).sum())
        stats["misaligned"] += int(np.count_nonzero(supervised & (labels != ids)))
    return stats


def check_template_masks(tokenizer, conversations: list) -> None:
    """apply_chat_template's assistant mask == render_conversation's mask on these conversations, and the
    template supervises `<|assistant_end|>` (TRL only warns when it does not)."""
    from modeling_nanochat.tokenization_nanochat import render_conversation

    for i, conversation in enumerate(conversations):
        out = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = render_conversation(tokenizer, conversation, max_tokens=None)
        if list(out["input_ids"]) != ids or list(out["assistant_masks"]) != mask:
            raise SFTDataError(
                f"conversation {i}: the tokenizer's chat template does not reproduce nanochat's rendering "
                "(render_conversation): ids or supervised mask differ. Is this nanochat's chat template "
                "(modeling_nanochat.tokenization_nanochat.CHAT_TEMPLATE)?")
    end = tokenizer.convert_tokens_to_ids("<|assistant_end|>")
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "ok"}]
    out = tokenizer.apply_chat_template(probe, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    supervised = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    if not supervised or supervised[-1] != end:
        raise SFTDataError("the chat template does not supervise <|assistant_end|>: the model would never learn to "
                           "stop. Put <|assistant_end|> inside the {% generation %} block.")


# --------------------------------------------------------------------------- trainer
class NanoChatSFTTrainer(SFTTrainer):
    """`SFTTrainer` with nanochat's LR/momentum schedule and the packing and supervision guards."""

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None:
            args = self.args
            self.lr_scheduler = NanoChatSFTSchedule(
                optimizer or self.optimizer, num_training_steps, getattr(args, "warmup_ratio", 0.0),
                getattr(args, "warmdown_ratio", 0.5), getattr(args, "final_lr_frac", 0.0))
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        # Tokenize (and truncate) unpacked first so the masks can be checked before and after packing.
        from trl.data_utils import pack_dataset

        prepared = super()._prepare_dataset(dataset, processing_class, args, False, formatting_func, dataset_name)
        end = self._tokenizer.convert_tokens_to_ids("<|assistant_end|>")
        before = supervision_stats(prepared, end)
        if before["examples"] == 0 or before["supervised"] == 0:
            raise SFTDataError(f"{dataset_name}: no example has supervised tokens after tokenization "
                               f"(max_length {args.max_length})")
        if before["assistant_end"] == 0:
            raise SFTDataError(f"{dataset_name}: <|assistant_end|> is never supervised; the model would not learn to stop")
        self.supervision = getattr(self, "supervision", {})
        self.supervision[dataset_name] = before
        if not packing:
            return prepared
        packed = pack_dataset(prepared.select_columns(["input_ids", "labels"]), args.max_length,
                              args.packing_strategy, {"num_proc": args.dataset_num_proc})
        after = supervision_stats(packed, end)
        if (after["tokens"], after["supervised"], after["assistant_end"]) != (
                before["tokens"], before["supervised"], before["assistant_end"]) or after["misaligned"]:
            raise SFTDataError(f"{dataset_name}: packing changed the supervised tokens (before {before}, after {after})")
        self.supervision[dataset_name] = {**before, "packed_rows": after["examples"]}
        return packed

    def training_step(self, model, inputs, num_items_in_batch=None):
        labels = inputs.get("labels")
        if labels is not None and not bool((labels != -100).any()):
            raise SFTDataError("a training micro-batch has no supervised tokens (every label is masked): check the "
                               "chat template's {% generation %} blocks and max_length")
        return super().training_step(model, inputs, num_items_in_batch)


class ChatCoreCallback(TrainerCallback):
    """ChatCORE (subset) every `chatcore_every` steps and at the last step (spec §7.6), on every process:
    the problems are split across ranks and the results all-reduced (so all ranks must take part).

    Results go into the trainer's log history (`chatcore`, `chatcore_cat`, `chatcore/<task>` accuracies) and
    through `log` to the trackers. With LoRA, the base model with its adapter layers active is evaluated.
    """

    def __init__(self, trainer: SFTTrainer, cfg: NanoChatSFTConfig):
        self.trainer, self.cfg = trainer, cfg

    def on_step_end(self, args, state, control, **kwargs):
        every = self.cfg.chatcore_every
        last = state.global_step >= state.max_steps
        if every <= 0 or not (last or state.global_step % every == 0):
            return control
        from eval.chat import LocalChat, evaluate_chatcore

        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        model = model.get_base_model() if hasattr(model, "get_base_model") else model
        tasks = [t for t in self.cfg.chatcore_tasks.split("|") if t] if self.cfg.chatcore_tasks else None
        was_training = model.training
        with torch.no_grad():
            result = evaluate_chatcore(LocalChat(model, self.trainer.processing_class, self.cfg.per_device_eval_batch_size),
                                       tasks, max_problems=self.cfg.chatcore_max_problems,
                                       max_new_tokens=self.cfg.chatcore_max_new_tokens)
        model.train(was_training)
        logs = {"chatcore": result["chatcore"], "chatcore_cat": result["chatcore_cat"],
                **{f"chatcore/{name}": r["accuracy"] for name, r in result["tasks"].items()}}
        self.trainer.log({k: v for k, v in logs.items() if v is not None})
        return control


# --------------------------------------------------------------------------- the run
def read_base(base: str | Path, flag: str = "--base") -> dict[str, Any]:
    """Validate a model folder (nanochat-hf config and tokenizer) and return its training summary ({} if none)."""
    base = Path(base)
    config_path = base / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{flag} {base}: no config.json; expected a model folder written by `nanochat pretrain` "
                         "or save_pretrained")
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type != "nanochat_hf":
        raise ValueError(f"{flag} {base}: model_type is {model_type!r}, not 'nanochat_hf' (this stage trains "
                         "nanochat-hf models; convert other nanochat checkpoints with `nanochat convert`)")
    if not (base / "tokenizer.json").is_file():
        raise ValueError(f"{flag} {base}: no tokenizer.json next to the model")
    summary = base / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else {}


def inherited_settings(cfg: NanoChatSFTConfig, summary: dict) -> dict[str, Any]:
    """Spec §7.1: a CLI value wins, else the base run's, else the original's fallback."""
    base_cfg = summary.get("config", {})
    base_total = base_cfg.get("total_batch_size", -1)
    if base_total is None or base_total <= 0:
        base_total = summary.get("plan", {}).get("total_batch_size")
    from_base = {"max_seq_len": base_cfg.get("max_seq_len"), "device_batch_size": base_cfg.get("device_batch_size"),
                 "total_batch_size": base_total, "embedding_lr": base_cfg.get("embedding_lr"),
                 "unembedding_lr": base_cfg.get("unembedding_lr"), "matrix_lr": base_cfg.get("matrix_lr")}
    cli = {"max_seq_len": cfg.max_length, "device_batch_size": cfg.device_batch_size,
           "total_batch_size": cfg.total_batch_size, "embedding_lr": cfg.embedding_lr,
           "unembedding_lr": cfg.unembedding_lr, "matrix_lr": cfg.matrix_lr}
    return {k: cli[k] if cli[k] is not None else from_base[k] if from_base[k] is not None else FALLBACKS[k]
            for k in FALLBACKS}


def load_tokenizer(base: str | Path):
    from transformers import AutoTokenizer
    from trl.chat_template_utils import has_generation_markers

    from modeling_nanochat.tokenization_nanochat import SPECIAL_TOKENS

    tokenizer = AutoTokenizer.from_pretrained(base)
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"the tokenizer in {base} lacks nanochat's special tokens {missing}")
    if not tokenizer.chat_template or not has_generation_markers(tokenizer.chat_template):
        raise ValueError(f"the tokenizer in {base} has no chat template with {{% generation %}} blocks "
                         "(nanochat's CHAT_TEMPLATE); assistant-only loss needs one")
    return tokenizer


def build_datasets(cfg: NanoChatSFTConfig):
    """(train, validation) mixtures of the configured preset, `messages` only."""
    from training.tasks import load_mixture, preset

    train_specs, val_specs = preset(cfg.mixture, identity_file=cfg.identity_file, model_name=cfg.model_name,
                                    mmlu_epochs=cfg.mmlu_epochs, gsm8k_epochs=cfg.gsm8k_epochs,
                                    identity_epochs=cfg.identity_epochs)
    train = load_mixture(train_specs, seed=cfg.seed)
    if cfg.max_conversations is not None:
        train = train.select(range(min(cfg.max_conversations, len(train))))
    val = load_mixture(val_specs, seed=cfg.seed, training=False) if cfg.eval_strategy != "no" else None
    return train, val


def lora_config(cfg: NanoChatSFTConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM")


def build_trainer(cfg: NanoChatSFTConfig, train_dataset=None, eval_dataset=None) -> NanoChatSFTTrainer:
    """Validate the base, inherit its settings, load the data (the preset mixture unless datasets with a
    `messages` column are given), check the template masks and build the trainer (datasets prepared and
    packed, guards run). `cfg` is updated with the effective batch geometry."""
    from transformers import AutoModelForCausalLM

    import modeling_nanochat  # noqa: F401  (registers nanochat_hf with the Auto classes)

    summary = read_base(cfg.base)
    tokenizer = load_tokenizer(cfg.base)
    settings = inherited_settings(cfg, summary)
    if train_dataset is None:
        train_dataset, built_eval = build_datasets(cfg)
        eval_dataset = eval_dataset if eval_dataset is not None else built_eval
    for name, ds in (("train", train_dataset), ("eval", eval_dataset)):
        if ds is None:
            continue
        if "messages" not in ds.column_names:
            raise ValueError(f"the {name} dataset needs a 'messages' column (has {ds.column_names})")
        if len(ds) == 0:
            raise ValueError(f"the {name} dataset is empty")
    train_dataset = train_dataset.select_columns(["messages"])
    eval_dataset = eval_dataset.select_columns(["messages"]) if eval_dataset is not None else None
    first = train_dataset.select(range(min(CHECK_CONVERSATIONS, len(train_dataset))))
    check_template_masks(tokenizer, [row["messages"] for row in first])

    # batch geometry: inherited, then written into TRL's fields
    world = cfg.world_size
    tokens_per_micro = settings["device_batch_size"] * settings["max_seq_len"] * world
    if settings["total_batch_size"] % tokens_per_micro:
        raise ValueError(f"total_batch_size {settings['total_batch_size']} is not a multiple of device_batch_size x "
                         f"max_length x processes = {settings['device_batch_size']} x {settings['max_seq_len']} x {world}")
    cfg.max_length = settings["max_seq_len"]
    cfg.per_device_train_batch_size = cfg.per_device_eval_batch_size = settings["device_batch_size"]
    cfg.gradient_accumulation_steps = settings["total_batch_size"] // tokens_per_micro
    if eval_dataset is None:
        cfg.eval_strategy = "no"

    model = AutoModelForCausalLM.from_pretrained(cfg.base)
    if model.config.max_position_embeddings < cfg.max_length:
        print(f"nanochat sft: note: max_length {cfg.max_length} exceeds the base model's context "
              f"{model.config.max_position_embeddings}; its attention windows stay as trained", file=sys.stderr)
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0) and not cfg.use_cpu:
        model.model.embed_tokens.to(torch.bfloat16)  # nanochat's dtype policy (spec §1.7), as in pretraining
        for ve in model.model.value_embeds.values():
            ve.to(torch.bfloat16)
    state_path = latest_optimizer_state(cfg.base) if cfg.load_optimizer and not cfg.lora else None
    optimizer_kwargs = {"unembedding_lr": settings["unembedding_lr"], "embedding_lr": settings["embedding_lr"],
                        "matrix_lr": settings["matrix_lr"], "scalar_lr": cfg.scalar_lr, "weight_decay": 0.0,
                        "init_lr_frac": cfg.init_lr_frac, "optimizer_state": str(state_path) if state_path else None}
    trainer = NanoChatSFTTrainer(
        model=model, args=cfg, train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
        optimizer_cls_and_kwargs=(SFTOptimizerFactory, optimizer_kwargs),
        peft_config=lora_config(cfg) if cfg.lora else None,
    )
    trainer.nanochat_settings = {**settings, "optimizer_state": optimizer_kwargs["optimizer_state"]}
    trainer.add_callback(ChatCoreCallback(trainer, cfg))
    return trainer


def run(cfg: NanoChatSFTConfig, train_dataset=None, eval_dataset=None) -> dict[str, Any]:
    """Fine-tune `cfg.base` (see `build_trainer`), evaluate at the end, and save an HF folder (+ `adapter/`
    with LoRA, merged into the folder) and summary.json to `cfg.output_dir`; returns the summary."""
    trainer = build_trainer(cfg, train_dataset, eval_dataset)
    t0 = time.time()
    result = trainer.train()
    evals = [(h["step"], h["eval_loss"]) for h in trainer.state.log_history if "eval_loss" in h]
    if trainer.eval_dataset is not None and (not evals or evals[-1][0] != trainer.state.global_step):
        evals.append((trainer.state.global_step, trainer.evaluate()["eval_loss"]))  # always at the last step
    out = Path(cfg.output_dir)
    summary = {
        "base": str(cfg.base), "steps": trainer.state.global_step, "train_loss": result.training_loss,
        "eval_loss": evals[-1][1] if evals else None, "train_time_s": time.time() - t0,
        "settings": trainer.nanochat_settings, "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "lora": cfg.lora, "supervision": getattr(trainer, "supervision", {}), "history": trainer.state.log_history,
        "distributed_type": str(trainer.accelerator.distributed_type.value), "processes": trainer.accelerator.num_processes,
        "config": {k: v for k, v in cfg.to_dict().items() if _jsonable(v)},  # to_dict redacts tokens
    }
    if not cfg.lora:  # every rank: the save is collective under FSDP
        from training.pretrain import save_model_folder

        save_model_folder(trainer.accelerator, trainer.model, out)
    if trainer.is_world_process_zero():
        if cfg.lora:
            trainer.model.save_pretrained(out / "adapter")
            trainer.model.merge_and_unload().save_pretrained(out)
        trainer.processing_class.save_pretrained(out)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        print(f"nanochat sft: saved {out} | {summary['steps']} steps | train loss {result.training_loss:.4f}"
              + (f" | val loss {summary['eval_loss']:.4f}" if evals else ""))
    return summary


def _jsonable(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (str, int, bool, type(None), list, dict))


# --------------------------------------------------------------------------- LoRA adapters
def load_lora(base: str | Path, adapter: str | Path):
    """The base model with a trained LoRA adapter applied (a PEFT model, for generation or more training)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import modeling_nanochat  # noqa: F401

    read_base(base)
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ValueError(f"{adapter}: no adapter_config.json (written by `nanochat sft --lora` under <output_dir>/adapter)")
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter))


def merge_lora(base: str | Path, adapter: str | Path, output_dir: str | Path) -> Path:
    """Merge a LoRA adapter into the base weights and save a plain nanochat-hf folder (with the tokenizer)."""
    from transformers import AutoTokenizer

    merged = load_lora(base, adapter).merge_and_unload()
    merged.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(base).save_pretrained(output_dir)
    return Path(output_dir)


# --------------------------------------------------------------------------- CLI
def parse_config(argv: list[str] | None = None) -> NanoChatSFTConfig:
    from trl import TrlParser

    (cfg,) = TrlParser((NanoChatSFTConfig,)).parse_args_and_config(argv)
    return cfg


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        run(cfg)
    except ValueError as exc:
        print(f"nanochat sft: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
