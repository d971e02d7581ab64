"""A deployment's cadence: the usual gap between the tokens of its streams. Pure.

A stream that goes silent is judged against the pace its deployment usually keeps, not only
against ``timeouts.idle`` (30 s by default): a voice bot cannot wait that long, and a
deployment that streams a token every 30 ms and has said nothing for 2 s has stalled. The
stall bound is ``factor`` times the usual gap, never under ``floor`` (providers do pause a
little) and never over the configured ``idle`` (the ceiling; also what applies until the
deployment has shown its pace in ``min_samples`` complete streams). The usual gap is an EWMA
of each complete stream's mean gap; peaks are not chased (a slow stream is not a stall).
"""

from __future__ import annotations

from dataclasses import dataclass

FACTOR = 20.0  # a stall: this many usual gaps without a token
FLOOR = 2.0  # seconds: never judged stalled sooner
MIN_SAMPLES = 5  # complete streams before the learned pace is trusted
ALPHA = 0.2  # EWMA weight of the newest stream


@dataclass(slots=True)
class Cadence:
    gap: float = 0.0  # seconds between two tokens, usually
    samples: int = 0

    def observe(self, first_progress: float, last_progress: float, tokens: int) -> None:
        """A stream completed: ``tokens`` content chunks between the two times."""
        if tokens < 2 or last_progress <= first_progress:
            return
        gap = (last_progress - first_progress) / (tokens - 1)
        self.gap = gap if not self.samples else self.gap + ALPHA * (gap - self.gap)
        self.samples += 1

    def idle(self, ceiling: float) -> float:
        """Seconds of silence after which a stream of this deployment has stalled."""
        if self.samples < MIN_SAMPLES:
            return ceiling
        return min(ceiling, max(FLOOR, FACTOR * self.gap))
