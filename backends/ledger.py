"""What remote requests cost: prices, per-model budgets, and the append-only JSONL ledger.

A remote model with prices (``remote_price_input_per_1m`` / ``remote_price_output_per_1m``) gets
an :class:`Account`.  With ``remote_cost_ledger_path`` the account also keeps a **ledger**: one
JSON object per line, never rewritten, one line per event::

    reserved ──┬──▶ settled               the upstream answered with usage: cost = real usage
               ├──▶ failed_usage_unknown  it answered (or was cancelled mid-answer) without
               │                          usage: fails closed, cost = the reservation
               ├──▶ failed_after_submit   failed after the upstream may have worked on it:
               │                          cost = usage if known, else the reservation
               ├──▶ failed_before_submit  never accepted (connect failure, error status): 0
               ├──▶ released              never sent (cancelled in the queue, refused): 0
               └──▶ abandoned             found open at load and older than
                                          ``remote_reservation_stale_after_s`` (the process
                                          that made it died): stops counting, 0

Every line has ``ts`` (UTC, ISO 8601), ``event``, ``model``, ``request_id``, ``currency``;
``reserved`` adds ``amount``, ``estimated_prompt_tokens`` and ``max_tokens``; every closing event
adds ``cost`` (and ``prompt_tokens`` / ``output_tokens`` when known, ``error`` or ``reason``).

Reservation (before the request is queued): ``estimated prompt tokens`` × input price +
``max_tokens`` × output price.  The prompt estimate is ``ceil(len(content) / 4) + 4`` per message
sent (about four characters per token for English text, plus the chat template's framing), plus
85 tokens per ``low``-detail image and 765 per other image (:data:`IMAGE_TOKENS`); it is an
estimate, the settle records what the upstream reports.

Budgets, per model and per UTC day: ``spent today`` (the costs of closing events written today)
plus ``reserved now`` (open reservations younger than the stale limit) plus the new reservation
must not exceed ``remote_budget_daily`` (429 ``budget_exceeded``); a single reservation must not
exceed ``remote_budget_request_max`` (400 ``request_cost_exceeds_max``).

Atomicity: read-decide-append is one synchronous call (:meth:`CostLedger.reserve`) with no trio
checkpoint inside, so no other task of this process can interleave (that is what a ``trio.Lock``
would buy, without the await); the file is ``flock``-ed for the duration, and the decision is made
from the file as it is under that lock (new lines are read incrementally first), so replicas,
models and even processes sharing a ledger file never overspend together.  The I/O is a short
local append; it runs on the trio thread on purpose (a thread hop would need the lock held across
an await).

This module does no network I/O and imports no quart.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from llm_pool.pool.errors import PoolError
from llm_pool.pool.jobs import Message

log = logging.getLogger("llm_pool.ledger")

#: Budget comparisons tolerate float rounding of this size (far below any real price).
EPSILON = 1e-12
#: Costs are written rounded to this many decimals (sub-micro-cent; keeps the file readable).
COST_DECIMALS = 10
#: Chat-template framing tokens counted per message in the prompt estimate.
TOKENS_PER_MESSAGE = 4

CLOSING_EVENTS = frozenset(
    {"settled", "released", "failed_before_submit", "failed_after_submit", "failed_usage_unknown", "abandoned"}
)


#: Prompt tokens reserved per image (issue 16): OpenAI's count for a ``low`` detail image, and
#: for a 1024×1024 one at ``high``/``auto`` (85 + 170 per 512-pixel tile); the usage the upstream
#: reports settles the real cost.
IMAGE_TOKENS = {"low": 85, "high": 765, "auto": 765}


def estimate_prompt_tokens(messages: list[Message]) -> int:
    """``ceil(chars / 4) + 4`` per message, plus :data:`IMAGE_TOKENS` per image: see the module
    docstring."""
    return sum(
        math.ceil(len(m.content) / 4) + TOKENS_PER_MESSAGE + sum(IMAGE_TOKENS[i.detail] for i in m.images) for m in messages
    )


def money(x: float) -> str:
    """A cost for a message: up to 8 decimals, trailing zeros dropped (``0.028``, ``1.5``)."""
    text = f"{x:.8f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _now_iso(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _day(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")


def _epoch(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp()


@dataclass(frozen=True)
class Prices:
    input_per_1m: float
    output_per_1m: float
    currency: str

    def cost(self, prompt_tokens: int, output_tokens: int) -> float:
        raw = (prompt_tokens * self.input_per_1m + output_tokens * self.output_per_1m) / 1_000_000
        return round(raw, COST_DECIMALS)


@dataclass
class OpenReservation:
    model: str
    amount: float
    at: float  # epoch seconds


class CostLedger:
    """One ledger file, shared by every account (model, replica) that names it in this process.

    Get it with :func:`ledger_for`; every operation re-reads what was appended since the last one
    (by anyone) under an exclusive ``flock`` before it decides and appends.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._inode: int | None = None
        self._tail_unterminated = False
        self.open: dict[str, OpenReservation] = {}
        #: (model, UTC day) → cost of the closing events written that day
        self.spent: dict[tuple[str, str], float] = defaultdict(float)

    # ------------------------------------------------------------------ file access
    @contextmanager
    def _locked(self) -> Iterator[IO[bytes]]:
        with self.path.open("a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                self._sync(f)
                yield f
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _sync(self, f: IO[bytes]) -> None:
        st = os.fstat(f.fileno())
        if st.st_ino != self._inode or st.st_size < self._offset:  # new, replaced or truncated
            self._inode, self._offset = st.st_ino, 0
            self.open.clear()
            self.spent.clear()
        if st.st_size == self._offset:
            return
        f.seek(self._offset)
        data = f.read(st.st_size - self._offset)
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            if line.strip():
                self._apply_line(line)
        # A tail without a newline under the lock is what a crash mid-write leaves: it is never
        # completed; the next append starts a new line.
        self._tail_unterminated = end < len(data)
        if self._tail_unterminated:
            log.warning("cost ledger %s ends with an incomplete line (ignored)", self.path)
        self._offset += end

    def _apply_line(self, line: bytes) -> None:
        try:
            event = json.loads(line)
            self._apply(event)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("cost ledger %s: unreadable line ignored (%s: %s)", self.path, type(e).__name__, e)

    def _apply(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        rid = event["request_id"]
        if kind == "reserved":
            self.open[rid] = OpenReservation(event["model"], float(event["amount"]), _epoch(event["ts"]))
        elif kind in CLOSING_EVENTS:
            self.open.pop(rid, None)
            self.spent[(event["model"], event["ts"][:10])] += float(event["cost"])
        else:
            raise ValueError(f"unknown event {kind!r}")

    def _append(self, f: IO[bytes], event: dict[str, Any]) -> None:
        line = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        if self._tail_unterminated:
            line = b"\n" + line
        f.seek(0, os.SEEK_END)
        f.write(line)
        f.flush()
        self._offset = f.tell()
        self._tail_unterminated = False
        self._apply(event)

    @staticmethod
    def _event(kind: str, model: str, request_id: str, currency: str, now: float, **fields: Any) -> dict[str, Any]:
        return {
            "ts": _now_iso(now),
            "event": kind,
            "model": model,
            "request_id": request_id,
            "currency": currency,
            **fields,
        }

    # ------------------------------------------------------------------ figures
    def reserved_now(self, model: str, now: float, stale_after_s: float) -> float:
        return sum((r.amount for r in self.open.values() if r.model == model and r.at >= now - stale_after_s), 0.0)

    def spent_on(self, model: str, day: str) -> float:
        return self.spent.get((model, day), 0.0)

    # ------------------------------------------------------------------ operations
    def replay(self, model: str, *, currency: str, stale_after_s: float) -> list[str]:
        """Read the whole file (a load); write ``abandoned`` for ``model``'s stale reservations.

        Returns the abandoned request ids.
        """
        now = time.time()
        abandoned = []
        with self._locked() as f:
            for rid, r in list(self.open.items()):
                if r.model == model and r.at < now - stale_after_s:
                    reason = f"no outcome recorded within {stale_after_s:g}s (the process that reserved it stopped)"
                    self._append(f, self._event("abandoned", model, rid, currency, now, cost=0.0, reason=reason))
                    abandoned.append(rid)
        if abandoned:
            log.warning("cost ledger %s: %d stale reservation(s) of %s abandoned", self.path, len(abandoned), model)
        return abandoned

    def reserve(
        self,
        model: str,
        request_id: str,
        amount: float,
        *,
        currency: str,
        budget_daily: float | None,
        stale_after_s: float,
        details: dict[str, Any],
    ) -> None:
        """Atomically check the daily budget and append ``reserved`` (429 when over)."""
        now = time.time()
        with self._locked() as f:
            if budget_daily is not None:
                spent = self.spent_on(model, _day(now))
                held = self.reserved_now(model, now, stale_after_s)
                if spent + held + amount > budget_daily + EPSILON:
                    remaining = max(0.0, budget_daily - spent - held)
                    raise PoolError(
                        429,
                        "budget_exceeded",
                        f"model {model!r} is over its daily budget: this request may cost up to "
                        f"{money(amount)} {currency} but only {money(remaining)} {currency} of the "
                        f"{money(budget_daily)} {currency} daily budget remains (spent today "
                        f"{money(spent)}, reserved by running requests {money(held)}); the budget "
                        "resets at 00:00 UTC",
                        model=model,
                    )
            self._append(f, self._event("reserved", model, request_id, currency, now, amount=amount, **details))

    def holds(self, request_id: str) -> bool:
        with self._locked():
            return request_id in self.open

    def close(self, kind: str, model: str, request_id: str, *, currency: str, cost: float, **fields: Any) -> bool:
        """Append one closing event; False (nothing written) when the reservation is no longer open
        and ``cost`` is 0.  A cost is always written: money spent after a reservation was
        abandoned as stale still counts."""
        assert kind in CLOSING_EVENTS, kind
        now = time.time()
        with self._locked() as f:
            if request_id not in self.open and cost <= 0:
                return False
            self._append(f, self._event(kind, model, request_id, currency, now, cost=cost, **fields))
            return True

    def summary(self, model: str, stale_after_s: float) -> tuple[str, float, float]:
        """(UTC day, spent today, reserved now) from the file as it is now."""
        now = time.time()
        with self._locked():
            return _day(now), self.spent_on(model, _day(now)), self.reserved_now(model, now, stale_after_s)


_LEDGERS: dict[str, CostLedger] = {}


def ledger_for(path: Path) -> CostLedger:
    """The process's one :class:`CostLedger` for ``path`` (resolved; created on first use)."""
    key = os.path.realpath(path)
    ledger = _LEDGERS.get(key)
    if ledger is None:
        ledger = _LEDGERS[key] = CostLedger(Path(key))
    return ledger


def check_ledger_path(raw: str, base_dir: str) -> Path:
    """Validate ``remote_cost_ledger_path`` (relative to the settings' directory): its folder must
    exist (it is never created), the path must be a regular file or absent, and writable.
    Raises ``ValueError`` with the reason."""
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = Path(base_dir) / path
    if not path.parent.is_dir():
        raise ValueError(f"remote_cost_ledger_path {raw!r}: directory {path.parent} does not exist")
    if path.exists() and not path.is_file():
        raise ValueError(f"remote_cost_ledger_path {raw!r}: {path} is not a regular file")
    try:
        with path.open("ab"):
            pass
    except OSError as e:
        raise ValueError(f"remote_cost_ledger_path {raw!r}: cannot append to {path}: {e.strerror}") from None
    return path


class Account:
    """One remote model's costs: prices, budgets and (optionally) its ledger."""

    def __init__(
        self,
        model: str,
        prices: Prices,
        *,
        ledger: CostLedger | None,
        budget_daily: float | None,
        budget_request_max: float | None,
        stale_after_s: float,
    ) -> None:
        self.model = model
        self.prices = prices
        self.ledger = ledger
        self.budget_daily = budget_daily
        self.budget_request_max = budget_request_max
        self.stale_after_s = stale_after_s

    @property
    def currency(self) -> str:
        return self.prices.currency

    def estimate(self, messages: list[Message], max_tokens: int) -> tuple[float, int]:
        """(maximum cost, estimated prompt tokens) of a request."""
        prompt = estimate_prompt_tokens(messages)
        return self.prices.cost(prompt, max_tokens), prompt

    def reserve(self, request_id: str, messages: list[Message], max_tokens: int) -> float:
        """Check the per-request maximum (400) and the daily budget (429), then reserve.

        Returns the reserved amount.  Without a ledger only the per-request maximum applies.
        """
        amount, prompt = self.estimate(messages, max_tokens)
        cur = self.currency
        if self.budget_request_max is not None and amount > self.budget_request_max + EPSILON:
            raise PoolError(
                400,
                "request_cost_exceeds_max",
                f"this request may cost up to {money(amount)} {cur} (about {prompt} prompt tokens at "
                f"{money(self.prices.input_per_1m)} {cur}/1M + max_tokens {max_tokens} at "
                f"{money(self.prices.output_per_1m)} {cur}/1M), more than model {self.model!r}'s "
                f"remote_budget_request_max of {money(self.budget_request_max)} {cur}; lower decoding.max_tokens",
                model=self.model,
                param="$.decoding.max_tokens",
            )
        if self.ledger is not None:
            self.ledger.reserve(
                self.model,
                request_id,
                amount,
                currency=cur,
                budget_daily=self.budget_daily,
                stale_after_s=self.stale_after_s,
                details={"estimated_prompt_tokens": prompt, "max_tokens": max_tokens},
            )
        return amount

    def holds(self, request_id: str) -> bool:
        return self.ledger is None or self.ledger.holds(request_id)

    def close(self, kind: str, request_id: str, *, cost: float, **fields: Any) -> float:
        """Write a closing event (if there is a ledger and the reservation is open); the cost."""
        if self.ledger is not None:
            try:
                self.ledger.close(kind, self.model, request_id, currency=self.currency, cost=cost, **fields)
            except OSError:
                log.exception("cost ledger %s: cannot record %s for %s", self.ledger.path, kind, request_id)
        return cost


def summarize(
    model: str,
    prices: Prices,
    *,
    budget_daily: float | None,
    budget_request_max: float | None,
    stale_after_s: float,
    ledger_path: Path | None,
) -> dict[str, Any]:
    """A model's cost figures for today (an admin row); reads the ledger if it exists, never
    creates it."""
    out: dict[str, Any] = {
        "currency": prices.currency,
        "price_input_per_1m": prices.input_per_1m,
        "price_output_per_1m": prices.output_per_1m,
        "budget_daily": budget_daily,
        "budget_request_max": budget_request_max,
        "ledger_path": str(ledger_path) if ledger_path else None,
        "day": _day(time.time()),
        "spent_today": None,
        "reserved_now": None,
        "remaining_today": None,
    }
    if ledger_path is None:
        return out
    spent = held = 0.0
    if ledger_path.is_file():
        out["day"], spent, held = ledger_for(ledger_path).summary(model, stale_after_s)
    out |= {"spent_today": round(spent, COST_DECIMALS), "reserved_now": round(held, COST_DECIMALS)}
    if budget_daily is not None:
        out["remaining_today"] = round(max(0.0, budget_daily - spent - held), COST_DECIMALS)
    return out
