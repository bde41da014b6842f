"""Utilities shared by the training families and meta-RL: results files,
statistics and run configs (no TensorFlow model code)."""
