"""`python launch/classification.py`: the launcher maml_tf/launch/classification.py.

Also installed as the console script `maml-tf-classification`; see its module
docstring (`--help`) for the flags.
"""

from maml_tf.launch import classification

if __name__ == "__main__":
  classification.run()
