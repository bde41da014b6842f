"""MAML meta-step in JAX (CPU): the peer of ``benchmarks/meta_step.py``.

  .venv-peers/bin/python benchmarks/peers/jax_maml.py --workload sinusoid \\
      --iters 50 --warmup 5 [--first_order]
  .venv-peers/bin/python benchmarks/peers/jax_maml.py --workload sinusoid \\
      --check_iters 200                  # meta-loss must go down

One meta-iteration = the meta-gradient (second order unless
``--first_order``, which stops the gradient through the inner gradients) of
the mean query loss after ``inner_steps`` SGD steps on each task's support
set, then one Adam(1e-3) update, as maml_tf does. The whole meta-iteration
is one ``jax.jit``-compiled function: ``jax.grad`` of the mean over tasks of
a per-task function whose inner steps take ``jax.grad`` of the support loss
(grad of grad), followed by a hand-written Adam update (Keras' form, epsilon
1e-7; no optax dependency). Parameters and optimizer state are donated to
the step. The random batch is built once (see ``common.py``). Variants:

* ``vmap_jit`` (default): ``jax.vmap`` over tasks. The adapted weights differ
  per task, so XLA batches the convolutions into grouped convolutions (one
  group per task), which XLA:CPU runs slowly: see the README.
* ``map_jit``: ``jax.lax.map`` (a scan) over tasks: one task's ordinary
  convolutions after another, inside the same jit.
* ``vmap_jit_loop`` (sinusoid only): the twin of maml_tf's ``train_steps``:
  100 meta-iterations per call in a ``jax.lax.fori_loop``, each on a fresh
  batch sampled inside the jit (``jax.random``); the time reported is per
  meta-iteration.

Networks are written with ``jax.lax``: the MLP 1-40-40-1 ReLU for the
sinusoid, and the paper's 4 x [3x3 conv 'SAME' (stride 2, or stride 1 + 2x2
'VALID' max-pool) + BatchNorm with batch statistics + ReLU] + Dense for the
classification workloads, NHWC, Glorot-uniform kernels and zero biases as
Keras initialises them.

Prints one JSON line: workload, framework, variant, median_s_per_iter,
iters_per_s, peak_rss_mb and more. XLA's CPU client uses all (2) cores; the
compile time of the step is reported as ``compile_s``.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import jaxlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

VARIANTS = ("vmap_jit", "map_jit", "vmap_jit_loop")
LOOP_STEPS = 100     # meta-iterations per call of the vmap_jit_loop variant


def glorot(key, shape, fan_in, fan_out):
  limit = np.sqrt(6.0 / (fan_in + fan_out))
  return jax.random.uniform(key, shape, jnp.float32, -limit, limit)


def init_params(w: common.Workload, key):
  """A flat dict of float32 arrays (the meta-parameters theta)."""
  keys = iter(jax.random.split(key, 8))
  if w.is_sinusoid:
    params, sizes = {}, (1, 40, 40, 1)
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
      params[f"dense{i}/kernel"] = glorot(next(keys), (n_in, n_out), n_in,
                                          n_out)
      params[f"dense{i}/bias"] = jnp.zeros(n_out)
    return params
  h, _, c = w.input_shape
  params = {}
  for i in range(4):
    params[f"conv{i}/kernel"] = glorot(next(keys), (3, 3, c, w.filters),
                                       9 * c, 9 * w.filters)
    params[f"conv{i}/bias"] = jnp.zeros(w.filters)
    params[f"bn{i}/gamma"] = jnp.ones(w.filters)
    params[f"bn{i}/beta"] = jnp.zeros(w.filters)
    h = h // 2 if w.pooling == "max" else (h + 1) // 2
    c = w.filters
  features = h * h * c
  params["logits/kernel"] = glorot(next(keys), (features, w.way), features,
                                   w.way)
  params["logits/bias"] = jnp.zeros(w.way)
  return params


def apply(w: common.Workload, params, x):
  """The network's output for a batch ``x`` (``[N, 1]`` or NHWC images)."""
  if w.is_sinusoid:
    for i in range(3):
      x = x @ params[f"dense{i}/kernel"] + params[f"dense{i}/bias"]
      if i < 2:
        x = jax.nn.relu(x)
    return x
  stride = 2 if w.pooling == "stride" else 1
  for i in range(4):
    x = jax.lax.conv_general_dilated(
        x, params[f"conv{i}/kernel"], (stride, stride), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC")) + params[f"conv{i}/bias"]
    mean = x.mean((0, 1, 2))
    var = jnp.square(x - mean).mean((0, 1, 2))
    x = ((x - mean) * jax.lax.rsqrt(var + common.BN_EPSILON)
         * params[f"bn{i}/gamma"] + params[f"bn{i}/beta"])
    x = jax.nn.relu(x)
    if w.pooling == "max":
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                                (1, 2, 2, 1), "VALID")
  x = x.reshape(x.shape[0], -1)
  return x @ params["logits/kernel"] + params["logits/bias"]


