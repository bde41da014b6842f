"""Conjugate gradient, baseline, Hessian-vector products and a short run."""

import dataclasses
import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

import maml_tf.rl as rl
from maml_tf.rl import optim
from maml_tf.rl.baseline import (baseline_features, discounted_returns,
                                 fit_linear_baseline, gae_advantages,
                                 normalize_advantages, process_trajectories)
from maml_tf.rl.maml_trpo import MAMLTRPO
from maml_tf.rl.policy import build_gaussian_mlp_policy
from maml_tf.rl.sampler import NavigationSampler


def test_conjugate_gradient_solves_spd_system():
  rng = np.random.default_rng(0)
  m = rng.standard_normal((12, 12))
  a = tf.constant(m @ m.T + 12 * np.eye(12))
  b = tf.constant(rng.standard_normal(12))
  x = optim.conjugate_gradient(lambda v: tf.linalg.matvec(a, v), b, iters=12)
  np.testing.assert_allclose(x.numpy(), np.linalg.solve(a.numpy(), b.numpy()),
                             rtol=1e-4, atol=1e-6)
  # compiled: a fixed unrolled graph; early convergence leaves x unchanged.
  cg = tf.function(lambda b: optim.conjugate_gradient(
      lambda v: tf.linalg.matvec(a, v), b, iters=30))
  np.testing.assert_allclose(cg(b).numpy(), x.numpy(), rtol=1e-6, atol=1e-8)


def test_flatten_roundtrip():
  ts = [tf.ones((2, 3)), tf.zeros((4,))]
  back = optim.unflatten(optim.flatten(ts), ts)
  assert [t.shape for t in back] == [(2, 3), (4,)]


def test_discounted_returns_and_gae():
  r = np.array([[1.0, 1.0, 1.0, 0.0]])
  mask = np.array([[1.0, 1.0, 1.0, 0.0]])
  np.testing.assert_allclose(discounted_returns(r, mask, 0.5)[0],
                             [1.75, 1.5, 1.0, 0.0])
  values = np.array([[0.5, 0.2, 0.1, 0.0]])
  adv = gae_advantages(r, values, mask, 0.5, 1.0)
  np.testing.assert_allclose(adv[0], [1.25, 1.3, 0.9, 0.0])   # R - V
  adv0 = gae_advantages(r, values, mask, 0.5, 0.0)             # TD errors
  np.testing.assert_allclose(adv0[0], [1 + 0.1 - 0.5, 1 + 0.05 - 0.2, 0.9, 0])
  norm = normalize_advantages(np.arange(6.).reshape(1, 2, 3), np.ones((1, 2, 3)))
  assert abs(norm.mean()) < 1e-9 and abs(norm.std() - 1) < 1e-6


def test_linear_baseline_recovers_linear_target():
  rng = np.random.default_rng(0)
  obs = rng.uniform(-2, 2, (3, 10, 20, 4))
  mask = np.ones((3, 10, 20))
  mask[:, :, 15:] = 0
  feats = baseline_features(obs)
  w = rng.standard_normal((3, feats.shape[-1]))
  w[:, 8:11] = 0.0   # t/100 powers are tiny: the ridge term shrinks them
  target = np.einsum("tnhf,tf->tnh", feats, w) * mask
  values, coeffs = fit_linear_baseline(obs, target, mask)
  np.testing.assert_allclose(values, target, atol=1e-3)
  np.testing.assert_allclose(coeffs[:, :8], w[:, :8], atol=1e-3)
  # degenerate features (constant obs): the ridge term keeps it finite.
  values, _ = fit_linear_baseline(np.zeros_like(obs), target, mask)
  assert np.all(np.isfinite(values))


def _small_problem(first_order=False, tasks=3):
  sampler = NavigationSampler(horizon=10)
  policy = build_gaussian_mlp_policy(2, 2, hidden_sizes=(8, 8),
                                     dtype="float64", seed=3)
  rng = np.random.default_rng(5)
  for w in policy.trainable_variables:   # off the ReLU kinks at obs = 0
    w.assign(w + 0.3 * rng.standard_normal(w.shape))
  learner = MAMLTRPO(policy, fast_lr=0.5, first_order=first_order)
  tasks = sampler.sample_tasks(tasks, rng)
  stacked = learner.stacked_params(len(tasks))
  pre = sampler.sample(tasks, 4, learner.policy_fn(stacked), rng)
  pre = learner.make_data(pre, process_trajectories(pre))
  post = sampler.sample(tasks, 4, learner.policy_fn(learner.adapt(stacked, pre)),
                        rng)
  post = learner.make_data(post, process_trajectories(post))
  return learner, pre, post


