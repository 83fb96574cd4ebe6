"""State-dict names: original nanochat (`gpt.py`) <-> this model.

The original names (spec §1.4) map one to one onto ours; no tensor is transposed or re-laid-out
(both use nanochat's RoPE sign and half-split layout, and PyTorch's (out, in) Linear weights).
"""

from __future__ import annotations

import re

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
    return _rename(name.removeprefix("_orig_mod."), _TO_HF, "nanochat")


def hf_to_original_name(name: str) -> str:
    """The inverse of `original_to_hf_name`."""
    return _rename(name, _TO_ORIGINAL, "NanoChat")
