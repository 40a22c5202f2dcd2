"""Load shedding: refuse new work with 503 before it queues, lowest priority first.

The ingress runs `LoadShedder.run(probe)` as a background task: every ~1 s it asks `probe()`
for a `LoadSample` (the aligner's queued and ongoing requests against its capacity, its recent
batch wait, the scanner's backlog) and keeps the latest. Requests only read that sample: no
per-request probing, no CPU sampling.

From the sample:
- `level`: the most loaded stage's utilisation, 0 idle, 1 at capacity, above 1 queueing beyond it;
- `load_factor`: 1 up to `reduce_above`, then falling linearly to `min_load_factor` at level 1;
  the rate limiter multiplies bucket capacities by it;
- `should_shed(priority)`: true once the level reaches the plan priority's threshold, which rises
  linearly from `shed_above` (priority 0) to `shed_top_priority_above` (priority 10), so premium
  traffic is shed last.

Shed on measured load only. A probe that fails or does not answer within `sample_interval_s`
is counted (`probe_failures`, and `on_probe_failure` for the metric) and is never turned into a
reading: a slow probe says the probe is slow, not that the aligner is full (a replica busy with one
long batch answers late while holding 1 of its 16 slots). The previous measured sample stays in
force until it is older than `max_sample_age_s`; then the load is unknown and nothing is shed (the
per-replica concurrency cap and Serve's `max_queued_requests` still bound the work). Deterministic
given samples and the clock, so the policy is tested directly.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from serve_app.settings import SheddingOptions

logger = logging.getLogger(__name__)

MAX_PRIORITY = 10  # settings.Plan.priority's upper bound


@dataclass(frozen=True)
class LoadSample:
    aligner_ongoing: int  # requests the aligner replicas are processing
    aligner_queued: int  # requests waiting for a batch or a replica
    aligner_capacity: int  # how many the aligner replicas can hold at once (replicas x max ongoing)
    batch_wait_s: float  # recent mean time a request waited for its batch
    scanner_backlog: int  # uploads waiting for or in a scan
    scanner_capacity: int  # how many scans the scanner replicas run at once


class LoadShedder:
    def __init__(self, options: SheddingOptions = SheddingOptions(), clock: Callable[[], float] = time.monotonic):
        self.options = options
        self._clock = clock
        self._sample: LoadSample | None = None
        self._sampled_at = -math.inf
        self.probe_failures = 0  # exported as a metric by the ingress
        self.shed_count = 0  # exported as a metric by the ingress

    def update(self, sample: LoadSample) -> None:
        self._sample = sample
        self._sampled_at = self._clock()

    @property
    def level(self) -> float:
        """Utilisation of the most loaded stage; 0 when the load is unknown (no recent sample)."""
        sample = self._sample
        if sample is None or self._clock() - self._sampled_at > self.options.max_sample_age_s:
            return 0.0
        return max(
            _utilisation(sample.aligner_ongoing + sample.aligner_queued, sample.aligner_capacity),
            _utilisation(sample.scanner_backlog, sample.scanner_capacity),
            sample.batch_wait_s / self.options.target_batch_wait_s,
        )

    @property
    def load_factor(self) -> float:
        options = self.options
        overload = (self.level - options.reduce_above) / (1 - options.reduce_above)
        return 1 - (1 - options.min_load_factor) * min(1.0, max(0.0, overload))

    def should_shed(self, plan_priority: int) -> bool:
        options = self.options
        threshold = options.shed_above + (options.shed_top_priority_above - options.shed_above) * plan_priority / MAX_PRIORITY
        if self.level < threshold:
            return False
        self.shed_count += 1
        return True

    async def run(
        self,
        probe: Callable[[], Awaitable[LoadSample]],
        on_probe_failure: Callable[[str], None] = lambda error_type: None,
    ) -> None:
        """Sample forever (until cancelled); the ingress owns the task and counts failures in a metric."""
        while True:
            interval_s = self.options.sample_interval_s  # live: reconfigure() may change it
            try:
                self.update(await asyncio.wait_for(probe(), timeout=interval_s))
            except asyncio.CancelledError:
                raise
            except Exception as error:  # timeout or any probe error: a signal to count, never a reading
                self.probe_failures += 1
                on_probe_failure(type(error).__name__)
                logger.warning("load probe failed (%s); %d failures so far", type(error).__name__, self.probe_failures)
            await asyncio.sleep(interval_s)


def _utilisation(load: int, capacity: int) -> float:
    """No capacity at all (no replica up) is overload, not idleness."""
    return load / capacity if capacity > 0 else math.inf
