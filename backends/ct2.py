"""CTranslate2 models (decoder-only ``Generator`` or encoder-decoder ``Translator``), batched.

One replica runs up to ``target_inflight`` jobs at once in shared CTranslate2 calls.  Everything
but the per-token callback runs on the replica's one worker thread (see :mod:`backends.base`).

How CTranslate2 shapes the design (each fact measured on ctranslate2 4.8, SmolLM2-135M int8, and
read in ``src/models/language_model.cc``):

* CT2 keeps no KV cache between calls.  A job joins a running batch by **restarting** the call:
  every unfinished sequence is resubmitted as ``prompt + tokens generated so far``.
* Inside one ``generate_batch`` call the prompts are prefilled together up to the *shortest*
  one; the longer ones' remaining tokens are forced one per decode step.  A sequence that has
  generated ``s`` tokens therefore *stalls* for about ``s`` steps when a restart adds a fresh
  prompt (the newcomer generates meanwhile), and every sequence is prefilled again.  So a join
  is not free: :meth:`CT2Backend._worth_joining` lets newcomers into a running call only when
  the wait they save outweighs what the restart costs the running ones (from step and prefill
  times measured online).  In practice a burst that arrives while a call starts joins it, and
  under steady load newcomers start with the next call: joining at every arrival halved the
  throughput at concurrency 16 (``bench.ct2_batching --join-cost-factor 0``).
* A prompt much longer than the others would be forced token by token (a decode step each,
  ~10x a prefilled token at batch 1), so :meth:`CT2Backend._select` only batches sequences
  whose lengths are close.
* Fairness (:meth:`CT2Backend._restart_reason`): no waiting job overtakes the one that has
  waited longest, and if that one cannot share the running call, the call *yields* to it after
  a time slice (1-10 s, four times what the restart costs): its sequences wait and resume in a
  later call.  So a job with other sampling settings never waits for a long call to end.
* The per-step ``callback`` (beam_size 1 only) runs on CT2's own thread; returning True stops
  that batch item.  We stream, apply stop strings, ``max_tokens``, the stop flag and a restart
  from there.  The end token comes as a final step (not emitted).  With a one-token shortest
  prompt CT2 reports the forced prompt tails as steps too: those steps are skipped, as are the
  translator's target-prefix steps.
* ``repetition_penalty != 1`` sees forced tails and not prefilled prompts, so batching or
  restarting would change the result: such jobs run alone and are never restarted (the others
  wait for them).  Sampling
  settings are per call, so only jobs with the same settings share a call (greedy ones all do).
* Exactness: our bookkeeping (restarts, skipped steps, budgets, stops) is exact; a greedy result
  is then what the job gives alone as far as CT2's arithmetic is batch-invariant.  float32 is
  (SmolLM2: ``bench.ct2_batching --compute-type float32``); CT2's int8 CPU kernels are not, so
  with int8 a batched answer can drift from the lone one after a near-tie.

``ctranslate2`` and ``tokenizers`` are imported in :meth:`CT2Backend.load` only.

Cancellation: the stop flag is checked at every step of every sequence (including a sequence that
is waiting for the next call), and the job ends at once with ``finish_reason="cancelled"``; the
other sequences of its call go on.  ``serve`` returns on ``None`` only after every job it took
has ended (the pool sets the stop flags first on unload, so that is one step).
"""

from __future__ import annotations

import gc
import json
import logging
import queue
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from llm_pool.backends.base import BackendKind, StreamTimer
from llm_pool.backends.decoding import NO_OPENAI_PENALTIES, POSITIVE_PENALTY
from llm_pool.backends.prompts import NATIVE_STOPS, PromptPrep, SpecialToken, StopMatcher, Vocab, check_prompt_length
from llm_pool.pool.errors import invalid_request
from llm_pool.pool.jobs import GenerationStats, Job

if TYPE_CHECKING:
    from collections.abc import Callable

    from llm_pool.backends.base import BackendContext, Inbox

T = TypeVar("T")

log = logging.getLogger("llm_pool.ct2")

