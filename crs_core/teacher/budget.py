"""What calls may cost and did: prices ($ per 1M tokens), the `Budget` limits, the `Tally` of a
teacher's counters, and the ledger that reserves a call's worst case before it is made."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class Price:
    """US dollars per 1M input (prompt) and output (completion) tokens."""

    input_per_1m: float
    output_per_1m: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_1m + completion_tokens * self.output_per_1m) / 1e6


FREE = Price(0.0, 0.0)

# List prices in USD per 1M tokens as published by OpenAI for these models (standard tier).
# Prices change: check them and override in TeacherConfig.prices. Dated snapshots
# ("gpt-4o-2024-08-06") match their family by the longest prefix.
DEFAULT_PRICES: dict[str, Price] = {
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "gpt-4-turbo": Price(10.00, 30.00),
    "gpt-3.5-turbo": Price(0.50, 1.50),
}


def price_for(model: str, prices: Mapping[str, Price]) -> Price | None:
    """The model's price: an exact entry, else the longest entry that prefixes the name."""
    if model in prices:
        return prices[model]
    best = None
    for name in prices:
        if model.startswith(name) and (best is None or len(name) > len(best)):
            best = name
    return prices[best] if best is not None else None

@dataclass(frozen=True)
class Budget:
    """Limits for a teacher's real (not cached) calls; None = no limit, 0 = no call at all.

    max_tokens counts prompt + completion tokens; max_cost is in US dollars (needs a price for
    the model, local models cost 0). A call counts against max_calls once, retries included.
    """

    max_calls: int | None = None
    max_tokens: int | None = None
    max_cost: float | None = None

    @property
    def unlimited(self) -> bool:
        return self.max_calls is None and self.max_tokens is None and self.max_cost is None

    def describe(self) -> str:
        parts = []
        if self.max_calls is not None:
            parts.append(f"{self.max_calls} calls")
        if self.max_tokens is not None:
            parts.append(f"{self.max_tokens:,} tokens")
        if self.max_cost is not None:
            parts.append(f"${self.max_cost:.4f}")
        return ", ".join(parts) or "unlimited"


@dataclass(frozen=True)
class Tally:
    """What a teacher has done since it was made (or ``reset_tally``): a consistent snapshot."""

    calls: int = 0  # real calls that returned a completion
    cached_hits: int = 0
    failures: int = 0  # calls that failed after their retries
    retries: int = 0  # extra HTTP attempts
    requests: int = 0  # HTTP requests sent
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0  # US dollars, priced calls only
    unpriced_calls: int = 0  # calls whose model has no price
    in_flight: int = 0
    budget_refused: int = 0  # requests not made because of the budget
    resent: int = 0  # calls an earlier process had in flight when it stopped, sent again now

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["total_tokens"] = self.total_tokens
        return d


ZERO_COUNTS: dict[str, Any] = {f.name: f.default for f in fields(Tally)}


class Ledger:
    """Budget accounting with reservations for in-flight calls. Used on the teacher loop only
    (no lock); other threads just read ``budget`` and ``exhausted``."""

    def __init__(self, budget: Budget | None):
        self.budget = budget or Budget()
        self.used_calls = 0
        self.used_tokens = 0
        self.used_cost = 0.0
        self.res_calls = 0
        self.res_tokens = 0
        self.res_cost = 0.0
        self.exhausted: str | None = None
        self._settled: asyncio.Future | None = None  # done when a reservation is settled

    def _fits(self, tokens: int, cost: float) -> str | None:
        b = self.budget
        zero = [n for n, v in (("calls", b.max_calls), ("tokens", b.max_tokens), ("cost", b.max_cost))
                if v is not None and v <= 0]
        if zero:
            return f"the budget is 0 ({', '.join('max_' + n for n in zero)} = 0), so no call is made"
        if b.max_calls is not None and self.used_calls + self.res_calls + 1 > b.max_calls:
            return f"the call limit ({b.max_calls} calls; {self.used_calls} made)"
        if b.max_tokens is not None and self.used_tokens + self.res_tokens + tokens > b.max_tokens:
            return (f"the token limit ({b.max_tokens:,} tokens; {self.used_tokens:,} used, "
                    f"the next call may take up to {tokens:,})")
        if b.max_cost is not None and self.used_cost + self.res_cost + cost > b.max_cost + 1e-12:
            return (f"the money limit (${b.max_cost:.4f}; ${self.used_cost:.4f} spent, "
                    f"the next call may cost up to ${cost:.4f})")
        return None

    async def reserve(self, tokens: int, cost: float, cancelled: Callable[[], bool]) -> tuple[int, float] | str:
        """Reserve a call's worst case; returns the reservation, or the reason it cannot be made."""
        if self.budget.unlimited:
            return (0, 0.0)
        while True:
            if self.exhausted is not None:
                return self.exhausted
            reason = self._fits(tokens, cost)
            if reason is None:
                self.res_calls += 1
                self.res_tokens += tokens
                self.res_cost += cost
                return (tokens, cost)
            if self.res_calls == 0:  # nothing in flight can free room: stop for good
                self.exhausted = (reason if "budget is 0" in reason
                                  else f"budget reached: {reason}; no further calls are made")
                return self.exhausted
            if cancelled():
                return "cancelled"
            if self._settled is None:
                self._settled = asyncio.get_running_loop().create_future()
            await asyncio.wait([self._settled], timeout=0.5)  # in-flight calls settle with their real usage

    def settle(self, reservation: tuple[int, float], tokens: int, cost: float, *, made: bool = True) -> None:
        """Replace a reservation by the call's real usage (made=False: no request was sent)."""
        if self.budget.unlimited:
            return
        self.res_calls -= 1
        self.res_tokens -= reservation[0]
        self.res_cost -= reservation[1]
        self.used_calls += int(made)
        self.used_tokens += tokens
        self.used_cost += cost
        if self._settled is not None:
            self._settled.set_result(None)
            self._settled = None
