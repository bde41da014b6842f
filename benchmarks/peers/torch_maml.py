"""MAML meta-step in PyTorch (CPU): the peer of ``benchmarks/meta_step.py``.

  .venv-peers/bin/python benchmarks/peers/torch_maml.py --workload sinusoid \\
      --iters 50 --warmup 5 [--variant func] [--first_order]
  .venv-peers/bin/python benchmarks/peers/torch_maml.py --workload sinusoid \\
      --check_iters 200                  # meta-loss must go down
  .venv-peers/bin/python benchmarks/peers/torch_maml.py --workload \\
      omniglot_5w1s --check_grads        # meta-gradients of all variants

One meta-iteration = the meta-gradient (second order unless
``--first_order``) of the mean query loss after ``inner_steps`` SGD steps on
each task's support set, then one Adam(1e-3) update, as maml_tf does. The
random batch is built once (see ``common.py``). Variants:

* ``func_vmap``: ``torch.func.grad`` of ``torch.func.vmap`` over tasks of a
  per-task function that takes its inner gradients with ``torch.func.grad``
  and runs the network with ``torch.func.functional_call``.
* ``func_loop``: the same per-task function in a Python loop over tasks.
* ``func`` (default): ``func_vmap``, falling back to ``func_loop`` if vmap
  raises; the JSON line says which one ran (and the error).
* ``autograd_loop``: the classic implementation: a loop over tasks, inner
  gradients by ``torch.autograd.grad(create_graph=True)``, ``backward()`` of
  each task's query loss.

BatchNorm always uses the batch's statistics (training mode; no running
statistics, which vmap could not update in place anyway). ``--bn native`` is
``nn.BatchNorm2d(track_running_stats=False)``; ``--bn elementary`` computes
the same from mean/variance ops. Under ``vmap``, second-order meta-gradients
through the native batch_norm op are WRONG in torch 2.13 (no error; e.g. a
non-zero meta-gradient for the conv bias that BatchNorm cancels; see
``--check_grads``), so ``--bn auto`` (default) uses elementary BatchNorm on
the vmap paths and the native op on the loops.

Prints one JSON line: workload, framework, variant, median_s_per_iter,
iters_per_s, peak_rss_mb and more. Runs on ``--threads`` (2) intra-op
threads.
"""

import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value, vmap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

VARIANTS = ("func", "func_vmap", "func_loop", "autograd_loop")


class ElementaryBatchNorm2d(nn.Module):
  """BatchNorm with batch statistics built from mean/variance ops.

  Same function as ``nn.BatchNorm2d(c, eps, track_running_stats=False)`` in
  training mode (biased variance), but differentiated (and vmapped) op by op,
  which gives exact second derivatives under ``torch.func.vmap``.
  """

  def __init__(self, channels: int, eps: float = common.BN_EPSILON):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(channels))
    self.bias = nn.Parameter(torch.zeros(channels))
    self.eps = eps

  def forward(self, x):
    mean = x.mean((0, 2, 3), keepdim=True)
    var = (x - mean).square().mean((0, 2, 3), keepdim=True)
    scale = self.weight[:, None, None] * torch.rsqrt(var + self.eps)
    return (x - mean) * scale + self.bias[:, None, None]


def build_model(w: common.Workload, bn: str) -> nn.Module:
  """The workload's network: MLP 1-40-40-1 or the paper's 4-block conv net."""
  if w.is_sinusoid:
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40),
                         nn.ReLU(), nn.Linear(40, 1))
  h, _, c = w.input_shape
  layers = []
  for _ in range(4):
    stride = 2 if w.pooling == "stride" else 1
    # padding=1 gives Keras' 'same' output sizes (28->14->7->4->2 at stride 2).
    layers.append(nn.Conv2d(c, w.filters, 3, stride=stride, padding=1))
    layers.append(ElementaryBatchNorm2d(w.filters) if bn == "elementary" else
                  nn.BatchNorm2d(w.filters, eps=common.BN_EPSILON,
                                 track_running_stats=False))
    layers.append(nn.ReLU())
    if w.pooling == "max":
      layers.append(nn.MaxPool2d(2))
      h //= 2
    else:
      h = (h + 1) // 2
    c = w.filters
  layers += [nn.Flatten(), nn.Linear(c * h * h, w.way)]
  return nn.Sequential(*layers)


