"""Limits per dependency, shared by every worker through Redis: rate, concurrency, tokens, pushback.

A call to a dependency (the mail provider, the LLM API) first takes a permit here:

- `requests_per_second` and `tokens_per_minute`: a reservation on a shared schedule (GCRA: each
  permit reserves the next free slot, `1 / rate` after the last one; a completion reserves its
  prompt's estimate plus what recent answers used, and `Permit.release` settles with the
  provider's reported usage);
- `max_concurrency`, once the turn came: a lease in a Redis sorted set (member = permit id,
  score = when the lease lapses), so a worker that dies holding one gives it back after the lease
  time;
- a provider's `Retry-After` (`throttled`) pauses the dependency for every worker until then.

A permit that would wait longer than `max_wait` is not reserved: `MustWait` tells the caller to
hand the message back to the broker (no attempt used, no prefetch slot held) until its place in
the line of refused calls: each refusal takes the next place on a second schedule (`defer`), one
call's interval after the last, starting where the reservations end, so a backlog comes back
spread at the pace the limit lets calls out instead of all at once, every `max_wait`. That line
reserves nothing: a call granted now is never held back by it.

Why a Lua script and not the `limits` library: its strategies are counting windows (fixed,
moving, sliding) that let a whole window's requests out at once, which a provider counting its
own window answers with 429s at every edge, and they cannot give back tokens reserved beyond the
reported usage nor cap calls in flight. A reservation schedule paces calls evenly, settles
tokens both ways and costs one round trip a call.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from streams.core import metrics
from streams.core.logging import get_logger
from streams.core.periodic import Periodic
from streams.core.settings import DependencyLimits

log = get_logger("pipeline.limits")

KEY_PREFIX = "pipeline:limits:"
# Keys outlive the last call by this long (milliseconds), then Redis forgets the dependency.
KEY_TTL_MS = 3_600_000
# How long a throttled dependency still reports as throttled after its pause ended (no flapping).
THROTTLE_HOLD = 2.0
# Calls are spaced this much wider than the limit allows: evenly spaced calls at exactly the limit put
# the N+1th call on the edge of the provider's window, where a few milliseconds of jitter make it a 429.
PACE_MARGIN = 1.02
# Tokens reserved for an answer until this worker has seen what the provider's answers use;
# after that, a moving average of what they used (ANSWER_WEIGHT: the newest one's share).
DEFAULT_ANSWER_TOKENS = 256
ANSWER_WEIGHT = 0.2
# How often a waiter for a concurrency slot asks again (seconds, jittered).
SLOT_POLL = (0.005, 0.025)

# KEYS[1] = the dependency's hash. ARGV: req interval (ms a request), tok interval (ms a token,
# 0: none), tokens, max wait (ms), key TTL (ms), tokens a place in the line stands for.
# Returns {granted (1/0), wait ms}: granted, the wait before the reserved turn; refused, the wait
# until its place in the line of refused calls.
RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local req_iv, tok_iv = tonumber(ARGV[1]), tonumber(ARGV[2])
local tokens, max_wait = tonumber(ARGV[3]), tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'req', 'tok', 'paused', 'defer')
local start = math.max(now, tonumber(state[3] or '0'))
if req_iv > 0 then start = math.max(start, tonumber(state[1] or '0')) end
if tok_iv > 0 then start = math.max(start, tonumber(state[2] or '0')) end
local wait = start - now
if wait > max_wait then
  local place = math.max(start, tonumber(state[4] or '0'))
  redis.call('HSET', KEYS[1], 'defer', tostring(place + math.max(req_iv, tok_iv * tonumber(ARGV[6]))))
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return {0, tostring(place - now)}
end
if req_iv > 0 then redis.call('HSET', KEYS[1], 'req', tostring(start + req_iv)) end
if tok_iv > 0 then redis.call('HSET', KEYS[1], 'tok', tostring(start + tok_iv * tokens), 'last', tostring(start)) end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {1, tostring(wait)}
"""
# KEYS[1] = the dependency's hash. ARGV: ms to move the token schedule by (negative: give back).
# Tokens given back never move the schedule before the last turn granted: calls already given
# later turns (reserved with a larger estimate) would otherwise overlap the ones placed in the
# freed time, and the provider's window would see more than the limit.
SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local state = redis.call('HMGET', KEYS[1], 'tok', 'last')
local shift = tonumber(ARGV[1])
local tok = math.max(tonumber(state[1] or '0'), now) + shift
if shift < 0 then tok = math.max(tok, tonumber(state[2] or '0')) end
redis.call('HSET', KEYS[1], 'tok', tostring(tok))
return 1
"""
# KEYS[1] = the dependency's hash. ARGV: pause (ms from now). Returns the pause's end (ms since epoch).
PAUSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local paused = math.max(tonumber(redis.call('HGET', KEYS[1], 'paused') or '0'), now + tonumber(ARGV[1]))
redis.call('HSET', KEYS[1], 'paused', tostring(paused))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return tostring(paused)
"""
# KEYS[1] = the dependency's lease set. ARGV: most leases, lease (ms), permit id. Returns 1 when leased.
LEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


