"""NanoChatCache: per-layer window-bounded KV cache plus the smear state.

nanochat's layers attend over finite windows (FA3 convention (w, 0): a query sees itself and the w
keys before it), so every layer keeps at most its own window of past keys; memory for a short-window
layer is bounded by that window, not by the context. The smear needs one more piece of state per
row: the previous token's normed embedding (`prev_embedding`), which must follow the rows through
beam reordering and `num_return_sequences` expansion exactly like the keys and values do.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicSlidingWindowLayer

from .configuration_nanochat import NanoChatConfig


class NanoChatCache(DynamicCache):
    """A `DynamicCache` whose layer `i` keeps the last `layer_windows[i]` keys, plus the smear state.

    transformers' sliding layers use the "W keys including the query" convention, so a nanochat window
    w becomes `DynamicSlidingWindowLayer(sliding_window=w + 1)` (it keeps w past keys).
    """

    def __init__(self, config: NanoChatConfig, offloading: bool = False):
        layers = [DynamicSlidingWindowLayer(sliding_window=w + 1) for w in config.layer_windows]
        # DynamicCache's own constructor derives layers from `layer_types`; ours come from the windows
        Cache.__init__(self, layers=layers, offloading=offloading, offload_only_non_sliding=False)
        self.prev_embedding: torch.Tensor | None = None

    # -- smear state follows every batch manipulation of the keys/values --------------------------
    def reset(self) -> None:
        super().reset()
        self.prev_embedding = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.prev_embedding is not None:
            self.prev_embedding = self.prev_embedding.index_select(0, beam_idx.to(self.prev_embedding.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.prev_embedding is not None:
            self.prev_embedding = self.prev_embedding.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.prev_embedding is not None:
            self.prev_embedding = self.prev_embedding[indices, ...]

    def crop(self, max_length: int) -> None:
        # Cropping would need the embedding of the token before the new end, which is not kept.
        raise NotImplementedError(
            "NanoChatCache cannot be cropped: the smear state only holds the last token's embedding. "
            "Assisted/speculative decoding is not supported for NanoChat models."
        )

    @property
    def is_croppable(self) -> bool:
        return False
