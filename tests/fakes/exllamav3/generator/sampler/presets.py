"""Fake of exllamav3/generator/sampler/presets.py (same constructors and argument checks)."""

from __future__ import annotations

from .custom import (
    SS_DRY,
    CustomSampler,
    SS_AdaptiveP,
    SS_Argmax,
    SS_LogitBias,
    SS_MinP,
    SS_PresFreqP,
    SS_RepP,
    SS_Sample,
    SS_Temperature,
    SS_TopK,
    SS_TopP,
)


class DefaultSampler(CustomSampler):
    def __init__(self) -> None:
        super().__init__([SS_MinP(0.08), SS_Temperature(0.8), SS_Sample()])


class ArgmaxSampler(CustomSampler):
    def __init__(self) -> None:
        super().__init__([SS_Argmax()])


GreedySampler = ArgmaxSampler


class CategoricalSampler(CustomSampler):
    def __init__(self, temperature: float = 1.0):
        if temperature == 0:
            super().__init__([SS_Argmax()])
        else:
            super().__init__([SS_Temperature(temperature), SS_Sample()])


GumbelSampler = CategoricalSampler


class TopKSampler(CustomSampler):
    def __init__(self, top_k: int, temperature: float = 1.0):
        assert top_k >= 1
        if top_k == 1 or temperature == 0:
            super().__init__([SS_Argmax()])
        else:
            super().__init__([SS_Temperature(temperature), SS_TopK(top_k), SS_Sample()])


class TopPSampler(CustomSampler):
    def __init__(self, top_p: float, temperature: float = 1.0, temperature_last: bool = False):
        if top_p == 0 or temperature == 0:
            super().__init__([SS_Argmax()])
        elif temperature_last:
            super().__init__([SS_TopP(top_p), SS_Temperature(temperature), SS_Sample()])
        else:
            super().__init__([SS_Temperature(temperature), SS_TopP(top_p), SS_Sample()])


class ComboSampler(CustomSampler):
    def __init__(
        self,
        rep_p: float = 1.0,
        freq_p: float = 0.0,
        pres_p: float = 0.0,
        rep_sustain_range: int = int(10e7),
        rep_decay_range: int = 0,
        dry_multiplier: float = 0.0,
        dry_base: float = 1.75,
        dry_allowed_length: int = 2,
        dry_range: int = 0,
        dry_sequence_breakers: frozenset[int] | set[int] | list[int] | None = None,
        temperature: float = 1.0,
        min_p: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        temp_last: bool = False,
        adaptive_target: float = 1.0,
        adaptive_decay: float = 0.9,
        logit_bias: dict[int, float] | None = None,
    ):
        stack = [
            SS_LogitBias(logit_bias or {}),
            SS_RepP(rep_p, rep_sustain_range, rep_decay_range),
            SS_PresFreqP(pres_p, freq_p, rep_sustain_range, rep_decay_range),
            SS_DRY(dry_multiplier, dry_base, dry_allowed_length, dry_range, dry_sequence_breakers),
        ]
        if temperature == 0.0 or top_k == 1:
            stack += [SS_Argmax()]
        else:
            stack += [
                SS_Temperature(temperature if not temp_last else 1.0),
                SS_MinP(min_p),
                SS_TopK(top_k),
                SS_TopP(top_p),
                SS_Temperature(temperature if temp_last else 1.0),
            ]
            if adaptive_target != 1.0:
                stack += [SS_AdaptiveP(adaptive_target, adaptive_decay)]
            else:
                stack += [SS_Sample()]
        super().__init__(stack)
        # Fake-only: keep the requested settings visible for tests
        self.settings = dict(
            rep_p=rep_p, freq_p=freq_p, pres_p=pres_p, temperature=temperature, min_p=min_p, top_k=top_k,
            top_p=top_p, temp_last=temp_last, dry_multiplier=dry_multiplier, logit_bias=logit_bias,
        )


class AdaptivePSampler(CustomSampler):
    def __init__(self, min_p: float = 0.08, target: float = 0.5, decay: float = 0.9):
        super().__init__([SS_MinP(min_p), SS_AdaptiveP(target, decay)])
