"""NanoChatCache: pre-allocated, window-bounded per-layer KV ring buffers plus the smear state.

nanochat's layers attend over finite windows (FA3 convention (w, 0): a query sees itself and the w
keys before it; "L" layers use the finite S, so they slide too beyond the training context). A decode
query therefore never needs more than w + 1 keys, and each layer keeps exactly that many: a ring
buffer of `capacity = min(w + 1, max_cache_len)` slots where the token at real position p of a row
lives in slot p % capacity. An "S" layer's memory is bounded by its window, not by the context.

Layout and bookkeeping follow FA3's `flash_attn_with_kvcache`, not transformers' DynamicCache:

- keys/values are stored (B, capacity, Hkv, D) and written in place;
- every row has its own length (`seqlens`, int32): padding is never written into the cache, so a
  left-padded batch holds exactly what each prompt would hold alone, and the engine can mix prompts
  of different lengths;
- `get_seq_length()` still counts the columns the model was fed (padding included), which is what
  `generate()` slices its inputs by.

Because slots are in ring order, the model does not ask transformers' mask utilities for masks when
the cache holds something: it asks the cache (`attention_mask`), which knows every slot's real
position. The smear needs one more piece of state per row, the previous token's normed embedding
(`prev_embedding`); it follows the rows through beam reordering and `num_return_sequences`
expansion exactly like the keys and values do.

Protocol with the model, once per forward: `begin_forward` (plans the writes, returns the real
positions of the new tokens), `attention_mask` per distinct window, `update` per layer (the last
layer's update commits the new lengths). Calling `update` directly without `begin_forward` works too
(all tokens are taken as real).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .configuration_nanochat import NanoChatConfig

GROWTH_QUANTUM = 64  # caches without a known max length grow in steps of at least this many slots


class _Step:
    """What one forward writes: shared by all layers, with per-capacity derived indices/masks memoized."""

    def __init__(self, lens: torch.Tensor, min_len: int, max_len: int, seq_len: int, token_mask: torch.Tensor | None):
        self.seq_len = seq_len
        self.lens = lens  # (B,) int32, real tokens per row before this forward
        self.min_len, self.max_len = min_len, max_len
        self.token_mask = token_mask  # (B, T) bool, None when every new token is real
        lens_long = lens.long()
        steps = torch.arange(seq_len, device=lens.device)
        if token_mask is None:
            self.positions = lens_long[:, None] + steps  # real position of every new token
            self.new_lens = lens + seq_len
            self.new_min, self.new_max = min_len + seq_len, max_len + seq_len
        else:
            counts = token_mask.long().cumsum(1)
            self.positions = (lens_long[:, None] + counts - 1).masked_fill(~token_mask, 0)
            self.new_lens = lens + counts[:, -1].to(lens.dtype)
            bounds = torch.stack([self.new_lens.min(), self.new_lens.max()]).tolist()
            self.new_min, self.new_max = int(bounds[0]), int(bounds[1])
        self.uniform = token_mask is None and min_len == max_len  # every row at the same length, no padding
        self._memo: dict = {}

    def memo(self, key, fn):
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    # -- where the new tokens go -------------------------------------------------------------------
    def decode_rows_slots(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        def build():
            rows = torch.arange(self.lens.shape[0], device=self.lens.device)
            if self.token_mask is not None:
                rows = rows[self.token_mask[:, 0]]
            return rows, self.lens.long()[rows] % capacity

        return self.memo(("decode", capacity), build)

    def prefill_writes(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, chunk index, slot) of every new real token that survives in a ring of `capacity` slots."""

        def build():
            keep = self.positions >= (self.new_lens.long()[:, None] - capacity)
            if self.token_mask is not None:
                keep &= self.token_mask
            rows, cols = keep.nonzero(as_tuple=True)
            return rows, cols, self.positions[rows, cols] % capacity

        return self.memo(("prefill", capacity), build)

    def past_positions(self, capacity: int) -> torch.Tensor:
        """Real positions of the past keys gathered for a T > 1 forward: the last min(max_len, capacity) of each row
        (negative = before the row's first token, masked)."""

        def build():
            m = min(self.max_len, capacity)
            return self.lens.long()[:, None] - m + torch.arange(m, device=self.lens.device)

        return self.memo(("past", capacity), build)


