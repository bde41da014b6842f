"""How launchers end: interrupted runs and missing files."""

import pytest

from maml_tf.common import interrupts


def _raise(error):
  raise error


def test_an_interrupted_run_exits_143_saying_how_to_resume(capsys):
  with pytest.raises(SystemExit) as exit_info:
    interrupts.exit_if_interrupted(_raise, interrupts.Interrupted(7))
  assert exit_info.value.code == 143
  assert "interrupted at step 7" in capsys.readouterr().out


def test_a_missing_file_exits_1_with_its_message_alone():
  with pytest.raises(SystemExit) as exit_info:
    interrupts.exit_if_interrupted(
        _raise, FileNotFoundError("eval_only: no checkpoint under /x"))
  assert exit_info.value.code == "error: eval_only: no checkpoint under /x"
  assert interrupts.exit_if_interrupted(lambda x: x + 1, 1) == 2


def test_a_user_facing_error_exits_1_with_its_message_alone():
  from maml_tf.common import run_config  # pylint: disable=g-import-not-at-top
  from maml_tf.tasks import omniglot  # pylint: disable=g-import-not-at-top
  for error in (run_config.ConfigMismatchError("runs/x holds another run"),
                omniglot.DataUnavailableError("pass --data_dir")):
    with pytest.raises(SystemExit) as exit_info:
      interrupts.exit_if_interrupted(_raise, error)
    assert exit_info.value.code == f"error: {error}"
  with pytest.raises(ValueError, match="a bug"):   # others keep a traceback
    interrupts.exit_if_interrupted(_raise, ValueError("a bug"))


def test_a_ctrl_c_outside_training_and_a_nan_end_in_one_line(capsys):
  with pytest.raises(SystemExit) as exit_info:
    interrupts.exit_if_interrupted(_raise, KeyboardInterrupt())
  assert exit_info.value.code == 130
  assert "run the same command again" in capsys.readouterr().out
  with pytest.raises(SystemExit) as exit_info:
    interrupts.exit_if_interrupted(
        _raise, FloatingPointError("loss is NaN at step 3"))
  assert exit_info.value.code == "error: loss is NaN at step 3"
