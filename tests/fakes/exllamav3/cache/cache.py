"""Fake of exllamav3/cache/cache.py."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..model.model import Model


class CacheLayer:
    """Real: abstract per-layer K/V storage (exllamav3/cache/cache.py)."""

    def __init__(self, config: Any, attention: Any, cache_id: int, max_num_tokens: int, **kwargs: Any):
        self.config = config
        self.attention = attention
        self.cache_id = cache_id
        self.max_num_tokens = max_num_tokens


class Cache:

    def __init__(
        self,
        model: Model,
        max_num_tokens: int,
        layer_type: type[CacheLayer] | None = None,
        max_batch_size: int = 16,
        max_history: int = 0,
        recurrent_dtype: Any = None,
        **kwargs: Any,
    ):
        """
        Real: Cache(model, max_num_tokens, layer_type=CacheLayer_fp16 | CacheLayer_quant, ..., k_bits=, v_bits=).
        Extra kwargs go to layer_type(config, attn, id(cache), max_num_tokens, **kwargs) for every attention layer,
        so k_bits/v_bits with the fp16 layer raise TypeError, and the quant layer without them raises TypeError.
        max_num_tokens % 256 != 0 -> AssertionError("max_num_tokens must be a multiple of 256.").
        The cache registers itself with the model; its tensors exist only after a later model.load()
        (cache.initialized). A cache built after load() stays uninitialized and Generator.iterate() asserts.
        """
        from .fp16 import CacheLayer_fp16

        self.model = model
        self.initialized = False
        self.owner_serial = 0  # bumped by every Generator created over this cache
        self.config = model.config
        self.max_num_tokens = max_num_tokens
        self.layer_type = layer_type or CacheLayer_fp16

        cl = self.model.get_cache_layers()
        self.num_layers = len(cl)
        self.layers: dict = {}
        for attn in cl:
            assert attn.layer_idx is not None
            for instance in self.model.get_layer_instances(attn.layer_idx):
                self.layers[instance] = self.layer_type(self.config, attn, id(self), self.max_num_tokens, **kwargs)

        self.num_slots = max_batch_size
        self.max_history = max_history
        self.recurrent_state_cls = None
        self.num_recurrent_layers = 0
        self.recurrent_layers: dict = {}
        self.recurrent_instances: dict = {}
        self.attach_to_model()

    def attach_to_model(self, model: Model | None = None) -> None:
        if model is None:
            model = self.model
        model.cache_weakrefs[id(self)] = weakref.ref(self)

    def detach_from_model(self, model: Model | None = None) -> None:
        if model is None:
            model = self.model
        del model.cache_weakrefs[id(self)]

    def reset_states(self) -> None:
        pass
