"""`nanochat demo`: the smallest end-to-end proof that the model is a real transformers model.

1. build a tiny byte-level NanoChat (every architectural feature on) and train it for a few hundred
   steps on a short embedded text, so that it has something to say;
2. `save_pretrained` it (safetensors + config + the custom code);
3. reload it in a fresh Python process where this package is NOT importable, through
   `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` with the Hub offline;
4. generate from a prompt there and print the text.

Bytes are the tokens (ids 0-255, BOS = 256), so no tokenizer is needed and the output is readable.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

TEXT = """\
nanochat is a small chat model that you train yourself, from raw text to a model you can talk to.
First a tokenizer is trained, then the model is pretrained on plain text, then it is taught to chat.
The model reads tokens, mixes them with attention and a small feed forward network, and predicts the next token.
Training makes the predictions better, one step at a time, until the text it writes starts to make sense.
"""
BOS = 256

FRESH_PROCESS = r"""
import json, sys, time
sys.modules["modeling_nanochat"] = None  # prove the folder is self-contained: our package is blocked
import torch
from transformers import AutoModelForCausalLM
folder, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.time()
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
ids = torch.tensor([[256] + list(prompt.encode())])
out = model.generate(ids, max_new_tokens=n, do_sample=False)
text = bytes(t for t in out[0, ids.shape[1]:].tolist() if t < 256).decode("utf-8", errors="replace")
print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__,
                  "cache": type(model.model).__module__, "text": text, "seconds": round(time.time() - t0, 2)}))
"""


def build_model(seq_len: int):
    from modeling_nanochat import NanoChatConfig, NanoChatForCausalLM

    config = NanoChatConfig(
        vocab_size=257, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=seq_len,
        window_pattern="SSSL", short_window=32, bos_token_id=BOS, eos_token_id=None, pad_token_id=BOS,
    )
    torch.manual_seed(42)
    return NanoChatForCausalLM(config)


def train(model, steps: int, seq_len: int, batch: int) -> list[float]:
    data = torch.tensor([BOS] + list(TEXT.encode()), dtype=torch.long)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    bar = tqdm(range(steps), desc="training", unit="step")
    for step in bar:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
        rows = torch.stack([data[s:s + seq_len + 1] for s in starts])
        lr_scale = min(1.0, (step + 1) / 20) * (1.0 - 0.9 * step / steps)
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * lr_scale
        loss = model(input_ids=rows[:, :-1], targets=rows[:, 1:], use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nanochat demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo-model", help="folder to save the model to")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--batch", type=int, default=16, help="rows per step")
    parser.add_argument("--seq-len", type=int, default=96, help="tokens (bytes) per row")
    parser.add_argument("--prompt", default="The model reads", help="text to continue")
    parser.add_argument("--new-tokens", type=int, default=80, help="bytes to generate")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()

    print("== 1/3 build and train a tiny byte-level NanoChat ==")
    model = build_model(args.seq_len)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters, windows {model.config.layer_windows}, "
          f"attention={model.config._attn_implementation}")
    losses = train(model, args.steps, args.seq_len, args.batch)
    print(f"loss {losses[0]:.3f} -> {sum(losses[-10:]) / 10:.3f} (uniform over bytes would be {torch.log(torch.tensor(257.)):.3f})")

    print("== 2/3 save_pretrained ==")
    out = Path(args.out)
    model.save_pretrained(out)
    print(f"saved to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")

    print("== 3/3 reload in a fresh process (trust_remote_code, offline, package blocked) and generate ==")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(out.resolve()), args.prompt,
                             str(args.new_tokens)], capture_output=True, text=True, env=env, cwd=out.resolve())
    if result.returncode != 0:
        print(result.stderr[-4000:], file=sys.stderr)
        print("nanochat demo: the fresh-process reload failed (see above)", file=sys.stderr)
        return 1
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"loaded as {report['class']} in {report['seconds']} s")
    print(f"prompt:     {args.prompt!r}")
    print(f"generated:  {report['text']!r}")
    print(f"demo done in {time.time() - t0:.0f} s. Load it yourself with:\n"
          f"  AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
