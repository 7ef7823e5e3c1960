"""Scale-out pieces on 8 fake CPU devices: parameter sharding rules, sharded train-state creation,
and checkpoints restored onto a different device count."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from rebalance_jax.infra import sharding
from rebalance_jax.infra.errors import InputError
from rebalance_jax.training import checkpointing, loop

PARAMS = {"encoder": {"kernel": np.arange(32 * 12, dtype=np.float32).reshape(32, 12),
                      "norm": {"scale": np.ones(32, np.float32)}},
          "small": np.ones((3, 4), np.float32), "temp": np.float32(0.07)}
RULES = sharding.ParamRules(((r"norm", "replicate"), (r"^temp$", "replicate"), (r".*", "fsdp")),
                            min_size=64)


def test_mesh_axes_and_batch_sharding():
  mesh = sharding.make_mesh(fsdp=2)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
  with pytest.raises(InputError, match=r"config\.mesh\.fsdp=3"):
    sharding.make_mesh(fsdp=3)


def test_rules_place_parameters():
  mesh = sharding.make_mesh(fsdp=4)
  specs = jax.tree.map(lambda s: s.spec, RULES.param_shardings(PARAMS, mesh))
  assert specs["encoder"]["kernel"] == P("fsdp", None)  # the largest dimension divisible by 4
  assert specs["encoder"]["norm"]["scale"] == P()         # a "replicate" rule
  assert specs["small"] == P()                             # below min_size
  assert specs["temp"] == P()
  odd = sharding.ParamRules(((r".*", "fsdp"),), min_size=1)
  assert odd.spec("x", (30, 7), mesh) == P()  # no dimension divisible by 4: replicated
  assert odd.spec("x", (30, 8), mesh) == P(None, "fsdp")
  # Without an fsdp axis everything is replicated.
  assert RULES.spec("encoder/kernel", (32, 12), sharding.make_mesh()) == P()


def test_a_parameter_matching_no_rule_is_an_error():
  rules = sharding.ParamRules(((r"^encoder/", "fsdp"),))
  with pytest.raises(InputError, match=r"parameter small matches no rule"):
    rules.param_shardings(PARAMS, sharding.make_mesh(fsdp=2))
  with pytest.raises(InputError, match=r"'shard' is not one of"):
    sharding.ParamRules(((r".*", "shard"),))


def test_state_is_created_sharded_with_adam_moments_following_their_parameter():
  mesh = sharding.make_mesh(fsdp=2)
  tx = optax.adamw(1e-3)
  state = loop.create_state(PARAMS, tx, mesh, RULES)
  assert state["params"]["encoder"]["kernel"].sharding.spec == P("fsdp", None)
  mu = state["opt_state"][0].mu
  assert mu["encoder"]["kernel"].sharding.spec == P("fsdp", None)
  assert mu["encoder"]["norm"]["scale"].sharding.spec == P()
  assert state["step"].sharding.spec == P()
  np.testing.assert_array_equal(state["params"]["encoder"]["kernel"], PARAMS["encoder"]["kernel"])


def test_frozen_inputs_keep_their_fsdp_sharding_in_the_train_step():
  """Online teachers' parameters stay split over the fsdp axis (not gathered onto every device)
  and give the step the same result as replicated ones."""
  mesh = sharding.make_mesh(fsdp=2)
  tx = optax.sgd(0.1)
  params = {"w": np.ones((4,), np.float32)}
  state = loop.create_state(params, tx, mesh, RULES)
  target = loop.abstract_state(params, tx, mesh, RULES)
  frozen_host = {"teacher": PARAMS["encoder"]["kernel"]}
  frozen = jax.device_put(frozen_host, RULES.param_shardings(frozen_host, mesh))
  assert frozen["teacher"].sharding.spec == P("fsdp", None)

  def loss_fn(params, batch, frozen, rng):
    del rng
    loss = (params["w"].sum() * batch["x"].mean() * frozen["teacher"].mean()) ** 2
    return loss, {"loss/total": loss}

  step = loop.jit_train_step(loss_fn, tx, mesh, target)
  batch = sharding.to_global({"x": np.arange(8, dtype=np.float32)}, mesh)
  compiled = step.lower(state, batch, frozen, jax.random.key(0)).compile()
  assert compiled.input_shardings[0][2]["teacher"].spec == P("fsdp", None)
  replicated = jax.device_put(frozen_host, sharding.replicated(mesh))
  other = loop.create_state(params, tx, mesh, RULES)
  (new, metrics), (ref, ref_metrics) = (step(state, batch, frozen, jax.random.key(0)),
                                        step(other, batch, replicated, jax.random.key(0)))
  np.testing.assert_allclose(metrics["loss/total"], ref_metrics["loss/total"], rtol=1e-6)
  np.testing.assert_allclose(new["params"]["w"], ref["params"]["w"], rtol=1e-6)


@pytest.mark.parametrize("devices", [4, 1])
def test_checkpoint_from_8_devices_restores_onto_fewer(tmp_path, devices):
  tx = optax.adamw(1e-3)
  mesh8 = sharding.make_mesh(fsdp=2)
  state = loop.create_state(PARAMS, tx, mesh8, RULES)
  grads = jax.tree.map(np.ones_like, PARAMS)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
           "opt_state": opt_state}
  saver = checkpointing.Checkpointer(str(tmp_path), {"x": 1}, keep=1)
  saver.save(1, state)
  saver.wait()
  saver.close()

  mesh = sharding.make_mesh(jax.devices()[:devices], fsdp=2 if devices > 1 else 1)
  loader = checkpointing.Checkpointer(str(tmp_path), {"x": 1}, keep=1)
  restored = loader.restore(1, loop.abstract_state(PARAMS, tx, mesh, RULES))
  loader.close()
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
  kernel = restored["params"]["encoder"]["kernel"]
  assert len(kernel.sharding.device_set) == devices
  assert kernel.sharding.spec == (P("fsdp", None) if devices > 1 else P())