class MustWait(Exception):
    """The dependency is at its limit for longer than a worker holds a message: wait `seconds` on the broker."""

    def __init__(self, dependency: str, seconds: float, reason: str) -> None:
        super().__init__(f"{dependency} at its limit ({reason}) for {seconds:.1f} s")
        self.dependency = dependency
        self.seconds = seconds
        self.reason = reason


@dataclass
class Permit:
    """One call's right to use a dependency; `release` it when the call ended."""

    limiter: Limiter
    dependency: str
    lease: str | None = None
    tokens: int = 0  # reserved: the input's estimate plus the answer's
    prompt: int = 0  # the input's estimate
    released: bool = False

    async def release(self, used_tokens: int | None = None) -> None:
        """Give the concurrency slot back and settle the reserved tokens with what was used."""
        if self.released:
            return
        self.released = True
        await self.limiter.release(self, used_tokens)


@dataclass
class _Dependency:
    name: str
    limits: DependencyLimits
    lease_ms: int
    local: asyncio.Semaphore | None = None
    paused_until: float = 0.0  # wall clock, seconds
    throttled: bool = False
    in_flight: int = 0
    waiting: int = 0
    pushed_back: int = 0
    last_pushback: float = 0.0
    # Tokens an answer is expected to use, learned from the usage the provider reports.
    answer_tokens: float = DEFAULT_ANSWER_TOKENS
    answers_seen: int = 0

    def __post_init__(self) -> None:
        # The schedules' spacing (ms a request, ms a token; 0: no such limit), worked out once.
        limits = self.limits
        self.request_ms = PACE_MARGIN * 1000.0 / limits.requests_per_second if limits.requests_per_second else 0.0
        self.token_ms = PACE_MARGIN * 60_000.0 / limits.tokens_per_minute if limits.tokens_per_minute else 0.0
        # This dependency's metric series, looked up once rather than by label on every call.
        self.wait_seconds = metrics.DEPENDENCY_WAIT.labels(self.name)
        self.in_flight_gauge = metrics.DEPENDENCY_IN_FLIGHT.labels(self.name)
        self.throttled_count = metrics.THROTTLED.labels(self.name)

    @property
    def enforced(self) -> bool:
        """Whether calls go through Redis before they start (a limit is set)."""
        limits = self.limits
        return bool(limits.requests_per_second or limits.max_concurrency or limits.tokens_per_minute)


