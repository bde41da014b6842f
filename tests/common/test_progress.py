"""Durations and speed in progress lines."""

from maml_tf.common.progress import format_duration, format_speed


def test_format_duration():
  assert format_duration(3723.9) == "1h02m03s"
  assert format_duration(83) == "1m23s"
  assert format_duration(5) == "5s"
  assert format_duration(-3) == "0s"


def test_format_speed_switches_to_seconds_per_iteration_below_one():
  assert format_speed(12.34, 83, 50) == "12.3 it/s, elapsed 1m23s, left 4s"
  assert format_speed(1 / 34.2, 3900, 349) == (
      "34.2 s/it, elapsed 1h05m00s, left 3h18m55s")
  assert format_speed(1.0, 5, 3).startswith("1.0 it/s")