def _kl_grad_fn(learner, pre, post, old_mean, old_log_std):
  @tf.function
  def kl_grad(theta):
    with tf.GradientTape() as tape:
      tape.watch(theta)
      _, kl, _, _ = learner.objectives(theta, [pre], post, old_mean,
                                        old_log_std)
    return optim.flatten(tape.gradient(kl, theta))
  return kl_grad


def test_hvp_through_adaptation_matches_finite_differences():
  """H v of the meta-KL (second order, float64) vs differences of grad KL."""
  learner, pre, post = _small_problem()
  theta = learner.params()
  _, mean0, log_std0 = learner.post_log_prob(theta, [pre], post)
  kl_grad = _kl_grad_fn(learner, pre, post, mean0, log_std0)
  rng = np.random.default_rng(1)
  v = [tf.constant(rng.standard_normal(p.shape)) for p in theta]
  eps = 1e-5
  fd = (kl_grad([p + eps * u for p, u in zip(theta, v)])
        - kl_grad([p - eps * u for p, u in zip(theta, v)])) / (2 * eps)
  assert float(tf.norm(kl_grad(theta))) < 1e-10    # KL is minimal at theta
  for method in ("gauss_newton", "exact"):
    hv = optim.flatten(learner.hessian_vector_product(theta, [pre], post, v,
                                                      method))
    np.testing.assert_allclose(hv.numpy(), fd.numpy(), rtol=1e-5, atol=1e-8)


def test_first_order_hvp_ignores_adaptation_jacobian():
  so, pre, post = _small_problem(False)
  fo = MAMLTRPO(so.policy, fast_lr=0.5, first_order=True)
  v = [tf.ones_like(p) for p in so.params()]
  hv_so = optim.flatten(so.hessian_vector_product(so.params(), [pre], post, v))
  hv_fo = optim.flatten(fo.hessian_vector_product(fo.params(), [pre], post, v))
  assert float(tf.norm(hv_so - hv_fo)) > 1e-3 * float(tf.norm(hv_fo))
  # first order: H = average Fisher at the adapted weights, i.e. the same
  # product with every task's adapted weights held fixed (no pre batches).
  stacked = so.adapted_from_theta(so.params(), [pre])
  t = stacked[0].shape[0]
  fisher = 0
  for i in range(t):
    one = tuple(x[i:i + 1] for x in post)
    hv = fo.hessian_vector_product([p[i] for p in stacked], [], one, v)
    fisher += optim.flatten(hv) / t
  np.testing.assert_allclose(hv_fo.numpy(), fisher.numpy(), rtol=1e-6,
                             atol=1e-10)


def test_meta_step_respects_trust_region_and_does_not_retrace():
  learner, pre, post = _small_problem()
  for _ in range(2):
    stats = learner.meta_step([pre], post)
    assert stats["accepted"] == 1.0
    assert stats["kl"] <= learner.max_kl
    assert stats["surrogate_after"] < stats["surrogate_before"]
  assert max(learner.tracing_counts().values()) == 1


