from .cache import Cache, CacheLayer
from .fp16 import CacheLayer_fp16
from .quant import CacheLayer_quant

__all__ = ["Cache", "CacheLayer", "CacheLayer_fp16", "CacheLayer_quant"]
