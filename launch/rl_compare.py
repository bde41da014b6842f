"""`python launch/rl_compare.py`: the launcher maml_tf/launch/rl_compare.py.

Also installed as the console script `maml-tf-rl-compare`; see its module
docstring (`--help`) for the flags.
"""

from maml_tf.launch import rl_compare

if __name__ == "__main__":
  rl_compare.run()
