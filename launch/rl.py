"""`python launch/rl.py`: the launcher maml_tf/launch/rl.py.

Also installed as the console script `maml-tf-rl`; see its module
docstring (`--help`) for the flags.
"""

from maml_tf.launch import rl

if __name__ == "__main__":
  rl.run()
