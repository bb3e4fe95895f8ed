from stream_app.observe import histogram_quantile, parse_prometheus, total

TEXT = """# HELP x_seconds latency
x_seconds_bucket{le="0.1"} 50.0
x_seconds_bucket{le="0.2"} 90.0
x_seconds_bucket{le="0.5"} 100.0
x_seconds_bucket{le="+Inf"} 100.0
events_total{type="track"} 3.0
events_total{type="page"} 2.0
"""


def test_parse_and_sum() -> None:
    m = parse_prometheus(TEXT)
    assert total(m, "events_total") == 5.0
    assert total(m, "events_total", type="page") == 2.0


def test_quantiles_interpolate_inside_buckets() -> None:
    m = parse_prometheus(TEXT)
    assert histogram_quantile(m, "x_seconds", 0.5) == 0.1
    assert abs((histogram_quantile(m, "x_seconds", 0.7) or 0) - 0.15) < 1e-9
    assert abs((histogram_quantile(m, "x_seconds", 0.95) or 0) - 0.35) < 1e-9
    assert histogram_quantile(m, "x_seconds", 0.5, baseline=m) is None


def test_escaped_quotes_in_label_values_are_read_right() -> None:
    """The hand parser split on '",' and broke on an escaped quote inside a label value."""
    text = 'dlq_total{reason="not \\"json\\", really",kind="x"} 4.0\n'
    m = parse_prometheus(text)
    assert m["dlq_total"] == [({"reason": 'not "json", really', "kind": "x"}, 4.0)]