def test_config_validation():
  with pytest.raises(ValueError, match="algorithm"):
    rl.RLConfig(algorithm="sgd")
  with pytest.raises(ValueError, match="unknown environment"):
    rl.RLConfig(env="pong")
  c = rl.RLConfig(env="cheetah_dir")
  assert c.meta_batch == 40 and c.horizon == 200
  assert rl.RLConfig(fast_lr=0.1).eval_lrs == [0.1, 0.05, 0.05]
  assert rl.RLConfig(fast_batch_size=7).eval_batch_size == 7
  assert rl.RLConfig(eval_batch_size=40).eval_batch_size == 40
  with pytest.raises(ValueError, match="eval_batch_size"):
    rl.RLConfig(eval_batch_size=0)
  with pytest.raises(ValueError, match="fast_lr must be a finite number >= 0"):
    rl.RLConfig(fast_lr=-1)
  with pytest.raises(ValueError, match="max_kl must be a finite number > 0"):
    rl.RLConfig(max_kl=float("nan"))
  with pytest.raises(ValueError, match="needs resume=True"):
    rl.RLConfig(pretrained=True, resume=False)
  with pytest.raises(ValueError, match="needs algorithm='maml'"):
    rl.RLConfig(pretrained=True, eval_only=True, algorithm="pretrained")
  # Settings that cannot work are refused before anything runs.
  for field, value, message in (
      ("gamma", 2.0, r"gamma must be in \(0, 1\]"),
      ("gamma", 0.0, r"gamma must be in \(0, 1\]"),
      ("gae_lambda", -0.1, r"gae_lambda must be in \[0, 1\]"),
      ("cg_iters", 0, "cg_iters must be an integer >= 1"),
      ("ls_max_steps", 0, "ls_max_steps must be an integer >= 1"),
      ("ls_backtrack_ratio", 2.0, r"ls_backtrack_ratio must be a finite "
       r"number in \(0, 1\)"),
      ("cg_damping", -1.0, "cg_damping must be a finite number >= 0"),
      ("fast_lr", float("inf"), "fast_lr must be a finite number"),
      ("hvp_method", "foo", "hvp_method must be one of"),
      ("hidden_sizes", (0,), "hidden_sizes must be positive"),
      ("eval_every", -1, "eval_every must be >= 0"),
      ("num_workers", -1, "num_workers must be >= 0"),
      ("checkpoint_seconds", 0.0, "checkpoint_seconds must be")):
    with pytest.raises(ValueError, match=message):
      rl.RLConfig(**{field: value})
  with pytest.raises(ValueError, match="ls_backtrack_ratio"):
    rl.MAMLTRPO(rl.build_gaussian_mlp_policy(2, 2, hidden_sizes=(4,)),
                ls_backtrack_ratio=1.0)


def test_a_non_finite_iteration_stops_before_its_checkpoint(tmp_path):
  from maml_tf.common import interrupts  # pylint: disable=g-import-not-at-top
  config = rl.RLConfig(env="navigation", iterations=3, meta_batch=2,
                       fast_batch_size=2, eval_tasks=2, horizon=10,
                       hidden_sizes=(4,), fast_lr=1e30, checkpoint_every=1)
  with pytest.raises(FloatingPointError,
                     match=r"meta-iteration 0 produced non-finite values in "
                     r"the adapted policy's return \(fast_lr=1e\+30") as e:
    rl.train_and_evaluate(config, str(tmp_path / "nan"))
  assert isinstance(e.value, interrupts.UserFacingError)
  assert not (tmp_path / "nan" / "ckpt").exists()   # nothing NaN was saved


def test_a_zero_step_repeats_its_measurement_and_one_task_has_no_interval():
  from maml_tf.rl import train as rl_train   # pylint: disable=g-import-not-at-top
  from maml_tf.rl.sampler import make_sampler  # pylint: disable=g-import-not-at-top
  sampler = make_sampler("navigation", horizon=10)
  learner = rl_train.build_learner(
      rl.RLConfig(hidden_sizes=(4,)), sampler.obs_dim, sampler.act_dim)
  tasks = sampler.sample_tasks(3, np.random.default_rng(0))
  ev = rl_train.evaluate_adaptation(learner, sampler, tasks, 4, [0.0, 0.0],
                                    np.random.default_rng(1))
  assert ev["returns"][0] == ev["returns"][1] == ev["returns"][2]
  assert ev["per_task"][0] == ev["per_task"][2]
  ev = rl_train.evaluate_adaptation(learner, sampler, tasks, 4, [0.1, 0.0],
                                    np.random.default_rng(1))
  assert ev["returns"][0] != ev["returns"][1] == ev["returns"][2]
  # The oracle's curve is the constant line the docs promise.
  assert rl.RLConfig(algorithm="oracle").eval_lrs == [0.0, 0.0, 0.0]
  one = rl_train.evaluate_adaptation(learner, sampler, tasks[:1], 4, [0.1],
                                     np.random.default_rng(1))
  assert all(np.isnan(one["stderr"]))


