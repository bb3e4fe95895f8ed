"""Structured logs: every record becomes one JSON line, whatever its extra fields hold."""

from __future__ import annotations

import logging

import orjson

from stream_app.logs import JsonFormatter


def test_a_record_whose_extra_has_non_string_keys_is_still_one_json_line() -> None:
    record = logging.LogRecord("stream_app", logging.INFO, __file__, 1, "offsets", None, None)
    record.offsets = {0: 151, 3: 90}  # per partition: int keys (orjson refuses them by default)
    line = JsonFormatter().format(record)
    assert orjson.loads(line)["offsets"] == {"0": 151, "3": 90}