#: Sequences whose lengths differ by at most this many tokens may always share a call (their
#: extra prompt tokens are forced one per step, about one decode step each).
MIN_SPREAD_TOKENS = 32
#: ... or under this fraction of the largest budget left in the group (the forced steps then stay
#: a fraction of the generation they precede).
SPREAD_FRACTION = 0.5
#: A newcomer joins a running call only if the wait it saves exceeds this times the delay the
#: restart costs the running sequences (1.0: minimise the summed latency).
JOIN_COST_FACTOR = 1.0
#: A waiting job that cannot join the running call (other sampling settings, a length too far
#: from the others, a solo job) gets the replica after waiting this long at least ...
MIN_SLICE_S = 1.0
#: ... or this many times what restarting the running sequences costs, if longer: the running
#: call then yields (its sequences wait, and resume in a later call) ...
SLICE_COST_FACTOR = 4.0
#: ... but never longer than this, however long the running sequences are (and a job that could
#: share the call but for its length waits this long before the call yields to it).
MAX_SLICE_S = 10.0
#: Prefill cost per token is sampled from calls that prefill at least this many tokens (below,
#: the fixed cost of a call dominates).
PREFILL_SAMPLE_MIN_TOKENS = 16
#: Weight of the newest sample in the moving averages of step and prefill times.
EMA_WEIGHT = 0.2
#: Hugging Face writes huge ``model_max_length`` values (1e30) for "no limit".
NO_CONTEXT_LIMIT = 10**7
#: CT2 spec names (the header of ``model.bin``) by backend kind.
SPEC_KINDS = {"TransformerDecoderSpec": "generator", "TransformerSpec": "translator"}
#: Token shapes used for a language code, in order (M2M100/NLLB-style, MADLAD-style).
LANG_TOKEN_FORMS = ("__{}__", "<2{}>", "<{}>")


def model_kind(path: Path) -> str:
    """``"generator"`` or ``"translator"`` for a CTranslate2 model folder.

    Read from the spec name that heads ``model.bin`` (binary version >= 2); older folders are
    recognised by their vocabulary files.  Raises ``ValueError`` for other CT2 models (Whisper,
    encoders...) and ``FileNotFoundError`` for a folder without ``model.bin``.
    """
    model_bin = path / "model.bin"
    if not model_bin.is_file():
        raise FileNotFoundError(f"{path} is not a CTranslate2 model folder: no model.bin")
    with model_bin.open("rb") as f:
        head = f.read(4 + 2 + 256)
    (version,) = struct.unpack("<I", head[:4])
    if version >= 2:
        (n,) = struct.unpack("<H", head[4:6])
        spec = head[6 : 6 + n].rstrip(b"\0").decode("utf-8", "replace")
        if spec in SPEC_KINDS:
            return SPEC_KINDS[spec]
        raise ValueError(f"{path.name}: CTranslate2 model spec {spec!r} is neither a generator nor a translator")
    names = {p.stem for p in path.iterdir()}
    if names & {"shared_vocabulary", "source_vocabulary"}:
        return "translator"
    return "generator"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str:
    """A special token from tokenizer_config.json: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _metaspace_never(node: Any) -> bool:
    """Turn every Metaspace ``prepend_scheme: "first"`` in a pre-tokenizer JSON into ``"never"``;
    whether there was one."""
    if isinstance(node, list):
        return any([_metaspace_never(n) for n in node])
    if not isinstance(node, dict):
        return False
    found = node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first"
    if found:
        node["prepend_scheme"] = "never"
    return any([found, *(_metaspace_never(v) for v in node.values())])


def plain_tokenizer(tokenizer: Any, *, metaspace_never: bool = False) -> Any:
    """A copy of a Hugging Face ``tokenizers.Tokenizer`` that reads special tokens in its input
    as ordinary text (``encode_special_tokens = True``, as ``split_special_tokens=True`` in
    transformers; added tokens not marked special still match, as they would in any text).
    With ``metaspace_never``, a Metaspace ``prepend_scheme: "first"`` becomes ``"never"``."""
    import tokenizers

    data = json.loads(tokenizer.to_str())
    if metaspace_never:
        _metaspace_never(data.get("pre_tokenizer"))
    plain = tokenizers.Tokenizer.from_str(json.dumps(data))
    plain.encode_special_tokens = True
    return plain


def plain_text_vocab(tokenizer: Any) -> Vocab[str]:
    """The :class:`~backends.prompts.Vocab` of a Hugging Face tokenizer, in token strings (what
    CTranslate2 takes).  A whole-prompt encode gives a Metaspace ``prepend_scheme: "first"``
    prefix only to the prompt's first piece of text, so runs after a special token are encoded
    without it."""
    return _hf_vocab(tokenizer, lambda encoding: list(encoding.tokens), lambda t: t.content)


def plain_id_vocab(tokenizer: Any) -> Vocab[int]:
    """:func:`plain_text_vocab` in token ids (what an engine that takes a token-id prompt, such
    as ``vllm serve``, is sent)."""
    return _hf_vocab(tokenizer, lambda encoding: list(encoding.ids), lambda t: tokenizer.token_to_id(t.content))


def _hf_vocab(tokenizer: Any, tokens: Callable[[Any], list[T]], token_of: Callable[[Any], T]) -> Vocab[T]:
    plain = plain_tokenizer(tokenizer)
    later = plain
    if _metaspace_never(json.loads(tokenizer.to_str()).get("pre_tokenizer")):
        later = plain_tokenizer(tokenizer, metaspace_never=True)
    specials = [
        SpecialToken(t.content, token_of(t), t.lstrip, t.rstrip)
        for t in tokenizer.get_added_tokens_decoder().values()
        if t.special
    ]
    longest = max(map(len, tokenizer.get_vocab(with_added_tokens=True)), default=1)
    return Vocab(
        lambda text: tokens(plain.encode(text, add_special_tokens=False)),
        specials,
        longest,
        encode_after_special=lambda text: tokens(later.encode(text, add_special_tokens=False)),
    )


def _chat_template(path: Path, tok_config: dict[str, Any]) -> str | None:
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if not template and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    return template if isinstance(template, str) and template else None


class _Detokenizer:
    """Incremental text of a growing list of token ids.

    Decodes a short window (from the last emitted boundary) so that decoders which strip a
    leading space at the start of a text, and characters split across byte-level tokens (which
    decode to U+FFFD until complete), come out right.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        now = self.tokenizer.decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        now = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return now[len(before) :]