def test_short_navigation_run_improves_after_adaptation(tmp_path, capsys):
  """A few MAML iterations: post-update beats pre-update; outputs written."""
  config = rl.RLConfig(env="navigation", iterations=6, meta_batch=10,
                       fast_batch_size=10, eval_tasks=10, eval_grad_steps=1,
                       eval_batch_size=12,
                       hidden_sizes=(32, 32), checkpoint_every=3, seed=1,
                       eval_every=3)
  results = rl.train_and_evaluate(config, str(tmp_path / "maml"))
  # One progress line per iteration, with its speed and an ETA.
  progress = [l for l in capsys.readouterr().out.splitlines()
              if re.match(r"\[rl\] maml \d+/", l)]
  assert [l.split()[2] for l in progress] == [f"{i}/6" for i in range(1, 7)]
  assert all(re.search(r" [\d.]+ (it/s|s/it), elapsed .*, left ", l)
             for l in progress), progress
  history = json.loads((tmp_path / "maml" / "train_history.json").read_text())
  # The periodic test evaluations (after iterations 3 and 6) are kept.
  assert [h["iteration"] for h in history if "eval_returns" in h] == [2, 5]
  assert len(history[5]["eval_returns"]) == 2
  pre, post = results["eval"]["returns"]
  assert post > pre + 2.0, results["eval"]
  per_task = np.array(results["eval"]["per_task"])     # [steps + 1, tasks]
  assert per_task.shape == (2, 10)
  np.testing.assert_allclose(per_task.mean(axis=1), [pre, post], rtol=1e-6)
  assert max(results["tracing_counts"].values()) <= 2   # train + eval shapes
  for name in ("results.json", "returns.png", "train_history.json"):
    assert (tmp_path / "maml" / name).exists()
  assert (tmp_path / "maml" / "training_curve.png").stat().st_size > 10_000
  for h in history:   # where an iteration's time went
    assert h["sampling_seconds"] > 0 and h["meta_step_seconds"] > 0
  assert json.loads((tmp_path / "maml" / "results.json").read_text())
  # resume: nothing left to train, same evaluation.
  again = rl.train_and_evaluate(config, str(tmp_path / "maml"))
  assert len(again["train"]) == 6
  np.testing.assert_allclose(again["eval"]["returns"], results["eval"]["returns"],
                             rtol=1e-4)
  # eval_only: the checkpoint is evaluated, never trained further.
  history = (tmp_path / "maml" / "train_history.json").read_text()
  only = rl.train_and_evaluate(
      dataclasses.replace(config, iterations=50, eval_only=True),
      str(tmp_path / "maml"))
  assert only["iterations"] == 6 and len(only["train"]) == 6
  assert (tmp_path / "maml" / "train_history.json").read_text() == history
  np.testing.assert_allclose(only["eval"]["returns"], results["eval"]["returns"],
                             rtol=1e-4)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    rl.train_and_evaluate(dataclasses.replace(config, eval_only=True),
                          str(tmp_path / "empty"))
  # The shipped policy is never evaluated into a run's own directory.
  with pytest.raises(ValueError, match="holds a run's checkpoints") as e:
    rl.train_and_evaluate(
        dataclasses.replace(config, eval_only=True, pretrained=True),
        str(tmp_path / "maml"))
  from maml_tf.common import interrupts  # pylint: disable=g-import-not-at-top
  assert isinstance(e.value, interrupts.UserFacingError)  # one line, no trace
  # A checkpoint of another policy: one clear error, not TF's traceback.
  with pytest.raises(RuntimeError, match="could not restore checkpoint"):
    rl.train_and_evaluate(
        dataclasses.replace(config, eval_only=True, hidden_sizes=(16,)),
        str(tmp_path / "maml"))