class _Scripts:
    """The Lua scripts, registered on one Redis client."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.reserve = client.register_script(RESERVE)
        self.settle = client.register_script(SETTLE)
        self.pause = client.register_script(PAUSE)
        self.lease = client.register_script(LEASE)


class Limiter(Periodic):
    """The shared limits of every dependency this worker calls; its loop learns other workers' pauses."""

    name = "limits"
    quiet_failures = True  # Redis down shows in health already

    def __init__(
        self,
        client: aioredis.Redis | None,
        limits: Mapping[str, DependencyLimits],
        *,
        max_wait: float,
        lease_seconds: Mapping[str, float] | None = None,
        interval: float = 0.25,
    ) -> None:
        super().__init__(interval)
        if client is None and any(limits.values()):
            raise ValueError("limits are shared through Redis: a Limiter with limits needs a Redis client")
        self.client = client
        self.max_wait = max_wait
        self.configured = dict(limits)
        self.lease_seconds = dict(lease_seconds or {})
        self.dependencies: dict[str, _Dependency] = {}
        self._scripts = _Scripts(client) if client is not None else None
        self._rng = random.Random()  # noqa: S311 - jitter, not cryptography

    def dependency(self, name: str) -> _Dependency:
        """The state of one dependency (known from its first use, or `add`)."""
        dep = self.dependencies.get(name)
        if dep is None:
            limits = self.configured.get(name, DependencyLimits())
            # A lease outlives the longest call it may cover: the wait for its turn, then the call.
            lease = self.max_wait + self.lease_seconds.get(name, 60.0) + 5.0
            dep = _Dependency(name, limits, lease_ms=int(lease * 1000))
            if limits.max_concurrency:
                dep.local = asyncio.Semaphore(limits.max_concurrency)
            self.dependencies[name] = dep
            dep.in_flight_gauge.set(0)
        return dep

    def key(self, name: str) -> str:
        """The Redis hash that holds a dependency's schedule and pause."""
        return f"{KEY_PREFIX}{name}"

    async def acquire(self, name: str, tokens: int = 0) -> Permit:
        """Wait for a permit to call dependency `name`; `MustWait` when too long. With a token budget,
        it reserves `tokens` (the input's estimate) plus what an answer is expected to use."""
        dep = self.dependency(name)
        started = time.monotonic()
        permit = Permit(self, name)
        if dep.limits.tokens_per_minute:
            permit.prompt = tokens
            permit.tokens = tokens + round(dep.answer_tokens)
        dep.waiting += 1
        try:
            if not dep.enforced:
                await self._wait_for_pause(dep)
            else:
                # The turn first, then the slot: a slot taken first is held idle through the wait for
                # the turn, and under a backlog every slot waits so, the cap and not the rate setting
                # the pace (64 slots each held ~0.3 s for its turn: 150 calls/s of a 200/s limit).
                await self._take_turn(dep, permit)
                if dep.limits.max_concurrency:
                    try:
                        await self._take_slot(dep, permit)
                    except BaseException:
                        await self._give_back_tokens(dep, permit)  # the turn is lost, its tokens are not
                        raise
        finally:
            dep.waiting -= 1
            dep.wait_seconds.observe(time.monotonic() - started)
        dep.in_flight += 1
        dep.in_flight_gauge.inc()
        return permit

    async def _wait_for_pause(self, dep: _Dependency) -> None:
        """No limit set: only a provider's pushback (seen by any worker) holds calls back."""
        wait = dep.paused_until - time.time()
        if wait <= 0:
            return
        if wait > self.max_wait:
            raise MustWait(dep.name, wait, "throttled by the provider")
        await asyncio.sleep(wait)

    async def _take_slot(self, dep: _Dependency, permit: Permit) -> None:
        limit = dep.limits.max_concurrency
        assert dep.local is not None
        assert limit is not None
        deadline = time.monotonic() + self.max_wait
        try:
            await asyncio.wait_for(dep.local.acquire(), self.max_wait)
        except TimeoutError:
            raise MustWait(dep.name, 1.0, f"{limit} calls in flight") from None
        lease = uuid.uuid4().hex
        while not await self.scripts.lease(keys=[self.key(dep.name) + ":leases"], args=[limit, dep.lease_ms, lease]):
            if time.monotonic() >= deadline:
                dep.local.release()
                raise MustWait(dep.name, 1.0, f"{limit} calls in flight across workers")
            await asyncio.sleep(self._rng.uniform(*SLOT_POLL))
        permit.lease = lease

    async def _give_slot(self, dep: _Dependency, permit: Permit) -> None:
        if permit.lease is None:
            return
        lease, permit.lease = permit.lease, None
        if dep.local is not None:
            dep.local.release()
        await self.scripts.client.zrem(self.key(dep.name) + ":leases", lease)

    async def _take_turn(self, dep: _Dependency, permit: Permit) -> None:
        req_iv, tok_iv = dep.request_ms, dep.token_ms
        if not req_iv and not tok_iv:
            await self._wait_for_pause(dep)
            return
        # A place in the line stands for what the call is expected to use: its prompt, and the answer
        # once answers were seen (until then the prompt alone: a line spaced too tight only sends a
        # few calls back twice, one spaced too wide leaves turns unused).
        line_tokens = permit.prompt + (round(dep.answer_tokens) if dep.answers_seen else 0)
        args = [req_iv, tok_iv, permit.tokens, self.max_wait * 1000, KEY_TTL_MS, line_tokens]
        granted, wait_ms = await self.scripts.reserve(keys=[self.key(dep.name)], args=args)
        wait = float(wait_ms) / 1000
        if not int(granted):
            schedules = (("requests per second", req_iv), ("tokens per minute", tok_iv))
            raise MustWait(dep.name, wait, " and ".join(name for name, iv in schedules if iv))
        if wait > 0:
            await asyncio.sleep(wait)

    async def _settle(self, dep: _Dependency, tokens: int) -> None:
        """Move the token schedule by `tokens` (negative: give them back)."""
        await self.scripts.settle(keys=[self.key(dep.name)], args=[tokens * dep.token_ms])

    async def _give_back_tokens(self, dep: _Dependency, permit: Permit) -> None:
        if not dep.token_ms or not permit.tokens:
            return
        try:
            await self._settle(dep, -permit.tokens)
        except RedisError as exc:
            log.warning("could not give back the tokens of a call that did not start", error=repr(exc))

    async def release(self, permit: Permit, used_tokens: int | None) -> None:
        """End of a call: free its slot, settle its tokens."""
        dep = self.dependency(permit.dependency)
        dep.in_flight -= 1
        dep.in_flight_gauge.dec()
        await self._give_slot(dep, permit)
        if dep.limits.tokens_per_minute and used_tokens:
            answer = max(used_tokens - permit.prompt, 0)
            weight = ANSWER_WEIGHT if dep.answers_seen else 1.0
            dep.answer_tokens += weight * (answer - dep.answer_tokens)
            dep.answers_seen += 1
        if dep.token_ms and used_tokens is not None and used_tokens != permit.tokens:
            await self._settle(dep, used_tokens - permit.tokens)

    async def throttled(self, name: str, retry_after: float) -> None:
        """The provider pushed back: pause the dependency for every worker for `retry_after` seconds."""
        dep = self.dependency(name)
        dep.pushed_back += 1
        dep.last_pushback = time.time()
        dep.throttled_count.inc()
        self._learn(dep, time.time() + retry_after)  # this worker holds back at once, Redis or not
        if self._scripts is None:
            return
        try:
            paused = await self._scripts.pause(keys=[self.key(name)], args=[max(retry_after, 0.0) * 1000, KEY_TTL_MS])
        except RedisError as exc:
            log.warning("could not share a pause with the other workers", dependency=name, error=repr(exc))
            return
        self._learn(dep, float(paused) / 1000)

    def _learn(self, dep: _Dependency, paused_until: float) -> None:
        dep.paused_until = max(dep.paused_until, paused_until)
        now = time.time()
        throttled = now < dep.paused_until + THROTTLE_HOLD
        if throttled and not dep.throttled:
            log.warning("dependency throttled", dependency=dep.name, resume_in_seconds=round(dep.paused_until - now, 3))
        elif dep.throttled and not throttled:
            log.warning("dependency no longer throttled", dependency=dep.name, pushbacks=dep.pushed_back)
        dep.throttled = throttled

    async def tick(self) -> None:
        """Learn the pauses other workers were told about."""
        await self.refresh()

    @property
    def scripts(self) -> _Scripts:
        """The Redis side (only enforced limits reach it, and those need a client)."""
        assert self._scripts is not None
        return self._scripts

    async def refresh(self) -> None:
        """Learn the pauses other workers were told about; say when a dependency stops being throttled."""
        if not self.dependencies:
            return
        deps = list(self.dependencies.values())
        if self.client is None:
            for dep in deps:
                self._learn(dep, 0.0)
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for dep in deps:
                pipe.hget(self.key(dep.name), "paused")
            answers = await pipe.execute()
        for dep, paused in zip(deps, answers, strict=True):
            self._learn(dep, float(paused) / 1000 if paused else 0.0)

    def status(self) -> dict[str, dict[str, Any]]:
        """Per dependency, as `/health/consumers` shows it."""
        now = time.time()
        return {
            dep.name: {
                "throttled": dep.throttled,
                "paused_for_seconds": round(max(dep.paused_until - now, 0.0), 3),
                "in_flight": dep.in_flight,
                "waiting": dep.waiting,
                "throttled_answers": dep.pushed_back,
                "limits": dep.limits.model_dump(exclude_none=True),
            }
            for dep in self.dependencies.values()
        }
