"""
CPU fake of exllamav3 1.6.5 for tests (see NOTES.md). Install it as `exllamav3` with
tests/fakes/exllamav3_model.py:installed_fake_exllamav3(); never import it next to the real package.

Same top-level names as the real exllamav3/__init__.py (which first imports torch and JIT-builds the CUDA
extension; the fake needs neither). The real one ends with `from .generator.sampler import *`; the fake lists
those names explicitly.
"""

from .cache import Cache, CacheLayer_fp16, CacheLayer_quant
from .generator import AsyncGenerator, AsyncJob, Filter, FormatronFilter, Generator, Job, LLGuidanceFilter
from .generator.sampler import (
    SS_DRY,
    SS_XTC,
    AdaptivePSampler,
    ArgmaxSampler,
    CategoricalSampler,
    ComboSampler,
    CustomSampler,
    DefaultSampler,
    GreedySampler,
    GumbelSampler,
    Sampler,
    SS_AdaptiveP,
    SS_Argmax,
    SS_BanTokens,
    SS_Base,
    SS_LogitBias,
    SS_MinP,
    SS_NoOp,
    SS_Normalize,
    SS_PresFreqP,
    SS_RepP,
    SS_Sample,
    SS_Sample_mn,
    SS_Sort,
    SS_Temperature,
    SS_TopK,
    SS_TopP,
    TopKSampler,
    TopPSampler,
)
from .model.config import Config
from .model.model import Model
from .tokenizer import MMEmbedding, Tokenizer

FAKE_EXLLAMAV3 = True

__all__ = [
    "Config", "Model", "Tokenizer", "MMEmbedding", "Cache", "CacheLayer_fp16", "CacheLayer_quant",
    "Generator", "Job", "AsyncGenerator", "AsyncJob", "Filter", "FormatronFilter", "LLGuidanceFilter",
    "Sampler", "CustomSampler", "SS_Base", "SS_Argmax", "SS_Sample", "SS_Sample_mn", "SS_Temperature",
    "SS_Normalize", "SS_Sort", "SS_MinP", "SS_TopK", "SS_TopP", "SS_NoOp", "SS_RepP", "SS_PresFreqP", "SS_DRY",
    "SS_AdaptiveP", "SS_BanTokens", "SS_LogitBias", "SS_XTC", "DefaultSampler", "ArgmaxSampler", "GreedySampler",
    "CategoricalSampler", "GumbelSampler", "TopKSampler", "TopPSampler", "ComboSampler", "AdaptivePSampler",
    "FAKE_EXLLAMAV3",
]