def test_pretrained_continues_meta_training_from_the_shipped_policy(tmp_path):
  from maml_tf.models import pretrained  # pylint: disable=g-import-not-at-top
  from maml_tf.rl import train as rl_train   # pylint: disable=g-import-not-at-top
  shipped = pretrained.card("navigation")["iterations"]
  small = dict(meta_batch=2, fast_batch_size=2, eval_tasks=2,
               eval_batch_size=2, eval_grad_steps=1, checkpoint_every=1)
  config = rl_train.shipped_config("navigation", eval_only=False,
                                   iterations=shipped + 1, **small)
  assert config.pretrained and config.fast_lr == 0.5   # the card's settings
  workdir = str(tmp_path / "continued")
  out = rl.train_and_evaluate(config, workdir)
  # One iteration beyond the card's, from the shipped weights.
  assert out["iterations"] == shipped + 1
  assert [h["iteration"] for h in out["train"]] == [shipped]
  seeded = os.path.join(workdir, "ckpt", f"ckpt-{shipped}")
  policy = pretrained.pretrained("navigation").policy
  names = [n for n, _ in tf.train.list_variables(seeded)
           if n.startswith("policy/") and "OPTIMIZER" not in n]
  assert len(names) == len(policy.trainable_variables) > 0
  saved = sorted(np.asarray(tf.train.load_variable(seeded, n)).sum()
                 for n in names)
  np.testing.assert_allclose(
      saved, sorted(v.numpy().sum() for v in policy.trainable_variables),
      rtol=1e-6)
  # A restart resumes the continuation's own checkpoint: nothing left.
  again = rl.train_and_evaluate(config, workdir)
  assert again["iterations"] == shipped + 1 and len(again["train"]) == 1
  with pytest.raises(ValueError, match=f"policy's {shipped} iterations: "
                     f"iterations must be above that, got {shipped}"):
    rl.train_and_evaluate(dataclasses.replace(config, iterations=shipped),
                          str(tmp_path / "nothing"))


def test_plot_compares_runs_of_the_same_seed_and_length(tmp_path):
  from maml_tf.rl import train as rl_train   # pylint: disable=g-import-not-at-top
  config = rl.RLConfig(env="navigation", iterations=300, seed=0)
  runs = {"maml": ("maml", 100, 0), "maml_300": ("maml", 300, 0),
          "pretrained": ("pretrained", 100, 0),
          "pretrained_300": ("pretrained", 300, 0),
          "maml_seed1": ("maml", 300, 1), "random": ("random", 0, 0),
          "cheetah": ("maml", 300, 0), "maml_lr05": ("maml", 300, 0, 0.5),
          "random_lr05": ("random", 0, 0, 0.5),
          "random_lr05_b40": ("random", 0, 0, 0.5, 40)}
  for name, (algorithm, iterations, seed, *lr_batch) in runs.items():
    env = config.env if name != "cheetah" else "maml_tf/HalfCheetahDir-v0"
    lr, batch = (lr_batch + [0.1, 20][len(lr_batch):])
    (tmp_path / name).mkdir()
    (tmp_path / name / "results.json").write_text(json.dumps(
        {"config": {"env": env, "algorithm": algorithm, "fast_lr": lr,
                    "fast_batch_size": 20, "eval_batch_size": batch,
                    "iterations": iterations, "seed": seed},
         "eval": {"returns": [name]}}))
  chosen = rl_train.sibling_results(str(tmp_path / "maml_300"), config)
  assert {k: v["returns"][0] for k, v in chosen.items()} == {
      "maml": "maml_300", "pretrained": "pretrained_300", "random": "random"}
  # This run wins for its own method even when its length differs.
  chosen = rl_train.sibling_results(str(tmp_path / "maml"), config)
  assert chosen["maml"]["returns"] == ["maml"]
  # Another step size or test batch is a different protocol: matched first.
  lr05 = rl.RLConfig(env="navigation", iterations=300, seed=0, fast_lr=0.5)
  chosen = rl_train.sibling_results(str(tmp_path / "pretrained_300"), lr05)
  assert {k: v["returns"][0] for k, v in chosen.items()} == {
      "maml": "maml_lr05", "pretrained": "pretrained_300",
      "random": "random_lr05"}
  lr05.eval_batch_size = 40
  chosen = rl_train.sibling_results(str(tmp_path / "maml_lr05"), lr05)
  assert chosen["random"]["returns"] == ["random_lr05_b40"]


