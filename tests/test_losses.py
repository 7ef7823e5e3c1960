"""Tests of the loss terms (rebalance_jax.losses) against docs/method.md §4.

Every term is compared with a hand computation or with a float64 numpy re-derivation written as plain
Python loops (deliberately naive, so it is obviously the formula of the spec). JAX runs in float32.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rebalance_jax import losses

RTOL = 1e-5
ATOL = 1e-5


# ---------------------------------------------------------------- float64 numpy references (loops)

def _rng(seed):
  return np.random.default_rng(seed)


def _normalized(rng, b, d):
  x = rng.normal(size=(b, d))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_soft_targets(ids):
  b = len(ids)
  y = np.zeros((b, b))
  for i in range(b):
    count = sum(1 for k in range(b) if ids[k] == ids[i])
    for j in range(b):
      if ids[j] == ids[i]:
        y[i, j] = 1.0 / count
  return y


def np_ce_soft(logits, targets):
  """−(1/B) Σ_i Σ_j y_ij log softmax_j(S_ij)."""
  b = logits.shape[0]
  total = 0.0
  for i in range(b):
    log_z = math.log(sum(math.exp(s) for s in logits[i]))
    for j in range(logits.shape[1]):
      total -= targets[i, j] * (logits[i, j] - log_z)
  return total / b


def np_relation(x, tau):
  """R_ij = cos(x_i, x_j) / τ."""
  b = x.shape[0]
  r = np.zeros((b, b))
  for i in range(b):
    for j in range(b):
      r[i, j] = float(x[i] @ x[j]) / (np.linalg.norm(x[i]) * np.linalg.norm(x[j])) / tau
  return r


def np_offdiag_mean(m):
  b = m.shape[0]
  return sum(m[i, j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))


def np_distance(a, b, distance):
  diff = a - b
  return np_offdiag_mean(np.abs(diff) if distance == "mae" else diff * diff)


def np_structure(students, gv, gt, lam, tau, distance="mae"):
  r_v, r_t = np_relation(gv, tau), np_relation(gt, tau)
  r_e = lam * r_t + (1 - lam) * r_v
  return {
      "kd": sum(np_distance(np_relation(s, tau), r_e, distance) for s in students),
      "kdi": np_distance(r_v, r_e, distance),
      "kdt": np_distance(r_t, r_e, distance),
  }


def _close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def _features(seed, b=5, d=4, sets=3):
  rng = _rng(seed)
  return [rng.normal(size=(b, d)) for _ in range(sets)]


# ---------------------------------------------------------------- l2_normalize

def test_l2_normalize_unit_norm_and_zero_vector_finite():
  x = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [-1e-3, 2e-3, 5.0]])
  y = np.asarray(losses.l2_normalize(jnp.asarray(x)))
  _close(y[0], [0.6, 0.8, 0.0])
  _close(np.linalg.norm(y[[0, 2]], axis=1), [1.0, 1.0])
  assert np.all(np.isfinite(y))
  _close(y[1], [0.0, 0.0, 0.0])


# ---------------------------------------------------------------- soft targets / cross-entropy

def test_soft_targets_repeated_ids_hand_matrix():
  ids = jnp.array([0, 0, 1, 2, 2, 2])
  h, t = 1 / 2, 1 / 3
  expected = np.array([
      [h, h, 0, 0, 0, 0],
      [h, h, 0, 0, 0, 0],
      [0, 0, 1, 0, 0, 0],
      [0, 0, 0, t, t, t],
      [0, 0, 0, t, t, t],
      [0, 0, 0, t, t, t],
  ])
  y = np.asarray(losses.soft_targets(ids))
  _close(y, expected, atol=1e-7)
  _close(y.sum(axis=1), np.ones(6), atol=1e-7)


def test_soft_cross_entropy_matches_loop():
  rng = _rng(0)
  logits = rng.normal(size=(5, 5)) * 3
  ids = np.array([4, 1, 4, 7, 1])
  y = np_soft_targets(ids)
  _close(losses.soft_cross_entropy(jnp.asarray(logits), jnp.asarray(y)), np_ce_soft(logits, y))


# ---------------------------------------------------------------- ITC

@pytest.mark.parametrize("b,d,seed", [(3, 2, 0), (6, 4, 1), (7, 5, 2)])
def test_itc_loss_matches_loop(b, d, seed):
  rng = _rng(seed)
  v, t = _normalized(rng, b, d), _normalized(rng, b, d)
  ids = rng.integers(0, max(2, b // 2), size=b)  # repeated ids
  tau = 0.07
  y = np_soft_targets(ids)
  expected = 0.5 * (np_ce_soft(v @ t.T / tau, y) + np_ce_soft(t @ v.T / tau, y))
  _close(losses.itc_loss(jnp.asarray(v), jnp.asarray(t), jnp.asarray(ids), tau), expected)


@pytest.mark.parametrize("swap", [False, True])
def test_itc_loss_hand_computed_orthonormal(swap):
  """B=2, v = (e1, e2), ids distinct, τ = 0.5.

  t = (e1, e2): logits = I/τ. Each row: log softmax of the target = 1/τ − log(e^{1/τ} + 1), so both
  directions give log(1 + e^{−1/τ}) = log(1 + e^{−2}).
  t = (e2, e1): matched logits are 0, the other is 1/τ, so the loss is log(1 + e^{1/τ}) = log(1 + e²).
  """
  tau = 0.5
  v = jnp.eye(2)
  t = v[::-1] if swap else v
  expected = math.log1p(math.exp(2.0)) if swap else math.log1p(math.exp(-2.0))
  _close(losses.itc_loss(v, t, jnp.array([0, 1]), tau), expected)


# ---------------------------------------------------------------- representation distillation

def test_representation_distillation_matches_loop():
  rng = _rng(3)
  s, te = _normalized(rng, 5, 3), _normalized(rng, 5, 3)
  ids = np.array([0, 1, 1, 2, 3])
  tau = 0.1
  y = np_soft_targets(ids)
  forward = losses.representation_distillation(jnp.asarray(s), jnp.asarray(te), jnp.asarray(ids), tau)
  backward = losses.representation_distillation(jnp.asarray(te), jnp.asarray(s), jnp.asarray(ids), tau)
  _close(forward, np_ce_soft(s @ te.T / tau, y))
  _close(backward, np_ce_soft(te @ s.T / tau, y))
  # ITC is the average of the two directions.
  _close(losses.itc_loss(jnp.asarray(s), jnp.asarray(te), jnp.asarray(ids), tau),
         0.5 * (float(forward) + float(backward)))


def test_representation_distillation_one_direction_hand_computed():
  """Student rows all e1, teacher rows e1, e2, e3, ids distinct, τ = 0.5.

  Student → teacher: every logit row is (2, 0, 0), so the loss is log(e² + 2) − (2 + 0 + 0)/3.
  Swapped (teacher → student): logit rows are (2, 2, 2), (0, 0, 0), (0, 0, 0): uniform, log 3.
  """
  student, teacher = jnp.tile(jnp.eye(3)[:1], (3, 1)), jnp.eye(3)
  ids, tau = jnp.arange(3), 0.5
  forward = losses.representation_distillation(student, teacher, ids, tau)
  swapped = losses.representation_distillation(teacher, student, ids, tau)
  _close(forward, math.log(math.exp(2.0) + 2.0) - 2.0 / 3.0)
  _close(swapped, math.log(3.0))


# ---------------------------------------------------------------- relation matrix / distance

def test_relation_matrix_cosine_over_temperature():
  rng = _rng(4)
  x = rng.normal(size=(5, 3))
  tau = 0.2
  r = np.asarray(losses.relation_matrix(jnp.asarray(x), tau))
  _close(r, np_relation(x, tau))
  np.testing.assert_allclose(r, r.T, rtol=1e-6, atol=1e-6)
  _close(np.diag(r), np.full(5, 1 / tau))
  scale = np.array([0.01, 3.0, 100.0, 0.5, 7.0])[:, None]  # positive row scaling
  _close(losses.relation_matrix(jnp.asarray(x * scale), tau), r)


@pytest.mark.parametrize("distance", ["mae", "mse"])
def test_relation_distance_ignores_diagonal(distance):
  rng = _rng(5)
  a = rng.normal(size=(4, 4))
  b = a + np.diag([1.0, -2.0, 3.0, 5.0])  # differs only on the diagonal
  assert float(losses.relation_distance(jnp.asarray(a), jnp.asarray(b), distance)) == 0.0


@pytest.mark.parametrize("distance", ["mae", "mse"])
def test_relation_distance_averages_over_offdiagonal(distance):
  """a − b = 2 on every off-diagonal entry: mean over B(B−1) entries is 2 (mae) or 4 (mse);
  dividing by B² instead would give 2·(B−1)/B."""
  b = 4
  a = jnp.full((b, b), 2.0) + 7.0 * jnp.eye(b)
  expected = 2.0 if distance == "mae" else 4.0
  _close(losses.relation_distance(a, jnp.zeros((b, b)), distance), expected)
  rng = _rng(6)
  x, y = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
  _close(losses.relation_distance(jnp.asarray(x), jnp.asarray(y), distance), np_distance(x, y, distance))


def test_relation_distance_unknown_raises():
  with pytest.raises(ValueError):
    losses.relation_distance(jnp.zeros((3, 3)), jnp.zeros((3, 3)), "huber")


def test_fuse_relations_weights_text():
  r_t, r_v = jnp.full((2, 2), 10.0), jnp.full((2, 2), 2.0)
  _close(losses.fuse_relations(r_t, r_v, 0.25), np.full((2, 2), 0.25 * 10 + 0.75 * 2))


# ---------------------------------------------------------------- structure distillation

@pytest.mark.parametrize("distance", ["mae", "mse"])
@pytest.mark.parametrize("lam", [-0.5, 0.3, 1.5])
def test_structure_distillation_matches_numpy(distance, lam):
  s, gv, gt = _features(7, b=6, d=4)
  tau = 0.5
  out = losses.structure_distillation([jnp.asarray(s)], jnp.asarray(gv), jnp.asarray(gt), lam, tau,
                                      distance)
  expected = np_structure([s], gv, gt, lam, tau, distance)
  assert set(out) == {"kd", "kdi", "kdt"}
  for name in expected:
    _close(out[name], expected[name])


def test_structure_distillation_two_students_sum():
  s1, s2, gv, gt = _features(8, b=5, d=3, sets=4)
  args = (jnp.asarray(gv), jnp.asarray(gt), 0.4, 0.3)
  both = losses.structure_distillation([jnp.asarray(s1), jnp.asarray(s2)], *args)["kd"]
  one = losses.structure_distillation([jnp.asarray(s1)], *args)["kd"]
  two = losses.structure_distillation([jnp.asarray(s2)], *args)["kd"]
  _close(both, float(one) + float(two))
  _close(both, np_structure([s1, s2], gv, gt, 0.4, 0.3)["kd"])


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 1.0, -0.5, 1.5])
def test_kdi_plus_kdt_identity(lam):
  """kdi = |λ|·D and kdt = |1−λ|·D with D = mean_offdiag|R^V − R^T|, so kdi + kdt = D on [0, 1]
  and (|λ| + |1−λ|)·D > D outside (flaw 2 of the reference)."""
  s, gv, gt = _features(9, b=5, d=4)
  tau = 0.5
  out = losses.structure_distillation([jnp.asarray(s)], jnp.asarray(gv), jnp.asarray(gt), lam, tau)
  d = np_offdiag_mean(np.abs(np_relation(gv, tau) - np_relation(gt, tau)))
  total = float(out["kdi"]) + float(out["kdt"])
  _close(out["kdi"], abs(lam) * d)
  _close(out["kdt"], abs(1 - lam) * d)
  if 0.0 <= lam <= 1.0:
    _close(total, d)
  else:
    assert total > d + 0.1 * d
    _close(total, (abs(lam) + abs(1 - lam)) * d)


def test_structure_distillation_no_teacher_gradient():
  s, gv, gt = (jnp.asarray(a) for a in _features(10, b=5, d=4))

  def total(student, image_teacher, text_teacher):
    out = losses.structure_distillation([student], image_teacher, text_teacher, 1.3, 0.5)
    return out["kd"] + out["kdi"] + out["kdt"]

  g_s, g_v, g_t = jax.grad(total, argnums=(0, 1, 2))(s, gv, gt)
  assert np.all(np.asarray(g_v) == 0.0)
  assert np.all(np.asarray(g_t) == 0.0)
  assert np.abs(np.asarray(g_s)).max() > 1e-3  # the student does receive gradient


# ---------------------------------------------------------------- gradient with respect to λ

def _np_lambda_grad(s, gv, gt, lam, tau, terms=("kd", "kdi", "kdt")):
  """d/dλ mean|R^X − R^E| = mean(−sign(R^X − R^E)·(R^T − R^V)) for X in {S, V, T}."""
  r_v, r_t = np_relation(gv, tau), np_relation(gt, tau)
  r_e = lam * r_t + (1 - lam) * r_v
  sources = {"kd": np_relation(s, tau), "kdi": r_v, "kdt": r_t}
  return sum(np_offdiag_mean(-np.sign(sources[k] - r_e) * (r_t - r_v)) for k in terms)


def _np_total(s, gv, gt, lam, tau, terms=("kd", "kdi", "kdt")):
  out = np_structure([s], gv, gt, lam, tau)
  return sum(out[k] for k in terms)


def _jax_total(s, gv, gt, tau, mode, terms=("kd", "kdi", "kdt")):
  def f(raw):
    lam = losses.fusion_weight(raw, mode)
    out = losses.structure_distillation([jnp.asarray(s)], jnp.asarray(gv), jnp.asarray(gt), lam, tau)
    return sum(out[k] for k in terms)
  return f


@pytest.mark.parametrize("lam", [-0.5, 0.3, 0.7, 1.5])
def test_lambda_gradient_raw(lam):
  s, gv, gt = _features(11, b=6, d=3)
  tau = 0.5
  grad = float(jax.grad(_jax_total(s, gv, gt, tau, "raw"))(jnp.float32(lam)))
  analytic = _np_lambda_grad(s, gv, gt, lam, tau)
  h = 1e-6  # the loss is piecewise linear in λ: a central difference is exact away from kinks
  finite = (_np_total(s, gv, gt, lam + h, tau) - _np_total(s, gv, gt, lam - h, tau)) / (2 * h)
  _close(analytic, finite, rtol=1e-6, atol=1e-6)
  _close(grad, analytic, rtol=1e-4, atol=1e-5)
  assert abs(analytic) > 1e-3


@pytest.mark.parametrize("a", [-1.0, 0.4, 2.0])
def test_lambda_gradient_sigmoid_chain_rule(a):
  s, gv, gt = _features(12, b=6, d=3)
  tau = 0.5
  sig = 1 / (1 + math.exp(-a))
  grad = float(jax.grad(_jax_total(s, gv, gt, tau, "sigmoid"))(jnp.float32(a)))
  expected = sig * (1 - sig) * _np_lambda_grad(s, gv, gt, sig, tau)
  h = 1e-6
  finite = (_np_total(s, gv, gt, 1 / (1 + math.exp(-(a + h))), tau)
            - _np_total(s, gv, gt, 1 / (1 + math.exp(-(a - h))), tau)) / (2 * h)
  _close(expected, finite, rtol=1e-5, atol=1e-6)
  _close(grad, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lam", [-0.5, 0.2, 0.5, 0.9, 1.5])
def test_kdi_kdt_lambda_gradient_vanishes_inside_unit_interval(lam):
  """d/dλ (|λ| + |1−λ|)·D = 0 on (0, 1), −2D below 0, +2D above 1."""
  s, gv, gt = _features(13, b=5, d=4)
  tau = 0.5
  grad = float(jax.grad(_jax_total(s, gv, gt, tau, "raw", ("kdi", "kdt")))(jnp.float32(lam)))
  d = np_offdiag_mean(np.abs(np_relation(gv, tau) - np_relation(gt, tau)))
  expected = 0.0 if 0 < lam < 1 else 2 * d * np.sign(lam)
  _close(grad, expected, rtol=1e-4, atol=1e-6)
  _close(grad, _np_lambda_grad(s, gv, gt, lam, tau, ("kdi", "kdt")), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- fusion weight / temperature

def test_fusion_weight_modes():
  raw = jnp.array([-2.0, 0.0, 0.3, 1.7])
  _close(losses.fusion_weight(raw, "raw"), np.asarray(raw))
  _close(losses.fusion_weight(raw, "sigmoid"), 1 / (1 + np.exp(-np.asarray(raw, np.float64))))
  with pytest.raises(ValueError):
    losses.fusion_weight(raw, "softplus")


def test_relation_temperature_modes():
  lo, hi = 0.05, 0.5
  f = lambda raw, mode: float(losses.relation_temperature(jnp.float32(raw), mode, (lo, hi), 0.1))
  assert f(0.9, "learned") == pytest.approx(0.9)
  assert f(-0.2, "learned") == pytest.approx(-0.2)
  assert f(0.9, "clamped") == pytest.approx(hi)
  assert f(0.001, "clamped") == pytest.approx(lo)
  assert f(0.2, "clamped") == pytest.approx(0.2)
  assert f(0.9, "fixed") == pytest.approx(0.1)
  assert f(0.001, "fixed") == pytest.approx(0.1)
  with pytest.raises(ValueError):
    losses.relation_temperature(jnp.float32(0.1), "annealed", (lo, hi), 0.1)


def test_relation_temperature_gradients():
  lo, hi = 0.05, 0.5
  grad = lambda raw, mode: float(jax.grad(
      lambda r: losses.relation_temperature(r, mode, (lo, hi), 0.1))(jnp.float32(raw)))
  assert grad(0.9, "clamped") == 0.0
  assert grad(0.01, "clamped") == 0.0
  assert grad(0.2, "clamped") == 1.0
  assert grad(0.9, "learned") == 1.0
  assert grad(0.2, "fixed") == 0.0


# ---------------------------------------------------------------- hard negative sampling

# One compiled sampler, vmapped over keys; every test uses B = 6 or 4 and D = 3 so compiles are shared.
_sample_many = jax.jit(
    jax.vmap(losses.sample_hard_negatives, in_axes=(0, None, None, None, None, None)),
    static_argnums=5)


def _draws(v, t, ids, tau, num_groups=1, n=4000, seed=0):
  """n independent draws: (n, B) negative-image indices per text and negative-text indices per image."""
  keys = jax.random.split(jax.random.PRNGKey(seed), n)
  neg_img, neg_txt = _sample_many(keys, jnp.asarray(v, jnp.float32), jnp.asarray(t, jnp.float32),
                                  jnp.asarray(ids), jnp.float32(tau), num_groups)
  return np.asarray(neg_img), np.asarray(neg_txt)


def test_hard_negatives_never_same_id():
  ids = np.array([0, 0, 1, 1, 2, 2])
  v = np.repeat(_normalized(_rng(14), 3, 3), 2, axis=0)  # same-id rows identical: most similar
  neg_img, neg_txt = _draws(v, v, ids, 0.05)
  for neg in (neg_img, neg_txt):
    assert np.all(ids[neg] != ids[None, :])


def test_hard_negatives_stay_in_group():
  rng = _rng(15)
  v, t = _normalized(rng, 6, 3), _normalized(rng, 6, 3)
  neg_img, neg_txt = _draws(v, t, np.arange(6), 0.5, num_groups=2)
  rows = np.arange(6)
  for neg in (neg_img, neg_txt):
    assert np.all(neg // 3 == rows[None, :] // 3)
    assert np.all(neg != rows[None, :])
    assert len(np.unique(neg)) == 6  # every index is drawn somewhere


def test_hard_negatives_deterministic():
  rng = _rng(16)
  v, t = _normalized(rng, 6, 3), _normalized(rng, 6, 3)
  ids = np.arange(6)
  a, b = _draws(v, t, ids, 1.0, seed=7), _draws(v, t, ids, 1.0, seed=7)
  c = _draws(v, t, ids, 1.0, seed=8)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])
  # Within one call the keys give different draws too.
  assert len({tuple(row) for row in a[0]}) > 1


def _np_negative_distribution(scores, ids, num_groups=1):
  """Row i: p_ij ∝ softmax_j(scores_i) + 1e-5 over j with id_j ≠ id_i, 0 elsewhere; with groups, j
  (softmax included) runs over the row's own group only, as each device sees only its local batch."""
  b = len(ids)
  size = b // num_groups
  p = np.zeros((b, b))
  for i in range(b):
    group = range(i // size * size, (i // size + 1) * size)
    z = sum(math.exp(scores[i, j]) for j in group)
    for j in group:
      if ids[j] != ids[i]:
        p[i, j] = math.exp(scores[i, j]) / z + 1e-5
    p[i] /= p[i].sum()
  return p


def _frequencies(neg, b):
  return np.stack([np.bincount(neg[:, i], minlength=b) / len(neg) for i in range(b)])


def test_hard_negatives_empirical_distribution():
  rng = _rng(17)
  v, t = _normalized(rng, 4, 3), _normalized(rng, 4, 3)
  ids = np.array([0, 0, 1, 2])
  tau = 0.5
  neg_img, neg_txt = _draws(v, t, ids, tau)
  sim = v @ t.T / tau
  # Negative image for text i: scores t_i·v_j/τ; negative text for image i: v_i·t_j/τ.
  for neg, scores in ((neg_img, sim.T), (neg_txt, sim)):
    expected = _np_negative_distribution(scores, ids)
    empirical = _frequencies(neg, 4)
    np.testing.assert_allclose(empirical, expected, atol=0.03)
    assert np.all(empirical[expected == 0] == 0)


def test_hard_negatives_per_group_softmax():
  """num_groups=2 must reproduce per-device sampling: the softmax runs over the local batch.

  Text 0 (group rows 0..2) scores its group's images at −20, −10, −12 (τ = 0.05) and the other
  group's at +20. Locally the candidates 1, 2 get softmax ≈ 0.88, 0.12 (the 1e-5 floor is
  negligible); normalized over the whole batch instead, both are ~e^{-30}, far below the floor, and
  the draw would be ~uniform.
  """
  v = np.array([[-1.0, 0.0, 0.0], [-0.5, math.sqrt(0.75), 0.0], [-0.6, 0.8, 0.0],
                [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
  t = np.array([[1.0, 0.0, 0.0]] * 6)
  ids = np.arange(6)
  neg_img, _ = _draws(v, t, ids, 0.05, num_groups=2, seed=3)
  expected = _np_negative_distribution((v @ t.T / 0.05).T, ids, num_groups=2)
  np.testing.assert_allclose(expected[0, 1:3], [0.881, 0.119], atol=1e-3)  # the hand numbers
  np.testing.assert_allclose(_frequencies(neg_img, 6)[0], expected[0], atol=0.03)


def test_hard_negatives_weight_floor():
  """Text 0 matches image 0 (and image 3, same id 0) and is far from images 1, 2 (cos −1 and −0.5,
  τ = 0.01): their softmax weights (~e^{-200}, e^{-150}) are negligible against the 1e-5 floor, so
  images 1 and 2 are drawn uniformly; without the floor image 2 would always win."""
  v = np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [-0.5, math.sqrt(0.75), 0.0], [1.0, 0.0, 0.0]])
  t = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  neg_img, _ = _draws(v, t, np.array([0, 1, 2, 0]), 0.01, seed=2)
  np.testing.assert_allclose(_frequencies(neg_img, 4)[0], [0.0, 0.5, 0.5, 0.0], atol=0.03)


def test_hard_negatives_indivisible_batch_raises():
  x = jnp.ones((6, 2))
  with pytest.raises(ValueError):
    losses.sample_hard_negatives(jax.random.PRNGKey(0), x, x, jnp.arange(6), 1.0, num_groups=4)


def test_hard_negatives_single_id_group_fallback():
  """Group 0 (rows 0..2) holds one image id only: it falls back to another row of its group."""
  rng = _rng(18)
  v, t = _normalized(rng, 6, 3), _normalized(rng, 6, 3)
  ids = np.array([5, 5, 5, 1, 2, 3])
  neg_img, neg_txt = _draws(v, t, ids, 0.5, num_groups=2)
  rows = np.arange(6)
  for neg in (neg_img, neg_txt):
    assert np.all(neg != rows[None, :])
    assert np.all(neg // 3 == rows[None, :] // 3)
    for i in range(3):  # both other rows of the group are reachable
      assert set(np.unique(neg[:, i])) == set(range(3)) - {i}


# ---------------------------------------------------------------- ITM

def test_itm_loss_hand_computed():
  """All-zero logits: every pair has p = ½ for its label, so the loss is log 2.
  With the positive at logits (0, log 3): p(label 1) = 3/4, so loss = (log(4/3) + 2 log 2) / 3."""
  _close(losses.itm_loss(jnp.zeros((1, 2)), jnp.zeros((2, 2))), math.log(2))
  pos = jnp.array([[0.0, math.log(3)]])
  _close(losses.itm_loss(pos, jnp.zeros((2, 2))), (math.log(4 / 3) + 2 * math.log(2)) / 3)


def test_itm_loss_matches_numpy():
  rng = _rng(19)
  b = 3
  pos, neg = rng.normal(size=(b, 2)) * 2, rng.normal(size=(2 * b, 2)) * 2
  logits = np.concatenate([pos, neg])
  labels = [1] * b + [0] * (2 * b)
  expected = 0.0
  for row, label in zip(logits, labels):
    expected -= row[label] - math.log(math.exp(row[0]) + math.exp(row[1]))
  expected /= 3 * b
  _close(losses.itm_loss(jnp.asarray(pos), jnp.asarray(neg)), expected)
