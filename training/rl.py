"""RL on GSM8K with TRL's `GRPOTrainer` and the calculator tool (spec §8): `nanochat rl [--model runs/sft ...]`.

The original's algorithm is on-policy REINFORCE with a group-mean baseline: sample 16 answers per question,
reward 1 when the final `#### number` is right, advantage = reward - the group's mean (not divided by the
std), token-level normalization, no KL, no ratio clipping in effect (one update per batch). In TRL terms:
`GRPOTrainer` with `beta=0`, `scale_rewards="none"`, `loss_type="dapo"` (normalized by the batch's
completion tokens), `num_iterations=1`, `num_generations=16`; 16 questions x 16 samples = 256 completions
per optimizer step (`per_device_train_batch_size=8` x `gradient_accumulation_steps=32` on one process).

Rollouts go through nanochat's engine (`modeling_nanochat.generation_nanochat.NanoChatEngine`) via TRL's
`rollout_func` hook, so the calculator runs mid-generation exactly as in the original: when the model closes
`<|python_end|>`, the expression is evaluated and `<|output_start|>result<|output_end|>` is forced into that
row. Forced tokens are returned with `env_mask` 0, so they are context but never reinforced; the stop token
`<|assistant_end|>` is returned (TRL sees the completion as terminated) also with `env_mask` 0, because the
original never reinforces it either.

Optimizer: `MuonAdamW` with the original's RL learning rates (`setup_optimizer` defaults: unembedding 0.004,
embedding 0.2, matrix 0.02, scalars 0.5, smear/backout 0.2, no weight decay) all multiplied by
`init_lr_frac` 0.05; LR multiplier 1 - step/num_steps (TRL's "linear"); Muon momentum 0.95 throughout.
Tasks: `gsm8k` (train split on the Hub, or `--task_source` a local copy with its schema) and
`spelling_bee` (generated offline, also scored by `#### n` and solved with the tool: the offline demo).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from trl import GRPOConfig, GRPOTrainer

from training.muon import MuonAdamWFactory

RL_TASKS = ("gsm8k", "spelling_bee")


@dataclass
class NanoChatGRPOConfig(GRPOConfig):
    """TRL's `GRPOConfig` with the original's RL settings (spec §8) and the nanochat fields below.

    Changed TRL defaults: `num_generations=16`, `max_completion_length=256`, `top_k=50`,
    `scale_rewards="none"`, `per_device_train_batch_size=8`, `gradient_accumulation_steps=32`,
    `lr_scheduler_type="linear"` without warmup, `activation_checkpointing=False`, `bf16=False`,
    `logging_steps=1`, `save_strategy="no"`, `report_to="none"`, `output_dir="runs/rl"`.
    """

    output_dir: str | None = field(default="runs/rl", metadata={"help": "where the RL model folder is written"})
    model: str = field(default="runs/sft", metadata={"help": "the chat model to start from (the SFT output folder)"})
    task: str = field(default="gsm8k", metadata={"help": "prompts and rewards: gsm8k (Hub train split) or spelling_bee (generated, offline)"})
    task_source: str | None = field(default=None, metadata={"help": "a Hub id or local copy (same schema) for the task's data"})
    task_size: int | None = field(default=None, metadata={"help": "use the first N problems (spelling_bee: how many to generate)"})
    use_calculator: bool = field(default=True, metadata={"help": "run the calculator tool during rollouts (the original's RL)"})
    init_lr_frac: float = field(default=0.05, metadata={"help": "every LR is multiplied by this"})
    unembedding_lr: float = field(default=0.004, metadata={"help": "AdamW LR of lm_head (before init_lr_frac)"})
    embedding_lr: float = field(default=0.2, metadata={"help": "AdamW LR of the embeddings (before init_lr_frac)"})
    matrix_lr: float = field(default=0.02, metadata={"help": "Muon LR of the block matrices (before init_lr_frac)"})
    scalar_lr: float = field(default=0.5, metadata={"help": "AdamW LR of the residual scalars (before init_lr_frac)"})
    # TRL defaults changed for nanochat
    num_generations: int | None = field(default=16, metadata={"help": "samples per question (the group)"})
    max_completion_length: int | None = field(default=256, metadata={"help": "max tokens per sample (forced tool tokens count)"})
    top_k: int = field(default=50, metadata={"help": "top-k sampling (0 = off)"})
    scale_rewards: str = field(default="none", metadata={"help": "advantage = reward - group mean, not divided by the std"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "completions per micro-batch per process"})
    gradient_accumulation_steps: int = field(default=32, metadata={"help": "micro-batches per optimizer step"})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "LR multiplier 1 - step / num_steps"})
    activation_checkpointing: bool | None = field(default=False, metadata={"help": "recompute activations in the backward pass"})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "deprecated alias of --activation_checkpointing"})
    bf16: bool | None = field(default=False, metadata={"help": "autocast to bf16 (NanoChat already runs in its embedding dtype)"})
    logging_steps: float = field(default=1, metadata={"help": "log every N steps"})
    save_strategy: str = field(default="no", metadata={"help": "intermediate Trainer checkpoints (the final model is always saved)"})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "trackers: none, wandb, mlflow, trackio, ..."})

    def __post_init__(self):
        super().__post_init__()
        if self.task not in RL_TASKS:
            raise ValueError(f"--task must be one of {', '.join(RL_TASKS)}, got {self.task!r}")
        if self.task_size is not None and self.task_size <= 0:
            raise ValueError(f"--task_size must be positive, got {self.task_size}")
        if self.init_lr_frac <= 0:
            raise ValueError(f"--init_lr_frac must be positive, got {self.init_lr_frac}")


# --------------------------------------------------------------------------- data and reward
def prompt_dataset(task: str, source: str | None = None, size: int | None = None, split: str = "train"):
    """`prompt` (the conversation without its final assistant message) and `answer` (reference number)."""
    from training.tasks import load_task

    if task == "spelling_bee":
        ds = load_task("spelling_bee", split, **({"size": size} if size else {}))
    else:
        ds = load_task(task, split, **({"source": source} if source else {}))
        if size:
            ds = ds.select(range(min(size, len(ds))))
    if len(ds) == 0:
        raise ValueError(f"the {task} {split} split is empty")
    return ds.map(lambda row: {"prompt": row["messages"][:-1]}, remove_columns=["messages"])


def answer_reward(completions: list, answer: list[str], **kwargs: Any) -> list[float]:
    """GSM8K's reward (spec §8): 1.0 when the completion's `#### number` equals the reference, else 0.0."""
    from training.tasks.gsm8k import reward

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [reward(text if isinstance(text, str) else str(text), ref) for text, ref in zip(texts, answer)]


# --------------------------------------------------------------------------- rollouts with the tool
def render_prompt(tokenizer, prompt: list) -> list[int]:
    """nanochat's completion prompt (spec §4.7): the conversation so far, then `<|assistant_start|>`."""
    from modeling_nanochat.tokenization_nanochat import render_conversation

    ids, _ = render_conversation(tokenizer, prompt, max_tokens=None)
    return ids + [tokenizer.convert_tokens_to_ids("<|assistant_start|>")]


