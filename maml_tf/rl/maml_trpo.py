"""MAML for reinforcement learning: REINFORCE inner step, TRPO outer step.

Algorithm 3 of Finn, Abbeel & Levine (2017), as in the paper's code
(rllab ``MAMLTRPO``). For a meta-batch of ``T`` tasks:

1. sample ``N`` episodes per task with ``theta`` (pre-update);
2. inner step per task, functionally on the policy weights::

     L_i(theta) = -mean_{valid steps} log pi_theta(a|s) * A        (REINFORCE)
     theta_i'   = theta - alpha * grad L_i(theta)

3. sample ``N`` episodes per task with ``theta_i'`` (post-update);
4. TRPO on the post-update surrogate as a function of ``theta``::

     S(theta)  = mean_i -mean_steps  pi_{theta_i'(theta)}(a|s) / pi_old(a|s) * A
     KL(theta) = mean_i  mean_steps  KL(pi_old || pi_{theta_i'(theta)})

   ``pi_old`` is the sampling (post-update) policy. The natural-gradient
   direction solves ``H x = grad S`` by conjugate gradient (10 iterations,
   damping ``1e-5``), where ``H v`` is the Hessian-vector product of ``KL``
   *through* the inner step. At theta the KL's gradient w.r.t. the adapted
   weights is zero, so its Hessian is exactly ``J^T F J`` (``J`` the
   Jacobian of the adaptation, ``F`` the policy's Fisher matrix): every CG
   iteration runs one forward-mode JVP and one reverse-mode VJP through the
   inner gradient step (second derivatives; ``hvp_method="exact"``
   differentiates ``grad KL`` again instead). The step ``sqrt(2 max_kl / x'Hx) x``
   is then backtracked (ratio 0.8, up to 15 times) until ``S`` improves and
   ``KL <= max_kl``; otherwise the step is rejected.

``first_order=True`` stops the gradient through the inner gradient (FOMAML):
``d theta_i' / d theta = I``. With no pre-update batches (``pre=[]``) the
same code is plain TRPO on the tasks' mixture (the "pretrained" and "oracle"
comparisons).

All heavy parts are ``tf.function``s over fixed shapes (episodes padded to
the horizon with masks), traced once per batch structure; see
``tracing_counts``.

Example:
  >>> learner = MAMLTRPO(policy, fast_lr=0.1, max_kl=0.01)
  >>> stacked = learner.stacked_params(20)
  >>> pre = sampler.sample(tasks, 20, learner.policy_fn(stacked), rng)
  >>> pre_data = learner.make_data(pre, process_trajectories(pre))
  >>> adapted = learner.adapt(stacked, pre_data)
  >>> post = sampler.sample(tasks, 20, learner.policy_fn(adapted), rng)
  >>> stats = learner.meta_step([pre_data], learner.make_data(post, adv))
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from maml_tf.core import functional
from maml_tf.core.maml import inner_update
from maml_tf.rl import optim
from maml_tf.rl import policy as policy_lib

# (obs [T, M, D], actions [T, M, A], advantages [T, M], mask [T, M])
Data = Tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]


HVP_METHODS = ("gauss_newton", "exact")


def check_settings(fast_lr: float = 0.1, max_kl: float = 0.01,
                   cg_iters: int = 10, cg_damping: float = 1e-5,
                   ls_max_steps: int = 15, ls_backtrack_ratio: float = 0.8,
                   hvp_method: str = "gauss_newton") -> None:
  """Raises ``ValueError`` naming the first setting of :class:`MAMLTRPO`
  that cannot work: step sizes must be finite, ``fast_lr >= 0``,
  ``max_kl > 0``, ``cg_iters >= 1``, ``cg_damping >= 0``,
  ``ls_max_steps >= 1``, ``0 < ls_backtrack_ratio < 1`` (a ratio >= 1 never
  shrinks the step, so the line search could never succeed), and
  ``hvp_method`` one of :data:`HVP_METHODS`."""
  rules = (("fast_lr", fast_lr, lambda v: v >= 0, ">= 0"),
           ("max_kl", max_kl, lambda v: v > 0, "> 0"),
           ("cg_damping", cg_damping, lambda v: v >= 0, ">= 0"),
           ("ls_backtrack_ratio", ls_backtrack_ratio, lambda v: 0 < v < 1,
            "in (0, 1)"))
  for name, value, ok, rule in rules:
    if isinstance(value, bool) or not isinstance(value, (int, float,
                                                         np.number)):
      raise ValueError(f"{name} must be a number {rule}; got {value!r}")
    if not (math.isfinite(float(value)) and ok(float(value))):
      raise ValueError(f"{name} must be a finite number {rule}; got {value}")
  for name, value in (("cg_iters", cg_iters), ("ls_max_steps", ls_max_steps)):
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
        or value < 1):
      raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
  if hvp_method not in HVP_METHODS:
    raise ValueError(f"hvp_method must be one of {HVP_METHODS}; got "
                     f"{hvp_method!r}")


def _masked_task_mean(x, mask):
  """Mean over valid steps of each task, ``[T, M] -> [T]``."""
  return tf.reduce_sum(x * mask, axis=1) / tf.maximum(
      tf.reduce_sum(mask, axis=1), 1.0)


class MAMLTRPO:
  """Meta-learner for a Gaussian policy: REINFORCE inner, TRPO outer.

  Arguments:
    policy: a built Keras model ``obs -> [mean, log_std]``
      (:func:`maml_tf.rl.policy.build_gaussian_mlp_policy`).
    fast_lr: inner step size alpha (paper: 0.1).
    max_kl: TRPO trust region (0.01).
    cg_iters: conjugate-gradient iterations (10).
    cg_damping: added ``damping * v`` to every Hessian-vector product.
    ls_max_steps: backtracking steps of the line search (15).
    ls_backtrack_ratio: step shrink factor (0.8).
    first_order: first-order MAML (no gradient through the inner gradient).
    hvp_method: ``"gauss_newton"`` (default: ``J^T F J``, exact at theta,
      second-order derivatives only) or ``"exact"`` (differentiates the KL's
      gradient once more: third derivatives, slower).

  Raises:
    ValueError: a setting that cannot work (:func:`check_settings`).

  Example:
    >>> learner = MAMLTRPO(build_gaussian_mlp_policy(2, 2))
  """

  def __init__(self, policy: keras.Model, fast_lr: float = 0.1,
               max_kl: float = 0.01, cg_iters: int = 10,
               cg_damping: float = 1e-5, ls_max_steps: int = 15,
               ls_backtrack_ratio: float = 0.8, first_order: bool = False,
               hvp_method: str = "gauss_newton"):
    functional.ensure_built(policy)
    check_settings(fast_lr, max_kl, cg_iters, cg_damping, ls_max_steps,
                   ls_backtrack_ratio, hvp_method)
    self.policy = policy
    self.fast_lr = float(fast_lr)
    self.max_kl = float(max_kl)
    self.cg_iters = int(cg_iters)
    self.cg_damping = float(cg_damping)
    self.ls_max_steps = int(ls_max_steps)
    self.ls_backtrack_ratio = float(ls_backtrack_ratio)
    self.first_order = bool(first_order)
    self.hvp_method = hvp_method
    self.dtype = policy.trainable_variables[0].dtype
    self._policy_step = tf.function(self._policy_step_impl)
    self._adapt_fn = tf.function(self._adapt_impl)
    self._direction = tf.function(self._direction_impl)
    self._evaluate = tf.function(self._evaluate_impl)
    self._hvp = tf.function(self._hvp_impl)

  # ----------------------------------------------------------------- weights
  @property
  def model(self) -> keras.Model:
    """The policy (the Keras model whose weights are meta-trained)."""
    return self.policy

  def params(self) -> List[tf.Tensor]:
    """Current meta-parameters theta (tensors, ordered as the variables)."""
    return [tf.convert_to_tensor(v) for v in self.policy.trainable_variables]

  def _state(self):
    return [tf.convert_to_tensor(v) for v in self.policy.non_trainable_variables]

  def set_params(self, params: Sequence[tf.Tensor]) -> None:
    for var, value in zip(self.policy.trainable_variables, params):
      var.assign(value)

  def stacked_params(self, tasks: int) -> List[tf.Tensor]:
    """``tasks`` copies of theta stacked on a leading axis."""
    return policy_lib.tile_params(self.params(), tasks)

  # ---------------------------------------------------------------- sampling
  def _policy_step_impl(self, stacked, obs):
    return policy_lib.batched_forward(self.policy, stacked, self._state(), obs)

  def policy_fn(self, stacked: Sequence[tf.Tensor]):
    """A sampler policy ``obs[T, N, D] -> (mean, log_std)`` (numpy)."""
    stacked = [tf.convert_to_tensor(p) for p in stacked]

    def fn(obs):
      mean, log_std = self._policy_step(stacked, tf.constant(obs, self.dtype))
      return mean.numpy(), log_std.numpy()
    return fn

  def make_data(self, batch, advantages: np.ndarray) -> Data:
    """Flattens a padded batch to ``[T, N*H, ...]`` tensors for the learner."""
    t_count = batch.obs.shape[0]
    cast = lambda x, *shape: tf.constant(
        np.reshape(x, (t_count, -1) + shape), self.dtype)
    return (cast(batch.obs, batch.obs.shape[-1]),
            cast(batch.actions, batch.actions.shape[-1]),
            cast(advantages), cast(batch.mask))

  # -------------------------------------------------------------- inner step
  def _log_prob(self, stacked, obs, actions):
    mean, log_std = policy_lib.batched_forward(self.policy, stacked,
                                               self._state(), obs)
    dist = policy_lib.action_distribution(mean, log_std)
    return dist.log_prob(actions), mean, log_std

  def inner_loss(self, stacked, data: Data) -> tf.Tensor:
    """Sum over tasks of each task's REINFORCE loss at its own weights.

    The sum decouples: its gradient w.r.t. ``stacked[i]`` is task ``i``'s
    policy gradient. Returns a scalar.
    """
    obs, actions, adv, mask = data
    logp, _, _ = self._log_prob(stacked, obs, actions)
    return tf.reduce_sum(-_masked_task_mean(logp * adv, mask))

  def _inner_step(self, stacked, data, lr, first_order):
    with tf.GradientTape(watch_accessed_variables=False) as tape:
      tape.watch(stacked)
      loss = self.inner_loss(stacked, data)
    grads = tape.gradient(loss, stacked,
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    if first_order:
      grads = [tf.stop_gradient(g) for g in grads]
    return inner_update(stacked, grads, lr)

  def _adapt_impl(self, stacked, data, lr):
    return self._inner_step(list(stacked), data, lr, True)

  def adapt(self, stacked: Sequence[tf.Tensor], data: Data,
            lr: Optional[float] = None) -> List[tf.Tensor]:
    """One REINFORCE step per task from per-task weights ``stacked``.

    Arguments:
      stacked: weights with a leading task axis (e.g. :meth:`stacked_params`).
      data: the tasks' batch from :meth:`make_data`.
      lr: step size (default ``fast_lr``).

    Returns:
      the adapted stacked weights (constants; for sampling and evaluation).
    """
    lr = self.fast_lr if lr is None else lr
    return self._adapt_fn([tf.convert_to_tensor(p) for p in stacked], data,
                          tf.constant(lr, self.dtype))

  def adapted_from_theta(self, theta, pre: Sequence[Data],
                         first_order: Optional[bool] = None):
    """Differentiable ``theta -> [theta_i']`` through ``len(pre)`` steps."""
    first_order = self.first_order if first_order is None else first_order
    if not pre:
      return None
    stacked = policy_lib.tile_params(theta, int(pre[0][0].shape[0]))
    for data in pre:
      stacked = self._inner_step(stacked, data, self.fast_lr, first_order)
    return stacked

  # -------------------------------------------------------------- outer step
  def post_log_prob(self, theta, pre, post):
    obs, actions, _, _ = post
    stacked = self.adapted_from_theta(theta, pre)
    if stacked is None:
      stacked = policy_lib.tile_params(theta, int(obs.shape[0]))
    return self._log_prob(stacked, obs, actions)

  def objectives(self, theta, pre, post, old_mean, old_log_std):
    _, actions, adv, mask = post
    logp, mean, log_std = self.post_log_prob(theta, pre, post)
    old = policy_lib.action_distribution(old_mean, old_log_std)
    new = policy_lib.action_distribution(mean, log_std)
    old_logp = old.log_prob(actions)
    ratio = tf.exp(logp - old_logp)
    surrogate = tf.reduce_mean(-_masked_task_mean(ratio * adv, mask))
    kl = tf.reduce_mean(_masked_task_mean(old.kl_divergence(new), mask))
    return surrogate, kl, mean, log_std

  def kl_and_surrogate(self, theta, pre: Sequence[Data], post: Data):
    """``(surrogate, kl)`` at ``theta`` with ``pi_old`` the policy at theta."""
    logp, mean, log_std = self.post_log_prob(theta, pre, post)
    mean0, log_std0 = tf.stop_gradient(mean), tf.stop_gradient(log_std)
    surrogate, kl, _, _ = self.objectives(theta, pre, post, mean0, log_std0)
    return surrogate, kl

  def hvp_fn(self, theta, pre: Sequence[Data], post: Data):
    """``v -> H v`` (list in, list out), H the Hessian of the KL at theta.

    Call it inside one ``tf.function`` (see :meth:`hessian_vector_product`);
    the returned function reuses one persistent tape.
    """
    with tf.GradientTape(persistent=True,
                         watch_accessed_variables=False) as outer:
      outer.watch(theta)
      with tf.GradientTape(watch_accessed_variables=False) as inner:
        inner.watch(theta)
        _, kl = self.kl_and_surrogate(theta, pre, post)
      grad_kl = inner.gradient(kl, theta,
                               unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def hvp(v):
      return outer.gradient(grad_kl, theta, output_gradients=list(v),
                            unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return hvp

  def _fisher_weights(self, mask):
    t_count = tf.cast(tf.shape(mask)[0], mask.dtype)
    return mask / (tf.maximum(tf.reduce_sum(mask, 1, keepdims=True), 1.0)
                   * t_count)

  def gauss_newton_hvp_fn(self, theta, pre: Sequence[Data], post: Data):
    """``v -> H v`` for the KL's Hessian at theta, without third derivatives.

    At theta the sampling policy equals ``pi_{theta'(theta)}``, so the KL's
    gradient w.r.t. the adapted weights vanishes and its Hessian w.r.t. theta
    is exactly ``J^T F J``: ``J = d theta' / d theta`` (through the inner
    step, second order), ``F`` the Fisher information of the Gaussian policy
    at ``theta'`` (``1/sigma^2`` on the mean, ``2`` on the log-std, weighted
    as the KL averages steps). ``J v`` is a forward-mode JVP, ``J^T u`` a
    reverse-mode VJP on a tape recorded once. Matches :meth:`hvp_fn`
    (checked against finite differences in ``tests/rl``). Call it inside a
    ``tf.function``.
    """
    obs, _, _, mask = post
    weights = self._fisher_weights(mask)[..., None]
    theta = list(theta)
    with tf.GradientTape(persistent=True,
                         watch_accessed_variables=False) as adapt_tape:
      adapt_tape.watch(theta)
      stacked = self.adapted_from_theta(theta, pre)
      if stacked is None:
        stacked = policy_lib.tile_params(theta, int(obs.shape[0]))
    fast = [tf.stop_gradient(p) for p in stacked]
    with tf.GradientTape(persistent=True,
                         watch_accessed_variables=False) as out_tape:
      out_tape.watch(fast)
      mean, log_std = policy_lib.batched_forward(self.policy, fast,
                                                 self._state(), obs)
    inv_var = tf.stop_gradient(tf.exp(-2.0 * log_std))

    def hvp(v):
      v = list(v)
      with tf.autodiff.ForwardAccumulator(theta, v) as acc:
        adapted = self.adapted_from_theta(theta, pre)
        if adapted is None:
          adapted = policy_lib.tile_params(theta, int(obs.shape[0]))
      jv = [acc.jvp(p, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            for p in adapted]
      with tf.autodiff.ForwardAccumulator(fast, jv) as acc2:
        m2, l2 = policy_lib.batched_forward(self.policy, fast, self._state(),
                                            obs)
      j_mean = acc2.jvp(m2, unconnected_gradients=tf.UnconnectedGradients.ZERO)
      j_log = acc2.jvp(l2, unconnected_gradients=tf.UnconnectedGradients.ZERO)
      u = out_tape.gradient(
          [mean, log_std], fast,
          output_gradients=[weights * inv_var * j_mean, weights * 2.0 * j_log],
          unconnected_gradients=tf.UnconnectedGradients.ZERO)
      return adapt_tape.gradient(
          stacked, theta, output_gradients=u,
          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return hvp

  def hessian_vector_product(self, theta, pre: Sequence[Data], post: Data,
                             vector, method: Optional[str] = None) -> list:
    """``H v`` for the meta-KL's Hessian at ``theta`` (compiled).

    Arguments:
      theta: meta-parameters (list of tensors, as :meth:`params`).
      pre, post: batches as for :meth:`meta_step`.
      vector: a list shaped as ``theta``.
      method: ``"gauss_newton"`` or ``"exact"`` (default: ``hvp_method``).

    Example:
      >>> hv = learner.hessian_vector_product(learner.params(), [pre], post, v)
    """
    method = method or self.hvp_method
    return self._hvp([tf.convert_to_tensor(p) for p in theta],
                     tuple(tuple(d) for d in pre), tuple(post),
                     [tf.convert_to_tensor(x) for x in vector],
                     method == "exact")

  def _hvp_impl(self, theta, pre, post, vector, exact):
    make = self.hvp_fn if exact else self.gauss_newton_hvp_fn
    return make(list(theta), pre, post)(list(vector))

  def _direction_impl(self, pre, post):
    theta = self.params()
    with tf.GradientTape(watch_accessed_variables=False) as tape:
      tape.watch(theta)
      logp, mean, log_std = self.post_log_prob(theta, pre, post)
      old_mean, old_log_std = (tf.stop_gradient(mean),
                               tf.stop_gradient(log_std))
      surrogate, _, _, _ = self.objectives(theta, pre, post, old_mean,
                                            old_log_std)
    grads = tape.gradient(surrogate, theta,
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    flat_grad = optim.flatten(grads)
    if self.hvp_method == "exact":
      list_hvp = self.hvp_fn(theta, pre, post)
    else:
      list_hvp = self.gauss_newton_hvp_fn(theta, pre, post)

    def hvp(v):
      hv = list_hvp(optim.unflatten(v, theta))
      return optim.flatten(hv) + self.cg_damping * v

    direction = optim.conjugate_gradient(hvp, flat_grad, self.cg_iters)
    shs = tf.reduce_sum(direction * hvp(direction))
    step_size = tf.sqrt(2.0 * self.max_kl / (shs + 1e-8))
    return (surrogate, step_size * direction, old_mean, old_log_std,
            tf.linalg.norm(flat_grad))

  def _evaluate_impl(self, theta, pre, post, old_mean, old_log_std):
    surrogate, kl, _, _ = self.objectives(list(theta), pre, post, old_mean,
                                           old_log_std)
    return surrogate, kl

  def meta_step(self, pre: Sequence[Data], post: Data) -> Dict[str, float]:
    """One TRPO meta-update of the policy's weights.

    Arguments:
      pre: the pre-update batches, one per inner step (``[]``: plain TRPO).
      post: the batch sampled with the adapted weights.

    Returns:
      ``surrogate_before/after``, ``kl``, ``grad_norm``, ``ls_steps``,
      ``accepted``.
    """
    pre = tuple(tuple(d) for d in pre)
    post = tuple(post)
    loss0, full_step, old_mean, old_log_std, grad_norm = self._direction(
        pre, post)
    theta0 = self.params()
    flat0 = optim.flatten(theta0)
    loss0 = float(loss0)
    stats = {"surrogate_before": loss0, "grad_norm": float(grad_norm),
             "accepted": 0.0, "ls_steps": float(self.ls_max_steps),
             "kl": 0.0, "surrogate_after": loss0}
    for k in range(self.ls_max_steps):
      ratio = self.ls_backtrack_ratio ** k
      candidate = optim.unflatten(flat0 - ratio * full_step, theta0)
      loss, kl = self._evaluate(candidate, pre, post, old_mean, old_log_std)
      loss, kl = float(loss), float(kl)
      if (math.isfinite(loss) and math.isfinite(kl) and loss < loss0
          and kl <= self.max_kl):
        self.set_params(candidate)
        stats.update(accepted=1.0, ls_steps=float(k), kl=kl,
                     surrogate_after=loss)
        break
    return stats

  def tracing_counts(self) -> Dict[str, int]:
    """How many times each compiled function was traced (for retrace checks)."""
    return {name: fn.experimental_get_tracing_count() for name, fn in [
        ("policy_step", self._policy_step), ("adapt", self._adapt_fn),
        ("direction", self._direction), ("evaluate", self._evaluate)]}
