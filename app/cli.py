"""The `nanochat` command: one entry point that dispatches to each stage's `main(argv)`.

Each stage lives in its own module and owns its argument parsing; this file only maps a sub-command
name to "module:function" and imports the module lazily, so `nanochat --help` stays fast and a
stage's heavy dependencies are loaded only when that stage runs.
"""

from __future__ import annotations

import importlib
import logging
import sys

# sub-command -> ("module:function", one-line help). Add a line here when a stage grows a CLI.
COMMANDS: dict[str, tuple[str, str]] = {
    "speedrun": ("app.speedrun:main", "data -> tokenizer -> pretrain -> eval -> SFT -> eval -> report, one command"),
    "demo": ("app.demo:main", "build a tiny model, save it, reload it in a fresh process and generate"),
    "data": ("training.data:main", "pretraining data: `nanochat data prepare` writes the embedded corpus"),
    "tokenizer": ("training.tokenizer:main", "train / evaluate / convert the BPE tokenizer (train, eval, convert)"),
    "sft": ("training.sft:main", "chat fine-tuning with TRL's SFTTrainer (assistant-only loss, packing, Muon, --lora)"),
    "rl": ("training.rl:main", "RL on GSM8K with TRL's GRPOTrainer, calculator tool active in rollouts"),
    "eval": ("eval.cli:main", "evaluate a model folder: CORE + bpb (base), ChatCORE (chat), and write the report"),
    "convert": ("modeling_nanochat.convert_nanochat_checkpoint:main", "convert checkpoints: original nanochat <-> ours, transformers NanoChat -> ours"),
    "push": ("app.hub:main", "publish a model folder on the Hub with a model card (--dry-run: preview)"),
    "serve": ("app.server:main", "serve a model: OpenAI + TGI APIs with continuous batching, and the chat UI at /"),
    "chat": ("app.chat_cli:main", "chat with a model in the terminal (streaming, /clear, /exit, tool calls shown)"),
    "ui": ("app.gradio_app:main", "the Gradio chat app on a local model folder or a remote endpoint"),
    "space": ("app.gradio_app:space_main", "write a ready Hugging Face Space (app.py, requirements, README) for a model"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: nanochat <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in sorted(COMMANDS.items())]
    lines += ["", "Run `nanochat <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"nanochat: unknown command {name!r}; choose one of: {', '.join(sorted(COMMANDS))}", file=sys.stderr)
        return 2
    # optional-kernel notices printed at every import (torchao's CUDA-only extensions, a torch deprecation)
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    target, _ = COMMANDS[name]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
