"""
Fake of exllamav3/generator/job.py.

Mirrors the real Job's constructor, queue preparation (cache-size checks, max_new_tokens capping, max_rq_tokens
alignment), chunked prefill with "prefill" events, and receive_sample()'s streaming/EOS logic: stop tokens, stop
strings (with held text while a stop string may still complete), max_new_tokens, loop detection and requeueing.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Any

from .._fake import FAULT_PREFILL, FakeTensor, as_id_rows, partial_strings_match
from ..constants import PAGE_SIZE
from .loop_detect import LoopDetector
from .pagetable import chain_hashes
from .sampler import DefaultSampler, Sampler

if TYPE_CHECKING:
    from .generator import Generator


class Job:

    def __init__(
        self,
        input_ids: Any,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        max_skips: int | None = 4,
        sampler: Sampler | None = None,
        seed: int | None = None,
        stop_conditions: list | tuple | set | None = None,
        decode_special_tokens: bool = False,
        return_top_tokens: int = 0,
        return_logits: bool = False,
        return_probs: bool = False,
        filters: list | None = None,
        token_healing: bool = False,
        identifier: object | None = None,
        banned_strings: list[str] | None = None,
        embeddings: list | None = None,
        max_rq_tokens: int | None = None,
        stop_on_loop: tuple[int, int] | None = None,
        rq_state: dict | None = None,
        **kwargs: Any,
    ):
        items = input_ids if isinstance(input_ids, list) else list(input_ids)
        assert all(ids.device.type == "cpu" for ids in items), \
            "input_ids must reside in system memory"

        if filters:
            raise NotImplementedError("fake exllamav3: filters are not simulated")
        if banned_strings:
            raise NotImplementedError("fake exllamav3: banned_strings are not simulated")
        if embeddings:
            raise NotImplementedError("fake exllamav3: multimodal embeddings are not simulated")
        if return_top_tokens or return_logits:
            raise NotImplementedError("fake exllamav3: return_top_tokens/return_logits are not simulated")

        if rq_state is None:
            rq_state = {}
            self.is_requeued = False
            self.rq_new_tokens = 0
        else:
            self.is_requeued = True
            self.rq_new_tokens = rq_state["rq_new_tokens"]

        self.generator: Generator | None = None
        self.pagetable: Any = None
        self.serial_number: int | None = None
        self.identifier = identifier
        self.max_skips = max_skips
        self.skips = 0

        if sampler is None:
            sampler = DefaultSampler()

        self.held_text: str = rq_state.get("held_text", "")
        self.held_tokens: list[int] = rq_state.get("held_tokens", [])
        self.held_probs: list[float] = rq_state.get("held_probs", [])
        self.full_completion: str = rq_state.get("full_completion", "")
        self.seed = seed

        seqs = input_ids if isinstance(input_ids, list) else [input_ids]
        if token_healing and all(ids.shape[-1] > 1 for ids in seqs):
            raise NotImplementedError("fake exllamav3: token_healing is not simulated")
        self.prefix_token = None

        self.sequences_ids: list[list[int]] = []
        for ids in seqs:
            assert ids.shape[-1] > 0, \
                "Input IDs cannot be empty."
            assert ids.shape[0] == 1, \
                "input_ids must be [1, seq_len] tensor or list of [1, seq_len] tensors"
            self.sequences_ids.append(as_id_rows(ids)[0])
        assert len(self.sequences_ids) == 1, \
            "A job holds exactly one sequence (multi-sequence jobs are not supported)"
        self.input_ids: list[int] = list(self.sequences_ids[0])
        self.sequence_ids: list[int] = self.sequences_ids[0]

        assert max_new_tokens is None or max_new_tokens >= 1, "max_new_tokens must be >= 1, or None for no limit"
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.new_tokens = 0
        self.sampler = sampler
        self.rng = rq_state.get("rng")
        if self.rng is None:
            self.rng = random.Random() if seed is None else random.Random(seed)
        self.orig_max_rq_tokens = max_rq_tokens
        self.max_rq_tokens = max_rq_tokens
        self.rq_margin = 0
        self.rq_headroom = 0

        self.decode_special_tokens = decode_special_tokens
        self.return_top_tokens = return_top_tokens
        self.return_logits = return_logits
        self.return_probs = return_probs

        # Stop conditions (the fake keeps stop strings in the given order; the real one keeps a set)
        self.stop_strings: dict[str, None] = dict(rq_state.get("stop_strings", {}))
        self.stop_tokens: set[int] = set(rq_state.get("stop_tokens", set()))
        if stop_conditions is not None:
            if isinstance(stop_conditions, (str, int)):
                stop_conditions = [stop_conditions]
            for t in stop_conditions:
                if isinstance(t, int):
                    self.stop_tokens.add(t)
                elif isinstance(t, str):
                    self.stop_strings[t] = None
                else:
                    raise ValueError("Unsupported type in stop_conditions")
        self.stop_tokens_list = list(self.stop_tokens)
        self.stop_strings_list = [s for s in self.stop_strings if s]
        self.stop_string_max_length = max([0] + [len(x) for x in self.stop_strings_list])

        self.banned_strings: list[str] = []
        self.filters: list = []
        self.embeddings: list = []

        # Metrics
        self.time_enqueue: float | None = None
        self.time_first_prefill: float | None = None
        self.time_first_token: float | None = None
        self.time_last_token: float | None = None
        self.time_enqueued: float = rq_state.get("time_enqueued", 0.0)
        self.time_prefill: float = rq_state.get("time_prefill", 0.0)
        self.time_generate: float = rq_state.get("time_generate", 0.0)
        self.accepted_draft_tokens = 0
        self.rejected_draft_tokens = 0
        self.rq_prompt_tokens: int | None = rq_state.get("prompt_tokens")
        self.rq_cached: tuple[int, int] | None = rq_state.get("cached")
        self.cached_pages = 0
        self.cached_tokens = 0
        self.is_finished = False

        # Paging state (set by prepare_for_queue / allocate_pages)
        self.page_hashes: list = []
        self.new_unique_pages = 0
        self.kv_position = 0
        self.prefill_complete = False
        self.allocated = False

        self.loop_detector = None
        self.stop_on_loop = stop_on_loop
        if stop_on_loop:
            window_size, min_reps = stop_on_loop
            assert window_size > 1, "Loop detector window size cannot be less than 1"
            assert 1 < min_reps < window_size, "Number of reps must be > 1, < window_size"
            self.loop_detector = LoopDetector(window_size, window_size // min_reps)

        self._fake_prompt_text = ""

    def __repr__(self) -> str:
        if self.serial_number is None:
            return "Generator job (new)"
        return f"Generator job #{self.serial_number}"

    # -- queueing

    def prepare_for_queue(self, generator: Generator, serial_number: int, rq: bool = False) -> None:
        self.serial_number = serial_number
        self.generator = generator
        self.pagetable = generator.pagetable
        self.skips = 0

        room = generator.max_total_tokens - len(self.input_ids) - 1 - generator.max_draft_tokens
        if self.max_new_tokens is None:
            self.max_new_tokens = max(1, room)
        elif room >= 1:
            self.max_new_tokens = min(self.max_new_tokens, room)

        if self.max_rq_tokens is not None:
            x = len(self.input_ids)
            y = (x - 1 + self.max_rq_tokens + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
            y = min(y, generator.max_total_tokens - generator.max_draft_tokens)
            self.max_rq_tokens = max(1, y - x)
            self.rq_margin = 0
            self.rq_headroom = generator.max_draft_tokens
        else:
            self.max_rq_tokens = self.max_new_tokens + 1 + generator.max_draft_tokens
            self.rq_margin = generator.max_draft_tokens
            self.rq_headroom = 0

        # Pages: full prompt pages (all but the last prompt token) are content-hashed; the rest are fresh pages
        seq_len = len(self.sequence_ids)
        max_len = seq_len + self.max_rq_tokens + self.rq_headroom
        context_pages = (seq_len - 1) // PAGE_SIZE
        total_pages = (max_len + PAGE_SIZE - 1) // PAGE_SIZE
        self.page_hashes = chain_hashes(self.sequence_ids, context_pages)
        self.new_unique_pages = total_pages - context_pages

        total_pages_required = len(set(self.page_hashes)) + self.new_unique_pages
        max_pages = self.pagetable.max_pages
        assert total_pages_required <= max_pages, \
            f"Job requires {total_pages_required} pages (only {max_pages} available) and cannot " + \
            f"be enqueued. Total cache allocated is {max_pages} * {PAGE_SIZE} = " + \
            f"{generator.max_total_tokens} tokens"
        assert 1 <= generator.max_batch_size, \
            "Job requires a minimum batch size of 1. Max supported batch size in" + \
            f"generator is {generator.max_batch_size}."

        if not rq:
            self.held_text = ""
            self.held_tokens = []
            self.held_probs = []
            self.full_completion = ""

        self.time_enqueue = time.time()
        pieces = generator.tokenizer.get_id_to_piece_list(True)
        self._fake_prompt_text = "".join(pieces[t] if 0 <= t < len(pieces) else "" for t in self.input_ids)

    def current_new_pages_required(self) -> int:
        new_pages = sum(1 for h in set(self.page_hashes) if h not in self.pagetable.referenced)
        return new_pages + self.new_unique_pages

    def activate(self) -> None:
        pass

    def allocate_pages(self) -> None:
        cached = self.pagetable.allocate_pages(self)
        self.allocated = True
        self.cached_pages += cached
        self.kv_position = cached * PAGE_SIZE
        self.prefill_complete = False

    def deallocate_pages(self) -> None:
        if not self.allocated:
            return
        self.allocated = False
        full_pages = self.kv_position // PAGE_SIZE
        generated = []
        if full_pages > len(self.page_hashes):
            start_hash = self.page_hashes[-1] if self.page_hashes else None
            generated = chain_hashes(self.sequence_ids, full_pages, start_hash, len(self.page_hashes))
        self.pagetable.deallocate_pages(self, generated)

    def is_prefill_done(self) -> bool:
        return self.kv_position == len(self.sequence_ids) - 1

    # -- prefill

    def prefill(self, results: list, chunk_size: int | None = None) -> None:
        assert self.generator is not None
        if self.time_first_prefill is None:
            self.time_first_prefill = time.time()

        progress = 0
        if not self.prefill_complete:
            pt = self.pagetable
            seq_len = len(self.sequence_ids)
            prefill_start = self.kv_position
            prefill_end = self.kv_position + self.generator.max_chunk_size
            prefill_end = (prefill_end // PAGE_SIZE) * PAGE_SIZE
            prefill_end = min(prefill_end, seq_len - 1)

            # Skip prompt pages another job has filled since allocation
            p0 = prefill_start // PAGE_SIZE
            p1 = (prefill_end + PAGE_SIZE - 1) // PAGE_SIZE
            for idx in range(p0, p1):
                if idx < len(self.page_hashes) and self.page_hashes[idx] in pt.filled:
                    prefill_start = (idx + 1) * PAGE_SIZE
                    self.kv_position = prefill_start
                    self.cached_pages += 1
                else:
                    break
            for idx in range(prefill_start // PAGE_SIZE, p1):
                if idx < len(self.page_hashes) and self.page_hashes[idx] in pt.filled:
                    prefill_end = idx * PAGE_SIZE
                    break

            if chunk_size is not None:
                prefill_end = min(prefill_end, (prefill_start + chunk_size) // PAGE_SIZE * PAGE_SIZE)

            if prefill_end > prefill_start:
                if FAULT_PREFILL in self._fake_prompt_text:
                    raise RuntimeError("fake exllamav3: injected prefill failure (" + FAULT_PREFILL + " in prompt)")
                for idx in range(prefill_start // PAGE_SIZE, prefill_end // PAGE_SIZE):
                    if idx < len(self.page_hashes):
                        pt.mark_filled(self.page_hashes[idx])
                self.kv_position = prefill_end
                progress += prefill_end - prefill_start
                if self.kv_position >= seq_len - 1:
                    self.prefill_complete = True

        if progress:
            r = {
                "job": self,
                "stage": "prefill",
                "eos": False,
                "curr_progress": self.kv_position,
                "max_progress": len(self.sequence_ids) - 1,
                "serial": self.serial_number,
            }
            if self.identifier is not None:
                r.update({"identifier": self.identifier})
            results.append(r)

    # -- sampling

    def blocked_tokens(self) -> frozenset[int]:
        if self.new_tokens < self.min_new_tokens:
            return frozenset(self.stop_tokens)
        return frozenset()

    def receive_sample(self, next_token: int, results: list) -> tuple[bool, int, bool]:
        """Accept one sampled token; append stream events to results. Returns (eos, token, requeue)."""
        assert self.generator is not None and self.max_rq_tokens is not None
        tokenizer = self.generator.tokenizer

        self.new_tokens += 1
        requeue_now = self.new_tokens > self.max_rq_tokens - self.rq_margin
        self.sequence_ids.append(next_token)
        self.kv_position += 1

        def emit(
            results_: list,
            emit_eos: bool = False,
            eos_reason: str | None = None,
            emit_held: bool = False,
            stop_token: int | None = None,
            stop_string: str | None = None,
            rem_held_text: str | None = None,
        ) -> tuple[bool, int, bool]:
            nonlocal requeue_now
            if emit_eos:
                requeue_now = False

            r: dict[str, Any] = {
                "job": self,
                "stage": "streaming",
                "eos": emit_eos,
                "serial": self.serial_number,
            }
            if eos_reason is not None:
                r.update({"eos_reason": eos_reason})
                if eos_reason == "stop_token":
                    assert stop_token is not None
                    id_to_piece = tokenizer.get_id_to_piece_list(True)
                    r.update({
                        "eos_triggering_token_id": stop_token,
                        "eos_triggering_token_str": id_to_piece[stop_token],
                    })
                if eos_reason == "stop_string":
                    r.update({"eos_triggering_string": stop_string})

            if requeue_now:
                r.update({"requeue": True})

            if emit_held:
                if self.held_text != "":
                    self.full_completion += self.held_text
                    r.update({"text": self.held_text})
                    self.held_text = ""
                if self.held_tokens:
                    r.update({"token_ids": FakeTensor.ids(self.held_tokens)})
                    self.held_tokens = []
                if self.held_probs:
                    r.update({"token_probs": FakeTensor([list(self.held_probs)], "float32")})
                    self.held_probs = []

            if emit_eos or requeue_now:
                self.time_last_token = time.time()
                assert self.time_first_prefill is not None and self.time_enqueue is not None
                assert self.time_first_token is not None
                self.time_enqueued += self.time_first_prefill - self.time_enqueue
                self.time_prefill += self.time_first_token - self.time_first_prefill
                self.time_generate += self.time_last_token - self.time_first_token

            if emit_eos:
                self.is_finished = True
                cached = self.rq_cached if self.rq_cached is not None else (
                    self.cached_pages,
                    self.cached_pages * PAGE_SIZE + self.cached_tokens,
                )
                r.update({
                    "full_completion": self.full_completion,
                    "new_tokens": self.rq_new_tokens + self.new_tokens,
                    "prompt_tokens": self.rq_prompt_tokens or len(self.input_ids),
                    "time_enqueued": self.time_enqueued,
                    "time_prefill": self.time_prefill,
                    "time_generate": self.time_generate,
                    "cached_pages": cached[0],
                    "cached_tokens": cached[1],
                })
                if eos_reason == "stop_string":
                    self.held_text = rem_held_text or ""
                rh: dict[str, Any] = {}
                if self.held_text:
                    rh.update({"text": self.held_text})
                if self.held_tokens:
                    rh.update({"token_ids": FakeTensor.ids(self.held_tokens)})
                if self.held_probs:
                    rh.update({"token_probs": FakeTensor([list(self.held_probs)], "float32")})
                if rh:
                    r.update({"held": rh})

            if self.identifier is not None:
                r.update({"identifier": self.identifier})

            results_.append(r)
            return emit_eos, next_token, requeue_now

        id_to_piece = tokenizer.get_id_to_piece_list(self.decode_special_tokens)
        new_text = id_to_piece[next_token]
        self.held_text += new_text
        self.held_tokens.append(next_token)
        if self.return_probs:
            self.held_probs.append(1.0)

        if next_token in self.stop_tokens:
            return emit(results, emit_eos=True, eos_reason="stop_token", stop_token=next_token)

        assert self.max_new_tokens is not None
        if self.new_tokens >= self.max_new_tokens:
            return emit(results, emit_eos=True, emit_held=True, eos_reason="max_new_tokens")

        if self.stop_strings_list:
            match = partial_strings_match(self.held_text, self.stop_strings_list)
            if match >= 0:
                held = self.held_text[match:]
                self.held_text = self.held_text[:match]
                for s in self.stop_strings_list:
                    if held.startswith(s):
                        return emit(
                            results,
                            emit_eos=True,
                            emit_held=True,
                            eos_reason="stop_string",
                            stop_string=s,
                            rem_held_text=held,
                        )
                raise AssertionError("Detected stop string but couldn't identify it (logic error)")
            if match == -2:
                return emit(results)

        if self.loop_detector:
            if self.loop_detector.feed_many(list(self.held_tokens)):
                return emit(results, emit_eos=True, emit_held=True, eos_reason="loop_detected")

        return emit(results, emit_held=True)

    # -- requeue

    def prepare_for_requeue(self) -> Job:
        assert self.generator is not None and self.serial_number is not None and self.max_new_tokens is not None
        last_completed_tokens = len(self.sequence_ids) - len(self.input_ids)
        new_input = FakeTensor.ids(self.sequence_ids)
        rq_state = {
            "rng": self.rng,
            "stop_strings": self.stop_strings,
            "stop_tokens": self.stop_tokens,
            "held_text": self.held_text,
            "held_tokens": self.held_tokens,
            "held_probs": self.held_probs,
            "full_completion": self.full_completion,
            "time_enqueued": self.time_enqueued,
            "time_prefill": self.time_prefill,
            "time_generate": self.time_generate,
            "rq_new_tokens": self.rq_new_tokens + self.new_tokens,
            "prompt_tokens": self.rq_prompt_tokens or len(self.input_ids),
            "cached": self.rq_cached if self.rq_cached is not None else (
                self.cached_pages, self.cached_pages * PAGE_SIZE + self.cached_tokens),
        }
        serial_number = self.serial_number
        generator = self.generator
        self.__init__(  # type: ignore[misc]
            input_ids=new_input,
            max_new_tokens=self.max_new_tokens - last_completed_tokens,
            min_new_tokens=max(self.min_new_tokens - last_completed_tokens, 0),
            sampler=self.sampler,
            decode_special_tokens=self.decode_special_tokens,
            return_probs=self.return_probs,
            identifier=self.identifier,
            max_rq_tokens=self.orig_max_rq_tokens,
            stop_on_loop=self.stop_on_loop,
            rq_state=rq_state,
        )
        self.prepare_for_queue(generator, serial_number, rq=True)
        return self