#: What CT2 must share per call: (sampling_topk, sampling_topp, sampling_temperature,
#: repetition_penalty, suppressed sequences).
CallKey = tuple[int, float, float, float, tuple[str, ...]]


@dataclass(eq=False)
class _Seq:
    """One job's sequence inside the backend, kept across calls (restarts)."""

    job: Job
    order: int
    key: CallKey
    #: Runs alone and is never restarted (repetition penalty, or isolated after an error).
    solo: bool
    #: Generator: the prompt tokens.  Translator: the source tokens.
    tokens: list[str]
    #: Translator: the target prefix before any output (language token); generator: empty.
    prefix: list[str]
    #: Tokens fed to the decoder before any output: the prompt, or the target prefix.
    base: int
    budget: int
    prompt_tokens: int
    stops: StopMatcher
    detok: _Detokenizer
    timer: StreamTimer
    #: When it last started waiting (arrival, or the end of a call that did not finish it).
    ready_at: float = field(default_factory=time.perf_counter)
    out: list[str] = field(default_factory=list)
    finish: str | None = None
    #: Steps CT2 reports for this item in the current call before its first new token.
    skip: int = 0

    @property
    def forced(self) -> int:
        """Tokens this sequence feeds CT2 before a new one: its decode position."""
        return self.base + len(self.out)

    @property
    def remaining(self) -> int:
        return self.budget - len(self.out)

    def wait_order(self) -> tuple[float, int]:
        return (self.ready_at, self.order)