class ToolRollout:
    """TRL `rollout_func(prompts, trainer)` that samples through nanochat's engine with the calculator.

    TRL hands over each prompt already repeated `num_generations` times in a row; consecutive equal prompts
    are prefilled once and sampled `num_samples` times (the engine clones the prompt's cache). Returns, per
    prompt received: `prompt_ids`, `completion_ids` (sampled + forced tokens, then the stop token when the
    sample stopped), `env_mask` (1 = sampled and trained, 0 = forced tool output or the stop token),
    `logprobs=None` (on-policy: TRL recomputes them) and `tool_calls` (per sample, for logging/rewards).
    """

    def __init__(self, use_calculator: bool = True, seed: int = 42):
        self.use_calculator, self.seed, self.calls = use_calculator, seed, 0

    def __call__(self, prompts: list, trainer) -> dict[str, list]:
        from modeling_nanochat.generation_nanochat import NanoChatEngine

        tokenizer, args = trainer.processing_class, trainer.args
        model = trainer.accelerator.unwrap_model(trainer.model)
        engine = NanoChatEngine(model, tokenizer, use_calculator_tool=self.use_calculator)
        special = engine.special
        prompt_ids = [render_prompt(tokenizer, p) for p in prompts]
        runs: list[tuple[list[int], int]] = []  # (prompt ids, consecutive repeats)
        for ids in prompt_ids:
            if runs and runs[-1][0] == ids:
                runs[-1] = (ids, runs[-1][1] + 1)
            else:
                runs.append((ids, 1))
        groups = [[ids for ids, _ in runs]] if len({n for _, n in runs}) == 1 else [[ids] for ids, _ in runs]
        samples = [runs[0][1]] if len(groups) == 1 else [n for _, n in runs]
        completions, env_mask, tool_calls = [], [], []
        was_training = model.training
        model.eval()
        try:
            for group, num_samples in zip(groups, samples):
                self.calls += 1
                seed = hash((self.seed, trainer.state.global_step, trainer.accelerator.process_index, self.calls)) & 0x7FFFFFFF
                rows = len(group) * num_samples
                tokens, masks, done = [[] for _ in range(rows)], [[] for _ in range(rows)], [False] * rows
                for column, mask_column in engine.generate(group, num_samples=num_samples,
                                                           max_tokens=args.max_completion_length,
                                                           temperature=args.temperature, top_k=args.top_k or None,
                                                           seed=seed):
                    for i, (token, m) in enumerate(zip(column, mask_column)):
                        if done[i]:
                            continue
                        stop = token in special.stop_ids
                        tokens[i].append(token)
                        masks[i].append(0 if stop else m)
                        done[i] = stop
                completions += tokens
                env_mask += masks
                tool_calls += [row.count(special.python_start) for row in tokens]
        finally:
            model.train(was_training)
        return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": None, "env_mask": env_mask,
                "tool_calls": tool_calls}


