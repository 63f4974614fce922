"""Fake of exllamav3/model/model.py (Model.from_config, load/load_gen, unload)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .._fake import FakeVocab, fallback_order, successor
from .config import Config


class _FakeModule:
    def __init__(self, key: str, layer_idx: int | None = None):
        self.key = key
        self.layer_idx = layer_idx
        self.device: str | None = None
        self.modules: list = []

    def __iter__(self) -> Iterator[_FakeModule]:
        yield self


class Model:
    """
    Real: Model(config) is abstract per architecture; construct it with Model.from_config(config).
    Loading (load()/load_gen()) allocates the tensors of every Cache attached to the model and sets
    cache.initialized = True; unload() frees them and sets cache.initialized = False.
    """

    def __init__(self, config: Config, **kwargs: Any):
        self.config = config
        self.caps: dict[str, Any] = {"supports_tp": True}
        self.active_devices: list = []
        self.output_device: Any = None
        self.cache_weakrefs: dict = {}
        self.recurrent_state_cls = None
        self.draft_verifier_params: dict = {}
        self.loaded_tp = False
        self.component = "text"

        self.modules: list[_FakeModule] = [_FakeModule("model.embed_tokens")]
        self.first_block_idx = len(self.modules)
        self.modules += [_FakeModule(f"model.layers.{i}", i) for i in range(config.num_hidden_layers)]
        self.last_kv_module_idx = len(self.modules) - 1
        self.modules += [_FakeModule("model.norm"), _FakeModule("lm_head")]
        self.logit_layer_idx = len(self.modules) - 1

        # Fake "weights": the vocabulary the deterministic next-token rule works on
        self._fake_vocab = FakeVocab(config.directory)
        self._fake_fallback = fallback_order(self._fake_vocab)
        self._fake_loaded = False

    def __iter__(self) -> Iterator[_FakeModule]:
        for module in self.modules:
            yield from module

    @staticmethod
    def from_config(config: Config, component: str = "text", **kwargs: Any) -> Model:
        assert component in config.model_classes, \
            f"{config.architecture} does not define a '{component}' component model"
        model = config.model_classes[component](config, **kwargs)
        model.component = component
        return model

    # Cache attachment (used by the fake Cache)
    def get_cache_layers(self) -> list[_FakeModule]:
        return [m for m in self.modules if m.layer_idx is not None]

    def get_recurrent_layers(self) -> list:
        return []

    def get_layer_instances(self, layer_idx: int) -> tuple:
        return ((layer_idx, 0),)

    def load_gen(
        self,
        device: Any = None,
        tp_output_device: Any = None,
        reserve_per_device: list[float] | float | None = None,
        use_per_device: list[float] | float | None = None,
        tensor_p: bool = False,
        progressbar: bool = False,
        max_chunk_size: int = 2048,
        max_output_size: int = 32,
        max_output_factor: int = 1,
        callback: Callable[[int, int], None] | None = None,
        generator: bool = True,
        tp_dev_limits: dict | None = None,
        tp_backend: str = "native",
        verbose: bool = False,
        max_batch_size: int = 1,
        tp_options: dict | None = None,
        autosplit_no_forward: bool = False,
        draft_model: Model | None = None,
    ) -> Iterator[tuple[int, int]]:
        """
        Real: generator function; in autosplit mode (device=None, tensor_p=False) it calls
        callback(idx, num_modules) and (generator=True) yields (idx, num_modules) per module, then
        (num_modules, num_modules). device="cuda:0" loads to one device without callback/yields.
        """
        assert not (bool(reserve_per_device) and bool(use_per_device)), \
            "Cannot specify both memory usage and memory reserve."
        assert max_chunk_size >= 1, "max_chunk_size must be positive"
        assert max_output_size >= 1, "max_output_size must be positive"
        assert max_output_factor >= 1, "max_output_factor must be positive"

        n = len(self.modules)
        if device is not None:
            assert not bool(reserve_per_device) and not bool(use_per_device), \
                "Cannot specify reserve_per_device or use_per_device when loading to single device."
            assert not tensor_p, \
                "Cannot use tensor_p when loading to single device."
            for m in self.modules:
                m.device = str(device)
            self.output_device = str(device)
        else:
            for idx, m in enumerate(self.modules):
                m.device = "cuda:0"
                if callback:
                    callback(idx, n)
                if generator:
                    yield idx, n
            if callback:
                callback(n, n)
            if generator:
                yield n, n
            self.output_device = "cuda:0"
            if tensor_p:
                self.loaded_tp = True
        self.active_devices = [self.output_device]
        self._fake_loaded = True
        for ref in self.cache_weakrefs.values():
            cache = ref()
            if cache is not None:
                cache.initialized = True

    def load(self, *args: Any, **kwargs: Any) -> None:
        """Real: load(...) == exhausting load_gen(..., generator=False); same arguments as load_gen()."""
        kwargs["generator"] = False
        for _ in self.load_gen(*args, **kwargs):
            pass

    def unload(self) -> None:
        for m in self.modules:
            m.device = None
        self.active_devices = []
        self.loaded_tp = False
        self.output_device = None
        self._fake_loaded = False
        for ref in self.cache_weakrefs.values():
            cache = ref()
            if cache is not None:
                cache.initialized = False

    def get_name(self) -> str:
        return self.__class__.__name__

    # -- fake-only
    def _fake_next_token(self, sequence_ids: list[int], blocked: set[int] | frozenset[int] = frozenset()) -> int:
        """Greedy 'forward pass': successor of the last token, or the next fallback choice if it is masked."""
        nxt = successor(self._fake_vocab, sequence_ids[-1], self.config.eos_token_id)
        if nxt not in blocked:
            return nxt
        for t in self._fake_fallback:
            if t not in blocked:
                return t
        return nxt
