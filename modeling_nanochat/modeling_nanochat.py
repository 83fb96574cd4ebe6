"""NanoChat as a transformers model: `NanoChatModel` (backbone) and `NanoChatForCausalLM`.

Every detail follows nanochat's `gpt.py` (spec §1): weightless fp32 RMSNorm, half-split RoPE with
nanochat's sign, QK-norm then x1.2, value embeddings with 3*sigmoid gates, smear, x0/resid lambdas,
backout, ReLU^2, untied head, padded vocab sliced back, fp32 softcap, per-layer sliding windows.

HF conventions on top: attention through `ALL_ATTENTION_FUNCTIONS` (sdpa, eager, flash_attention_2,
and nanochat's FA3 path `nanochat_fa3`), masks built once per forward per distinct window by
transformers' mask utilities (padding and packed documents included), `labels` loss with the HF
shift and -100, gradient checkpointing, generation with `NanoChatCache`.

Dtype policy (§1.7): the activation dtype is the dtype of the token embedding table. Linear weights
are cast to the activation dtype at every forward, so fp32 master weights with bf16 embeddings train
exactly like nanochat (no autocast needed), and a model loaded in one dtype runs in that dtype.
"""

from __future__ import annotations

import copy
import functools
import importlib
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.initialization import no_init_weights
from transformers.masking_utils import (
    AttentionMaskInterface,
    create_sliding_window_causal_mask,
    flash_attention_mask,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .cache_nanochat import NanoChatCache
from .configuration_nanochat import NanoChatConfig

logger = logging.getLogger(__name__)

FA3_IMPLEMENTATION = "nanochat_fa3"  # our FA3 path; transformers forbids "flash" in custom names


# --------------------------------------------------------------------------- primitives
def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMSNorm computed in fp32 and cast back (nanochat's `norm`, §1.6)."""
    return F.rms_norm(x.float(), (x.size(-1),), eps=eps).to(x.dtype)


class NanoChatLinear(nn.Linear):
    """Bias-free Linear that casts its (fp32 master) weight to the activation dtype at every call."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (B, T, 1, D/2) for the given positions (§1.5.1).

    Computed from `position_ids` (not from a fixed-length table) with the same fp32 operations as
    nanochat's table, so values are bit-identical to its rows, any length works and packed documents
    get positions restarting at 0.
    """
    channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device)
    inv_freq = 1.0 / (theta ** (channels / head_dim))
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq
    return freqs.cos().to(dtype)[:, :, None, :], freqs.sin().to(dtype)[:, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE with nanochat's sign: y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos. x is (B,T,H,D)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


# --------------------------------------------------------------------------- attention backends
def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain matmul-softmax attention; q/k/v are (B, H, T, D), the mask additive or boolean."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is None:
        tq, tk = query.shape[2], key.shape[2]
        causal = torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril(tk - tq)
        scores = scores.masked_fill(~causal, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    else:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights, value)
    return out.transpose(1, 2).contiguous(), weights


@functools.cache
def load_flash_attn_3():
    """FA3's `flash_attn_interface` module, or None. Resolved once (spec §2.1): CUDA only.

    Looks for an installed `flash_attn_interface` (FA3's Hopper build), then for a hub kernel already
    present in the local `kernels` cache (nothing is downloaded when HF_HUB_OFFLINE is set).
    """
    if not torch.cuda.is_available():
        return None
    try:
        return importlib.import_module("flash_attn_interface")
    except Exception:
        pass
    try:
        from kernels import get_kernel

        repo = "varunneal/flash-attention-3" if torch.cuda.get_device_capability()[0] == 9 else (
            "kernels-community/flash-attn3"
        )
        return get_kernel(repo).flash_attn_interface
    except Exception:
        return None


def _fa3_cu_seqlens_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens of the documents of a packed row (positions restarting at 0), as TRL packs them."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    if starts.numel() == 0 or starts[0] != 0:
        starts = torch.cat([torch.zeros(1, dtype=starts.dtype, device=starts.device), starts])
    ends = torch.cat([starts[1:], torch.tensor([flat.numel()], device=starts.device, dtype=starts.dtype)])
    cu = torch.cat([starts, ends[-1:]]).to(torch.int32)
    return cu, int((ends - starts).max())


def nanochat_fa3_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """FA3 with nanochat's windows: layout (B, T, H, D), `window_size=(w, 0)`, causal.

    Dense rows go through `flash_attn_func`; padded rows (a 2D mask from `flash_attention_mask`) and
    packed documents (TRL's `cu_seq_lens_*`, or `position_ids` restarting at 0) through
    `flash_attn_varlen_func`. FA3 aligns the causal mask bottom-right, so decoding with a cache works.
    """
    fa3 = kwargs.get("fa3_module") or load_flash_attn_3()
    if fa3 is None:
        raise RuntimeError(
            f"attn_implementation={FA3_IMPLEMENTATION!r} needs FlashAttention-3 (CUDA, Hopper): "
            "install `flash_attn_interface` or use attn_implementation='sdpa'"
        )
    window = (module.window, 0)
    kvcache = kwargs.get("fa3_kvcache")
    if kvcache is not None and hasattr(fa3, "flash_attn_with_kvcache"):
        # decode: the new token is already in its ring slot (NanoChatCache.fa3_kvcache), FA3 only reads
        k_cache, v_cache, cache_seqlens = kvcache
        out = fa3.flash_attn_with_kvcache(
            query.transpose(1, 2), k_cache, v_cache, cache_seqlens=cache_seqlens,
            softmax_scale=scaling, causal=True, window_size=window,
        )
        return (out[0] if isinstance(out, tuple) else out), None
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, T, H, D)
    batch, tq = q.shape[:2]
    tk = k.shape[1]
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    position_ids = kwargs.get("position_ids")
    if cu_q is None and attention_mask is None and position_ids is not None and batch == 1 and tq == tk:
        if bool((position_ids.reshape(-1)[1:] == 0).any()):
            cu_q, max_q = _fa3_cu_seqlens_from_positions(position_ids)
            cu_k, kwargs["max_length_q"], kwargs["max_length_k"] = cu_q, max_q, max_q
    if cu_q is not None:  # packed documents in one row
        out = fa3.flash_attn_varlen_func(
            q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:]),
            cu_seqlens_q=cu_q, cu_seqlens_k=cu_k if cu_k is not None else cu_q,
            max_seqlen_q=int(kwargs.get("max_length_q")), max_seqlen_k=int(kwargs.get("max_length_k")),
            softmax_scale=scaling, causal=True, window_size=window,
        )
        out = out[0] if isinstance(out, tuple) else out
        return out.reshape(batch, tq, *out.shape[1:]), None
    if attention_mask is not None:  # left/right padding: unpad, varlen, pad back
        kv_mask = attention_mask.bool()
        # decode over a NanoChatCache ring (builds without flash_attn_with_kvcache): the mask marks filled
        # slots, not the query, which is always real
        q_mask = kv_mask[:, -tq:] if kvcache is None else torch.ones(batch, tq, dtype=torch.bool, device=q.device)
        len_q, len_k = q_mask.sum(-1, dtype=torch.int32), kv_mask.sum(-1, dtype=torch.int32)
        zero = torch.zeros(1, dtype=torch.int32, device=q.device)
        cu_q, cu_k = torch.cat([zero, len_q.cumsum(0, dtype=torch.int32)]), torch.cat([zero, len_k.cumsum(0, dtype=torch.int32)])
        out_unpad = fa3.flash_attn_varlen_func(
            q[q_mask], k[kv_mask], v[kv_mask], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
            max_seqlen_q=int(len_q.max()), max_seqlen_k=int(len_k.max()),
            softmax_scale=scaling, causal=True, window_size=window,
        )
        out_unpad = out_unpad[0] if isinstance(out_unpad, tuple) else out_unpad
        out = q.new_zeros(batch, tq, q.shape[2], v.shape[3])
        out[q_mask] = out_unpad
        return out, None
    out = fa3.flash_attn_func(q, k, v, softmax_scale=scaling, causal=True, window_size=window)
    out = out[0] if isinstance(out, tuple) else out
    return out, None