# --------------------------------------------------------------------------- the run
class NanoChatGRPOTrainer(GRPOTrainer):
    """`GRPOTrainer` with nanochat's `MuonAdamW` (GRPOTrainer takes no `optimizer_cls_and_kwargs`)."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = MuonAdamWFactory()(self.model if model is None else model, **optimizer_kwargs(self.args))
        return self.optimizer


def optimizer_kwargs(cfg: NanoChatGRPOConfig) -> dict[str, float]:
    """nanochat_param_groups kwargs: the RL LRs, every one (smear/backout's 0.2 included) x init_lr_frac."""
    f = cfg.init_lr_frac
    return {"unembedding_lr": cfg.unembedding_lr * f, "embedding_lr": cfg.embedding_lr * f,
            "matrix_lr": cfg.matrix_lr * f, "scalar_lr": cfg.scalar_lr * f, "smear_lr": 0.2 * f, "weight_decay": 0.0}


def run(cfg: NanoChatGRPOConfig, train_dataset=None) -> dict[str, Any]:
    """GRPO from `cfg.model` on the task's prompts; saves an HF folder and summary.json to `cfg.output_dir`."""
    from transformers import AutoModelForCausalLM

    import modeling_nanochat  # noqa: F401  (registers nanochat_hf with the Auto classes)
    from training.sft import load_tokenizer, read_base

    read_base(cfg.model, flag="--model")
    tokenizer = load_tokenizer(cfg.model)
    tokenizer.eos_token = "<|assistant_end|>"
    if train_dataset is None:
        train_dataset = prompt_dataset(cfg.task, cfg.task_source, cfg.task_size)
    missing = [c for c in ("prompt", "answer") if c not in train_dataset.column_names]
    if missing:
        raise ValueError(f"the RL dataset needs columns 'prompt' and 'answer'; missing {missing}")
    model = AutoModelForCausalLM.from_pretrained(cfg.model)
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0) and not cfg.use_cpu:
        model.model.embed_tokens.to(torch.bfloat16)
        for ve in model.model.value_embeds.values():
            ve.to(torch.bfloat16)
    rollout = ToolRollout(cfg.use_calculator, cfg.seed)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL 1.16; we rely on it
    trainer = NanoChatGRPOTrainer(model=model, reward_funcs=[answer_reward], args=cfg, train_dataset=train_dataset,
                                  processing_class=tokenizer, rollout_func=rollout)
    t0 = time.time()
    result = trainer.train()
    out = Path(cfg.output_dir)
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    summary = {"model": cfg.model, "task": cfg.task, "steps": trainer.state.global_step,
               "train_loss": result.training_loss, "mean_reward": rewards, "train_time_s": time.time() - t0,
               "rollout_calls": rollout.calls, "history": trainer.state.log_history,
               "config": {k: v for k, v in cfg.to_dict().items() if isinstance(v, (str, int, float, bool, type(None)))}}
    if trainer.is_world_process_zero():
        trainer.save_model(str(out))
        tokenizer.save_pretrained(out)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        print(f"nanochat rl: saved {out} | {trainer.state.global_step} steps | mean reward per step "
              + ", ".join(f"{r:.3f}" for r in rewards[-5:]))
    return summary


def parse_config(argv: list[str] | None = None) -> NanoChatGRPOConfig:
    from trl import TrlParser

    (cfg,) = TrlParser((NanoChatGRPOConfig,)).parse_args_and_config(argv)
    return cfg


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_config(argv))
    except ValueError as exc:
        print(f"nanochat rl: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