def to_tensors(batch, w: common.Workload, dtype=torch.float32):
  """numpy ``(sx, sy, qx, qy)`` -> tensors (images NCHW, labels int64)."""
  sx, sy, qx, qy = batch
  if w.is_sinusoid:
    return tuple(torch.as_tensor(a, dtype=dtype) for a in batch)
  image = lambda a: torch.as_tensor(a).permute(0, 1, 4, 2, 3).to(
      dtype).contiguous()
  label = lambda a: torch.as_tensor(a, dtype=torch.int64)
  return image(sx), label(sy), image(qx), label(qy)


class TorchMAML:
  """Meta-parameters, Adam state and one meta-iteration of a variant."""

  def __init__(self, w: common.Workload, variant: str, first_order: bool,
               bn: str = "auto", seed: int = 0):
    torch.manual_seed(seed)
    self.w = w
    self.variant = variant
    self.first_order = first_order
    if bn == "auto":
      bn = "elementary" if variant in ("func", "func_vmap") else "native"
    self.bn = "none" if w.is_sinusoid else bn
    self.model = build_model(w, bn)
    self.params = dict(self.model.named_parameters())
    # Views of the same storage for torch.func (which wants plain tensors):
    # the optimizer's in-place updates show through them.
    self.plain = {k: p.detach() for k, p in self.params.items()}
    self.optimizer = torch.optim.Adam(self.params.values(), lr=common.META_LR,
                                      eps=common.ADAM_EPSILON)
    self.vmap_error = None

  # -- the functional pieces -------------------------------------------------
  def loss(self, params, x, y):
    out = functional_call(self.model, params, (x,))
    return (F.mse_loss(out, y) if self.w.is_sinusoid
            else F.cross_entropy(out, y))

  def task_loss(self, params, sx, sy, qx, qy):
    """Query loss after the inner steps on one task (torch.func style)."""
    fast = params
    for _ in range(self.w.inner_steps):
      g = grad(self.loss)(fast, sx, sy)
      if self.first_order:
        g = {k: v.detach() for k, v in g.items()}
      fast = {k: fast[k] - self.w.inner_lr * g[k] for k in fast}
    return self.loss(fast, qx, qy)

  def meta_loss_vmap(self, params, batch):
    return vmap(self.task_loss, in_dims=(None, 0, 0, 0, 0))(
        params, *batch).mean()

  def meta_loss_loop(self, params, batch):
    return torch.stack([self.task_loss(params, *(b[i] for b in batch))
                        for i in range(batch[0].shape[0])]).mean()

  # -- meta-gradients --------------------------------------------------------
  def meta_grad(self, batch, variant=None):
    """``(meta-gradient dict, meta-loss float)`` by the given variant."""
    variant = variant or self.variant
    if variant == "func":
      if self.vmap_error is None:
        try:
          return self.meta_grad(batch, "func_vmap")
        except Exception as e:  # pylint: disable=broad-except
          self.vmap_error = f"{type(e).__name__}: {e}"[:300]
          print(f"vmap failed, using a loop over tasks: {self.vmap_error}",
                file=sys.stderr)
      return self.meta_grad(batch, "func_loop")
    if variant in ("func_vmap", "func_loop"):
      fn = (self.meta_loss_vmap if variant == "func_vmap"
            else self.meta_loss_loop)
      grads, loss = grad_and_value(fn)(self.plain, batch)
      return grads, float(loss)
    if variant == "autograd_loop":
      return self.autograd_meta_grad(batch)
    raise ValueError(variant)

  def autograd_meta_grad(self, batch):
    """The classic loop: ``autograd.grad(create_graph=True)`` per task."""
    names, weights = list(self.params), list(self.params.values())
    tasks = batch[0].shape[0]
    grads = [torch.zeros_like(p) for p in weights]
    total = 0.0
    for i in range(tasks):
      sx, sy, qx, qy = (b[i] for b in batch)
      fast = weights
      for _ in range(self.w.inner_steps):
        loss = self.loss(dict(zip(names, fast)), sx, sy)
        g = torch.autograd.grad(loss, fast, create_graph=not self.first_order)
        fast = [p - self.w.inner_lr * gi for p, gi in zip(fast, g)]
      query = self.loss(dict(zip(names, fast)), qx, qy) / tasks
      for acc, gi in zip(grads, torch.autograd.grad(query, weights)):
        acc += gi
      total += float(query.detach())
    return dict(zip(names, grads)), total

  def step(self, batch) -> float:
    """One meta-iteration: meta-gradient + Adam update; returns the loss."""
    grads, loss = self.meta_grad(batch)
    for k, p in self.params.items():
      p.grad = grads[k]
    self.optimizer.step()
    return loss

  @property
  def ran(self) -> str:
    """The variant that actually ran (``func`` resolves to vmap or loop)."""
    if self.variant != "func":
      return self.variant
    return "func_loop" if self.vmap_error else "func_vmap"


