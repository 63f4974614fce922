"""
Fake of exllamav3/generator/sampler/custom.py: the sampling steps keep their constructor signatures and argument
assertions, but never run -- the fake model is deterministic (greedy), whatever the sampler.
"""

from __future__ import annotations

from typing import Any

from .sampler import Sampler


class SS_Base:
    def reqs_past_ids(self) -> bool:
        return False

    def reqs_torch_seed(self) -> bool:
        return False

    def alt(self) -> SS_Base | None:
        return None


class SS_NoOp(SS_Base):
    pass


class SS_Argmax(SS_Base):
    pass


class SS_Sample(SS_Base):
    pass


class SS_Sample_mn(SS_Sample):
    pass


class SS_Temperature(SS_Base):
    def __init__(self, temperature: float):
        self.temperature = temperature

    def alt(self) -> SS_Base | None:
        return SS_NoOp() if self.temperature == 1.0 else None


class SS_Normalize(SS_Base):
    pass


class SS_Sort(SS_Base):
    pass


class SS_MinP(SS_Base):
    def __init__(self, min_p: float):
        self.min_p = min_p
        assert 0.0 <= min_p <= 1.0

    def alt(self) -> SS_Base | None:
        return SS_NoOp() if self.min_p == 0.0 else None


class SS_TopK(SS_Base):
    def __init__(self, top_k: int):
        assert isinstance(top_k, int) or top_k.is_integer(), "top_k value must be integer"
        self.top_k = int(top_k)

    def alt(self) -> SS_Base | None:
        return SS_NoOp() if self.top_k < 1 else None


class SS_TopP(SS_Base):
    def __init__(self, top_p: float):
        self.top_p = top_p
        assert 0.0 <= top_p <= 1.0

    def alt(self) -> SS_Base | None:
        return SS_NoOp() if self.top_p == 1.0 else None


class SS_RepP(SS_Base):
    def __init__(self, rep_p: float = 1.0, sustain_range: int = int(10e7), decay_range: int = 0):
        self.rep_p = rep_p
        self.sustain_range = sustain_range
        self.decay_range = decay_range

    def reqs_past_ids(self) -> bool:
        return True

    def alt(self) -> SS_Base | None:
        return SS_NoOp() if self.rep_p == 1.0 else None


class SS_PresFreqP(SS_Base):
    def __init__(self, pres_p: float = 0.0, freq_p: float = 0.0, sustain_range: int = int(10e7), decay_range: int = 0):
        self.pres_p = pres_p
        self.freq_p = freq_p
        self.sustain_range = sustain_range
        self.decay_range = decay_range

    def reqs_past_ids(self) -> bool:
        return True

    def alt(self) -> SS_Base | None:
        return SS_NoOp() if self.pres_p == 0.0 and self.freq_p == 0.0 else None


class SS_DRY(SS_Base):
    def __init__(self, dry_multiplier: float = 0.0, dry_base: float = 1.75, dry_allowed_length: int = 2,
                 dry_range: int = 0, dry_sequence_breakers: Any = None, tokenizer: Any = None):
        assert dry_multiplier >= 0.0, "dry_multiplier must be non-negative"
        assert isinstance(dry_allowed_length, int) or dry_allowed_length.is_integer(), \
            "dry_allowed_length must be integer"
        assert dry_allowed_length >= 0, "dry_allowed_length must be non-negative"
        assert isinstance(dry_range, int) or dry_range.is_integer(), "dry_range must be integer"
        self.dry_multiplier = float(dry_multiplier)
        self.dry_base = dry_base
        self.dry_allowed_length = int(dry_allowed_length)
        self.dry_range = int(dry_range)
        self.dry_sequence_breakers = dry_sequence_breakers

    def reqs_past_ids(self) -> bool:
        return True

    def alt(self) -> SS_Base | None:
        return SS_NoOp() if self.dry_multiplier == 0.0 or self.dry_base < 1.0 else None


class SS_AdaptiveP(SS_Base):
    def __init__(self, target: float = 1.0, decay: float = 0.0):
        self.target = target
        self.decay = decay


class SS_BanTokens(SS_Base):
    def __init__(self, token_ids: list[int]):
        self.token_ids = list(token_ids)


class SS_LogitBias(SS_Base):
    def __init__(self, logit_bias: dict[int, float]):
        self.logit_bias = dict(logit_bias)

    def alt(self) -> SS_Base | None:
        return SS_NoOp() if not self.logit_bias else None


class SS_XTC(SS_Base):
    def __init__(self, probability: float = 0.0, threshold: float = 0.1, *args: Any, **kwargs: Any):
        assert 0.0 <= probability <= 1.0
        assert 0.0 <= threshold <= 1.0
        self.probability = probability
        self.threshold = threshold


class CustomSampler(Sampler):
    def __init__(self, steps: list[SS_Base]):
        super().__init__()
        simplified = []
        for step in steps:
            alt = step.alt()
            if alt:
                step = alt
            if isinstance(step, SS_NoOp):
                continue
            self.reqs_past_ids = self.reqs_past_ids or step.reqs_past_ids()
            self.reqs_torch_seed = self.reqs_torch_seed or step.reqs_torch_seed()
            simplified.append(step)
        self.steps = simplified
