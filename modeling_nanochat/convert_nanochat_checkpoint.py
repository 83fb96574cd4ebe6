"""Checkpoint conversion: the original nanochat <-> this model, and transformers' built-in NanoChat -> this model.

    nanochat convert from-original ~/.cache/nanochat/base_checkpoints/d20 runs/d20-hf     # model_<step>.pt + meta
    nanochat convert to-original runs/d20-hf runs/d20-original                             # and back, bitwise
    nanochat convert from-transformers path/to/transformers-nanochat runs/d32-hf          # model_type "nanochat"

Original nanochat (spec §1.4, §6.11). A checkpoint directory holds `model_<step>.pt` (the `state_dict()`
of `GPT`, names like `transformer.h.3.attn.c_q.weight`, `_orig_mod.` prefixes when saved from a compiled
model, wte/value embeddings in bf16 when trained on GPU) and `meta_<step>.json` (`model_config` with the
7 `GPTConfig` fields, `user_config`, `step`, `val_bpb`, ...); the tokenizer is `<base>/tokenizer/tokenizer.pkl`.
The names map one to one onto ours and no tensor is transposed or re-laid-out: our attention uses
nanochat's RoPE sign and half-split layout, and both sides store PyTorch's (out, in) Linear weights.
The checkpoint is read with `torch.load(weights_only=True)` only.

Older original checkpoints convert too (spec §1.1): without `window_pattern` in `model_config` the layers
are all "L"; missing `resid_lambdas`/`x0_lambdas` are patched to ones/zeros (an exact identity); a state
dict without value embeddings, smear or backout tensors turns the matching switch of `NanoChatConfig`
off. Settings no key can reveal (QK scale, RoPE base, norm eps, softcap of very old versions) keep the
current values unless overridden (`overrides=` / `--set qk_scale=1.0`). A `meta_<step>.json` written by
`save_original_checkpoint` also carries our full config under `"nanochat_hf_config"` (the original's
loader ignores extra meta keys), so a round trip restores settings the original cannot express.

transformers' NanoChat (`model_type: "nanochat"`): same parameter names as ours; its architecture is
ours with value embeddings, smear, backout and residual lambdas off, QK scale 1.0, no vocab padding, every
layer full attention, and its own `rms_norm_eps`, RoPE base, MLP width and softcap. Its attention has no
window; ours slides a window of `max_position_embeddings` keys (as nanochat's "L" layers do), so outputs
are identical up to `max_position_embeddings + 1` tokens of context.

Only stdlib, torch, transformers and safetensors are imported (this folder is the Hub's custom code);
`tiktoken` is needed only to write an original tokenizer.pkl.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import pickle
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from .configuration_nanochat import FP32_EPS, NanoChatConfig, short_window_for
from .modeling_nanochat import NanoChatForCausalLM
from .tokenization_nanochat import ASSISTANT_END, BOS, convert_nanochat_tokenizer, to_tiktoken, token_bytes

# --------------------------------------------------------------------------- names
# (original name, our name); `{i}` stands for a layer index
_NAME_PAIRS = [
    ("transformer.wte.weight", "model.embed_tokens.weight"),
    ("transformer.h.{i}.attn.c_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("transformer.h.{i}.attn.c_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("transformer.h.{i}.attn.c_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("transformer.h.{i}.attn.c_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("transformer.h.{i}.attn.ve_gate.weight", "model.layers.{i}.self_attn.ve_gate.weight"),
    ("transformer.h.{i}.mlp.c_fc.weight", "model.layers.{i}.mlp.fc1.weight"),
    ("transformer.h.{i}.mlp.c_proj.weight", "model.layers.{i}.mlp.fc2.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("resid_lambdas", "model.resid_lambdas"),
    ("x0_lambdas", "model.x0_lambdas"),
    ("smear_gate.weight", "model.smear_gate.weight"),
    ("smear_lambda", "model.smear_lambda"),
    ("backout_lambda", "model.backout_lambda"),
    ("value_embeds.{i}.weight", "model.value_embeds.{i}.weight"),
]

COMPILE_PREFIX = "_orig_mod."  # torch.compile's wrapper prefix, present when a compiled model was saved
# The 7 GPTConfig fields of meta["model_config"] (spec §1.1) and the ones that old checkpoints may lack
ORIGINAL_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern")
_REQUIRED_ORIGINAL_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_embd")
HF_CONFIG_META_KEY = "nanochat_hf_config"  # our full config inside meta_<step>.json
ORIGINAL_META_FILE = "nanochat_meta.json"  # the original meta, kept in a converted folder (provenance, card)
ORIGINAL_PAD_VOCAB_TO = 64
_CHECKPOINT_RE = re.compile(r"^model_(\d+)\.pt$")


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_TO_HF = [(_pattern(orig), ours) for orig, ours in _NAME_PAIRS]
_TO_ORIGINAL = [(_pattern(ours), orig) for orig, ours in _NAME_PAIRS]


def _rename(name: str, table: list[tuple[re.Pattern, str]], what: str) -> str:
    for pattern, template in table:
        match = pattern.match(name)
        if match:
            return template.replace("{i}", match.groupdict().get("i") or "")
    raise KeyError(f"unknown {what} parameter name {name!r}")


def original_to_hf_name(name: str) -> str:
    """`transformer.h.3.attn.c_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (compile prefix stripped)."""
    return _rename(name.removeprefix(COMPILE_PREFIX), _TO_HF, "nanochat")


def hf_to_original_name(name: str) -> str:
    """The inverse of `original_to_hf_name`."""
    return _rename(name, _TO_ORIGINAL, "NanoChat")


# --------------------------------------------------------------------------- shared checks
def expected_shapes(config: NanoChatConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a `NanoChatForCausalLM` of this config holds (built on the meta device)."""
    with torch.device("meta"):
        model = NanoChatForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def state_dict_problems(
    shapes: Mapping[str, tuple[int, ...] | None],
    config: NanoChatConfig,
    unknown: list[str] | None = None,
    display=lambda name: name,
) -> list[str]:
    """What is wrong with tensors of these shapes (our names; None = not a tensor) for a model of `config`:
    unknown, missing, non-tensor and wrongly shaped entries, each list naming them. `display` maps a name to
    the one the user knows (the original's, for original checkpoints); `unknown` are names that did not map."""
    expected = expected_shapes(config)
    unknown = list(unknown or []) + [display(n) for n in shapes if n not in expected]
    missing = [display(n) for n in expected if n not in shapes]
    not_tensors = [display(n) for n, shape in shapes.items() if n in expected and shape is None]
    wrong = [f"{display(n)} {shape} (expected {expected[n]})"
             for n, shape in shapes.items() if n in expected and shape is not None and shape != expected[n]]
    problems = []
    for what, names in (("unknown keys", unknown), ("missing keys", missing),
                        ("entries that are not tensors", not_tensors), ("wrong shapes", wrong)):
        if names:
            problems.append(f"{what}: {_listing(names)}")
    return problems


def check_state_dict(
    tensors: Mapping[str, Any],
    config: NanoChatConfig,
    source: str,
    unknown: list[str] | None = None,
    display=lambda name: name,
) -> None:
    """Raise a ValueError naming every unknown, missing, non-tensor or wrongly shaped entry of `tensors`
    (see `state_dict_problems`)."""
    shapes = {n: tuple(t.shape) if isinstance(t, torch.Tensor) else None for n, t in tensors.items()}
    problems = state_dict_problems(shapes, config, unknown, display)
    if problems:
        raise ValueError(
            f"{source} does not match its configuration ({config.num_hidden_layers} layers, width "
            f"{config.hidden_size}, vocab {config.vocab_size} padded to {config.padded_vocab_size}, value embeds "
            f"{config.use_value_embeds}, smear {config.use_smear}, backout {config.use_backout}): " + "; ".join(problems)
        )


def _check_vocab(tokenizer: PreTrainedTokenizerBase, config: NanoChatConfig, tokenizer_source: str, model_source: str):
    if len(tokenizer) != config.vocab_size:
        raise ValueError(
            f"vocab mismatch: the tokenizer {tokenizer_source} has {len(tokenizer)} tokens but the model "
            f"{model_source} has vocab_size {config.vocab_size}; use the tokenizer the model was trained with"
        )


def _config_kwargs(config: NanoChatConfig) -> dict[str, Any]:
    """The constructor arguments that reproduce `config` (no transformers bookkeeping)."""
    names = [p for p in inspect.signature(NanoChatConfig.__init__).parameters if p not in ("self", "kwargs")]
    return {name: getattr(config, name) for name in names}


def _apply_overrides(kwargs: dict[str, Any], overrides: Mapping[str, Any] | None, source: str) -> dict[str, Any]:
    allowed = set(inspect.signature(NanoChatConfig.__init__).parameters) - {"self", "kwargs"}
    bad = sorted(set(overrides or {}) - allowed)
    if bad:
        raise ValueError(f"{source}: unknown config override(s) {bad}; allowed: {', '.join(sorted(allowed))}")
    return {**kwargs, **(overrides or {})}


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return tensors
    return {n: t.to(dtype) if t.is_floating_point() else t for n, t in tensors.items()}


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    choices = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}
    if dtype not in choices:
        raise ValueError(f"dtype must be one of {', '.join(choices)}, got {dtype!r}")
    return choices[dtype]


def build_model(config: NanoChatConfig, tensors: dict[str, torch.Tensor]) -> NanoChatForCausalLM:
    """A `NanoChatForCausalLM` that uses `tensors` (our names, already checked) as its parameters, in eval mode."""
    with torch.device("meta"):
        model = NanoChatForCausalLM(config)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


def read_hf_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a saved folder as stored: `model.safetensors`, a sharded safetensors index, or (read with
    `weights_only=True`) `pytorch_model.bin`."""
    folder = Path(folder)
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a safetensors index (a JSON object with a 'weight_map'): {e}") from e
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not in {folder}: {_listing(missing)}")
    elif (folder / "pytorch_model.bin").is_file():
        return dict(_torch_load(folder / "pytorch_model.bin"))
    else:
        raise FileNotFoundError(
            f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
        )
    tensors = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def _torch_load(path: Path) -> Mapping[str, Any]:
    """torch.load with weights_only=True (never a full unpickle), memory-mapped when the format allows."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise ValueError(
            f"{path} cannot be read with torch.load(weights_only=True) (only tensors and plain containers are "
            f"allowed; nothing else is unpickled): {str(e).splitlines()[0]}"
        ) from e
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a state dict (a mapping of name -> tensor)")
    return obj


def _save_folder(
    model: NanoChatForCausalLM,
    output_dir: Path,
    tokenizer: PreTrainedTokenizerBase | None,
    overwrite: bool,
    extra_json: dict[str, Any] | None = None,
) -> Path:
    output_dir = Path(output_dir)
    if (output_dir / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already holds a model (config.json); pass overwrite=True (--force)")
    output_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    eos = [i for i in (config.eos_token_id, config.bos_token_id) if i is not None]
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, pad_token_id=config.pad_token_id,
        eos_token_id=eos if len(eos) > 1 else (eos[0] if eos else None),
    )
    model.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    for name, obj in (extra_json or {}).items():
        (output_dir / name).write_text(json.dumps(obj, indent=1, default=str))
    return output_dir


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when the file is absent or not a JSON object."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _special_ids(tokenizer: PreTrainedTokenizerBase | None) -> dict[str, int | None]:
    if tokenizer is None:
        return {}
    vocab = tokenizer.get_vocab()
    bos, end = vocab.get(BOS), vocab.get(ASSISTANT_END)
    return {"bos_token_id": bos, "eos_token_id": end, "pad_token_id": bos}


# --------------------------------------------------------------------------- original -> ours
def find_original_checkpoint(path: str | os.PathLike, step: int | None = None) -> tuple[Path, Path, int]:
    """(model_<step>.pt, meta_<step>.json, step) in a nanochat checkpoint directory; the largest step by default.

    `path` is the directory (e.g. `<base>/base_checkpoints/d20`) or a `model_<step>.pt` file.
    """
    path = Path(path)
    if path.is_file():
        match = _CHECKPOINT_RE.match(path.name)
        if not match:
            raise ValueError(f"{path} is not a nanochat checkpoint file (expected a name like model_000500.pt)")
        candidates = {int(match.group(1)): path}
        if step is not None and step != int(match.group(1)):
            raise ValueError(f"{path} is step {int(match.group(1))}, but step {step} was asked for")
    elif path.is_dir():
        candidates = {}
        for child in path.iterdir():
            match = _CHECKPOINT_RE.match(child.name)
            if match and child.is_file():
                candidates[int(match.group(1))] = child
        if not candidates:
            raise FileNotFoundError(f"no nanochat checkpoint in {path}: expected model_<step>.pt and meta_<step>.json")
    else:
        raise FileNotFoundError(f"nanochat checkpoint not found: {path} does not exist")
    if step is None:
        step = max(candidates)
    if step not in candidates:
        raise FileNotFoundError(
            f"no model_{step:06d}.pt in {path}; steps available: {', '.join(str(s) for s in sorted(candidates))}"
        )
    model_path = candidates[step]
    meta_path = model_path.with_name(model_path.name.replace("model_", "meta_", 1).removesuffix(".pt") + ".json")
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path.name} is missing next to {model_path} (nanochat writes the model config there)"
        )
    return model_path, meta_path, step


def load_original_state_dict(model_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a `model_<step>.pt`, read with weights_only=True, `_orig_mod.` prefixes stripped."""
    state = _torch_load(Path(model_path))
    out = {}
    for name, tensor in state.items():
        if not isinstance(name, str):
            raise ValueError(f"{model_path}: state dict key {name!r} is not a string")
        out[name.removeprefix(COMPILE_PREFIX)] = tensor
    return out


def config_from_original(
    meta: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    overrides: Mapping[str, Any] | None = None,
    source: str = "meta",
) -> NanoChatConfig:
    """The `NanoChatConfig` of an original checkpoint, from its meta (`model_config`) and its tensor names.

    Feature switches follow the tensors present (see the module docstring); `overrides` (NanoChatConfig
    field -> value) are applied last, e.g. {"qk_scale": 1.0, "rope_theta": 10000.0} for very old checkpoints.
    """
    model_config = meta.get("model_config")
    if not isinstance(model_config, Mapping):
        raise ValueError(f"{source} has no 'model_config' object (nanochat's meta_<step>.json, spec §6.11); "
                         f"its keys: {sorted(meta)}")
    unknown = sorted(set(model_config) - set(ORIGINAL_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"{source}: model_config has unknown field(s) {unknown}; known: {list(ORIGINAL_CONFIG_KEYS)}")
    missing = [k for k in _REQUIRED_ORIGINAL_KEYS if k not in model_config]
    if missing:
        raise ValueError(f"{source}: model_config lacks {missing}")
    mc = {"n_kv_head": model_config["n_head"], "window_pattern": "L", **model_config}  # old checkpoints: "L" (§1.1)
    from_original = {
        "vocab_size": mc["vocab_size"], "hidden_size": mc["n_embd"], "num_hidden_layers": mc["n_layer"],
        "num_attention_heads": mc["n_head"], "num_key_value_heads": mc["n_kv_head"],
        "max_position_embeddings": mc["sequence_len"], "window_pattern": mc["window_pattern"],
    }
    saved = meta.get(HF_CONFIG_META_KEY)
    if saved is not None:  # written by save_original_checkpoint: every setting, cross-checked with model_config
        if not isinstance(saved, Mapping):
            raise ValueError(f"{source}: {HF_CONFIG_META_KEY!r} must be an object, got {type(saved).__name__}")
        kwargs = _apply_overrides({}, saved, f"{source} [{HF_CONFIG_META_KEY}]")
        for name, value in from_original.items():
            if str(kwargs.get(name)).upper() != str(value).upper():
                raise ValueError(f"{source}: {HF_CONFIG_META_KEY}.{name} = {kwargs.get(name)!r} contradicts "
                                 f"model_config ({value!r})")
    else:
        state_dict = {n.removeprefix(COMPILE_PREFIX): t for n, t in state_dict.items()}
        wte = state_dict.get("transformer.wte.weight")
        if not isinstance(wte, torch.Tensor) or wte.dim() != 2:
            raise ValueError(f"{source}: the checkpoint has no 2-D transformer.wte.weight to size the vocabulary from")
        vocab, rows = mc["vocab_size"], wte.shape[0]
        if rows == math.ceil(vocab / ORIGINAL_PAD_VOCAB_TO) * ORIGINAL_PAD_VOCAB_TO:
            pad_to = ORIGINAL_PAD_VOCAB_TO
        elif rows == vocab:  # checkpoints from before vocab padding
            pad_to = 1
        else:
            raise ValueError(
                f"{source}: transformer.wte.weight has {rows} rows, but model_config.vocab_size {vocab} pads to "
                f"{math.ceil(vocab / ORIGINAL_PAD_VOCAB_TO) * ORIGINAL_PAD_VOCAB_TO} (or {vocab} unpadded)"
            )
        names = set(state_dict)
        kwargs = {
            **from_original,
            "pad_vocab_size_to": pad_to,
            "use_value_embeds": any(n.startswith("value_embeds.") for n in names),
            "use_smear": bool({"smear_gate.weight", "smear_lambda"} & names),
            "use_backout": "backout_lambda" in names,
            "use_residual_lambdas": True,  # missing ones are patched to the identity, as the original does
        }
    return NanoChatConfig(**_apply_overrides(kwargs, overrides, source))


def original_to_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: NanoChatConfig, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename an original state dict to ours, patch missing lambdas (ones/zeros) and check every key and shape."""
    tensors, unknown = {}, []
    for name, tensor in state_dict.items():
        try:
            tensors[original_to_hf_name(name)] = tensor
        except KeyError:
            unknown.append(name.removeprefix(COMPILE_PREFIX))
    if config.use_residual_lambdas:  # spec §1.1: checkpoints from before the lambdas behave as x = 1*x + 0*x0
        L = config.num_hidden_layers
        tensors.setdefault("model.resid_lambdas", torch.ones(L))
        tensors.setdefault("model.x0_lambdas", torch.zeros(L))
    check_state_dict(tensors, config, source, unknown=unknown, display=hf_to_original_name)
    return tensors


def load_original_checkpoint(
    path: str | os.PathLike,
    step: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    dtype: str | torch.dtype = torch.float32,
) -> tuple[NanoChatForCausalLM, dict[str, Any]]:
    """Load an original nanochat checkpoint as a `NanoChatForCausalLM` (eval mode) plus its meta dict.

    `dtype` float32 (default; lossless for bf16-stored embeddings, as the original's CPU loader) or bfloat16.
    """
    model_path, meta_path, _ = find_original_checkpoint(path, step)
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise ValueError(f"{meta_path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} must hold a JSON object, got {type(meta).__name__}")
    state = load_original_state_dict(model_path)
    config = config_from_original(meta, state, overrides, source=str(meta_path))
    tensors = original_to_hf_state_dict(state, config, source=str(model_path))
    return build_model(config, _cast(tensors, _resolve_dtype(dtype))), meta


def find_original_tokenizer(checkpoint: str | os.PathLike) -> Path | None:
    """Where nanochat keeps the tokenizer relative to a checkpoint: `<dir>/tokenizer/`, `<dir>/tokenizer.pkl`,
    or the base dir's `tokenizer/` (`<base>/base_checkpoints/<tag>/` -> `<base>/tokenizer/`)."""
    ckpt = Path(checkpoint)
    ckpt = ckpt.parent if ckpt.is_file() else ckpt
    for candidate in (ckpt / "tokenizer", ckpt / "tokenizer.pkl", ckpt.parent / "tokenizer",
                      ckpt.parent.parent / "tokenizer"):
        if candidate.is_file() or (candidate / "tokenizer.pkl").is_file() or (candidate / "tokenizer.json").is_file():
            return candidate
    return None


def load_any_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """An HF tokenizer folder (tokenizer.json) as is, or an original nanochat tokenizer (tokenizer.pkl /
    .tiktoken) converted without changing any id."""
    path = Path(path)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(path)
    return convert_nanochat_tokenizer(path)


def convert_original_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | bool | None = None,
    step: int | None = None,
    dtype: str | torch.dtype = torch.float32,
    overrides: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Original nanochat checkpoint (+ tokenizer) -> an HF folder: safetensors, config with the switches the
    checkpoint needs, our code (auto_map), tokenizer with the chat template, generation config, and the
    original meta as `nanochat_meta.json`.

    `tokenizer`: a path (nanochat tokenizer dir / tokenizer.pkl / .tiktoken, or an HF tokenizer folder),
    None to look next to the checkpoint (`find_original_tokenizer`), or False for a folder without one.
    """
    model, meta = load_original_checkpoint(checkpoint, step, overrides, dtype)
    tok = None
    if tokenizer is not False:
        tok_path = Path(tokenizer) if tokenizer not in (None, True) else find_original_tokenizer(checkpoint)
        if tok_path is None:
            raise FileNotFoundError(
                f"no tokenizer found for {checkpoint} (looked for tokenizer/tokenizer.pkl next to it and in the "
                "nanochat base dir two levels up); pass tokenizer=PATH (--tokenizer) or tokenizer=False (--no-tokenizer)"
            )
        tok = load_any_tokenizer(tok_path)
        _check_vocab(tok, model.config, str(tok_path), f"{checkpoint} (model_config.vocab_size)")
        for name, value in _special_ids(tok).items():
            setattr(model.config, name, value)
    return _save_folder(model, Path(output_dir), tok, overwrite, extra_json={ORIGINAL_META_FILE: meta})


# --------------------------------------------------------------------------- ours -> original
def original_incompatibilities(config: NanoChatConfig) -> list[str]:
    """Settings of `config` that nanochat's `GPT` (spec revision) cannot express, as 'name=value (original: x)'."""
    checks = [
        ("head_dim", config.head_dim, config.hidden_size // config.num_attention_heads),
        ("intermediate_size", config.intermediate_size, 4 * config.hidden_size),
        ("short_window", config.short_window, None if config.short_window is None
         else short_window_for(config.max_position_embeddings)),
        ("value_embed_gate_channels", config.value_embed_gate_channels, 12),
        ("smear_gate_channels", config.smear_gate_channels, 24),
        ("qk_scale", config.qk_scale, 1.2),
        ("rope_theta", config.rope_theta, 100000.0),
        ("rms_norm_eps", config.rms_norm_eps, FP32_EPS),
        ("final_logit_softcapping", config.final_logit_softcapping, 15.0),
        ("padded_vocab_size", config.padded_vocab_size,
         math.ceil(config.vocab_size / ORIGINAL_PAD_VOCAB_TO) * ORIGINAL_PAD_VOCAB_TO),
        ("use_value_embeds", config.use_value_embeds, True),
        ("use_smear", config.use_smear, True),
        ("use_backout", config.use_backout, True),
        ("tie_word_embeddings", bool(config.tie_word_embeddings), False),
    ]
    return [f"{name}={got!r} (original: {want!r})" for name, got, want in checks if got != want]


def save_original_checkpoint(
    source: str | os.PathLike | NanoChatForCausalLM,
    output_dir: str | os.PathLike,
    step: int | None = None,
    tokenizer_dir: str | os.PathLike | bool | None = None,
    embedding_dtype: str | torch.dtype | None = None,
    allow_nonstandard: bool = False,
    meta: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Ours -> nanochat's layout: `model_<step>.pt` + `meta_<step>.json` in `output_dir`, and the tokenizer as
    nanochat's `tokenizer.pkl` + `token_bytes.pt` in `tokenizer_dir` (default `output_dir/tokenizer`; False: none).

    `source` is a saved folder (its tensors are copied as stored, so folder -> original -> folder is bitwise)
    or a model. `embedding_dtype` casts wte and value embeddings only (bfloat16: nanochat's GPU layout).
    Settings the original cannot express raise (see `original_incompatibilities`) unless `allow_nonstandard`;
    they are kept in meta["nanochat_hf_config"] either way. Returns (model path, meta path).
    """
    folder = None
    if isinstance(source, NanoChatForCausalLM):
        config, tensors = source.config, {n: t.detach() for n, t in source.state_dict().items()}
        where = f"the {type(source).__name__}"
    else:
        folder = Path(source)
        where = str(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} has no config.json (expected a NanoChat folder saved with save_pretrained)")
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        if model_type != NanoChatConfig.model_type:
            hint = " (convert it with `nanochat convert from-transformers` first)" if model_type == "nanochat" else ""
            raise ValueError(f"{where} holds a {model_type!r} model, expected {NanoChatConfig.model_type!r}{hint}")
        config = NanoChatConfig.from_pretrained(folder)
        tensors = read_hf_weights(folder)
    check_state_dict(tensors, config, where)
    incompatible = original_incompatibilities(config)
    if incompatible and not allow_nonstandard:
        raise ValueError(
            f"nanochat's GPT cannot express these settings of {where}: {'; '.join(incompatible)}. Pass "
            "allow_nonstandard=True (--allow-nonstandard) to write the checkpoint anyway: nanochat-hf reads every "
            f"setting back from meta[{HF_CONFIG_META_KEY!r}], the original code would not build the same model"
        )
    emb_dtype = _resolve_dtype(embedding_dtype)
    state = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        if emb_dtype is not None and (name == "model.embed_tokens.weight" or name.startswith("model.value_embeds.")):
            tensor = tensor.to(emb_dtype)
        state[hf_to_original_name(name)] = tensor
    # the rest of the meta: the original's own (a folder converted from an original checkpoint keeps it), else
    # what training.pretrain's summary.json knows
    base_meta = _read_json(folder / ORIGINAL_META_FILE) if folder is not None else None
    if base_meta is None:
        summary = (_read_json(folder / "summary.json") if folder is not None else None) or {}
        base_meta = {"step": summary.get("step", 0), "val_bpb": summary.get("val_bpb"),
                     "user_config": summary.get("config", {}), "max_seq_len": config.max_position_embeddings}
    base_meta = {k: v for k, v in base_meta.items() if k != HF_CONFIG_META_KEY}
    step = int(base_meta.get("step") or 0) if step is None else step
    out = Path(output_dir)
    model_path, meta_path = out / f"model_{step:06d}.pt", out / f"meta_{step:06d}.json"
    full_meta = {
        **base_meta,
        "step": step,
        "model_config": {
            "sequence_len": config.max_position_embeddings, "vocab_size": config.vocab_size,
            "n_layer": config.num_hidden_layers, "n_head": config.num_attention_heads,
            "n_kv_head": config.num_key_value_heads, "n_embd": config.hidden_size,
            "window_pattern": config.window_pattern,
        },
        **(dict(meta) if meta else {}),
        HF_CONFIG_META_KEY: _config_kwargs(config),
    }
    encoding = None  # the tokenizer is converted before anything is written, so a failure leaves no half output
    if tokenizer_dir is not False and folder is not None and (folder / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(folder)
        _check_vocab(tok, config, str(folder), where)
        encoding, lengths = to_tiktoken(tok), token_bytes(tok)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, model_path)
    meta_path.write_text(json.dumps(full_meta, indent=2, default=str))
    if encoding is not None:
        tok_dir = out / "tokenizer" if tokenizer_dir in (None, True) else Path(tokenizer_dir)
        tok_dir.mkdir(parents=True, exist_ok=True)
        with open(tok_dir / "tokenizer.pkl", "wb") as f:
            pickle.dump(encoding, f)  # exactly how nanochat's RustBPETokenizer saves itself
        torch.save(lengths, tok_dir / "token_bytes.pt")
    return model_path, meta_path


# --------------------------------------------------------------------------- transformers' NanoChat -> ours
def config_from_transformers_nanochat(config: Mapping[str, Any] | Any, source: str = "config.json") -> NanoChatConfig:
    """Our config reproducing transformers' `NanoChatConfig` (a dict or the config object)."""
    from transformers.models.nanochat.configuration_nanochat import (
        NanoChatConfig as TransformersNanoChatConfig,
    )

    if isinstance(config, Mapping):
        if config.get("model_type") != TransformersNanoChatConfig.model_type:
            raise ValueError(f"{source}: model_type is {config.get('model_type')!r}, expected 'nanochat' "
                             "(transformers' built-in NanoChat)")
        config = TransformersNanoChatConfig.from_dict({k: v for k, v in config.items() if k != "model_type"})
    if getattr(config, "hidden_act", "relu2") != "relu2":
        raise ValueError(f"{source}: hidden_act={config.hidden_act!r} is not supported (NanoChat's MLP is relu2)")
    if getattr(config, "attention_bias", False):
        raise ValueError(f"{source}: attention_bias=True is not supported (NanoChat has no biases)")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{source}: rope_type={rope.get('rope_type')!r} is not supported (only 'default' RoPE)")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return NanoChatConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        window_pattern="L",  # every layer attends over the whole context
        rope_theta=float(theta),
        rms_norm_eps=float(config.rms_norm_eps),
        qk_scale=1.0,
        final_logit_softcapping=config.final_logit_softcapping,
        pad_vocab_size_to=1,
        use_value_embeds=False,
        use_smear=False,
        use_backout=False,
        use_residual_lambdas=False,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def load_transformers_nanochat(folder: str | os.PathLike, dtype: str | torch.dtype | None = None) -> NanoChatForCausalLM:
    """A folder of transformers' built-in NanoChat as our `NanoChatForCausalLM` (dtype: as stored by default)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json (expected a transformers NanoChat folder)")
    try:
        raw = json.loads(config_path.read_text())
    except ValueError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    config = config_from_transformers_nanochat(raw, str(config_path))
    tensors = read_hf_weights(folder)
    tensors = {n: t for n, t in tensors.items() if not n.endswith("rotary_emb.inv_freq")}  # old non-persistent buffer
    if "lm_head.weight" not in tensors and raw.get("tie_word_embeddings") and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # tied: we keep an untied head
    check_state_dict(tensors, config, str(folder))
    return build_model(config, _cast(tensors, _resolve_dtype(dtype)))


def convert_transformers_nanochat(
    folder: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """transformers' NanoChat folder -> ours, with its tokenizer (if any) and its generation config."""
    folder = Path(folder)
    model = load_transformers_nanochat(folder, dtype)
    tok = None
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(folder)
        if len(tok) > model.config.vocab_size:
            raise ValueError(f"vocab mismatch: the tokenizer in {folder} has {len(tok)} tokens, more than the "
                             f"model's vocab_size {model.config.vocab_size}")
    out = _save_folder(model, Path(output_dir), tok, overwrite)
    if (folder / "generation_config.json").is_file():  # keep the source's generation settings
        GenerationConfig.from_pretrained(folder).save_pretrained(out)
    return out


# --------------------------------------------------------------------------- CLI
def _parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    """`nanochat convert from-original | to-original | from-transformers`."""
    parser = argparse.ArgumentParser(prog="nanochat convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    p = sub.add_parser("from-original", help="original nanochat checkpoint dir (model_<step>.pt + meta) -> HF folder")
    p.add_argument("checkpoint", help="checkpoint directory (e.g. ~/.cache/nanochat/base_checkpoints/d20) or model_<step>.pt")
    p.add_argument("out", help="output folder")
    p.add_argument("--step", type=int, help="checkpoint step (default: the largest)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--tokenizer", help="nanochat tokenizer dir / tokenizer.pkl, or an HF tokenizer folder "
                                           "(default: found next to the checkpoint or in the base dir)")
    group.add_argument("--no-tokenizer", action="store_true", help="write the folder without a tokenizer")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the saved weights")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a NanoChatConfig field, e.g. --set qk_scale=1.0 --set rope_theta=10000 (old checkpoints)")
    p.add_argument("--force", action="store_true", help="overwrite an existing model in OUT")
    p = sub.add_parser("to-original", help="HF folder -> original nanochat layout (model_<step>.pt + meta + tokenizer.pkl)")
    p.add_argument("folder", help="a NanoChat folder saved with save_pretrained")
    p.add_argument("out", help="output directory for model_<step>.pt and meta_<step>.json")
    p.add_argument("--step", type=int, help="step number in the file names (default: summary.json's step, else 0)")
    p.add_argument("--tokenizer-out", help="where tokenizer.pkl + token_bytes.pt go (default: OUT/tokenizer)")
    p.add_argument("--embedding-dtype", choices=["bfloat16", "float32"],
                   help="cast wte and value embeddings (bfloat16 = how nanochat stores them on GPU); default: as stored")
    p.add_argument("--allow-nonstandard", action="store_true",
                   help="write settings the original cannot express (kept in meta for nanochat-hf) instead of failing")
    p = sub.add_parser("from-transformers", help="transformers' built-in NanoChat folder (model_type nanochat) -> ours")
    p.add_argument("folder", help="folder with config.json (model_type 'nanochat') and weights")
    p.add_argument("out", help="output folder")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="dtype of the saved weights (default: as stored)")
    p.add_argument("--force", action="store_true", help="overwrite an existing model in OUT")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `nanochat convert`."""
    args = build_parser().parse_args(argv)
    try:
        if args.direction == "from-original":
            tokenizer = False if args.no_tokenizer else args.tokenizer
            out = convert_original_checkpoint(args.checkpoint, args.out, tokenizer=tokenizer, step=args.step,
                                              dtype=args.dtype, overrides=_parse_overrides(args.overrides),
                                              overwrite=args.force)
            print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
        elif args.direction == "to-original":
            model_path, meta_path = save_original_checkpoint(
                args.folder, args.out, step=args.step, tokenizer_dir=args.tokenizer_out,
                embedding_dtype=args.embedding_dtype, allow_nonstandard=args.allow_nonstandard,
            )
            print(f"wrote {model_path} and {meta_path}")
            tok_dir = Path(args.tokenizer_out) if args.tokenizer_out else Path(args.out) / "tokenizer"
            if (tok_dir / "tokenizer.pkl").is_file():
                print(f"wrote {tok_dir / 'tokenizer.pkl'} and {tok_dir / 'token_bytes.pt'}")
            else:
                print(f"{args.folder} has no tokenizer.json: no tokenizer written")
        else:
            out = convert_transformers_nanochat(args.folder, args.out, dtype=args.dtype, overwrite=args.force)
            print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    except (OSError, ValueError, ImportError) as e:
        print(f"nanochat convert: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
