"""How often a sender may send feedback, and how often an address may present a wrong key.

Rates are counted in this process's memory (a moving window, from the `limits` library), so with several
replicas each allows the rate; a key's daily feedback quota is counted in the database, so it holds across them.
Callers without a key are counted per address (the rate and the quota, in memory): one keyless client cannot use
up every keyless client's allowance.
"""

from __future__ import annotations

import time
from datetime import timedelta

from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from tuneloop.config import ServeConfig
from tuneloop.db.schema import ANONYMOUS, utc_now
from tuneloop.errors import TooManyRequests
from tuneloop.feedback.log import PredictionLog
from tuneloop.serve.security import Caller


class Throttle:
    def __init__(self, config: ServeConfig) -> None:
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self.feedback_rate: RateLimitItem | None = (
            parse(config.feedback_rate_limit) if config.feedback_rate_limit else None
        )
        self.daily_quota = config.feedback_daily_quota
        self.anonymous_daily: RateLimitItem | None = (
            parse(f"{config.feedback_daily_quota}/day") if config.feedback_daily_quota else None
        )
        self.auth_failures: RateLimitItem = parse(f"{config.auth_failures_per_minute}/minute")

    def _retry_after(self, item: RateLimitItem, *identifiers: str) -> int:
        return int(self._limiter.get_window_stats(item, *identifiers).reset_time - time.time()) + 1

    def count_feedback(self, caller: Caller, prediction_log: PredictionLog) -> None:
        """Count one feedback of `caller`, or refuse it (429): trusted senders are not limited; a sender without a
        key is counted by its address."""
        if caller.trusted:
            return
        sender = caller.sender if caller.sender != ANONYMOUS else f"{ANONYMOUS}@{caller.address}"
        if self.feedback_rate is not None and not self._limiter.hit(self.feedback_rate, "feedback", sender):
            raise TooManyRequests(
                f"{sender} sent more than {self.feedback_rate} feedback (serve.feedback_rate_limit); "
                "slow down, or ask for a trusted key",
                self._retry_after(self.feedback_rate, "feedback", sender),
            )
        if caller.sender == ANONYMOUS:
            if self.anonymous_daily is not None and not self._limiter.hit(self.anonymous_daily, "daily", sender):
                raise TooManyRequests(
                    f"{sender} sent {self.daily_quota} feedback in the last 24 hours, its quota "
                    "(serve.feedback_daily_quota); try again tomorrow, or use an API key",
                    self._retry_after(self.anonymous_daily, "daily", sender),
                )
        elif self.daily_quota is not None:
            sent = prediction_log.feedback_count_since(caller.sender, utc_now() - timedelta(days=1))
            if sent >= self.daily_quota:
                raise TooManyRequests(
                    f"{caller.sender} sent {sent} feedback in the last 24 hours, its quota "
                    "(serve.feedback_daily_quota); try again tomorrow, or ask for a trusted key",
                    3600,
                )

    def blocked_for(self, address: str) -> int | None:
        """Seconds until an address that presented too many wrong keys within the last minute may try again, or
        None when it is not blocked."""
        if self._limiter.test(self.auth_failures, "auth", address):
            return None
        return self._retry_after(self.auth_failures, "auth", address)

    def count_failure(self, address: str) -> None:
        self._limiter.hit(self.auth_failures, "auth", address)
