"""The training loop: one readable function, in the manner of big_vision's train.py.

Generic over the model (`base_model.BaseModel`, t5x's shape): a step differentiates
`model.loss_fn` and applies the update, never looking inside a batch; what a batch needs
before the step is the model's (`host_batch`, `host_stage`). Data arrives as numpy batches
from a checkpointable iterator (the data layer stays outside this TF-free module). Resumes
from the newest checkpoint, the iterator's state included; evaluators run on their own
cadence and never touch the training RNG.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from charred.models import pretrained
from charred.models import tracing
from charred.models.base_model import BaseModel, batch_size_of
from charred.trainers import checkpoints, optimizer as optimizer_lib
from charred.trainers import distributed, monitoring
from charred.trainers import partitioning
from charred.trainers.train_state import TrainState, ema_update

Batch = dict[str, np.ndarray]
# () -> iterator of batches (what the model's loss reads: its `batch_keys`),
# checkpointable in Grain's protocol: get_state() -> a JSON-able dict, and set_state(dict)
# continues with the batch that followed (`datasets.streams`, `bucketing`).
BatchesFn = Callable[[], Iterator[Batch]]


NAN_POLICIES = ('skip', 'stop', 'none')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training loop: steps, batch, optimizer, EMA, accumulation, the NaN policy and
  where things run. What the loss is belongs to the model (ObjectiveConfig)."""
  train_steps: int
  batch_size: int
  optimizer: optimizer_lib.OptimizerConfig = optimizer_lib.OptimizerConfig()
  ema_decay: float = 0.999
  seed: int = 0
  log_every: int = 50
  # Gradient accumulation: each train step consumes one micro-batch of `batch_size`, and
  # every `accumulation_steps`-th step applies one optimizer update on their mean gradient.
  # `train_steps`, `state.step`, checkpoints and the data position count micro-batches;
  # the learning-rate schedule (warm-up included) and the EMA count optimizer updates.
  accumulation_steps: int = 1
  # Non-finite loss or gradients: 'skip' the update (params, EMA and optimizer state stay
  # as they were; the `nonfinite` metric counts it), 'stop' (skip, then raise at the host;
  # costs a host sync per step), or 'none' (no check).
  nan_policy: str = 'skip'
  # Run the model's `host_stage` on the host CPU before each step, outside it (a diffusion
  # model's frozen text encoder: ObjectiveConfig.train_text_encoder=False).
  text_encoder_on_host: bool = False
  checkpointing: checkpoints.CheckpointConfig = checkpoints.CheckpointConfig()
  # Writers (TensorBoard, W&B, OpenTelemetry), the profiler and MFU.
  monitoring: monitoring.MonitoringConfig = monitoring.MonitoringConfig()
  # Device mesh ('data', 'fsdp', 'tensor') and logical axis rules; `batch_size` is global
  # (summed over processes and devices) and must divide over 'data' x 'fsdp'.
  partitioning: partitioning.PartitioningConfig = partitioning.PartitioningConfig()

  def __post_init__(self):
    if not isinstance(self.accumulation_steps, int) or self.accumulation_steps < 1:
      raise ValueError(f'accumulation_steps must be an integer >= 1, got '
                       f'{self.accumulation_steps!r}.')
    if self.train_steps % self.accumulation_steps:
      raise ValueError(f'train_steps ({self.train_steps}) counts micro-batches and must be a '
                       f'multiple of accumulation_steps ({self.accumulation_steps}).')
    if self.nan_policy not in NAN_POLICIES:
      raise ValueError(f'Unknown nan_policy {self.nan_policy!r}; expected one of '
                       f'{NAN_POLICIES}.')


def check_model(model: BaseModel, config: TrainConfig) -> None:
  """Fails early on a training config the model cannot run."""
  if config.text_encoder_on_host:
    model.check_host_stage()


