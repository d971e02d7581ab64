from keel._hedge import MIN_SAMPLES, HedgePolicy


def test_fixed_threshold_has_a_floor() -> None:
    assert HedgePolicy(after=1.5).delay() == 1.5
    assert HedgePolicy(after=0.05, min_after=0.2).delay() == 0.2


def test_percentile_needs_history_then_tracks_the_tail() -> None:
    p = HedgePolicy(percentile=0.9, min_after=0.0)
    for _ in range(MIN_SAMPLES - 1):
        p.observe(0.1)
    assert p.delay() is None  # too little history to know what "late" means
    for i in range(100):
        p.observe(0.1 if i % 10 else 2.0)  # 10 % of first tokens are late
    d = p.delay()
    assert d is not None and 0.1 <= d <= 2.0


def test_budget_caps_hedges_at_the_ratio() -> None:
    p = HedgePolicy(after=1.0, max_ratio=0.1)
    hedged = 0
    for _ in range(1000):
        p.on_request()
        hedged += p.try_hedge()
    assert 100 <= hedged <= 111  # ≈ 10 % (plus the initial burst)
