"""
Fake of exllamav3/generator/generator.py (the synchronous dynamic Generator).

Same scheduling as the real one: enqueue() prepares and appends to pending_jobs; each iterate() call
  1. starts pending jobs (queue order, bounded by max_batch_size and free cache pages, with max_skips fairness)
     -> one "started" result each,
  2. runs one prefill chunk for every active job still ingesting its prompt (shared_chunk_size/prefill_cooldown
     throttling while other jobs generate) -> "prefill" results,
  3. samples exactly one token for EVERY active job whose prefill is done (true batching) -> one "streaming"
     result per job, in active_jobs order; finished jobs leave the batch and free their pages.
The "model" is the deterministic successor rule in exllamav3/_fake.py.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .._fake import FAULT_ITERATE
from ..cache.cache import Cache
from ..constants import PAGE_SIZE
from ..model.model import Model
from ..tokenizer.tokenizer import Tokenizer
from .job import Job
from .pagetable import PageTable
from .sampler import Sampler

logger = logging.getLogger(__name__)


class Generator:

    def __init__(
        self,
        model: Model,
        cache: Cache,
        tokenizer: Tokenizer,
        max_batch_size: int = 256,
        max_chunk_size: int = 2048,
        shared_chunk_size: int | None = None,
        prefill_cooldown: int | None = 4,
        max_q_size: int = 8,
        draft_model: Model | None = None,
        draft_cache: Cache | None = None,
        num_draft_tokens: int | None = None,
        show_visualizer: bool = False,
        enable_defrag: bool = True,
        cpu_cache_size: int = 0,
        disk_cache_dir: str | None = None,
        disk_cache_size: int = 50 * 1024**3,
        disk_cache_flush_on_idle: bool = True,
        disk_cache_checkpoint_interval: int = 4096,
        disk_cache_write_interval: float = 2.0,
        recurrent_cache_size: int = 4 * 1024**3,
        recurrent_checkpoint_interval: int | None = None,
        recurrent_checkpoint_interval_pp: int = 32768,
        ngram_match_min: int = 0,
        dynamic_draft_tokens: bool = False,
        draft_confidence: float = 0.4,
        record_draft_stats: bool = False,
        ngram_corpus: str | None = None,
        hybrid_draft_tokens: int = 0,
        draft_max_rows: int = 0,
        sparse_draft_head: int = 0,
        **kwargs: Any,
    ):
        self.model = model
        self.cache = cache
        self.tokenizer = tokenizer
        cfg = self.model.config
        self.padded_vocab_size = ((cfg.vocab_size + 31) // 32) * 32

        self.pagetable = PageTable(self, cache)
        cache.owner_serial = getattr(cache, "owner_serial", 0) + 1
        self.cache_owner_serial = cache.owner_serial
        self.max_total_tokens = PAGE_SIZE * self.pagetable.max_pages

        if draft_model is not None or ngram_match_min or hybrid_draft_tokens:
            raise NotImplementedError("fake exllamav3: speculative decoding is not simulated")
        if ngram_corpus is not None:
            raise ValueError("ngram_corpus requires ngram_match_min > 0")
        self.draft_model = None
        self.draft_cache = None
        self.num_draft_tokens = 0
        self.ngram_match_min = 0
        self.hybrid_draft_tokens = 0
        self.max_draft_tokens = 0

        self.max_batch_size = max_batch_size
        self.max_chunk_size = max_chunk_size
        if shared_chunk_size is None:
            shared_chunk_size = (max_chunk_size // 2 + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
        assert 0 < shared_chunk_size <= max_chunk_size and shared_chunk_size % PAGE_SIZE == 0, \
            "shared_chunk_size must be a multiple of the page size (256) and no larger than max_chunk_size"
        if prefill_cooldown is None:
            prefill_cooldown = 4
        assert prefill_cooldown >= 0, \
            "prefill_cooldown must not be negative"
        self.shared_chunk_size = shared_chunk_size
        self.prefill_cooldown = prefill_cooldown
        self.prefill_cooldown_left = 0
        self.prefill_rotation = 0

        self.job_serial = 0
        self.pending_jobs: list[Job] = []
        self.active_jobs: list[Job] = []

        # The CPU tier only changes where evicted pages live, not what the generator emits: accepted and ignored
        if disk_cache_dir and not cpu_cache_size:
            raise ValueError("disk_cache_dir needs a CPU page cache tier to write through from (cpu_cache_size > 0)")
        self.cpu_page_cache = None
        self.disk_page_cache = None
        self.visualizer = None
        self.enable_defrag = enable_defrag
        self.recurrent_cache = None

        if recurrent_checkpoint_interval is None:
            recurrent_checkpoint_interval = 2048
        assert recurrent_checkpoint_interval % PAGE_SIZE == 0 and recurrent_checkpoint_interval_pp % PAGE_SIZE == 0, \
            "checkpoint interval must be a multiple of the page size (256)"
        self.recurrent_checkpoint_interval = recurrent_checkpoint_interval
        self.recurrent_checkpoint_interval_pp = recurrent_checkpoint_interval_pp

    # -- queue state

    def num_remaining_jobs(self) -> int:
        return len(self.pending_jobs) + len(self.active_jobs)

    def num_active_jobs(self) -> int:
        return len(self.active_jobs)

    def num_pending_jobs(self) -> int:
        return len(self.pending_jobs)

    def get_cache_stats(self) -> dict:
        pt = self.pagetable
        used = len(pt.referenced) + pt.anon
        cached = len(pt.filled) + len(pt.cached)
        m = pt.metrics
        alloc_prompt = m["alloc_prompt_pages"]
        return {
            "page_size": PAGE_SIZE,
            "max_tokens": pt.max_pages * PAGE_SIZE,
            "used_tokens": used * PAGE_SIZE,
            "cached_tokens": cached * PAGE_SIZE,
            "free_tokens": (pt.max_pages - used - len(pt.cached)) * PAGE_SIZE,
            "tier_cached_tokens": 0,
            "tier_max_tokens": 0,
            "disk_cached_tokens": 0,
            "disk_pages": 0,
            "disk_states": 0,
            "disk_used_bytes": 0,
            "disk_max_bytes": 0,
            "alloc_pages": m["alloc_pages"],
            "alloc_prompt_pages": alloc_prompt,
            "alloc_cached_pages": m["alloc_cached_pages"],
            "alloc_tier_pages": 0,
            "alloc_disk_pages": 0,
            "hit_rate": m["alloc_cached_pages"] / alloc_prompt if alloc_prompt else None,
            "tier_hit_rate": 0.0 if alloc_prompt else None,
            "disk_hit_rate": 0.0 if alloc_prompt else None,
            "active_jobs": len(self.active_jobs),
            "pending_jobs": len(self.pending_jobs),
        }

    def clear_queue(self) -> None:
        """Abort all active and pending jobs (no results are emitted for them)."""
        for job in self.active_jobs + self.pending_jobs:
            job.deallocate_pages()
        self.active_jobs.clear()
        self.pending_jobs.clear()

    def enqueue(self, job: Job | list[Job]) -> int | list[int]:
        """Prepare and append to pending_jobs; returns the job's serial number (list in, list out)."""
        if isinstance(job, list):
            return [self.enqueue(j) for j in job]  # type: ignore[misc]
        job.prepare_for_queue(self, self.job_serial)
        self.job_serial += 1
        self.pending_jobs.append(job)
        assert job.serial_number is not None
        return job.serial_number

    def cancel(self, job: Job) -> None:
        """Remove a pending or active job. Emits no result for it; unknown jobs are ignored."""
        if job in self.pending_jobs:
            self.pending_jobs.remove(job)
        elif job in self.active_jobs:
            job.deallocate_pages()
            self.active_jobs.remove(job)

    def close(self) -> None:
        pass

    def on_queue_drained(self) -> None:
        pass

    # -- iteration

    def iterate(self) -> list[dict]:
        assert self.cache.initialized, \
            "Cache tensors were never allocated. Construct the Cache BEFORE calling model.load()"
        owner_serial = getattr(self.cache, "owner_serial", None)
        if owner_serial is not None and owner_serial != getattr(self, "cache_owner_serial", owner_serial):
            self.pending_jobs.clear()
            self.active_jobs.clear()
            raise RuntimeError(
                "This Generator no longer owns its Cache: a newer Generator was created over the same "
                "Cache. Close or discard the old Generator before creating a new one."
            )

        results: list[dict] = []
        self.iterate_start_jobs(results)

        prefilling = [job for job in self.active_jobs if not job.is_prefill_done()]
        chunk_size = None
        deferred: list[Job] = []
        if prefilling and len(prefilling) < len(self.active_jobs) and \
                (self.shared_chunk_size < self.max_chunk_size or self.prefill_cooldown > 0):
            if self.shared_chunk_size < self.max_chunk_size:
                chunk_size = self.shared_chunk_size
            if self.prefill_cooldown_left > 0:
                self.prefill_cooldown_left -= 1
                deferred = prefilling
            else:
                self.prefill_cooldown_left = self.prefill_cooldown
                selected = prefilling[self.prefill_rotation % len(prefilling)]
                self.prefill_rotation += 1
                deferred = [job for job in prefilling if job is not selected]
        else:
            self.prefill_cooldown_left = 0
        for job in list(self.active_jobs):
            if any(job is d for d in deferred):
                continue
            try:
                job.prefill(results, chunk_size)
            except Exception as e:
                self.reap_failed_job(job, e, results)

        self.iterate_gen(results)
        return results

    def iterate_gen(self, results: list) -> None:
        batch_jobs = [job for job in self.active_jobs if job.is_prefill_done()]
        if not batch_jobs:
            return
        for job in batch_jobs:
            if FAULT_ITERATE in job._fake_prompt_text:
                raise RuntimeError("fake exllamav3: injected generator failure (" + FAULT_ITERATE + " in prompt)")
        for job in batch_jobs:
            if job.time_first_token is None:
                job.time_first_token = time.time()

        completed_jobs: list[Job] = []
        requeuing_jobs: list[Job] = []
        for job in batch_jobs:
            next_token = self.model._fake_next_token(job.sequence_ids, job.blocked_tokens())
            eos, _, rq = job.receive_sample(next_token, results)
            if rq:
                requeuing_jobs.append(job)
            elif eos:
                completed_jobs.append(job)

        for job in completed_jobs + requeuing_jobs:
            job.deallocate_pages()
            self.active_jobs.remove(job)
        for job in requeuing_jobs:
            self.pending_jobs.insert(0, job.prepare_for_requeue())

    def reap_failed_job(self, job: Job, error: Exception, results: list) -> None:
        try:
            job.deallocate_pages()
        except Exception:
            logger.error("reap_failed_job: deallocate_pages() raised for %s", job, exc_info=True)
        if job in self.active_jobs:
            self.active_jobs.remove(job)
        results.append({
            "job": job,
            "serial": job.serial_number,
            "stage": "error",
            "eos": True,
            "error": error,
        })

    def iterate_start_jobs(self, results: list) -> None:
        current_max_batch = len(self.active_jobs)
        if (self.pagetable.num_unreferenced_pages() and
                len(self.pending_jobs) and
                current_max_batch < self.max_batch_size):

            skipped_jobs: list[Job] = []
            for job in self.pending_jobs.copy():
                if (1 + current_max_batch > self.max_batch_size or
                        job.current_new_pages_required() > self.pagetable.num_unreferenced_pages()):
                    skipped_jobs.append(job)
                    continue

                for j in skipped_jobs:
                    if j.max_skips is not None and j.skips >= j.max_skips:
                        return
                for j in skipped_jobs:
                    j.skips += 1

                self.pending_jobs.remove(job)
                self.active_jobs.append(job)
                job.activate()
                try:
                    job.allocate_pages()
                except Exception as e:
                    self.reap_failed_job(job, e, results)
                    continue
                current_max_batch += 1

                r = {
                    "job": job,
                    "stage": "started",
                    "eos": False,
                    "serial": job.serial_number,
                }
                if job.identifier is not None:
                    r.update({"identifier": job.identifier})
                results.append(r)

    # -- convenience

    def generate(
        self,
        prompt: list[str] | str,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        seed: int | None = None,
        sampler: Sampler | list[Sampler] | None = None,
        token_healing: bool = False,
        encode_special_tokens: bool = False,
        decode_special_tokens: bool = False,
        stop_conditions: list[int | str] | None = None,
        add_bos: bool = False,
        abort_event: Any = None,
        completion_only: bool = False,
        filters: Any = None,
        return_last_results: bool = False,
        embeddings: Any = None,
        max_rq_tokens: int | None = None,
        stop_on_loop: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Blocking helper: runs iterate() until the given prompts finish (real: same loop)."""
        prompts = prompt if isinstance(prompt, list) else [prompt]
        order = {}
        for idx, p in enumerate(prompts):
            assert isinstance(p, str), "Unexpected type in prompt"
            input_ids = self.tokenizer.encode(p, encode_special_tokens=encode_special_tokens, add_bos=add_bos)
            p_sampler = sampler[idx] if isinstance(sampler, list) else sampler
            job = Job(
                input_ids=input_ids,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                seed=seed,
                stop_conditions=stop_conditions,
                sampler=p_sampler,
                token_healing=token_healing,
                decode_special_tokens=decode_special_tokens,
                max_rq_tokens=max_rq_tokens,
                stop_on_loop=stop_on_loop,
            )
            if seed is not None:
                seed += 1
            order[self.enqueue(job)] = idx

        completions = [""] * len(prompts)
        last_results: list[dict | None] = [None] * len(prompts)
        while self.num_remaining_jobs():
            for r in self.iterate():
                idx = order[r["serial"]]
                if r["stage"] == "error":
                    raise r["error"]
                if r["stage"] == "streaming":
                    completions[idx] += r.get("text", "")
                if r["eos"]:
                    last_results[idx] = r
            if abort_event is not None and abort_event.is_set():
                self.clear_queue()
                return None

        if not completion_only:
            completions = [p + c for p, c in zip(prompts, completions, strict=True)]
        if not isinstance(prompt, list):
            out: Any = completions[0]
            last: Any = last_results[0]
        else:
            out, last = completions, last_results
        return (out, last) if return_last_results else out