class NanoChatCacheLayer(CacheLayerMixin):
    """One layer's ring buffer: keys/values (B, capacity, Hkv, D), FA3's `k_cache` layout.

    The token at real position p of a row lives in slot p % capacity. capacity <= window + 1, so a full
    ring holds exactly the keys a decode query may see and every slot is inside its window.
    """

    is_compileable = False
    is_croppable = False  # decided by the cache (the smear state cannot be rolled back)

    def __init__(self, window: int, max_cache_len: int | None = None, is_sliding: bool = True):
        super().__init__()
        self.window = window
        self.max_capacity = window + 1 if max_cache_len is None else min(window + 1, max_cache_len)
        self.preallocate = max_cache_len is not None  # known max length: allocate everything at once
        self.is_sliding = is_sliding
        self.capacity = 0

    def __repr__(self):
        return f"{type(self).__name__}(window={self.window}, capacity={self.capacity}/{self.max_capacity})"

    # -- allocation ---------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate from HF-layout (B, H, T, D) example states (used by `Cache.early_initialization`)."""
        B, H, _, D = key_states.shape
        self.reserve(B, H, D, value_states.shape[-1], key_states.dtype, key_states.device, self.max_capacity)

    def reserve(self, batch: int, heads: int, k_dim: int, v_dim: int, dtype, device, needed: int) -> None:
        """Make room for `needed` slots (<= max_capacity). Grows by doubling until the window is reached."""
        if self.is_initialized and self.keys.shape[0] != batch:
            raise ValueError(f"NanoChatCache holds {self.keys.shape[0]} rows, got a batch of {batch}")
        if self.is_initialized and self.capacity >= needed:
            return
        capacity = self.max_capacity if self.preallocate else min(
            self.max_capacity, max(needed, 2 * self.capacity, GROWTH_QUANTUM)
        )
        keys = torch.zeros(batch, capacity, heads, k_dim, dtype=dtype, device=device)
        values = torch.zeros(batch, capacity, heads, v_dim, dtype=dtype, device=device)
        if self.is_initialized:  # growing happens only before the ring wraps: slots 0..capacity-1 are in order
            keys[:, : self.capacity] = self.keys
            values[:, : self.capacity] = self.values
        self.keys, self.values, self.capacity = keys, values, capacity
        self.device, self.is_initialized = device, True

    # -- writing and reading ------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, step: _Step | None = None, **kwargs):
        """Write the new (B, H, T, D) states; return the keys/values this forward's queries attend over.

        Decode (T == 1): the ring itself, slots [0, n) with n = min(longest row, capacity), in slot order.
        Prefill/chunks (T > 1): the row's past in chronological order (gathered before the ring is
        overwritten) followed by the new states, matching `_Step.past_positions` + `positions`.
        """
        if step is None:
            raise RuntimeError("NanoChatCacheLayer.update is driven by NanoChatCache.update")
        k_new, v_new = key_states.transpose(1, 2), value_states.transpose(1, 2)  # (B, T, H, D) views
        cap = self.capacity
        if step.seq_len == 1:
            if step.uniform:
                slot = step.min_len % cap
                self.keys[:, slot] = k_new[:, 0]
                self.values[:, slot] = v_new[:, 0]
            else:
                rows, slots = step.decode_rows_slots(cap)
                self.keys[rows, slots] = k_new[rows, 0]
                self.values[rows, slots] = v_new[rows, 0]
            n = min(step.new_max, cap)
            return self.keys[:, :n].transpose(1, 2), self.values[:, :n].transpose(1, 2)

        keys, values = key_states, value_states
        if step.max_len > 0:  # gather the past before the writes below can overwrite it
            if step.uniform and step.max_len <= cap:
                past_k, past_v = self.keys[:, : step.max_len], self.values[:, : step.max_len]
            else:
                slots = step.past_positions(cap).clamp(min=0) % cap
                rows = torch.arange(slots.shape[0], device=slots.device)[:, None]
                past_k, past_v = self.keys[rows, slots], self.values[rows, slots]
            keys = torch.cat([past_k, k_new], 1).transpose(1, 2)
            values = torch.cat([past_v, v_new], 1).transpose(1, 2)
        if step.uniform and step.max_len + step.seq_len <= cap:
            self.keys[:, step.max_len : step.max_len + step.seq_len] = k_new
            self.values[:, step.max_len : step.max_len + step.seq_len] = v_new
        else:
            rows, cols, slots = step.prefill_writes(cap)
            self.keys[rows, slots] = k_new[rows, cols]
            self.values[rows, slots] = v_new[rows, cols]
        return keys, values

    # -- transformers' layer API --------------------------------------------------------------------
    def get_seq_length(self) -> int:  # the cache answers for all layers (columns seen)
        raise NotImplementedError("use NanoChatCache.get_seq_length()")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        raise NotImplementedError("use NanoChatCache.get_mask_sizes()")

    def get_max_length(self) -> int:
        return self.max_capacity

    def reset(self) -> None:
        pass  # lengths live in the cache; stale slots are never read

    def release(self) -> None:
        self.keys = self.values = None
        self.capacity, self.is_initialized = 0, False

    def select_rows(self, index: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys = self.keys.index_select(0, index.to(self.keys.device))
            self.values = self.values.index_select(0, index.to(self.values.device))

    def repeat_rows(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)


class NanoChatCache(Cache):
    """KV cache of a NanoChat model: one window-bounded ring buffer per layer, per-row lengths, smear state.

    Args:
        config: the model's `NanoChatConfig` (windows, kv heads, head dim).
        max_cache_len: the most tokens a row will hold (prompt + new tokens). With it, every layer is
            allocated once at `min(window + 1, max_cache_len)` slots and a forward beyond it raises;
            without it, layers grow by doubling up to `window + 1` slots (any length works).
        max_batch_size, device, dtype: with `max_cache_len`, allocate right away instead of at the first
            forward (dtype = the model's activation dtype, i.e. its embedding dtype).

    `generate()` builds one sized for the call; build one yourself for manual decoding loops:
    `cache = NanoChatCache(model.config, max_cache_len=prompt_len + new_tokens)`.
    """

    def __init__(
        self,
        config: NanoChatConfig,
        max_cache_len: int | None = None,
        max_batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        for name, value in (("max_cache_len", max_cache_len), ("max_batch_size", max_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"NanoChatCache: {name} must be a positive integer or None, got {value!r}")
        S = config.max_position_embeddings
        layers = [NanoChatCacheLayer(w, max_cache_len, is_sliding=w < S) for w in config.layer_windows]
        super().__init__(layers=layers)
        self.max_cache_len = max_cache_len
        self.num_kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim
        self.use_smear = config.use_smear
        self.prev_embedding: torch.Tensor | None = None
        self._lens: torch.Tensor | None = None  # (B,) int32 real tokens per row (FA3's cache_seqlens)
        self._min_len = self._max_len = 0  # Python copies, so the hot path never syncs with the device
        self._seen = 0  # columns fed, padding included
        self._step: _Step | None = None
        if max_batch_size is not None and max_cache_len is not None:
            self._reserve(max_batch_size, torch.device(device or "cpu"), dtype or torch.float32, max_cache_len)

    # -- per-forward protocol -------------------------------------------------------------------------
    def begin_forward(
        self,
        batch_size: int,
        seq_len: int,
        token_mask: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Plan a forward of `seq_len` new columns; return the real positions (B, T) of the new tokens.

        `token_mask` (B, T), 1 for real tokens and 0 for padding (the last T columns of a 2D attention
        mask); padding is not written, and gets position 0.
        """
        if seq_len < 1:
            raise ValueError("NanoChatCache: a forward needs at least one new token")
        if self._lens is None or (self._max_len == 0 and self._lens.shape[0] != batch_size):
            device = torch.device(device) if device is not None else torch.device("cpu")
            self._lens = torch.zeros(batch_size, dtype=torch.int32, device=device)
            self._min_len = self._max_len = 0
            for layer in self.layers:  # an empty cache adapts to the batch it is given
                if layer.is_initialized and layer.keys.shape[0] != batch_size:
                    layer.release()
        elif self._lens.shape[0] != batch_size:
            raise ValueError(
                f"NanoChatCache holds {self._lens.shape[0]} rows but got a batch of {batch_size}; "
                "use a new cache (or reset()) for a different batch"
            )
        if token_mask is not None:
            token_mask = token_mask.to(device=self._lens.device, dtype=torch.bool)
            if token_mask.shape != (batch_size, seq_len):
                raise ValueError(f"token mask of shape {tuple(token_mask.shape)}, expected {(batch_size, seq_len)}")
            if bool(token_mask.all()):
                token_mask = None
        step = _Step(self._lens, self._min_len, self._max_len, seq_len, token_mask)
        if self.max_cache_len is not None and step.new_max > self.max_cache_len:
            raise ValueError(
                f"NanoChatCache was sized for {self.max_cache_len} tokens per row (max_cache_len) but this forward "
                f"brings a row to {step.new_max}; build the cache with a larger max_cache_len (prompt + new tokens)"
            )
        self._reserve(batch_size, self._lens.device, dtype, step.new_max)
        self._step = step
        return step.positions

    def _reserve(self, batch: int, device, dtype, needed: int) -> None:
        for layer in self.layers:
            if dtype is None and not layer.is_initialized:
                return  # allocated at the first update, from the states' dtype
            layer_dtype = dtype if dtype is not None else layer.keys.dtype
            layer.reserve(batch, self.num_kv_heads, self.head_dim, self.head_dim, layer_dtype, device,
                          min(needed, layer.max_capacity))

    def _current_step(self, key_states: torch.Tensor) -> _Step:
        if self._step is None:  # driven without the model's begin_forward: every token is real
            self.begin_forward(key_states.shape[0], key_states.shape[2], None, key_states.device, key_states.dtype)
        return self._step

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write layer `layer_idx`'s new (B, Hkv, T, D) states; return what its queries attend over.

        The last layer's update commits the forward (lengths advance), like nanochat's KVCache.advance.
        """
        step = self._current_step(key_states)
        layer = self.layers[layer_idx]
        if not layer.is_initialized or layer.capacity < min(step.new_max, layer.max_capacity):
            B, H, _, D = key_states.shape
            layer.reserve(B, H, D, value_states.shape[-1], key_states.dtype, key_states.device,
                          min(step.new_max, layer.max_capacity))
        out = layer.update(key_states, value_states, step)
        if layer_idx == len(self.layers) - 1:
            self._lens, self._min_len, self._max_len = step.new_lens, step.new_min, step.new_max
            self._seen += step.seq_len
            self._step = None
        return out

    def attention_mask(self, layer_idx: int, flash_layout: bool = False) -> torch.Tensor | None:
        """The mask of this forward's queries over what `update(layer_idx)` returns, or None (no masking).

        SDPA/eager: boolean (B, 1, T, K), True = attend. Flash layouts: a 2D key mask (B, K) of real keys,
        the keys being in chronological order with the causal diagonal bottom-right aligned.
        Only valid after `begin_forward` and while the cache held tokens before it (otherwise the
        model's ordinary causal/sliding masks apply).
        """
        step = self._step
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            raise RuntimeError("NanoChatCache.attention_mask needs begin_forward(..., dtype=...) first")
        cap, window = layer.capacity, layer.window
        return step.memo(("mask", cap, window, flash_layout), lambda: self._build_mask(step, cap, window, flash_layout))

    @staticmethod
    def _build_mask(step: _Step, cap: int, window: int, flash_layout: bool) -> torch.Tensor | None:
        device = step.lens.device
        if step.seq_len == 1:  # ring slots: every filled slot is inside the window
            n = min(step.new_max, cap)
            if step.new_min >= cap or step.new_min == step.new_max:
                return None
            filled = torch.arange(n, device=device)[None, :] < step.new_lens.long().clamp(max=cap)[:, None]
            return filled if flash_layout else filled[:, None, None, :]
        past = step.past_positions(cap)
        key_pos = torch.cat([past, step.positions], 1)  # (B, m + T), chronological per row
        new_real = step.token_mask if step.token_mask is not None else torch.ones_like(step.positions, dtype=torch.bool)
        key_real = torch.cat([past >= 0, new_real], 1)
        if flash_layout:
            return None if bool(key_real.all()) else key_real
        q = step.positions[:, :, None]
        allowed = key_real[:, None, :] & (key_pos[:, None, :] <= q) & (key_pos[:, None, :] >= q - window)
        m = past.shape[1]
        # a padding query sees its own slot only, so no softmax row is empty (its output is ignored)
        diagonal = torch.zeros_like(allowed)
        diagonal[:, :, m:] = torch.eye(step.seq_len, dtype=torch.bool, device=device)
        allowed |= diagonal & ~new_real[:, :, None]
        return allowed[:, None]

    def fa3_kvcache(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache, cache_seqlens) for FA3's `flash_attn_with_kvcache` after a decode update.

        The new token is already written in its ring slot, so FA3 attends over each row's first
        `cache_seqlens` slots (int32) without writing: all of them lie inside the window.
        """
        layer = self.layers[layer_idx]
        lens = self._lens if self._step is None else self._step.new_lens
        return layer.keys, layer.values, lens.clamp(max=layer.capacity).to(torch.int32)

    # -- state ------------------------------------------------------------------------------------------
    @property
    def current_token_mask(self) -> torch.Tensor | None:
        """(B, T) bool real-token mask of the forward in progress; None when every new token is real."""
        return None if self._step is None else self._step.token_mask

    @property
    def seqlens(self) -> torch.Tensor | None:
        """Real tokens held per row (int32, (B,)), or None before the first forward."""
        return self._lens

    def is_empty(self) -> bool:
        return self._max_len == 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns fed so far (padding included): what `generate()` slices its inputs by."""
        return self._seen

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """(kv_length, kv_offset) as for a chronological sliding window; NanoChat builds its cache masks itself."""
        layer = self.layers[layer_idx]
        return min(self._seen, layer.window) + query_length, max(self._seen - layer.window, 0)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        if layer_idx is None:
            return max(layer.max_capacity for layer in self.layers)
        return self.layers[layer_idx].max_capacity

    @property
    def max_batch_size(self) -> int:
        return -1 if self._lens is None else self._lens.shape[0]

    @property
    def batch_size(self) -> int:
        return self.max_batch_size

    def allocated_bytes(self) -> int:
        """Bytes held by the key/value buffers (what the window bound is about)."""
        return sum(
            layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
            for layer in self.layers
            if layer.is_initialized
        )

    def reset(self) -> None:
        """Forget every token (buffers are kept for reuse)."""
        if self._lens is not None:
            self._lens = torch.zeros_like(self._lens)
        self._min_len = self._max_len = self._seen = 0
        self._step = None
        self.prev_embedding = None

    # -- row manipulations: the smear state and lengths follow the keys/values -----------------------
    def _after_row_change(self) -> None:
        if self._min_len != self._max_len and self._lens.numel() > 0:
            self._min_len, self._max_len = (int(v) for v in torch.stack([self._lens.min(), self._lens.max()]).tolist())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i becomes old row beam_idx[i]."""
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._lens is None:
            return
        indices = torch.as_tensor(indices, device=self._lens.device)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        for layer in self.layers:
            layer.select_rows(indices)
        self._lens = self._lens.index_select(0, indices)
        if self.prev_embedding is not None:
            self.prev_embedding = self.prev_embedding.index_select(0, indices.to(self.prev_embedding.device))
        self._after_row_change()

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Row i becomes rows i*repeats .. i*repeats + repeats - 1 (prefill once, then sample many)."""
        if self._lens is None:
            return
        for layer in self.layers:
            layer.repeat_rows(repeats)
        self._lens = self._lens.repeat_interleave(repeats)
        if self.prev_embedding is not None:
            self.prev_embedding = self.prev_embedding.repeat_interleave(repeats, dim=0)

    # -- rollback -------------------------------------------------------------------------------------------
    @property
    def is_croppable(self) -> bool:
        """Cropping is exact only without the smear (its state holds just the last token) and when no slot
        a remaining query needs was overwritten; with the smear on (every nanochat model) it never is."""
        return not self.use_smear

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` columns (a negative value removes that many), where that is exact."""
        if self.use_smear:
            raise ValueError(
                "NanoChatCache cannot be cropped: the smear state only holds the last token's embedding. "
                "Assisted/speculative decoding is not supported for NanoChat models with smear."
            )
        target = self._seen + max_length if max_length < 0 else min(max_length, self._seen)
        remove = self._seen - target
        if remove == 0:
            return
        if self._min_len != self._max_len or self._max_len != self._seen:
            raise ValueError("NanoChatCache.crop needs unpadded rows of equal length")
        for layer in self.layers:
            # the slots still needed by a query at `target` are [target - window, target)
            if self._seen > layer.capacity and self._seen - layer.capacity > max(target - layer.window, 0):
                raise ValueError(
                    f"NanoChatCache.crop to {target}: layer with window {layer.window} already overwrote tokens "
                    "that a query there would need"
                )
        self._lens = torch.full_like(self._lens, target)
        self._min_len = self._max_len = self._seen = target