def make_step(w: common.Workload, first_order: bool, variant: str,
              jit: bool = True):
  """The jitted meta-iteration ``(params, adam_state, batch) -> (params,
  adam_state, meta-loss)``; tasks by ``jax.vmap`` or ``jax.lax.map``."""

  def loss(params, x, y):
    out = apply(w, params, x)
    if w.is_sinusoid:
      return jnp.mean(jnp.square(out - y))
    logp = jax.nn.log_softmax(out)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

  def task_loss(params, sx, sy, qx, qy):
    fast = params
    for _ in range(w.inner_steps):
      g = jax.grad(loss)(fast, sx, sy)
      if first_order:
        g = jax.lax.stop_gradient(g)
      fast = jax.tree.map(lambda p, gi: p - w.inner_lr * gi, fast, g)
    return loss(fast, qx, qy)

  def meta_loss(params, batch):
    if variant in ("vmap_jit", "vmap_jit_loop"):
      losses = jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(params, *batch)
    else:   # one task after another (a scan), inside the same jit
      losses = jax.lax.map(lambda b: task_loss(params, *b), batch)
    return jnp.mean(losses)

  def adam(params, grads, state, b1=0.9, b2=0.999):
    """Keras' Adam: lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)."""
    m, v, t = state
    t = t + 1
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
    v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
    lr = common.META_LR * jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    params = jax.tree.map(
        lambda p, m, v: p - lr * m / (jnp.sqrt(v) + common.ADAM_EPSILON),
        params, m, v)
    return params, (m, v, t)

  def step(params, state, batch):
    value, grads = jax.value_and_grad(meta_loss)(params, batch)
    params, state = adam(params, grads, state)
    return params, state, value

  if not jit:
    return step
  # Donating params and state lets XLA update them in place.
  return jax.jit(step, donate_argnums=(0, 1))


def make_loop(w: common.Workload, first_order: bool, steps: int):
  """``(params, adam_state, key) -> (params, adam_state, key, mean loss)``:
  ``steps`` meta-iterations on fresh sinusoid batches, all in one jit."""
  step = make_step(w, first_order, "vmap_jit", jit=False)
  k, q = w.k_support, w.k_query

  def sample(key):
    k1, k2, k3 = jax.random.split(key, 3)
    amp = jax.random.uniform(k1, (w.tasks, 1, 1), jnp.float32, 0.1, 5.0)
    phase = jax.random.uniform(k2, (w.tasks, 1, 1), jnp.float32, 0.0, np.pi)
    x = jax.random.uniform(k3, (w.tasks, k + q, 1), jnp.float32, -5.0, 5.0)
    y = amp * jnp.sin(x - phase)
    return x[:, :k], y[:, :k], x[:, k:], y[:, k:]

  def loop(params, state, key):
    def body(_, carry):
      params, state, key, total = carry
      key, sub = jax.random.split(key)
      params, state, loss = step(params, state, sample(sub))
      return params, state, key, total + loss
    params, state, key, total = jax.lax.fori_loop(
        0, steps, body, (params, state, key, jnp.zeros((), jnp.float32)))
    return params, state, key, total / steps
  return jax.jit(loop, donate_argnums=(0, 1))


class JaxMAML:
  """Meta-parameters, Adam state and the compiled meta-iteration."""

  def __init__(self, w: common.Workload, first_order: bool,
               variant: str = "vmap_jit", seed: int = 0):
    self.params = init_params(w, jax.random.PRNGKey(seed))
    zeros = jax.tree.map(jnp.zeros_like, self.params)
    self.state = (zeros, jax.tree.map(jnp.zeros_like, self.params),
                  jnp.zeros((), jnp.float32))
    self._step = make_step(w, first_order, variant)

  def step(self, batch) -> float:
    self.params, self.state, loss = self._step(self.params, self.state, batch)
    return float(loss)                     # waits for the result


def main():
  args = common.parse_args(__doc__.split("\n")[0], VARIANTS, "vmap_jit")
  w = common.WORKLOADS[args.workload]
  maml = JaxMAML(w, args.first_order, args.variant, args.seed)
  to_device = lambda b: tuple(jnp.asarray(a) for a in b)
  if args.check_iters:
    first, last = common.check_sinusoid(lambda b: maml.step(to_device(b)), w,
                                        args.check_iters, args.seed)
    common.report_check(args, "jax", args.variant, first, last)
    return
  if args.variant == "vmap_jit_loop":
    if not w.is_sinusoid:
      raise SystemExit("vmap_jit_loop: sinusoid only")
    loop = make_loop(w, args.first_order, LOOP_STEPS)
    key = [jax.random.PRNGKey(args.seed)]

    def calls():
      maml.params, maml.state, key[0], loss = loop(maml.params, maml.state,
                                                   key[0])
      return float(loss)
    median, first_s, loss = common.time_steps(calls, args.iters, args.warmup)
    median /= LOOP_STEPS
    common.report(args, "jax", jax.__version__, args.variant, median, first_s,
                  loss, jaxlib=jaxlib.__version__, steps_per_call=LOOP_STEPS)
    return
  batch = to_device(common.make_batch(w, np.random.default_rng(args.seed)))
  median, first_s, loss = common.time_steps(lambda: maml.step(batch),
                                            args.iters, args.warmup)
  common.report(args, "jax", jax.__version__, args.variant, median, first_s,
                loss, jaxlib=jaxlib.__version__)


if __name__ == "__main__":
  main()
