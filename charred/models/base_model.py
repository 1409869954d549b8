"""What the trainer needs of a model, in the shape of t5x's BaseModel.

A model turns parameters and a batch (a dict of arrays with a leading batch axis) into a
loss, and parameters plus inputs into predictions; it names the batch keys it reads and
the parameter collections the optimizer must leave alone. The trainer is written against
this class alone: it never looks inside a batch or a parameter tree.

Randomness: `loss_fn` gets the optimizer update's key and the index of the batch's first
example within that update, so that a model can draw per example and k micro-batches of
b examples see what one batch of k*b sees (see diffusion_model.example_keys).
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Mapping

import jax

Batch = Mapping[str, Any]
# (batch, update key, first example) -> batch, on the host before each step.
HostStage = Callable[[Batch, jax.Array, int], dict[str, Any]]


def batch_size_of(batch: Batch) -> int:
  """The leading dimension of a batch's arrays."""
  return int(jax.tree_util.tree_leaves(batch)[0].shape[0])


class BaseModel(abc.ABC):
  """A trainable model: initial parameters, their sharding axes, the loss and predictions."""

  @property
  @abc.abstractmethod
  def batch_keys(self) -> tuple[str, ...]:
    """The keys of a batch the model may read; `host_batch` drops the others."""

  @abc.abstractmethod
  def init_params(self, rng) -> Any:
    """Random initial parameters (t5x: get_initial_variables)."""

  @abc.abstractmethod
  def param_axes(self) -> Any:
    """The logical axis names of every parameter (a PartitionSpec or None per leaf), found
    without allocating anything."""

  @abc.abstractmethod
  def loss_fn(self, params, batch: Batch, rng, first_example=0
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(scalar loss, {term: value}) of one batch; example i of the batch is example
    `first_example + i` of the update whose key is `rng`. Differentiated in params."""

  @abc.abstractmethod
  def predict_batch(self, params, batch: Batch, rng, **kwargs) -> jax.Array:
    """The model's outputs for the inputs in `batch` (for a generative model: samples)."""

  # The parameter collections (top-level keys) the optimizer leaves untouched.
  @property
  def frozen(self) -> tuple[str, ...]:
    return ()

  def hparams(self) -> dict[str, Any]:
    """What the run's writers record about the model: JSON-able config dicts."""
    return {}

  def host_batch(self, batch: Batch) -> dict[str, Any]:
    """The keys of `batch` the model reads (others, e.g. captions as text, dropped)."""
    return {k: batch[k] for k in self.batch_keys if k in batch}

  def check_host_stage(self) -> None:
    """Raises ValueError naming why the model cannot run a `host_stage`; called before
    anything is built."""
    raise ValueError(f'{type(self).__name__} has no host stage.')

  def host_stage(self, params, gather: Callable[[Any], Any] = lambda tree: tree
                 ) -> HostStage:
    """Work moved out of the train step onto the host CPU (e.g. a frozen encoder): a
    function (batch, update key, first example) -> the batch the step reads, where the
    first example is global (this process's rows start after other processes' rows).
    `gather`: parameters (possibly sharded across processes) -> host arrays."""
    del params, gather
    self.check_host_stage()
    return lambda batch, rng, first_example: dict(batch)
