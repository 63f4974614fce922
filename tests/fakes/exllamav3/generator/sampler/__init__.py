from .custom import (
    SS_DRY,
    SS_XTC,
    CustomSampler,
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
)
from .presets import (
    AdaptivePSampler,
    ArgmaxSampler,
    CategoricalSampler,
    ComboSampler,
    DefaultSampler,
    GreedySampler,
    GumbelSampler,
    TopKSampler,
    TopPSampler,
)
from .sampler import Sampler

__all__ = [
    "Sampler", "CustomSampler", "SS_Base", "SS_Argmax", "SS_Sample", "SS_Sample_mn", "SS_Temperature",
    "SS_Normalize", "SS_Sort", "SS_MinP", "SS_TopK", "SS_TopP", "SS_NoOp", "SS_RepP", "SS_PresFreqP", "SS_DRY",
    "SS_AdaptiveP", "SS_BanTokens", "SS_LogitBias", "SS_XTC", "DefaultSampler", "ArgmaxSampler", "GreedySampler",
    "CategoricalSampler", "GumbelSampler", "TopKSampler", "TopPSampler", "ComboSampler", "AdaptivePSampler",
]
