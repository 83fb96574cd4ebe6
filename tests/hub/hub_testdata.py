"""Shared test data for the hub/convert tests: a tiny tokenizer, genuine original-format checkpoints built with
the spec-literal reference GPT, and a stub of the Hub's HTTP API."""

from __future__ import annotations

import base64
import json
import pickle
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import torch
from helpers import randomize
from reference_nanochat import GPT, GPTConfig

VOCAB = 300  # tokenizer size = model vocab (padded to 320 rows)
WORDS = ("the model reads tokens and predicts the next one; a tokenizer splits text into pieces. "
         "Numbers like 12, 345 and 6789 are split in pairs. Chat turns end with an assistant end token.").split()


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) for _ in range(n)]


def train_tiny_tokenizer():
    from modeling_nanochat.tokenization_nanochat import train_tokenizer

    return train_tokenizer(corpus(), VOCAB)


def write_original_tokenizer(tokenizer, directory: Path) -> Path:
    """`<dir>/tokenizer.pkl` exactly as nanochat's RustBPETokenizer writes it (a pickled tiktoken Encoding)."""
    from modeling_nanochat.tokenization_nanochat import to_tiktoken

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "tokenizer.pkl", "wb") as f:
        pickle.dump(to_tiktoken(tokenizer), f)
    return directory


def build_reference(seq_len=512, vocab=VOCAB, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, pattern="SSL", seed=1,
                    pad_vocab_size_to=64):
    """The original GPT (spec §1) with nanochat's seeded init, then every parameter perturbed so that the
    zero-initialized paths (c_proj, smear) matter; embedding values rounded to bf16."""
    config = GPTConfig(sequence_len=seq_len, vocab_size=vocab, n_layer=n_layer, n_head=n_head,
                       n_kv_head=n_kv_head, n_embd=n_embd, window_pattern=pattern)
    ref = GPT(config, pad_vocab_size_to=pad_vocab_size_to)
    torch.manual_seed(42)
    ref.init_weights()
    randomize(ref, seed=seed)
    with torch.no_grad():  # embeddings hold bf16 values, as nanochat stores them on GPU (kept in fp32 here)
        for emb in [ref.transformer.wte, *ref.value_embeds.values()]:
            emb.weight.copy_(emb.weight.bfloat16().float())
    return ref.eval()


def neutralize_old_features(ref: GPT) -> GPT:
    """Make the reference compute what an old checkpoint (no lambdas, smear, backout or value embeds) computes:
    lambdas 1/0, smear and backout off, value embeddings zero."""
    with torch.no_grad():
        ref.resid_lambdas.fill_(1.0)
        ref.x0_lambdas.fill_(0.0)
        ref.smear_lambda.zero_()
        ref.backout_lambda.zero_()
        for ve in ref.value_embeds.values():
            ve.weight.zero_()
    return ref


OLD_FEATURE_KEYS = ("resid_lambdas", "x0_lambdas", "smear_gate.weight", "smear_lambda", "backout_lambda")


def original_state_dict(ref: GPT, *, bf16_embeddings: bool = True, compile_prefix: bool = False,
                        drop_old_features: bool = False) -> dict[str, torch.Tensor]:
    """The state dict as nanochat saves it: wte/value embeddings in bf16 (its GPU layout), optionally with the
    compiled model's `_orig_mod.` prefix, or an old checkpoint's keys only."""
    state = {}
    for name, tensor in ref.state_dict().items():
        if drop_old_features and (name in OLD_FEATURE_KEYS or name.startswith("value_embeds.")
                                  or name.endswith("ve_gate.weight")):
            continue
        tensor = tensor.detach().clone()
        if bf16_embeddings and (name == "transformer.wte.weight" or name.startswith("value_embeds.")):
            tensor = tensor.to(torch.bfloat16)
        state[("_orig_mod." if compile_prefix else "") + name] = tensor
    return state


