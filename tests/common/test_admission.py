from lightpd.common.engine.admission import OutputLengthEstimator, peak_tokens


def test_peak_tokens_matches_hand_computed_schedule():
    # (remaining b, current a). Sorted by b: (10, 5), (4, 20), (1, 100).
    # i=1: 5 + 1*10 = 15; i=2: 25 + 2*4 = 33; i=3: 125 + 3*1 = 128.
    assert peak_tokens([(4, 20), (1, 100), (10, 5)]) == 128
    # A long-running request dominates when the others are short.
    # Sorted: (100, 10), (2, 10): i=1: 110; i=2: 20 + 4 = 24.
    assert peak_tokens([(2, 10), (100, 10)]) == 110
    assert peak_tokens([]) == 0


def test_estimator_is_conservative_until_it_has_history():
    estimator = OutputLengthEstimator(min_samples=4, quantile=0.5)
    assert estimator.expected_output(max_new_tokens=500) == 500
    for length in (10, 20, 30, 40):
        estimator.observe(length)
    assert estimator.expected_output(max_new_tokens=500) == 30
    # Never above what the request allows.
    assert estimator.expected_output(max_new_tokens=12) == 12
