"""A deployment's cadence: the usual gap between the tokens of its streams, and how soon its
first token usually comes. Pure.

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
OWN_TOKENS = 10  # until then, a stream's own pace counts after this many tokens
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

    @property
    def known(self) -> bool:
        return self.samples >= MIN_SAMPLES

    @staticmethod
    def own(ceiling: float, first_progress: float, last_progress: float, tokens: int) -> float:
        """Before the deployment's pace is known (its first streams after a start): the
        stall bound from this stream's own pace so far, once it has shown ``OWN_TOKENS``."""
        if tokens < OWN_TOKENS or last_progress <= first_progress:
            return ceiling
        gap = (last_progress - first_progress) / (tokens - 1)
        return min(ceiling, max(FLOOR, FACTOR * gap))


# -- the first token ---------------------------------------------------------------------------
#
# Likewise a first token (for a non-stream request: the whole answer) far later than the
# deployment's usual one is a reason to try elsewhere, not to wait out ``timeouts.first_token``
# (60 s). The usual one is learned like TCP's retransmission timeout (Jacobson/Karels: a smoothed
# mean and mean deviation, RFC 6298), from attempts that succeeded; the bound is ``FIRST_FACTOR``
# times ``mean + 4 x deviation``, never under a floor and never over the configured value (the
# ceiling; also what applies until ``MIN_SAMPLES`` answers were seen). The floor is generous and
# grows with the size of the request: a long prompt takes longer to prefill than the deployment's
# usual ones, and a request must not be cut for being big.
FIRST_FACTOR = 3.0
FIRST_FLOOR = 5.0  # seconds: a first token is never judged late sooner
PREFILL_BYTES_PER_S = 4000.0  # ~1,000 prompt tokens a second: what the floor adds per byte
FIRST_MEAN_GAIN = 0.125  # RFC 6298's alpha
FIRST_DEV_GAIN = 0.25  # RFC 6298's beta
RELOOK = 1.0  # seconds: how often a wait for a first token not known yet is judged again


@dataclass(slots=True)
class FirstToken:
    mean: float = 0.0  # seconds to the first token, usually
    dev: float = 0.0  # its mean deviation
    samples: int = 0
    # FIRST_FACTOR x (mean + 4 x dev), kept by ``observe``; -1 until MIN_SAMPLES were seen.
    # ``bound`` runs once per attempt, so it is plain compares on this (no min/max calls).
    learned: float = -1.0

    def observe(self, seconds: float) -> None:
        """An attempt succeeded; its first token (or whole answer) took ``seconds``."""
        if seconds < 0.0:
            return
        if not self.samples:
            self.mean, self.dev = seconds, seconds / 2.0
        else:
            err = seconds - self.mean
            self.mean += FIRST_MEAN_GAIN * err
            self.dev += FIRST_DEV_GAIN * (abs(err) - self.dev)
        self.samples += 1
        if self.samples >= MIN_SAMPLES:
            self.learned = FIRST_FACTOR * (self.mean + 4.0 * self.dev)

    def bound(self, ceiling: float, request_bytes: int = 0, patience: int = 0) -> float:
        """Seconds after which an attempt of ``request_bytes`` without its first token is late;
        doubled ``patience`` times (attempts of the request already cut for lateness)."""
        learned = self.learned
        if learned < 0.0:
            return ceiling  # fewer than MIN_SAMPLES answers seen
        b = FIRST_FLOOR + request_bytes / PREFILL_BYTES_PER_S
        if learned > b:
            b = learned
        if patience:
            b *= 1 << patience
        return b if b < ceiling else ceiling

    def due(
        self, sent: float, limit: float, ceiling: float, request_bytes: int, now: float
    ) -> float:
        """Before the usual first token is known, an attempt sent at ``sent`` waits for it
        by the bound as it stands *now*, looked at again every ``RELOOK`` seconds: the
        deployment's first answers teach it within a second or two, and an attempt that
        stalled in its first moments must not wait out the ceiling (60 s) for lack of them
        (a storm's non-stream stalls at start-up were its slowest failures). ``limit``: the
        attempt's own end (the request's deadline, ``timeouts.total``). When to look again;
        ``now`` or earlier: it is late."""
        end = sent + self.bound(ceiling, request_bytes)
        if end > limit:
            end = limit
        if self.learned < 0.0 and end > now + RELOOK:
            return now + RELOOK
        return end