class CT2Backend:
    """One CTranslate2 model with dynamic batching; see the module docstring."""

    threaded = True
    crashed = False  # no engine process of its own to die

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        #: Jobs one replica runs at once: the configured target (one CT2 call holds them all).
        self.capability = ctx.model.target_inflight
        self.model: Any = None
        self.tokenizer: Any = None
        self.kind = ""
        self.n_ctx: int | None = None
        self.prompts: PromptPrep[str] = PromptPrep(ctx.model, backend="ct2")
        #: The translator's source encoder: caller text, special tokens read as plain text.
        self._source_tokenizer: Any = None
        self._end_tokens: list[str] = []
        self._end_set: frozenset[str] = frozenset()
        # batching state: only the worker thread touches it, or CT2's callback thread while the
        # worker thread is blocked in that very call
        self._inbox: Inbox | None = None
        self._closing = False
        self._order = 0
        self._waiting: list[_Seq] = []
        self._call: list[_Seq] = []
        self._restart = False
        self._step_no = -1
        self._t_call = 0.0
        self._t_step: float | None = None
        #: Moving averages: seconds per decode step, seconds per prefilled token (guesses for a
        #: small model on a CPU until the first samples replace them).
        self._step_s = 0.03
        self._prefill_tok_s = 0.002
        self._sampled: set[str] = set()
        # counters (read by describe() and tests)
        #: CT2 calls made; calls restarted to let newcomers join; calls that yielded the replica
        #: to a job that could not join; the largest batch of one call.
        self.calls = 0
        self.joins = 0
        self.yields = 0
        self.max_batch = 0

    @property
    def intra_threads(self) -> int:
        """CT2 compute threads: ``n_threads`` when set, else 1.  On small models CT2 batches
        better with one thread per replica (SmolLM2 int8 on 2 cores: 316 vs 118 tok/s at
        batch 16 with 1 vs 2 threads)."""
        return self.ctx.model.n_threads or 1

    def describe(self) -> dict[str, object]:
        m = self.ctx.model
        return {
            "kind": self.kind or None,
            "device": getattr(self.model, "device", m.device),
            "compute_type": getattr(self.model, "compute_type", m.compute_type),
            "intra_threads": self.intra_threads,
            "capability": self.capability,
            "calls": self.calls,
            "joins": self.joins,
            "yields": self.yields,
            "max_batch": self.max_batch,
        }

    # ------------------------------------------------------------------ lifetime
    def load(self) -> None:
        import ctranslate2
        import tokenizers

        m = self.ctx.model
        path = self.ctx.model_path()
        if not path.is_dir():
            raise RuntimeError(f"{path.name} is not a CTranslate2 model folder (a directory with model.bin)")
        self.kind = model_kind(path)
        if not (path / "tokenizer.json").is_file():
            raise RuntimeError(f"{path.name} has no tokenizer.json")
        self.tokenizer = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        tok_config = _read_json(path / "tokenizer_config.json")
        ct2_config = _read_json(path / "config.json")
        limit = tok_config.get("model_max_length")
        self.n_ctx = int(limit) if isinstance(limit, (int, float)) and 0 < limit < NO_CONTEXT_LIMIT else None
        self.prompts.set_model(
            _chat_template(path, tok_config),
            _token_text(tok_config.get("bos_token")) or ct2_config.get("bos_token", ""),
            _token_text(tok_config.get("eos_token")) or ct2_config.get("eos_token", ""),
            plain_text_vocab(self.tokenizer),
        )
        self._source_tokenizer = plain_tokenizer(self.tokenizer)
        self._end_tokens = self._find_end_tokens(path, ct2_config)
        self._end_set = frozenset(self._end_tokens)

        cls = ctranslate2.Generator if self.kind == "generator" else ctranslate2.Translator
        compute_type = "default" if m.compute_type == "auto" else m.compute_type
        try:
            self.model = cls(
                str(path),
                device=m.device,
                compute_type=compute_type,
                inter_threads=1,
                intra_threads=self.intra_threads,
            )
        except (ValueError, RuntimeError) as e:
            raise RuntimeError(f"CTranslate2 could not load {path.name}: {e}") from None

    def _find_end_tokens(self, path: Path, ct2_config: dict[str, Any]) -> list[str]:
        """The tokens that end a sequence: the format's stop tokens that are in the vocabulary,
        then EOS (CT2's ``end_token`` replaces its default, so EOS is listed explicitly)."""
        ends = []
        if self.kind == "generator":
            ends += [s for s in NATIVE_STOPS[self.ctx.model.prompt_format] if self.tokenizer.token_to_id(s) is not None]
        ends.append(ct2_config.get("eos_token") or self.prompts.eos)
        eos_ids = _read_json(path / "generation_config.json").get("eos_token_id")
        for i in eos_ids if isinstance(eos_ids, list) else [eos_ids]:
            if isinstance(i, int) and (token := self.tokenizer.id_to_token(i)) is not None:
                ends.append(token)
        return [t for t in dict.fromkeys(ends) if t]

    def close(self) -> None:
        """Drop the model now: a CT2 model that ran a Python callback and is still alive at
        interpreter exit aborts the process."""
        model, self.model = self.model, None
        del model
        gc.collect()

    # ------------------------------------------------------------------ serving (worker thread)
    def serve(self, inbox: Inbox) -> None:
        """Run the jobs of ``inbox`` in batched CT2 calls until ``None``, then end what is left.

        Every job taken from the inbox ends (finish or fail) before this returns or raises.
        """
        self._inbox = inbox
        try:
            while True:
                self._reap()
                if not self._waiting:
                    if self._closing:
                        return
                    self._accept(inbox.get())
                    continue
                self._drain()
                self._reap()
                if self._waiting:
                    self._run(self._select(self._waiting))
        except BaseException as e:
            for seq in [*self._call, *self._waiting]:
                if seq.finish is None:
                    seq.finish = "failed"
                    seq.job.fail(e)
            raise

    def _accept(self, job: Job | None) -> None:
        if job is None:
            self._closing = True
            return
        if job.should_stop():
            job.finish(GenerationStats(finish_reason="cancelled", output_tokens=0))
            return
        job.begin()
        try:
            seq = self._prepare(job)
        except BaseException as e:  # a bad request gets its 4xx; the replica keeps serving
            job.fail(e)
            if not isinstance(e, Exception):
                raise
            return
        self._waiting.append(seq)

    def _drain(self) -> None:
        assert self._inbox is not None
        while not self._closing:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._accept(job)

    def _reap(self) -> None:
        """End waiting sequences whose stop flag is set."""
        if any(s.job.should_stop() for s in self._waiting):
            for seq in self._waiting:
                if seq.job.should_stop():
                    self._end(seq, "cancelled")
            self._waiting = [s for s in self._waiting if s.finish is None]

    def _prepare(self, job: Job) -> _Seq:
        """Render and tokenize one request; 400 for an empty or too long prompt."""
        timer = StreamTimer()
        req = job.request
        d = req.decoding
        if self.kind == "generator":
            prompt, tokens, stops = self.prompts.prepare(job, self.n_ctx)
            prefix: list[str] = []
            suppress = tuple(prompt.suppress)
        else:
            # the source text is the caller's: plain text, with the tokenizer's own post-processing
            # (an end token, language tokens) but no special token parsed out of it
            if len([m for m in req.messages if m.role != "system"]) > 1:
                raise invalid_request(
                    f"model {req.model!r} is a translator: it takes one text, not a conversation", param="messages", model=req.model
                )
            self.prompts.check_size(req, self.n_ctx)
            self.prompts.note_beam(req)
            tokens = self._source_tokenizer.encode(req.input).tokens
            source_lang = self._lang_token(req.source_lang_code)
            if source_lang and tokens and tokens[0] != source_lang:
                tokens = [source_lang, *tokens]
            target_lang = self._lang_token(req.target_lang_code)
            prefix = [target_lang] if target_lang else []
            stops = StopMatcher(d.stop)
            suppress = ()
            check_prompt_length(req.model, len(tokens), self.n_ctx)
        budget = d.max_tokens
        if self.n_ctx is not None:
            budget = min(budget, self.n_ctx - (len(tokens) if self.kind == "generator" else len(prefix)))
        greedy = d.greedy
        key: CallKey = (
            1 if greedy else d.top_k,
            1.0 if greedy else d.top_p,
            1.0 if greedy else d.temperature,
            d.repetition_penalty,
            suppress,
        )
        timer.prompt_ready()
        self._order += 1
        return _Seq(
            job=job,
            order=self._order,
            key=key,
            solo=d.repetition_penalty != 1.0,
            tokens=tokens,
            prefix=prefix,
            base=len(tokens) if self.kind == "generator" else len(prefix),
            budget=budget,
            prompt_tokens=len(tokens),
            stops=stops,
            detok=_Detokenizer(self.tokenizer),
            timer=timer,
        )

    def _lang_token(self, code: str | None) -> str | None:
        """The vocabulary's token for a language code (``fr`` -> ``__fr__``), if it has one."""
        if not code:
            return None
        forms = [f.format(code) for f in LANG_TOKEN_FORMS]
        if "_" in code or "-" in code:  # already a model-specific code such as fra_Latn
            forms.append(code)
        return next((t for t in forms if self.tokenizer.token_to_id(t) is not None), None)

    # ------------------------------------------------------------------ batching policy
    def _spread_ok(self, group: list[_Seq]) -> bool:
        """Whether the lengths in ``group`` are close enough to share a call: the longest
        sequence's forced tokens stay under ``MIN_SPREAD_TOKENS`` or a fraction of the work left."""
        lengths = [s.forced for s in group]
        allowed = max(MIN_SPREAD_TOKENS, int(SPREAD_FRACTION * max(s.remaining for s in group)))
        return max(lengths) - min(lengths) <= allowed

    def _select(self, candidates: list[_Seq]) -> list[_Seq]:
        """The next call: the longest-waiting sequence, plus (longest-waiting first) every
        compatible one that keeps the lengths close, up to ``capability``."""
        head = candidates[0]
        group = [head]
        if head.solo:
            return group
        for seq in candidates[1:]:
            if len(group) >= self.capability:
                break
            if seq.key == head.key and not seq.solo and self._spread_ok([*group, seq]):
                group.append(seq)
        return group

    def _restart_reason(self) -> str | None:
        """Whether to restart the running call now: ``"join"``, ``"yield"`` or None.

        Fairness first: no waiting job overtakes the one that has waited longest.  If that one
        can join the running call, everyone who can joins when :meth:`_worth_joining`.  If it
        cannot, nobody joins, so the call ends within its members' remaining budgets; if that
        is still far off, the call yields the replica: to a job that can never share it (other
        sampling settings, a solo job) after a slice (:data:`MIN_SLICE_S`,
        :data:`SLICE_COST_FACTOR`), to one only too long or short to share it after
        :data:`MAX_SLICE_S`.  A call running a solo job is never restarted.
        """
        live = [s for s in self._call if s.finish is None]
        if not live or not self._waiting or any(s.solo for s in live):
            return None  # a solo job is never restarted: that would change its result
        oldest = self._waiting[0]
        group = list(live)
        for seq in self._waiting:
            if len(group) >= self.capability:
                break
            if seq.key == live[0].key and not seq.solo and self._spread_ok([*group, seq]):
                group.append(seq)
        joiners = group[len(live) :]
        if joiners and joiners[0] is oldest:
            return "join" if self._worth_joining(live, joiners) else None
        if oldest.key == live[0].key and not oldest.solo:
            limit = MAX_SLICE_S
        else:
            restart_s = self._prefill_tok_s * sum(s.forced for s in live)
            limit = min(MAX_SLICE_S, max(MIN_SLICE_S, SLICE_COST_FACTOR * restart_s))
        waited = time.perf_counter() - oldest.ready_at
        call_left_s = max(s.remaining for s in live) * self._step_s
        return "yield" if waited >= limit and call_left_s >= limit else None

    def _worth_joining(self, live: list[_Seq], joiners: list[_Seq]) -> bool:
        """Whether restarting the running call so that ``joiners`` join it pays.

        Joining saves each newcomer the rest of the current call (bounded by the longest
        remaining budget); it costs every running sequence a prefill of the new batch plus the
        steps in which its own tokens are forced again.  Both in seconds, from moving averages.
        """
        group = [*live, *joiners]
        lo = min(s.forced for s in group)
        prefill_s = self._prefill_tok_s * len(group) * max(lo - 1, 1)
        saved = len(joiners) * max(s.remaining for s in live) * self._step_s
        cost = sum((s.forced - lo) * self._step_s + prefill_s for s in live)
        return saved > JOIN_COST_FACTOR * cost

    # ------------------------------------------------------------------ one CT2 call
    def _run(self, group: list[_Seq]) -> None:
        chosen = set(map(id, group))
        self._waiting = [s for s in self._waiting if id(s) not in chosen]
        self._call = group
        self._restart = False
        self._step_no = -1
        self._t_step = None
        self.calls += 1
        self.max_batch = max(self.max_batch, len(group))
        try:
            self._generate(group)
        except Exception as e:
            unfinished = [s for s in group if s.finish is None]
            if len(group) == 1:
                for seq in unfinished:
                    self._fail(seq, e)
            else:  # find the culprit: retry each alone
                log.warning(
                    "a CT2 batch of %d failed (%s: %s); retrying its jobs one by one", len(group), type(e).__name__, e
                )
                for seq in unfinished:
                    seq.solo = True
        finally:
            self._call = []
            left = [s for s in group if s.finish is None]
            if left:
                now = time.perf_counter()
                for seq in left:
                    seq.ready_at = now
                self._waiting = sorted([*self._waiting, *left], key=_Seq.wait_order)

    def _generate(self, group: list[_Seq]) -> None:
        topk, topp, temperature, repetition_penalty, suppress = group[0].key
        common: dict[str, Any] = {
            "beam_size": 1,
            "sampling_topk": topk,
            "sampling_topp": topp,
            "sampling_temperature": temperature,
            "repetition_penalty": repetition_penalty,
            "callback": self._on_step,
        }
        self._t_call = time.perf_counter()
        if self.kind == "generator":
            inputs = [[*s.tokens, *s.out] for s in group]
            shortest = min(map(len, inputs))
            for s, tokens in zip(group, inputs, strict=True):
                # CT2 prefills up to the shortest prompt; with a one-token shortest prompt it
                # also reports the others' forced prompt tails as steps
                s.skip = len(tokens) - 1 if shortest == 1 else 0
            suppress_ids = [self.tokenizer.encode(x, add_special_tokens=False).tokens for x in suppress]
            self.model.generate_batch(
                inputs,
                max_length=max(s.skip + s.remaining for s in group),
                include_prompt_in_result=False,
                end_token=self._end_tokens,
                suppress_sequences=suppress_ids or None,
                **common,
            )
        else:
            prefixes = [[*s.prefix, *s.out] for s in group]
            for s, p in zip(group, prefixes, strict=True):
                s.skip = len(p)  # the translator reports its target prefix as steps
            self.model.translate_batch(
                [s.tokens for s in group],
                target_prefix=[p or None for p in prefixes] if any(prefixes) else None,
                max_decoding_length=max(s.skip + s.remaining for s in group),
                max_input_length=0,
                **common,
            )

    def _on_step(self, step: Any) -> bool:
        """CT2's per-token callback (CT2's thread): True stops that batch item."""
        seq: _Seq | None = None
        try:
            if step.step != self._step_no:
                self._step_no = step.step
                self._new_step()
            seq = self._call[step.batch_id]
            if seq.finish is not None:
                return True
            if seq.job.should_stop():
                self._end(seq, "cancelled")
                return True
            if seq.skip > 0:
                seq.skip -= 1
                return self._restart
            if step.token in self._end_set:
                self._end(seq, "stop")
                return True
            self._push(seq, step.token)
            return seq.finish is not None or self._restart
        except BaseException as e:  # never raise into CT2: fail this job, stop its item
            if seq is not None and seq.finish is None:
                self._fail(seq, e)
            else:
                log.exception("CT2 step callback failed")
            return True

    def _new_step(self) -> None:
        """Once per decode step: timings, newcomers, cancelled waiters, restart decision."""
        now = time.perf_counter()
        if self._t_step is None:
            prefilled = len(self._call) * (min(s.forced for s in self._call) - 1)
            if prefilled >= PREFILL_SAMPLE_MIN_TOKENS:
                self._prefill_tok_s = self._average("prefill", self._prefill_tok_s, (now - self._t_call) / prefilled)
        else:
            self._step_s = self._average("step", self._step_s, now - self._t_step)
        self._t_step = now
        self._drain()
        self._reap()
        if not self._restart and (reason := self._restart_reason()) is not None:
            self._restart = True
            if reason == "join":
                self.joins += 1
            else:
                self.yields += 1

    def _average(self, name: str, current: float, sample: float) -> float:
        """The moving average ``name`` after ``sample``; the first sample replaces the guess."""
        if name not in self._sampled:
            self._sampled.add(name)
            return sample
        return current + EMA_WEIGHT * (sample - current)

    def _push(self, seq: _Seq, token: str) -> None:
        seq.timer.token()
        seq.out.append(token)
        token_id = self.tokenizer.token_to_id(token)
        piece = seq.detok.push(token_id) if token_id is not None else ""
        text, hit = seq.stops.push(piece)
        seq.job.emit(text)
        if hit:
            self._end(seq, "stop", flush=False)
        elif seq.remaining <= 0:
            self._end(seq, "length")

    def _end(self, seq: _Seq, reason: str, *, flush: bool = True) -> None:
        if flush:  # release text held back for a possible stop string or an unfinished character
            text, hit = seq.stops.push(seq.detok.flush())
            seq.job.emit(text if hit else text + seq.stops.flush())
        seq.finish = reason
        seq.job.finish(seq.timer.stats(finish_reason=reason, prompt_tokens=seq.prompt_tokens))

    def _fail(self, seq: _Seq, error: BaseException) -> None:
        seq.finish = "failed"
        seq.job.fail(error)


KIND = BackendKind(
    name="ct2",
    create=CT2Backend,
    uses_gpu=lambda m: m.device == "cuda",
    decoding_rules=(POSITIVE_PENALTY, *NO_OPENAI_PENALTIES),
    # no per-request seed in CTranslate2 (backends/decoding.py): a seeded sampling request is a 400
    seeded_sampling=False,
)
