"""`nanochat chat FOLDER`: talk to a model in the terminal (nanochat's chat_cli, spec §10.2).

    nanochat chat runs/d20/sft                    # multi-turn; /clear starts over, /exit (or Ctrl-D) quits
    nanochat chat runs/d20/sft -p "Why is the sky blue?"     # one question, one streamed answer, exit

Replies stream token by token (never splitting a UTF-8 character). Calculator tool calls run inside the
generation and show as `[calculator: 12*7] [= 84]`. Each turn renders the whole conversation with the same
prompt construction as the server (`app.protocol.chat_prompt_ids`), so a conversation that outgrows the
model's context is refused with a hint to /clear instead of being silently cut.
"""

from __future__ import annotations

import argparse
import random
import sys

from modeling_nanochat.tokenization_nanochat import OUTPUT_END, OUTPUT_START, PYTHON_END, PYTHON_START

from . import limits
from .limits import RequestError
from .protocol import chat_prompt_ids

HELP = "commands: /clear (new conversation), /exit (quit), /help; Ctrl-C stops a reply, Ctrl-D quits"
TOOL_DISPLAY = {PYTHON_START: "[calculator: ", PYTHON_END: "] ", OUTPUT_START: "[= ", OUTPUT_END: "]"}


def show_tools(text: str, color: bool = False) -> str:
    """Tool-call tokens as readable brackets (dim cyan on a color terminal)."""
    for token, shown in TOOL_DISPLAY.items():
        text = text.replace(token, f"\033[36m{shown}\033[0m" if color else shown)
    return text


def build_parser() -> argparse.ArgumentParser:
    """The options of `nanochat chat`."""
    p = argparse.ArgumentParser(prog="nanochat chat", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="a saved NanoChat folder (model + tokenizer), e.g. runs/d20/sft")
    p.add_argument("-p", "--prompt", default=None, help="ask one question, print the answer and exit")
    p.add_argument("-t", "--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    p.add_argument("-k", "--top-k", type=int, default=50, help="top-k sampling (0 = off)")
    p.add_argument("-m", "--max-tokens", type=int, default=256, help="max new tokens per reply")
    p.add_argument("--seed", type=int, default=None, help="seed of the first reply (default: random)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-calculator", action="store_true", help="do not run the calculator tool")
    return p


def _load(folder: str, device: str | None, use_calculator: bool):
    import torch

    from modeling_nanochat.generation_nanochat import NanoChatEngine

    from .scheduler import load_model

    model, tokenizer = load_model(folder, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return NanoChatEngine(model, tokenizer, use_calculator_tool=use_calculator)


class ChatSession:
    """A conversation with one engine: `reply(text)` streams the answer through `write` and remembers it."""

    def __init__(self, engine, temperature: float, top_k: int, max_tokens: int, seed: int | None = None):
        self.engine, self.temperature, self.top_k, self.max_tokens = engine, temperature, top_k, max_tokens
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
        self.messages: list[dict[str, str]] = []

    def clear(self) -> None:
        """Start a new conversation."""
        self.messages = []

    def reply(self, text: str, write=lambda s: None) -> str:
        """Generate the assistant's answer to `text` (streamed to `write`); raises RequestError when it cannot."""
        messages = self.messages + [{"role": "user", "content": text}]
        limits.check_messages(messages)
        prompt = chat_prompt_ids(self.engine.tokenizer, messages)
        context = self.engine.model.config.max_position_embeddings
        if len(prompt) >= context:
            raise RequestError(f"the conversation is {len(prompt)} tokens, the model's context is {context}: /clear "
                               "to start over", "messages")
        max_tokens = min(self.max_tokens, context - len(prompt))
        answer = ""
        try:
            for piece in self.engine.stream_text(prompt, max_tokens=max_tokens, temperature=self.temperature,
                                                 top_k=self.top_k or None, seed=self.seed):
                answer += piece
                write(piece)
        except KeyboardInterrupt:
            write(" [stopped]")
        self.seed += 1
        self.messages = messages + [{"role": "assistant", "content": answer or " "}]
        return answer


def main(argv: list[str] | None = None) -> int:
    """`nanochat chat FOLDER`: 0 on /exit or Ctrl-D, 2 for bad options or a folder that cannot chat."""
    args = build_parser().parse_args(argv)
    try:
        limits.check_sampling(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens)
    except RequestError as e:
        print(f"nanochat chat: {e.message}", file=sys.stderr)
        return 2
    try:
        engine = _load(args.folder, args.device, not args.no_calculator)
    except (OSError, ValueError) as e:
        print(f"nanochat chat: cannot load {args.folder}: {e}", file=sys.stderr)
        return 2
    session = ChatSession(engine, args.temperature, args.top_k, args.max_tokens, args.seed)
    color = sys.stdout.isatty()

    def write(piece: str) -> None:
        sys.stdout.write(show_tools(piece, color))
        sys.stdout.flush()

    if args.prompt is not None:
        try:
            session.reply(args.prompt, write)
        except RequestError as e:
            print(f"nanochat chat: {e.message}", file=sys.stderr)
            return 2
        print()
        return 0

    print(f"nanochat chat · {args.folder} · {HELP}")
    while True:
        try:
            text = input("\nYou: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        command = text.strip().lower()
        if command in ("/exit", "/quit", "exit", "quit"):
            return 0
        if command in ("/clear", "clear"):
            session.clear()
            print("(conversation cleared)")
            continue
        if command in ("/help", "help"):
            print(HELP)
            continue
        if not text.strip():
            continue
        sys.stdout.write("\nAssistant: ")
        try:
            session.reply(text, write)
        except RequestError as e:
            print(f"\n({e.message})")
        print()


if __name__ == "__main__":
    sys.exit(main())