AttentionInterface.register(FA3_IMPLEMENTATION, nanochat_fa3_attention)
AttentionMaskInterface.register(FA3_IMPLEMENTATION, flash_attention_mask)


# --------------------------------------------------------------------------- modules
class NanoChatAttention(nn.Module):
    """Causal self-attention with value residual (VE layers), RoPE, QK-norm x qk_scale and a window."""

    def __init__(self, config: NanoChatConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5  # the backends' default 1/sqrt(D), not overridden
        self.is_causal = True
        self.window = config.layer_windows[layer_idx]  # FA3 convention: sees window + 1 keys
        self.sliding_window = self.window + 1  # transformers' convention, for its flash path
        C = config.hidden_size
        # registration order matters for the optimizer's parameter order (q, k, v, o, ve_gate)
        self.q_proj = NanoChatLinear(C, self.num_heads * self.head_dim)
        self.k_proj = NanoChatLinear(C, self.num_kv_heads * self.head_dim)
        self.v_proj = NanoChatLinear(C, self.num_kv_heads * self.head_dim)
        self.o_proj = NanoChatLinear(self.num_heads * self.head_dim, C)
        self.ve_gate_channels = config.value_embed_gate_channels
        self.ve_gate = NanoChatLinear(self.ve_gate_channels, self.num_kv_heads) if config.has_value_embed(layer_idx) else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        value_embeds: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        B, T, _ = hidden_states.shape
        eps, scale = self.config.rms_norm_eps, self.config.qk_scale
        q = self.q_proj(hidden_states).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim)
        if self.ve_gate is not None:
            # value residual: gate in (0, 3) from the first 12 channels of the normed block input
            gate = 3 * torch.sigmoid(self.ve_gate(hidden_states[..., : self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * value_embeds.view(B, T, self.num_kv_heads, self.head_dim)
        cos, sin = position_embeddings
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = rms_norm(q, eps), rms_norm(k, eps)
        if scale != 1.0:
            q, k = q * scale, k * scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D) for the registry
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
            if T == 1 and self.config._attn_implementation == FA3_IMPLEMENTATION and isinstance(cache, NanoChatCache):
                kwargs["fa3_kvcache"] = cache.fa3_kvcache(self.layer_idx)
        attention_fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, _ = attention_fn(
            self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0,
            sliding_window=self.sliding_window, **kwargs,
        )
        return self.o_proj(out.reshape(B, T, -1))


class NanoChatMLP(nn.Module):
    """fc2(relu(fc1(x))^2): ReLU-squared, no gating, no bias."""

    def __init__(self, config: NanoChatConfig):
        super().__init__()
        self.fc1 = NanoChatLinear(config.hidden_size, config.intermediate_size)
        self.fc2 = NanoChatLinear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)).square())


class NanoChatDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block without learnable norm weights: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: NanoChatConfig, layer_idx: int):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.self_attn = NanoChatAttention(config, layer_idx)
        self.mlp = NanoChatMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        value_embeds: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        x = hidden_states
        x = x + self.self_attn(rms_norm(x, self.eps), value_embeds, position_embeddings, attention_mask, cache, **kwargs)
        return x + self.mlp(rms_norm(x, self.eps))


# --------------------------------------------------------------------------- pretrained base
class _DeferBackboneInit:
    """While active, a NanoChatModel being built leaves its init to the enclosing NanoChatForCausalLM,
    so the whole model consumes the RNG in nanochat's order (wte, lm_head, blocks, ...)."""

    active = False

    def __enter__(self):
        type(self).active = True

    def __exit__(self, *exc):
        type(self).active = False


class NanoChatPreTrainedModel(PreTrainedModel):
    config_class = NanoChatConfig
    config: NanoChatConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NanoChatDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False  # windows and packing go through sdpa/eager masks or FA; flex untested
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # mask construction and the smear state use Python control flow
    _is_stateful = True  # the smear state cannot be rolled back: no assisted decoding
    _keep_in_fp32_modules = []

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """With no explicit choice: FA3 (CUDA + bf16) > FlashAttention-2 (CUDA) > SDPA, logged once."""
        if requested_attention is None:
            dtype = getattr(self.config, "dtype", None) or torch.get_default_dtype()
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            choice = "sdpa"
            if torch.cuda.is_available():
                if dtype == torch.bfloat16 and load_flash_attn_3() is not None:
                    choice = FA3_IMPLEMENTATION
                elif dtype in (torch.bfloat16, torch.float16) and importlib.util.find_spec("flash_attn") is not None:
                    choice = "flash_attention_2"
            if not getattr(type(self), "_attn_choice_logged", False):
                logger.info("NanoChat attention implementation: %s", choice)
                type(self)._attn_choice_logged = True
            requested_attention = choice
        if requested_attention == FA3_IMPLEMENTATION:
            return requested_attention
        return super().get_correct_attn_implementation(requested_attention, is_init_check)

    # -- initialization (§1.8), in nanochat's RNG order --------------------------------------------
    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Initialize the whole model at once, so the RNG is consumed in nanochat's order.

        transformers' per-module `_init_weights` walk visits children first (lm_head after the
        blocks) and skips parameter-less containers of custom code, so it cannot reproduce nanochat's
        seeded values. The `transformers.initialization` helpers used here skip tensors that
        `from_pretrained` already loaded, so only missing weights are (re)initialized.
        """
        if getattr(self, "_is_hf_initialized", False):
            return
        if isinstance(self, NanoChatForCausalLM):
            self._init_nanochat(self.model, self.lm_head)
        elif isinstance(self, NanoChatModel) and not self._init_deferred:
            self._init_nanochat(self, None)
        else:
            return
        for module in self.modules():
            module._is_hf_initialized = True

    def _init_weights(self, module: nn.Module) -> None:
        # Reached only for modules created after construction (e.g. resize_token_embeddings).
        if isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=self.config.embedding_init_std)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=self.config.lm_head_init_std)

    @torch.no_grad()
    def _init_nanochat(self, backbone: NanoChatModel, lm_head: nn.Linear | None) -> None:
        config = backbone.config
        C, L = config.hidden_size, config.num_hidden_layers
        s = 3**0.5 * C**-0.5  # uniform(-s, s) has std 1/sqrt(C)
        init.normal_(backbone.embed_tokens.weight, mean=0.0, std=config.embedding_init_std)
        if lm_head is not None:
            init.normal_(lm_head.weight, mean=0.0, std=config.lm_head_init_std)
        for layer in backbone.layers:
            attn, mlp = layer.self_attn, layer.mlp
            init.uniform_(attn.q_proj.weight, -s, s)
            init.uniform_(attn.k_proj.weight, -s, s)
            init.uniform_(attn.v_proj.weight, -s, s)
            init.zeros_(attn.o_proj.weight)
            init.uniform_(mlp.fc1.weight, -0.4 * s, 0.4 * s)
            init.zeros_(mlp.fc2.weight)
        if config.use_residual_lambdas:  # Python-float arithmetic, as nanochat fills them
            init.copy_(backbone.resid_lambdas, torch.tensor([1.15 - 0.10 * i / max(L - 1, 1) for i in range(L)]))
            init.copy_(backbone.x0_lambdas, torch.tensor([0.20 - 0.15 * i / max(L - 1, 1) for i in range(L)]))
        if config.use_smear:
            init.zeros_(backbone.smear_lambda)
            init.uniform_(backbone.smear_gate.weight, 0.0, 0.02)
        if config.use_backout:
            init.constant_(backbone.backout_lambda, 0.2)
        for ve in backbone.value_embeds.values():
            init.uniform_(ve.weight, -s, s)
        for layer in backbone.layers:
            if layer.self_attn.ve_gate is not None:
                init.uniform_(layer.self_attn.ve_gate.weight, 0.0, 0.02)

    # -- accounting (§1.9) ---------------------------------------------------------------------------
    def num_scaling_params(self) -> dict[str, int]:
        """Parameter counts by role; `transformer_matrices + lm_head` is the scaling-law count."""
        backbone = self.model if isinstance(self, NanoChatForCausalLM) else self
        counts = {
            "wte": backbone.embed_tokens.weight.numel(),
            "value_embeds": sum(p.numel() for p in backbone.value_embeds.parameters()),
            "lm_head": self.lm_head.weight.numel() if isinstance(self, NanoChatForCausalLM) else 0,
            "transformer_matrices": sum(p.numel() for p in backbone.layers.parameters()),
            "scalars": sum(p.numel() for p in backbone.scalar_parameters()),
        }
        counts["total"] = sum(counts.values())
        real = sum(p.numel() for p in self.parameters())
        if counts["total"] != real:
            raise AssertionError(f"parameter accounting is off: {counts['total']} counted vs {real} in the model")
        return counts

    def estimate_flops(self) -> float:
        """Forward+backward FLOPs per token: 6 * matmul params + 12*H*D*window per layer (§1.9)."""
        counts = self.num_scaling_params()
        matmul = counts["total"] - counts["wte"] - counts["value_embeds"] - counts["scalars"]
        config = self.config
        S = config.max_position_embeddings
        attn = sum(
            12 * config.num_attention_heads * config.head_dim * min(w if w >= 0 else S, S) for w in config.layer_windows
        )
        return 6 * matmul + attn


# --------------------------------------------------------------------------- backbone
class NanoChatModel(NanoChatPreTrainedModel):
    """Embedding -> norm -> smear -> blocks (with resid/x0 lambdas and value embeddings) -> backout -> norm.

    `last_hidden_state` is exactly what the head consumes, so TRL's losses (computed from it and the
    output embeddings) match the model's own.
    """

    def __init__(self, config: NanoChatConfig):
        super().__init__(config)
        self._init_deferred = _DeferBackboneInit.active
        V, C, L = config.padded_vocab_size, config.hidden_size, config.num_hidden_layers
        kv_dim = config.num_key_value_heads * config.head_dim
        # torch's default inits are skipped: every tensor is filled by `initialize_weights` (or loaded),
        # and skipping keeps the RNG stream identical to nanochat's
        with no_init_weights():
            self.embed_tokens = nn.Embedding(V, C)
            self.layers = nn.ModuleList([NanoChatDecoderLayer(config, i) for i in range(L)])
            self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in config.value_embed_layers})
            if config.use_smear:
                self.smear_gate = NanoChatLinear(config.smear_gate_channels, 1)
        if config.use_residual_lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(L))
            self.x0_lambdas = nn.Parameter(torch.zeros(L))
        if config.use_smear:
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.use_backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def scalar_parameters(self) -> list[nn.Parameter]:
        """resid/x0 lambdas, smear gate/lambda, backout lambda (those that exist)."""
        names = ("resid_lambdas", "x0_lambdas", "smear_gate", "smear_lambda", "backout_lambda")
        params = []
        for name in names:
            obj = getattr(self, name, None)
            if isinstance(obj, nn.Parameter):
                params.append(obj)
            elif isinstance(obj, nn.Module):
                params.extend(obj.parameters())
        return params

    def _positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Positions without a cache (with one, the cache knows each row's real length)."""
        B, T = input_ids.shape[:2]
        if attention_mask is not None and attention_mask.dim() == 2:
            # left padding: real tokens count from 0, so padded rows equal unpadded ones
            positions = attention_mask.long().cumsum(-1) - 1
            positions = positions.masked_fill(attention_mask == 0, 0)
            return positions[:, -T:]
        return torch.arange(T, device=input_ids.device).unsqueeze(0).expand(B, -1)

    @staticmethod
    def _last_real(x: torch.Tensor, prev: torch.Tensor | None, token_mask: torch.Tensor | None) -> torch.Tensor:
        """Each row's last real (non-padding) position of x as (B, 1, C); rows without one keep `prev`."""
        if token_mask is None:
            return x[:, -1:, :]
        last = token_mask.long().cumsum(1).argmax(1)  # first index reaching the final count = last real token
        picked = x[torch.arange(x.shape[0], device=x.device), last].unsqueeze(1)
        keep = prev.to(x.dtype) if prev is not None else torch.zeros_like(picked)
        return torch.where(token_mask.any(1)[:, None, None], picked, keep)

    def _smear(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        boundaries_possible: bool,
        cache: Cache | None,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_t += smear_lambda * sigmoid(smear_gate(x_t[:24])) * x_{t-1}, never across a document start."""
        prev = getattr(cache, "prev_embedding", None) if cache is not None else None
        if cache is not None:
            cache.prev_embedding = self._last_real(x, prev, token_mask)  # pre-smear, as nanochat stores it
        lam = self.smear_lambda.to(x.dtype)
        gate = lam * torch.sigmoid(self.smear_gate(x[..., : self.config.smear_gate_channels]))  # (B, T, 1)
        if prev is None:
            if x.shape[1] == 1:
                return x
            gate, shifted = gate[:, 1:], x[:, :-1]
            keep = position_ids[:, 1:] == position_ids[:, :-1] + 1 if boundaries_possible else None
            if keep is not None:
                gate = gate * keep.unsqueeze(-1).to(gate.dtype)
            return torch.cat([x[:, :1], x[:, 1:] + gate * shifted], dim=1)
        shifted = torch.cat([prev.to(x.dtype), x[:, :-1]], dim=1)
        if boundaries_possible and x.shape[1] > 1:
            keep = torch.ones_like(position_ids, dtype=torch.bool)
            keep[:, 1:] = position_ids[:, 1:] == position_ids[:, :-1] + 1
            gate = gate * keep.unsqueeze(-1).to(gate.dtype)
        return x + gate * shifted

    def _build_masks(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: NanoChatCache | None,
        position_ids: torch.Tensor | None,
        cache_had_tokens: bool = False,
    ) -> dict[int, torch.Tensor | None]:
        """One mask per distinct window, built once per forward.

        With a cache that already holds tokens, the cache builds them (its ring slots are not in
        chronological order, and it knows every row's real length); otherwise transformers' mask utilities
        do (causal + window, padding, packed documents).
        """
        masks = {}
        if cache is not None and cache_had_tokens:
            impl = self.config._attn_implementation or ""
            flash_layout = impl == FA3_IMPLEMENTATION or "flash" in impl
            for layer_idx, window in enumerate(self.config.layer_windows):
                if window not in masks:
                    masks[window] = cache.attention_mask(layer_idx, flash_layout)
            return masks
        for layer_idx, window in enumerate(self.config.layer_windows):
            if window in masks:
                continue
            config = copy.copy(self.config)
            config.sliding_window = window + 1  # transformers counts the query itself
            masks[window] = create_sliding_window_causal_mask(
                config=config,
                inputs_embeds=x,
                attention_mask=attention_mask,
                cache=None,
                position_ids=position_ids,
                layer_idx=layer_idx,
            )
        return masks

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if "past_key_values" in kwargs:  # the pre-5.24 name
            cache = kwargs.pop("past_key_values") if cache is None else cache
        if input_ids is None:
            raise ValueError(
                "NanoChat needs input_ids (value embeddings are looked up by token id); inputs_embeds alone "
                "is not supported"
            )
        if inputs_embeds is not None:
            raise ValueError("NanoChat: pass input_ids, not inputs_embeds (value embeddings need token ids)")
        if input_ids.dim() != 2:
            raise ValueError(f"NanoChat: input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = NanoChatCache(self.config)
        if cache is not None and not isinstance(cache, NanoChatCache):
            raise TypeError(
                f"NanoChat needs a NanoChatCache (it keeps per-layer windows and the smear state), got "
                f"{type(cache).__name__}; pass cache=NanoChatCache(model.config) or leave it to generate()"
            )
        B, T = input_ids.shape
        if T == 0:
            raise ValueError("NanoChat: input_ids has no tokens (sequence length 0)")
        boundaries_possible = position_ids is not None or attention_mask is not None
        token_mask, cache_positions, cache_had_tokens = None, None, False
        if cache is not None:
            # the cache plans this forward: real positions per row, padding left out of the cache
            cache_had_tokens = not cache.is_empty()
            if attention_mask is not None and attention_mask.dim() == 2:
                attention_mask = attention_mask[:, -T:]  # generate() passes past + new columns
                token_mask = attention_mask
            cache_positions = cache.begin_forward(
                B, T, token_mask, device=input_ids.device, dtype=self.embed_tokens.weight.dtype
            )
            token_mask = cache.current_token_mask
        if position_ids is None:
            position_ids = cache_positions if cache_positions is not None else self._positions(input_ids, attention_mask)
        elif position_ids.shape[0] != B:
            position_ids = position_ids.expand(B, -1)

        x = self.embed_tokens(input_ids)  # activation dtype = embedding dtype (§1.7)
        x = rms_norm(x, self.config.rms_norm_eps)
        if self.config.use_smear:
            x = self._smear(x, position_ids, boundaries_possible, cache, token_mask)
        x0 = x
        cos_sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        # packed-document detection in the mask utilities needs explicit position_ids and no padding mask
        masks = self._build_masks(
            x, attention_mask, cache, position_ids if boundaries_possible and attention_mask is None else None,
            cache_had_tokens,
        )
        if self.config._attn_implementation == FA3_IMPLEMENTATION and attention_mask is None:
            kwargs.setdefault("position_ids", position_ids)
        all_hidden = [x] if output_hidden_states else None
        x_backout = None
        for i, layer in enumerate(self.layers):
            if self.config.use_residual_lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids).to(x.dtype) if str(i) in self.value_embeds else None
            x = layer(x, ve, cos_sin, masks[layer.self_attn.window], cache, **kwargs)
            if i == self.config.backout_layer:
                x_backout = x
            if all_hidden is not None:
                all_hidden.append(x)
        if self.config.use_backout:
            x = x - self.backout_lambda.to(x.dtype) * x_backout
        x = rms_norm(x, self.config.rms_norm_eps)
        return BaseModelOutputWithPast(
            last_hidden_state=x,
            cache=cache,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )


# --------------------------------------------------------------------------- causal LM
def _unshard_sharded_head(model: nn.Module, args) -> None:
    """Gather an FSDP2-sharded head at the start of every forward.

    Accelerate's FSDP2 makes `lm_head` a unit of its own, gathered by *its* forward hook. TRL's
    trainers never call the head: they multiply the backbone's output by `lm_head.weight`, which
    is then still sharded; TRL's fallback (`full_tensor()`) gives every rank only its own rows of
    its own gradient, unaveraged. Gathered here, the weight is the ordinary unsharded parameter
    and FSDP reduce-scatters its gradient like any other (the unit is not resharded until then).
    Without FSDP (no `unshard` method) this does nothing.
    """
    unshard = getattr(model.lm_head, "unshard", None)
    if unshard is not None:
        unshard()


class NanoChatForCausalLM(NanoChatPreTrainedModel, GenerationMixin):
    """NanoChat with its untied head: logits over the first `vocab_size` rows, fp32, softcapped."""

    _tied_weights_keys = {}

    def __init__(self, config: NanoChatConfig):
        super().__init__(config)
        with _DeferBackboneInit():
            self.model = NanoChatModel(config)
        with no_init_weights():
            self.lm_head = NanoChatLinear(config.hidden_size, config.padded_vocab_size)
        self.post_init()
        self.register_forward_pre_hook(_unshard_sharded_head)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        """generate() always gets a NanoChatCache (a plain DynamicCache would lose windows and the smear state)."""
        user_cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        if user_cache is not None:
            if not isinstance(user_cache, NanoChatCache):
                raise TypeError(
                    f"NanoChat cannot generate with a {type(user_cache).__name__}: pass a NanoChatCache "
                    "or no cache at all"
                )
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        if generation_config.use_cache is False:
            return None
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"NanoChat supports its own NanoChatCache only; cache_implementation="
                f"{generation_config.cache_implementation!r} is not available"
            )
        # generate() expands rows for beams / num_return_sequences before the first forward
        rows = batch_size * max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        model_kwargs["cache"] = NanoChatCache(
            self.config, max_cache_len=max_cache_length, max_batch_size=rows, device=self.device,
            dtype=self.model.embed_tokens.weight.dtype,
        )
        return None

    def logits_from_hidden(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Head, slice padded vocab rows away, fp32, softcap (§1.5 step 8)."""
        logits = self.lm_head(hidden_states)[..., : self.config.vocab_size].float()
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        targets: torch.LongTensor | None = None,
        loss_reduction: str = "mean",
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Two loss conventions, the same number on the same data:

        - `labels` (HF): same positions as `input_ids`, shifted inside, ignore index -100;
        - `targets` (nanochat's trainers): already shifted (targets[t] = token t+1), ignore index -1,
          with `loss_reduction` "mean" | "sum" | "none" (a flat per-position vector).
        """
        if labels is not None and targets is not None:
            raise ValueError("pass either labels (HF, shifted inside) or targets (pre-shifted), not both")
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.logits_from_hidden(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        elif targets is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )


def count_flops_and_params(config: NanoChatConfig) -> tuple[float, dict[str, int]]:
    """estimate_flops() and num_scaling_params() of a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = NanoChatForCausalLM(config)
    return model.estimate_flops(), model.num_scaling_params()


NanoChatConfig.register_for_auto_class()
NanoChatModel.register_for_auto_class("AutoModel")
NanoChatForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["NanoChatPreTrainedModel", "NanoChatModel", "NanoChatForCausalLM", "count_flops_and_params"]