def check_grads(w: common.Workload, seed: int, tasks: int = 2):
  """float64 meta-gradients of every variant and BatchNorm kind on a small
  batch, against autograd_loop (native BN), plus a finite difference."""
  torch.set_default_dtype(torch.float64)
  rng = np.random.default_rng(seed)
  batch = to_tensors(common.make_batch(w, rng), w, torch.float64)
  batch = tuple(b[:tasks] for b in batch)
  results, reference = {}, {}
  for bn in ("native", "elementary"):
    for first_order in (False, True):
      for variant in ("autograd_loop", "func_loop", "func_vmap"):
        m = TorchMAML(w, variant, first_order, bn, seed)
        g, _ = m.meta_grad(batch)
        flat = torch.cat([v.flatten() for v in g.values()])
        ref = reference.setdefault(first_order, flat)  # the first: autograd
        rel = float((flat - ref).abs().max() / ref.abs().max())
        order = "first" if first_order else "second"
        results[f"{order}_order/{bn}/{variant}"] = rel
  # Central finite difference of the second-order meta-loss along the
  # reference gradient's direction.
  m = TorchMAML(w, "func_loop", False, "native", seed)
  d = reference[False] / reference[False].norm()
  base = torch.cat([v.flatten() for v in m.plain.values()])

  def loss_at(flat):
    params, i = {}, 0
    for k, v in m.plain.items():
      params[k] = flat[i:i + v.numel()].view_as(v)
      i += v.numel()
    return float(m.meta_loss_loop(params, batch))
  eps = 1e-6
  fd = (loss_at(base + eps * d) - loss_at(base - eps * d)) / (2 * eps)
  print(json.dumps({
      "workload": w.name, "check": "meta-gradient max |g - g_ref| / max "
      "|g_ref|, g_ref = autograd_loop with native BatchNorm (float64)",
      "relative_error": results,
      "finite_difference_vs_reference_directional": [fd, float(
          reference[False].norm())]}))


def main():
  def add_arguments(parser):
    parser.add_argument("--bn", choices=("auto", "native", "elementary"),
                        default="auto", help="BatchNorm implementation")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch intra-op threads")
    parser.add_argument("--check_grads", action="store_true",
                        help="compare the variants' float64 meta-gradients "
                        "on 2 tasks instead of timing")
  args = common.parse_args(__doc__.split("\n")[0], VARIANTS, "func",
                           add_arguments)
  torch.set_num_threads(args.threads)
  w = common.WORKLOADS[args.workload]
  if args.check_grads:
    check_grads(w, args.seed)
    return
  maml = TorchMAML(w, args.variant, args.first_order, args.bn, args.seed)
  if args.check_iters:
    first, last = common.check_sinusoid(
        lambda b: maml.step(to_tensors(b, w)), w, args.check_iters, args.seed)
    common.report_check(args, "torch", maml.ran, first, last)
    return
  batch = to_tensors(common.make_batch(w, np.random.default_rng(args.seed)), w)
  median, first_s, loss = common.time_steps(lambda: maml.step(batch),
                                            args.iters, args.warmup)
  extra = {"bn": maml.bn, "threads": torch.get_num_threads()}
  if maml.vmap_error:
    extra["vmap_error"] = maml.vmap_error
  common.report(args, "torch", torch.__version__, maml.ran, median, first_s,
                loss, **extra)


if __name__ == "__main__":
  main()