def update_rng(rng, step, accumulation_steps: int, batch_size: int):
  """(rng of the update that train step `step` contributes to, index of the step's first
  example within that update)."""
  k = accumulation_steps
  return jax.random.fold_in(rng, step // k), (step % k) * batch_size


def train_step(state: TrainState, batch, rng, *, model: BaseModel, config: TrainConfig,
               tx):
  """One train step on one (micro-)batch: the gradient of `model.loss_fn`, an optimizer
  update every `config.accumulation_steps` steps, the EMA and the NaN policy."""
  rng, first = update_rng(rng, state.step, config.accumulation_steps, batch_size_of(batch))
  (loss, terms), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
      state.params, batch, rng, first)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  old_ms = optimizer_lib.find_multi_steps_state(state.opt_state)
  if old_ms is None:
    applied, num_updates = jnp.array(True), state.step
  else:  # accumulating: an update happened iff MultiSteps counted one
    num_updates = old_ms.gradient_step
    applied = optimizer_lib.find_multi_steps_state(opt_state).gradient_step != num_updates
  metrics = {'loss': loss, 'grad_norm': optax.global_norm(grads)}
  if len(terms) > 1:
    metrics.update({f'loss_{k}': v for k, v in terms.items()})
  if config.nan_policy != 'none':
    # One scalar for all gradients (a NaN or Inf anywhere makes the norm so): per-leaf
    # checks cost noticeably more compile time.
    finite = jnp.isfinite(loss) & jnp.isfinite(metrics['grad_norm'])
    keep = lambda new, old: jax.tree_util.tree_map(
        lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    applied = applied & finite
    metrics['nonfinite'] = 1.0 - finite.astype(jnp.float32)
  ema = jax.tree_util.tree_map(
      lambda n, o: jnp.where(applied, n, o),
      ema_update(state.ema_params, params, num_updates, config.ema_decay), state.ema_params)
  for name in model.frozen:  # the very same arrays: no p + 0 for frozen weights
    params = dict(params, **{name: state.params[name]})
    ema = dict(ema, **{name: state.ema_params[name]})
  new_state = TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
  return new_state, metrics


def raise_if_nonfinite(metrics, step: int) -> None:
  """nan_policy='stop': the step skipped its update; stop the run with a clear error."""
  if 'nonfinite' in metrics and float(metrics['nonfinite']) > 0:
    raise FloatingPointError(
        f'Step {step}: the loss or the gradients are not finite (loss '
        f'{float(metrics["loss"])}); the update was skipped and training stopped '
        "(nan_policy='stop'). The last checkpoint is intact.")


def create_state(model: BaseModel, config: TrainConfig, tx,
                 init: pretrained.InitConfig | None = None) -> TrainState:
  """The initial state: random parameters from `config.seed`, with the parts `init`
  names checkpoints for loaded from them."""
  params = model.init_params(jax.random.PRNGKey(config.seed))
  if init is not None:
    params = pretrained.load_checkpoints(init, params)
  return state_from_params(params, tx)


def state_from_params(params, tx) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree_util.tree_map(jnp.copy, params),
                    opt_state=tx.init(params))


def abstract_state(model: BaseModel, config: TrainConfig, tx) -> TrainState:
  """The shapes and dtypes of the state `create_state` builds; nothing allocated or read."""
  return jax.eval_shape(lambda: create_state(model, config, tx))


def state_shardings(model: BaseModel, config: TrainConfig, tx, mesh,
                    rules: partitioning.Rules | None = None) -> TrainState:
  """The NamedSharding of every leaf of the TrainState that `create_state` builds (the
  target of a sharded restore), without allocating anything."""
  rules = config.partitioning.rules if rules is None else rules
  return partitioning.state_shardings(mesh, rules, abstract_state(model, config, tx),
                                     model.param_axes())


def create_sharded_state(model: BaseModel, config: TrainConfig, tx, mesh,
                         rules: partitioning.Rules | None = None,
                         init: pretrained.InitConfig | None = None) -> TrainState:
  """`create_state`, born sharded: each device initialises only its own shards. The
  pretrained parts `init` names are read on the host and placed onto the same shardings."""
  shardings = state_shardings(model, config, tx, mesh, rules)
  state = jax.jit(lambda: create_state(model, config, tx), out_shardings=shardings)()
  if init is None or not (init.text_encoder or init.unet):
    return state
  params = partitioning.place(pretrained.load_checkpoints(init, state.params), shardings.params)
  return jax.jit(functools.partial(state_from_params, tx=tx), out_shardings=shardings,
                 donate_argnums=0)(params)


def make_tx(config: TrainConfig, frozen: Sequence[str] = ()):
  """The optimizer; parameter collections named in `frozen` (the model's `frozen`) are
  left untouched."""
  return optimizer_lib.make_optimizer(
      config.optimizer, optimizer_lib.num_updates(config.train_steps, config.accumulation_steps),
      tuple(frozen), accumulation_steps=config.accumulation_steps)


