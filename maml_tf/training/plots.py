"""Figures like the paper's (matplotlib, Agg backend: no display needed)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from maml_tf.tasks import sinusoid as tasks  # pylint: disable=g-import-not-at-top


def save_figure(fig, ax, path: str, xlabel: str, ylabel: str,
                title: str = "", legend_size=None, dpi: int = 110) -> str:
  """Labels ``ax``, adds its legend, writes ``fig`` to ``path`` and closes it.

  Returns:
    ``path``.
  """
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  ax.legend(fontsize=legend_size)
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path


def sinusoid_figure(maml, pretrained, config, path: str, steps=(1, 10),
                    seed: int = 7) -> str:
  """Figure 2 of the paper: one task, K points, predictions after 0/1/10 steps.

  Arguments:
    maml: the meta-trained :class:`maml_tf.MAML`.
    pretrained: the baseline wrapped in a MAML (or None).
    config: the run's SinusoidConfig (K is ``min(config.eval_shots)``).
    path: PNG to write.
    steps: fine-tuning steps to draw beside the pre-update prediction.
    seed: which random task to draw.
  """
  rng = np.random.default_rng([config.seed, 5, seed])
  k = min(config.eval_shots)
  amp, phase = tasks.SinusoidDistribution().sample_tasks(1, rng)
  xs = tasks.SinusoidDistribution().sample_x((k, 1), rng).astype(np.float32)
  ys = tasks.sinusoid(xs, amp[0], phase[0]).astype(np.float32)
  grid = np.linspace(-5, 5, 200, dtype=np.float32)[:, None]
  learners = [("MAML", maml)] + ([("pretrained", pretrained)]
                                 if pretrained is not None else [])
  fig, axes = plt.subplots(1, len(learners), figsize=(6 * len(learners), 4.2),
                           squeeze=False)
  # Ground truth black; each prediction its own colour (none reuses red).
  colors = ["tab:blue", "tab:green", "tab:orange", "tab:purple"]
  for ax, (name, learner) in zip(axes[0], learners):
    ax.plot(grid, tasks.sinusoid(grid, amp[0], phase[0]), color="black",
            lw=2, label="ground truth")
    ax.scatter(xs, ys, color="tab:red", marker="^", s=50, zorder=5,
               label=f"{k} points used for gradient")
    for i, n in enumerate((0,) + tuple(steps)):
      model = learner.adapt(xs, ys, steps=n) if n else learner.model
      label = "pre-update" if n == 0 else f"after {n} grad step{'s' * (n > 1)}"
      ax.plot(grid, np.asarray(model(grid, training=False)),
              color=colors[i % len(colors)], ls=":" if n == 0 else "--",
              lw=1.8, label=label)
    ax.set_title(f"{name}, K={k}")
    ax.set_ylim(-6, 6)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def curves_figure(x, curves, path: str, xlabel: str, ylabel: str,
                  title: str = "", chance: float = None) -> str:
  """Generic line plot: ``curves`` maps a label to (y, optional ci).

  Integer ``x`` get integer ticks; ``chance`` draws a dashed chance line.
  """
  fig, ax = plt.subplots(figsize=(6, 4))
  if all(float(v).is_integer() for v in x):
    ax.set_xticks(list(x))
  if chance is not None:
    ax.axhline(chance, color="gray", ls="--", lw=1, label=f"chance ({chance:g})")
  for label, (y, ci) in curves.items():
    y = np.asarray(y, dtype=float)
    ax.plot(x, y, marker="o", label=label)
    if ci is not None:
      ci = np.asarray(ci, dtype=float)
      ax.fill_between(x, y - ci, y + ci, alpha=0.2)
  return save_figure(fig, ax, path, xlabel, ylabel, title)
