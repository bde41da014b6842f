"""Durations in progress lines."""

from maml_tf.common.progress import format_duration


def test_format_duration():
  assert format_duration(3723.9) == "1h02m03s"
  assert format_duration(83) == "1m23s"
  assert format_duration(5) == "5s"
  assert format_duration(-3) == "0s"