def test_evaluation_uses_eval_batch_size(tmp_path, monkeypatch):
  """--eval_batch_size, not fast_batch_size, sizes the evaluation."""
  from maml_tf.rl import train as rl_train   # pylint: disable=g-import-not-at-top
  calls = []
  real = rl_train.evaluate_adaptation

  def spy(learner, sampler, tasks, episodes, lrs, *args, **kwargs):
    calls.append((len(tasks), episodes, list(lrs)))
    return real(learner, sampler, tasks, episodes, lrs, *args, **kwargs)

  monkeypatch.setattr(rl_train, "evaluate_adaptation", spy)
  config = rl.RLConfig(env="navigation", algorithm="random", fast_lr=0.5,
                       eval_tasks=3, eval_batch_size=7, eval_grad_steps=2,
                       hidden_sizes=(8,), seed=3)
  results = rl.train_and_evaluate(config, str(tmp_path / "random"))
  assert calls == [(3, 7, [0.5, 0.25])]
  assert results["config"]["eval_batch_size"] == 7
  assert np.array(results["eval"]["per_task"]).shape == (3, 3)


def test_policy_dims():
  from maml_tf.rl import envs  # pylint: disable=g-import-not-at-top
  assert envs.policy_dims("navigation") == (2, 2)
  assert envs.policy_dims("navigation", oracle=True) == (4, 2)
  assert envs.policy_dims("maml_tf/HalfCheetahDir-v0") == (17, 6)
  assert envs.policy_dims("cheetah_vel", oracle=True) == (18, 6)
  assert envs.short_name("maml_tf/AntDir-v0") == "ant_dir"


def test_an_immediate_stop_keeps_the_last_checkpoint_and_names_it(
    tmp_path, monkeypatch, capsys):
  """A second Ctrl-C (a KeyboardInterrupt mid-iteration) keeps the newest
  checkpoint and reports its iteration."""
  from maml_tf.common import interrupts  # pylint: disable=g-import-not-at-top
  from maml_tf.rl import train as rl_train   # pylint: disable=g-import-not-at-top
  real, calls, at = rl_train._train_iteration, [], [4]

  def interrupted(*args):
    calls.append(1)
    if len(calls) == at[0]:
      raise KeyboardInterrupt
    return real(*args)

  monkeypatch.setattr(rl_train, "_train_iteration", interrupted)
  config = rl.RLConfig(env="navigation", iterations=6, meta_batch=2,
                       fast_batch_size=2, eval_tasks=2, horizon=10,
                       hidden_sizes=(4,), checkpoint_every=2)
  with pytest.raises(interrupts.Interrupted) as e:
    rl.train_and_evaluate(config, str(tmp_path / "run"))
  # Three iterations ran; the newest checkpoint is iteration 2's
  # (checkpoints at multiples of checkpoint_every).
  assert e.value.step == 2
  assert sorted(os.listdir(tmp_path / "run" / "ckpt"))[-1].startswith(
      "ckpt-2.")
  assert "the checkpoint of iteration 2 is kept" in capsys.readouterr().out
  calls.clear()
  at[0] = 1
  with pytest.raises(KeyboardInterrupt) as e:   # nothing saved yet
    rl.train_and_evaluate(config, str(tmp_path / "fresh"))
  assert not isinstance(e.value, interrupts.Interrupted)


def test_a_line_search_that_never_accepts_is_reported(tmp_path, capsys):
  config = rl.RLConfig(env="navigation", iterations=10, meta_batch=2,
                       fast_batch_size=2, eval_tasks=2, horizon=10,
                       hidden_sizes=(4,), max_kl=1e-12, ls_max_steps=1,
                       checkpoint_every=10)
  rl.train_and_evaluate(config, str(tmp_path / "stuck"))
  out = capsys.readouterr().out
  assert out.count("warning: TRPO's line search has accepted no step for 10 "
                   "iterations, so the policy is not changing") == 1, out


def test_returns_plot_takes_a_run_of_one_test_task(tmp_path):
  path = rl.plot_returns({"maml": {"returns": [-10.0, -5.0],
                                   "stderr": [None, None]}},   # JSON's null
                         str(tmp_path / "returns.png"))
  assert os.path.getsize(path) > 5_000