def learning_rate(config: TrainConfig, step: int) -> float:
  """The scheduled learning rate after `step` train steps (step // k updates)."""
  k = config.accumulation_steps
  return float(optimizer_lib.learning_rate_schedule(
      config.optimizer, optimizer_lib.num_updates(config.train_steps, k))(step // k))


def jit_train_step(model: BaseModel, config: TrainConfig, tx, state: TrainState,
                   batch_sharding):
  """`train_step` jitted for `state`'s shardings and batches sharded as `batch_sharding`
  (the random key replicated); the old state's buffers are donated to the new one.
  Called as step_fn(state, batch, rng) -> (state, metrics). Traced once per batch shape:
  a second trace of one shape raises (a step that retraced every call would crawl)."""
  shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
  replicated = partitioning.replicated(batch_sharding.mesh)
  step = tracing.once_per_signature(
      functools.partial(train_step, model=model, config=config, tx=tx), 'train_step')
  return jax.jit(step, in_shardings=(shardings, batch_sharding, replicated),
                 out_shardings=(shardings, replicated), donate_argnums=0)


def make_mesh(config: TrainConfig):
  """(mesh, batch sharding), with the batch dividing over the batch shards."""
  pconfig = config.partitioning
  distributed.check_collectives(pconfig.collectives)
  mesh = partitioning.make_mesh(pconfig)
  batch_sharding = partitioning.batch_sharding(mesh, pconfig.rules)
  num_shards = partitioning.num_batch_shards(batch_sharding)
  if config.batch_size % num_shards:
    raise ValueError(f'batch_size {config.batch_size} does not divide over the {num_shards} '
                     f"batch shards of mesh {dict(mesh.shape)} ('data' x 'fsdp').")
  return mesh, batch_sharding


def restore_or_create(ckpt, model: BaseModel, config: TrainConfig, tx, mesh,
                      init: pretrained.InitConfig | None, log) -> tuple[TrainState, dict]:
  """(state, data state) of the newest checkpoint, or a fresh state at data position 0;
  the same on every process."""
  if ckpt.latest_step() is None:
    state = create_sharded_state(model, config, tx, mesh, config.partitioning.rules, init)
    data_state = {'position': 0}
  else:  # straight onto the mesh: nothing initialised, no pretrained weights read
    state, data_state = ckpt.restore(
        abstract_state(model, config, tx),
        shardings=state_shardings(model, config, tx, mesh, config.partitioning.rules),
        set_aside=True)
    log(f'Resumed from step {int(state.step)} (data position {data_state["position"]}).')
  distributed.check_same_on_all_processes(
      {'step': int(state.step), 'data position': data_state['position']},
      config.partitioning.collectives)
  return state, data_state


def start_data(batches: BatchesFn, data_state) -> Iterator[Batch]:
  """The iterator of `batches`, at the batch that follows `data_state`."""
  data = batches()
  if not (hasattr(data, 'get_state') and hasattr(data, 'set_state')):
    raise TypeError(f'batches() gave a {type(data).__name__}, which cannot be checkpointed: '
                    'it needs get_state() and set_state() (see charred.datasets.streams).')
  if 'iterator' in data_state:  # every checkpoint; a fresh run starts at the first batch
    data.set_state(data_state['iterator'])
  return data


def batch_feeder(model: BaseModel, config: TrainConfig, state: TrainState, batch_sharding,
                 rng) -> Callable[[Batch, int], Batch]:
  """feed(this process's numpy batch, train step) -> the global batch the step reads:
  the model's keys, through its host stage with `text_encoder_on_host`, one array per key
  sharded over 'data' x 'fsdp'."""
  feed_index, num_feeds = partitioning.process_batch_shard(batch_sharding)
  stage = None
  if config.text_encoder_on_host:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    # Sharded params may span devices or processes: gathered to host numpy first.
    stage = model.host_stage(state.params, functools.partial(
        multihost_utils.process_allgather, tiled=True))

  def feed(batch, step: int) -> Batch:
    batch = model.host_batch(batch)
    rows = batch_size_of(batch)
    if stage:  # the keys the step (from state.step == step - 1) draws with
      key, first = update_rng(rng, step - 1, config.accumulation_steps, config.batch_size)
      batch = stage(batch, key, first + feed_index * rows)
    if rows * num_feeds != config.batch_size:
      raise ValueError(f'The data gave {rows} rows; batch_size {config.batch_size} from '
                       f'{num_feeds} process(es) needs {config.batch_size // num_feeds} '
                       'per process.')
    return partitioning.global_batch(batch, batch_sharding, num_feeds)

  return feed


def make_monitor(workdir: str, model: BaseModel, config: TrainConfig, state: TrainState,
                 mesh, log) -> monitoring.Monitor:
  monitor = monitoring.Monitor(
      workdir, config.monitoring, total_steps=config.train_steps, batch_size=config.batch_size,
      first_step=int(state.step), log=log,
      hparams={'train': dataclasses.asdict(config), **model.hparams()})
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  log(f'{num_params:,} parameters; training to step {config.train_steps} with batch '
      f'{config.batch_size} on mesh {dict(mesh.shape)}.')
  return monitor


def mean_metrics(pending: Sequence[dict[str, Any]]) -> dict[str, float]:
  return {k: float(np.mean([m[k] for m in pending])) for k in pending[0]}


def run_evaluators(evaluators: Sequence[Any], step: int, params, writer, last: bool,
                   log) -> None:
  for evaluator in evaluators:
    metrics = evaluator(step, params=params, writer=writer, last=last)
    if metrics is not None:
      # The console gets the headline metrics; breakdowns (by length, bucket) are in the
      # writers.
      log(f'eval {evaluator.name} @ {step}: ' + ', '.join(
          f'{k.split("/", 1)[-1]} {v:.3f}' for k, v in metrics.items() if k.count('/') <= 1))


def train(workdir: str, model: BaseModel, config: TrainConfig, batches: BatchesFn,
          evaluators: Sequence[Any] = (), log: Callable[[str], None] = print,
          init: pretrained.InitConfig | None = None) -> TrainState:
  """Trains `model` to `config.train_steps`, resuming from `workdir/checkpoints` if present.

  `evaluators`: `evaluators.PeriodicEvaluator`s (or anything with a `name` and that call
  signature), called after every step with the EMA params. `init`: the pretrained parts a
  fresh run starts from (a resumed run reads only its checkpoint).
  """
  check_model(model, config)
  tx = make_tx(config, model.frozen)
  mesh, batch_sharding = make_mesh(config)
  ckpt = config.checkpointing.checkpointer(f'{workdir}/checkpoints')
  # However the run ends (done, preempted, an exception), pending saves are written and
  # the writers (W&B, OpenTelemetry, the profiler) are flushed and closed.
  preemption = checkpoints.Preemption(ckpt)
  with contextlib.ExitStack() as cleanup:
    cleanup.callback(ckpt.close)
    cleanup.enter_context(preemption.handling())  # from here on, SIGTERM stops cleanly
    state, data_state = restore_or_create(ckpt, model, config, tx, mesh, init, log)
    monitor = make_monitor(workdir, model, config, state, mesh, log)
    cleanup.callback(monitor.close)
    step_fn = jit_train_step(model, config, tx, state, batch_sharding)
    # Host numpy: every process passes the same key, replicated by the jit.
    rng = np.asarray(jax.random.PRNGKey(config.seed + 1))
    feed = batch_feeder(model, config, state, batch_sharding, rng)
    data = start_data(batches, data_state)
    pending = []
    for step in preemption.steps(range(int(state.step) + 1, config.train_steps + 1)):
      batch = feed(next(data), step)
      monitor.before_step(step, step_fn, state, batch, rng)  # FLOPs once; profiler
      state, metrics = step_fn(state, batch, rng)
      if config.nan_policy == 'stop':
        raise_if_nonfinite(metrics, step)
      data_state = {'position': data_state['position'] + 1}
      pending.append(metrics)
      last = step == config.train_steps
      monitor.after_step(step, state, last)
      if step % config.log_every == 0 or last:
        log(monitor.report(step, mean_metrics(pending),
                           {'train/learning_rate': learning_rate(config, step)}))
        pending = []
      stop = preemption.reached(step)  # SIGTERM: checkpoint this step, then stop
      if step % config.checkpointing.every == 0 or last or stop:
        data_state = dict(data_state, iterator=data.get_state())
        ckpt.save(state, data_state, step=step)  # asynchronous
      if stop:
        ckpt.wait()
        log(f'Stopped at step {step} on SIGTERM (preemption); its checkpoint is written: run '
            'again to resume.')
        break
      run_evaluators(evaluators, step, state.ema_params, monitor.writer, last, log)
    ckpt.wait()
  return state