def write_original_checkpoint(directory: Path, state: dict, model_config: dict, step: int = 123,
                              extra_meta: dict | None = None) -> Path:
    """model_<step>.pt + meta_<step>.json in nanochat's layout (spec §6.11)."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / f"model_{step:06d}.pt")
    meta = {"step": step, "val_bpb": 1.234, "model_config": model_config,
            "user_config": {"depth": model_config.get("n_layer"), "run": "test"}, "device_batch_size": 4,
            "max_seq_len": model_config.get("sequence_len"), "total_batch_size": 2048,
            "dataloader_state_dict": {"pq_idx": 0, "rg_idx": 1, "epoch": 1},
            "loop_state": {"min_val_bpb": 1.2, "smooth_train_loss": 3.0, "total_training_time": 1.0},
            **(extra_meta or {})}
    (directory / f"meta_{step:06d}.json").write_text(json.dumps(meta))
    return directory


def model_config_of(ref: GPT, drop: tuple[str, ...] = ()) -> dict:
    c = ref.config
    full = {"sequence_len": c.sequence_len, "vocab_size": c.vocab_size, "n_layer": c.n_layer, "n_head": c.n_head,
            "n_kv_head": c.n_kv_head, "n_embd": c.n_embd, "window_pattern": c.window_pattern}
    return {k: v for k, v in full.items() if k not in drop}


@torch.no_grad()
def reference_greedy(ref: GPT, ids: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """nanochat's naive generate (spec §1.10): a full forward per step, argmax; also returns each step's logits."""
    tokens, logits = ids.clone(), []
    for _ in range(steps):
        last = ref(tokens)[:, -1]
        logits.append(last)
        tokens = torch.cat([tokens, last.argmax(-1, keepdim=True)], dim=1)
    return tokens[0, ids.shape[1]:].tolist(), logits


# --------------------------------------------------------------------------- a stub of the Hub API
class StubHub:
    """Just enough of the Hub's HTTP API for `HfApi.create_repo`, `create_branch` and `upload_folder`: repo
    creation, branch creation, YAML validation, preupload (every file "regular", i.e. inline) and the NDJSON
    commit. Records every request and the files of every commit."""

    def __init__(self):
        self.requests: list[dict] = []
        self.repos: dict[str, dict] = {}
        self.branches: list[tuple[str, str]] = []
        self.commits: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code: int, obj: dict) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                stub.requests.append({"method": "GET", "path": self.path, "auth": self.headers.get("authorization")})
                self._reply(404, {"error": f"stub: no route GET {self.path}"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = unquote(self.path.split("?")[0])
                stub.requests.append({"method": "POST", "path": path, "auth": self.headers.get("authorization")})
                host = f"http://{self.headers['Host']}"
                if path == "/api/repos/create":
                    data = json.loads(body)
                    repo = f"{data.get('organization') or 'user'}/{data['name']}" if "/" not in data["name"] else data["name"]
                    stub.repos[repo] = data
                    return self._reply(200, {"url": f"{host}/{repo}", "name": repo})
                if path == "/api/validate-yaml":
                    return self._reply(200, {})
                if path.startswith("/api/models/") and "/branch/" in path:
                    repo, branch = path[len("/api/models/"):].split("/branch/")
                    stub.branches.append((repo, branch))
                    return self._reply(200, {})
                if path.startswith("/api/models/") and "/preupload/" in path:
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                       for f in files]})
                if path.startswith("/api/models/") and "/commit/" in path:
                    repo, revision = path[len("/api/models/"):].split("/commit/")
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    files = {}
                    for line in lines:
                        if line["key"] == "file":
                            value = line["value"]
                            files[value["path"]] = base64.b64decode(value["content"])
                    header = next(line["value"] for line in lines if line["key"] == "header")
                    stub.commits.append({"repo": repo, "revision": revision, "files": files, "header": header})
                    return self._reply(200, {"commitUrl": f"{host}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40})
                return self._reply(404, {"error": f"stub: no route POST {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StubHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
