"""Returns, advantages and rllab's linear feature baseline (numpy, batched).

All functions take padded ``[T, N, H]`` arrays with a ``mask`` of valid steps
(see :class:`maml_tf.rl.sampler.Trajectories`) and treat every task ``T``
separately: the baseline is fit per task, and advantages are normalised per
task (rllab's ``center_adv``), as in the paper's code.

Example:
  >>> values = fit_linear_baseline(batch.obs, returns, batch.mask)
  >>> adv = gae_advantages(batch.rewards, values, batch.mask, 0.99, 1.0)
  >>> adv = normalize_advantages(adv, batch.mask)
"""

import numpy as np


def discounted_returns(rewards: np.ndarray, mask: np.ndarray,
                       gamma: float) -> np.ndarray:
  """``R_t = sum_k gamma^k r_{t+k}`` within each episode, ``[..., H]``.

  Arguments:
    rewards: ``[..., H]`` rewards (zero where ``mask`` is 0).
    mask: ``[..., H]`` valid steps.
    gamma: discount factor.

  Example:
    >>> discounted_returns(np.ones((1, 3)), np.ones((1, 3)), 0.5)  # [1.75, 1.5, 1]
  """
  rewards = rewards * mask
  out = np.zeros_like(rewards, dtype=np.float64)
  running = np.zeros(rewards.shape[:-1])
  for t in range(rewards.shape[-1] - 1, -1, -1):
    running = rewards[..., t] + gamma * running * mask[..., t]
    out[..., t] = running
  return out * mask


def baseline_features(obs: np.ndarray, horizon_scale: float = 100.0):
  """rllab's LinearFeatureBaseline features of ``obs[..., H, D]``.

  ``[o, o^2, t/100, (t/100)^2, (t/100)^3, 1]`` with ``o = clip(obs, -10, 10)``.
  """
  o = np.clip(obs.astype(np.float64), -10.0, 10.0)
  h = obs.shape[-2]
  t = np.arange(h, dtype=np.float64) / horizon_scale
  t = np.broadcast_to(t[:, None], obs.shape[:-1] + (1,))
  return np.concatenate([o, o ** 2, t, t ** 2, t ** 3, np.ones_like(t)], axis=-1)


def fit_linear_baseline(obs: np.ndarray, returns: np.ndarray, mask: np.ndarray,
                        reg_coeff: float = 1e-5, retries: int = 5):
  """Fits ``returns ~ features(obs) . w`` per task; returns fitted values.

  Ridge regression on the valid steps of each task; when the solution is not
  finite the regulariser is multiplied by 10 (up to ``retries`` times), as
  rllab's ``LinearFeatureBaseline``.

  Arguments:
    obs: ``[T, N, H, D]`` observations.
    returns: ``[T, N, H]`` regression targets (discounted returns).
    mask: ``[T, N, H]`` valid steps.
    reg_coeff: initial ridge coefficient.
    retries: how many times to raise it.

  Returns:
    ``(values [T, N, H], coeffs [T, F])``; values are 0 on padded steps.

  Example:
    >>> values, w = fit_linear_baseline(batch.obs, returns, batch.mask)
  """
  t_count = obs.shape[0]
  feats = baseline_features(obs)                      # [T, N, H, F]
  f = feats.shape[-1]
  x = feats.reshape(t_count, -1, f) * mask.reshape(t_count, -1, 1)
  y = (returns * mask).reshape(t_count, -1)
  # Per-task BLAS products (np.einsum here runs without BLAS, several times
  # slower at the paper's batch).
  xtx = np.stack([xi.T @ xi for xi in x])
  xty = np.stack([xi.T @ yi for xi, yi in zip(x, y)])
  coeffs = np.zeros((t_count, f))
  eye = np.eye(f)
  for i in range(t_count):
    reg = reg_coeff
    for _ in range(retries):
      try:
        w = np.linalg.solve(xtx[i] + reg * eye, xty[i])
      except np.linalg.LinAlgError:
        w = np.full(f, np.nan)
      if np.all(np.isfinite(w)):
        break
      reg *= 10.0
    coeffs[i] = np.nan_to_num(w)
  values = (feats.reshape(t_count, -1, f) @ coeffs[:, :, None]).reshape(
      mask.shape) * mask
  return values, coeffs


def gae_advantages(rewards: np.ndarray, values: np.ndarray, mask: np.ndarray,
                   gamma: float, lam: float = 1.0) -> np.ndarray:
  """Generalised advantage estimates, ``[..., H]``.

  ``delta_t = r_t + gamma V_{t+1} - V_t`` with ``V = 0`` after an episode's
  last step; ``A_t = sum_k (gamma lam)^k delta_{t+k}``. With ``lam = 1`` this
  is ``R_t - V_t``.

  Example:
    >>> adv = gae_advantages(rewards, values, mask, 0.99, 1.0)
  """
  values = values * mask
  next_values = np.concatenate(
      [values[..., 1:] * mask[..., 1:], np.zeros_like(values[..., :1])], -1)
  deltas = (rewards + gamma * next_values - values) * mask
  adv = np.zeros_like(deltas, dtype=np.float64)
  running = np.zeros(deltas.shape[:-1])
  for t in range(deltas.shape[-1] - 1, -1, -1):
    running = deltas[..., t] + gamma * lam * running * mask[..., t]
    adv[..., t] = running
  return adv * mask


def normalize_advantages(adv: np.ndarray, mask: np.ndarray, eps: float = 1e-8):
  """Zero mean, unit std over the valid steps of each task (axis 0)."""
  t_count = adv.shape[0]
  a = adv.reshape(t_count, -1)
  m = mask.reshape(t_count, -1)
  n = np.maximum(m.sum(1, keepdims=True), 1.0)
  mean = (a * m).sum(1, keepdims=True) / n
  std = np.sqrt((((a - mean) * m) ** 2).sum(1, keepdims=True) / n)
  return (((a - mean) / (std + eps)) * m).reshape(adv.shape)


def process_trajectories(batch, gamma: float = 0.99, gae_lambda: float = 1.0,
                         normalize: bool = True):
  """Advantages of a :class:`~maml_tf.rl.sampler.Trajectories` batch.

  Fits the linear baseline per task on discounted returns, then computes
  (normalised) GAE advantages.

  Returns:
    ``advantages [T, N, H]`` float32.

  Example:
    >>> adv = process_trajectories(batch)
  """
  returns = discounted_returns(batch.rewards, batch.mask, gamma)
  values, _ = fit_linear_baseline(batch.obs, returns, batch.mask)
  adv = gae_advantages(batch.rewards, values, batch.mask, gamma, gae_lambda)
  if normalize:
    adv = normalize_advantages(adv, batch.mask)
  return adv.astype(np.float32)
