"""NanoChat configuration (`model_type="nanochat_hf"`).

One config describes every nanochat variant found in published checkpoints: the full current
architecture (value embeddings, smear, backout, residual/x0 lambdas, QK scale 1.2, sliding windows,
softcap 15, RoPE base 1e5) by default, and older ones through switches (e.g. transformers' built-in
NanoChat checkpoints: no value embeddings/smear/backout/lambdas, QK scale 1.0, eps 1e-6, RoPE 1e4).

Names follow transformers (`hidden_size`, `num_hidden_layers`, ...); nanochat's names (`n_embd`,
`n_layer`, `n_head`, `n_kv_head`, `sequence_len`) are accepted as constructor aliases and readable
as properties. Derived quantities (head_dim, intermediate size, padded vocab, per-layer windows,
value-embedding layers) are computed here and nowhere else.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

# nanochat's names -> transformers' names
NANOCHAT_ALIASES = {
    "n_embd": "hidden_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_kv_head": "num_key_value_heads",
    "sequence_len": "max_position_embeddings",
}

# torch.finfo(torch.float32).eps: the eps F.rms_norm uses when none is given (spec §1.6)
FP32_EPS = 1.1920928955078125e-07


def short_window_for(seq_len: int) -> int:
    """The "S" window of nanochat: a quarter of the context, rounded up to a multiple of 128 (§1.5.2)."""
    return -((-seq_len // 4) // 128) * 128


class NanoChatConfig(PretrainedConfig):
    r"""Configuration of a NanoChat model.

    Args:
        vocab_size: tokenizer vocabulary size (unpadded). Embedding/head rows are padded to
            `pad_vocab_size_to`; logits are sliced back to `vocab_size`.
        hidden_size (`n_embd`): model width C.
        num_hidden_layers (`n_layer`): number of blocks L.
        num_attention_heads (`n_head`): query heads H.
        num_key_value_heads (`n_kv_head`): key/value heads (divides H). Defaults to H.
        head_dim: per-head size D. Defaults to hidden_size // num_attention_heads.
        intermediate_size: MLP width. Defaults to 4 * hidden_size.
        max_position_embeddings (`sequence_len`): training context S; drives the window sizes.
        window_pattern: per-layer window pattern of `S` (short, a quarter of S) and `L` (S) characters,
            tiled over the layers; the last layer is always `L`.
        short_window: override of the `S` window (default: nanochat's rule, a quarter of
            max_position_embeddings rounded up to a multiple of 128).
        rope_theta: RoPE base (nanochat 1e5; older checkpoints 1e4).
        rms_norm_eps: epsilon of every (weightless) RMSNorm; fp32 machine epsilon in nanochat.
        qk_scale: multiplier applied to q and k after QK-norm (1.2 in nanochat, 1.0 in older versions).
        final_logit_softcapping: logits = c * tanh(logits / c) in fp32; None disables it.
        pad_vocab_size_to: embedding/head rows are padded to a multiple of this (1 disables padding).
        use_value_embeds: value embeddings with a 3*sigmoid gate on alternating layers incl. the last.
        value_embed_gate_channels: input channels of the value-embedding gate (12).
        use_smear: cheap bigram mixing of the previous token's normed embedding.
        smear_gate_channels: input channels of the smear gate (24).
        use_backout: subtract backout_lambda * (output of block L//2) before the final norm.
        use_residual_lambdas: per-layer `resid_lambdas[i] * x + x0_lambdas[i] * x0` before each block.
        embedding_init_std / lm_head_init_std: init scales of the token embedding and the head (§1.8).
    """

    model_type = "nanochat_hf"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    attribute_map = dict(NANOCHAT_ALIASES)
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.fc1": "colwise",
        "layers.*.mlp.fc2": "rowwise",
    }

    def __init__(
        self,
        vocab_size: int = 32768,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 6,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 2048,
        window_pattern: str = "SSSL",
        short_window: int | None = None,
        rope_theta: float = 100000.0,
        rms_norm_eps: float = FP32_EPS,
        qk_scale: float = 1.2,
        final_logit_softcapping: float | None = 15.0,
        pad_vocab_size_to: int = 64,
        use_value_embeds: bool = True,
        value_embed_gate_channels: int = 12,
        use_smear: bool = True,
        smear_gate_channels: int = 24,
        use_backout: bool = True,
        use_residual_lambdas: bool = True,
        embedding_init_std: float = 0.8,
        lm_head_init_std: float = 0.001,
        use_cache: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        # nanochat's names are accepted as aliases (n_embd=768, sequence_len=2048, ...)
        aliases = {name: kwargs.pop(alias) for alias, name in NANOCHAT_ALIASES.items() if alias in kwargs}
        hidden_size = aliases.get("hidden_size", hidden_size)
        num_hidden_layers = aliases.get("num_hidden_layers", num_hidden_layers)
        num_attention_heads = aliases.get("num_attention_heads", num_attention_heads)
        num_key_value_heads = aliases.get("num_key_value_heads", num_key_value_heads)
        max_position_embeddings = aliases.get("max_position_embeddings", max_position_embeddings)
        # transformers' RoPE dict form (rope_parameters={"rope_theta": ...}) is accepted too
        rope_parameters = kwargs.pop("rope_parameters", None)
        if isinstance(rope_parameters, dict) and "rope_theta" in rope_parameters:
            rope_theta = rope_parameters["rope_theta"]
        kwargs.pop("layer_types", None)  # derived below; a saved config carries it for other tools
        kwargs.pop("sliding_window", None)

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.window_pattern = window_pattern
        self.short_window = short_window
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.qk_scale = qk_scale
        self.final_logit_softcapping = final_logit_softcapping
        self.pad_vocab_size_to = pad_vocab_size_to
        self.use_value_embeds = use_value_embeds
        self.value_embed_gate_channels = value_embed_gate_channels
        self.use_smear = use_smear
        self.smear_gate_channels = smear_gate_channels
        self.use_backout = use_backout
        self.use_residual_lambdas = use_residual_lambdas
        self.embedding_init_std = embedding_init_std
        self.lm_head_init_std = lm_head_init_std
        self.use_cache = use_cache
        self._validate()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        self.window_pattern = self.window_pattern.upper()
        # HF-facing view of the windows: "sliding_attention" for S layers, "full_attention" for L layers,
        # and `sliding_window` in transformers' convention (keys visible including the query = left + 1).
        self.layer_types = [
            "full_attention" if w >= self.max_position_embeddings else "sliding_attention"
            for w in self.layer_windows
        ]
        self.sliding_window = min(self.layer_windows) + 1
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    # ---------------------------------------------------------------- validation
    def _validate(self) -> None:
        def positive_int(name: str, value, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"NanoChatConfig.{name} must be a positive integer, got {value!r}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings", "pad_vocab_size_to",
                     "value_embed_gate_channels", "smear_gate_channels"):
            positive_int(name, getattr(self, name))
        positive_int("head_dim", self.head_dim, allow_none=True)
        positive_int("intermediate_size", self.intermediate_size, allow_none=True)
        positive_int("short_window", self.short_window, allow_none=True)
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"NanoChatConfig.num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"NanoChatConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}), or head_dim must be given"
            )
        head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if head_dim % 2 != 0:
            raise ValueError(f"NanoChatConfig.head_dim must be even for RoPE's half-split layout, got {head_dim}")
        if (
            not isinstance(self.window_pattern, str)
            or not self.window_pattern
            or any(c not in "SL" for c in self.window_pattern.upper())
        ):
            raise ValueError(
                f"NanoChatConfig.window_pattern must be a non-empty string of 'S' and 'L' characters, "
                f"got {self.window_pattern!r}"
            )
        for name in ("rope_theta", "rms_norm_eps", "qk_scale", "embedding_init_std", "lm_head_init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
                raise ValueError(f"NanoChatConfig.{name} must be a positive finite number, got {value!r}")
        cap = self.final_logit_softcapping
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0):
            raise ValueError(
                f"NanoChatConfig.final_logit_softcapping must be a positive number or None, got {cap!r}"
            )
        if self.use_value_embeds and self.value_embed_gate_channels > self.hidden_size:
            raise ValueError(
                f"NanoChatConfig.value_embed_gate_channels ({self.value_embed_gate_channels}) cannot exceed "
                f"hidden_size ({self.hidden_size})"
            )
        if self.use_smear and self.smear_gate_channels > self.hidden_size:
            raise ValueError(
                f"NanoChatConfig.smear_gate_channels ({self.smear_gate_channels}) cannot exceed "
                f"hidden_size ({self.hidden_size})"
            )
        for name in ("use_value_embeds", "use_smear", "use_backout", "use_residual_lambdas"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"NanoChatConfig.{name} must be true or false, got {getattr(self, name)!r}")

    # ---------------------------------------------------------------- derived quantities
    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding, head and value-embedding tables (§1.3)."""
        m = self.pad_vocab_size_to
        return (self.vocab_size + m - 1) // m * m

    @property
    def layer_windows(self) -> list[int]:
        """Left window of each layer in FA3 convention: a query at p sees keys p-w..p (w+1 keys).

        `L` -> S, `S` -> a quarter of S rounded up to 128; the last layer is always `L` (§1.5.2).
        """
        long_w = self.max_position_embeddings
        short_w = self.short_window if self.short_window is not None else short_window_for(long_w)
        pattern = self.window_pattern.upper()
        windows = [long_w if pattern[i % len(pattern)] == "L" else short_w for i in range(self.num_hidden_layers)]
        windows[-1] = long_w
        return windows

    def has_value_embed(self, layer_idx: int) -> bool:
        """Value embeddings sit on alternating layers that always include the last one (§1.4)."""
        return self.use_value_embeds and layer_idx % 2 == (self.num_hidden_layers - 1) % 2

    @property
    def value_embed_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.has_value_embed(i)]

    @property
    def backout_layer(self) -> int:
        return self.num_hidden_layers // 2

    @property
    def window_sizes(self) -> list[tuple[int, int]]:
        """Per-layer (left, right) windows exactly as nanochat passes them to FA3."""
        return [(w, 0) for w in self.layer_windows]

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_depth(
        cls,
        depth: int,
        aspect_ratio: int = 64,
        head_dim: int = 128,
        max_seq_len: int = 2048,
        window_pattern: str = "SSSL",
        vocab_size: int = 32768,
        **kwargs,
    ) -> NanoChatConfig:
        """nanochat's single dial (§1.2): width = depth * aspect_ratio rounded up to a multiple of head_dim."""
        for name, value in (("depth", depth), ("aspect_ratio", aspect_ratio), ("head_dim", head_dim),
                            ("max_seq_len", max_seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"NanoChatConfig.from_depth: {name} must be a positive integer, got {value!r}")
        base_dim = depth * aspect_ratio
        model_dim = -(-base_dim // head_dim) * head_dim
        n_head = model_dim // head_dim
        return cls(
            vocab_size=vocab_size,
            hidden_size=model_dim,
            num_hidden_layers=depth,
            num_attention_heads=n_head,
            num_key_value_heads=n_head,
            head_dim=head_dim,
            max_position_embeddings=max_seq_len,
            window_pattern=window_pattern,
            **kwargs,
        )
