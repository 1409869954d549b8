"""What a training run reports: metric writers, the progress line, FLOPs and MFU, profiles.

Writers are clu `MetricWriter`s fanned out by a `MultiWriter`: the log, TensorBoard, and
optionally Weights & Biases and OpenTelemetry. Only process 0 writes anywhere but its
log. TensorFlow (TensorBoard), wandb and opentelemetry are imported only when used, so
`charred.trainers` stays importable without any of them.

`step_flops` and `mfu` are plain functions so that benchmarks can reuse them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
import types
from typing import Any, Callable, Mapping

from absl import logging
import jax
import numpy as np

# Dense bf16 peak FLOP/s per device (vendor data sheets), matched against
# `jax.Device.device_kind` by substring, most specific first. TPU v5p reports 'TPU v5'.
PEAK_FLOPS = (
    ('H100 PCIe', 756e12),
    ('H100', 989e12),
    ('H200', 989e12),
    ('GH200', 989e12),
    ('B200', 2250e12),
    ('A100', 312e12),
    ('L40S', 362e12),
    ('L4', 121e12),
    ('A10G', 70e12),
    ('V100', 125e12),
    ('TPU v6 lite', 918e12),
    ('TPU v5 lite', 197e12),
    ('TPU v5e', 197e12),
    ('TPU v5p', 459e12),
    ('TPU v5', 459e12),
    ('TPU v4', 275e12),
    ('TPU v3', 123e12),
    ('TPU v2', 45e12),
)


@dataclasses.dataclass(frozen=True)
class MonitoringConfig:
  """Where metrics go, what is profiled, how MFU is computed."""
  tensorboard: bool = True  # needs TensorFlow; without it, a warning and no events files
  wandb: bool = False  # Weights & Biases; WANDB_MODE=offline etc. are honoured
  wandb_project: str = 'charred'
  wandb_entity: str | None = None
  wandb_run_name: str | None = None  # None: the workdir's name
  # OpenTelemetry metrics and spans; exporters from OTEL_METRICS_EXPORTER,
  # OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_ENDPOINT, ... (default: OTLP over HTTP).
  opentelemetry: bool = False
  profile_steps: tuple[int, int] | None = None  # trace steps a..b (inclusive) on process 0
  profile_upload_url: str | None = None  # fsspec URL the trace folder is copied to
  count_flops: bool = True  # XLA cost analysis of the train step, for MFU
  peak_flops_per_device: float | None = None  # None: from PEAK_FLOPS by device kind

  def __post_init__(self):
    if self.profile_steps is not None:
      steps = tuple(self.profile_steps)
      if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
        raise ValueError(f'profile_steps must be (first, last) with 1 <= first <= last, '
                         f'got {self.profile_steps!r}.')
      object.__setattr__(self, 'profile_steps', steps)
    if self.peak_flops_per_device is not None and not self.peak_flops_per_device > 0:
      raise ValueError(f'peak_flops_per_device must be positive, got '
                       f'{self.peak_flops_per_device!r}.')


# --- FLOPs and MFU ------------------------------------------------------------------------


def step_flops(jitted_fn, *args, **kwargs) -> float | None:
  """FLOPs of one call of `jitted_fn(*args)` summed over the devices it runs on.

  From XLA's cost analysis of the compiled computation (which `jax.jit` caches, so the
  first real call does not compile again). For a partitioned computation XLA counts one
  device's program, so the count is multiplied by the number of devices. None when the
  backend reports no FLOPs.
  """
  compiled = jitted_fn.lower(*args, **kwargs).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get('flops')
  if flops is None or flops <= 0:
    return None
  shardings = jax.tree_util.tree_leaves(compiled.input_shardings)
  num_devices = max((len(s.device_set) for s in shardings), default=1)
  return float(flops) * num_devices


def mfu(flops_per_step: float, steps_per_sec: float, num_devices: int,
        peak_flops_per_device: float) -> float:
  """Model FLOPs utilisation: achieved FLOP/s over the devices' peak FLOP/s."""
  return flops_per_step * steps_per_sec / (num_devices * peak_flops_per_device)


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of a device kind (`jax.devices()[0].device_kind`), or None."""
  for name, peak in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return peak
  return None


# --- Writers ------------------------------------------------------------------------------


def _clu_metric_writers():
  """`clu.metric_writers` and why TensorBoard is unavailable (None if it is available).

  clu's package imports its TensorFlow summary writer eagerly; without TensorFlow a
  placeholder takes its place, so the logging, multi and async writers still import.
  """
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    missing = None
  except ImportError as e:
    missing = e
    if 'clu.metric_writers' not in sys.modules:
      placeholder = types.ModuleType('clu.metric_writers.summary_writer')

      class SummaryWriter:  # pylint: disable=unused-variable

        def __init__(self, *args, **kwargs):
          raise ImportError(f'TensorBoard summaries need TensorFlow: {missing}')

      placeholder.SummaryWriter = SummaryWriter
      sys.modules[placeholder.__name__] = placeholder
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  return metric_writers, missing


def _metric_writer_base():
  return _clu_metric_writers()[0].MetricWriter


def _scalars(scalars: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in scalars.items()}


def _uint8_images(images) -> np.ndarray:
  """[N, H, W, C] or [H, W, C] images (uint8, or floats in [0, 1]) as uint8 [N, H, W, C]."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[None]
  if images.dtype != np.uint8:
    images = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
  return images


@functools.cache
def _wandb_writer_class():
  base = _metric_writer_base()

  class WandbWriter(base):
    """Weights & Biases as a clu MetricWriter: scalars, images, texts, histograms, hparams.

    The run id is kept in `workdir/wandb_run_id`, so a resumed training appends to the
    same W&B run. Files go under `workdir/wandb`.
    """

    def __init__(self, workdir: str, project: str, entity: str | None = None,
                 name: str | None = None, config: Mapping[str, Any] | None = None):
      import wandb  # pylint: disable=g-import-not-at-top
      self._wandb = wandb
      id_path = os.path.join(workdir, 'wandb_run_id')
      run_id = None
      if os.path.exists(id_path):
        with open(id_path) as f:
          run_id = f.read().strip() or None
      self.run = wandb.init(
          project=project, entity=entity, id=run_id, resume='allow' if run_id else None,
          dir=workdir, name=name or os.path.basename(os.path.abspath(workdir)),
          config=dict(config or {}))
      if run_id is None:
        with open(id_path, 'w') as f:
          f.write(self.run.id)

    def write_scalars(self, step, scalars):
      self.run.log(_scalars(scalars), step=step)

    def write_images(self, step, images):
      self.run.log({k: [self._wandb.Image(im) for im in _uint8_images(v)]
                    for k, v in images.items()}, step=step)

    def write_texts(self, step, texts):
      self.run.log({k: self._wandb.Html(f'<pre>{v}</pre>') for k, v in texts.items()},
                   step=step)

    def write_histograms(self, step, arrays, num_buckets=None):
      self.run.log({k: self._wandb.Histogram(
          np.asarray(v), num_bins=(num_buckets or {}).get(k, 64)) for k, v in arrays.items()},
                   step=step)

    def write_hparams(self, hparams):
      self.run.config.update(dict(hparams), allow_val_change=True)

    def write_summaries(self, step, values, metadata=None):
      pass  # TensorBoard-specific tensors

    def write_videos(self, step, videos):
      pass  # not produced by charred

    def write_audios(self, step, audios, *, sample_rate):
      pass  # not produced by charred

    def log_artifact(self, path: str, name: str, kind: str, metadata=None):
      """Uploads a folder as a W&B artifact."""
      artifact = self._wandb.Artifact(name, type=kind, metadata=metadata)
      artifact.add_dir(path)
      self.run.log_artifact(artifact)

    def flush(self):
      pass  # wandb sends in the background

    def close(self):
      self.run.finish()

  return WandbWriter


def _otel_exporter(signal: str, protocol: str):
  """The OTLP exporter class for 'metrics' or 'traces' over `protocol`, or an ImportError."""
  transport = 'grpc' if protocol == 'grpc' else 'http'
  module = f'opentelemetry.exporter.otlp.proto.{transport}.' + (
      'metric_exporter' if signal == 'metrics' else 'trace_exporter')
  cls = 'OTLPMetricExporter' if signal == 'metrics' else 'OTLPSpanExporter'
  try:
    return getattr(__import__(module, fromlist=[cls]), cls)
  except ImportError as e:
    raise ImportError(f'opentelemetry-exporter-otlp-proto-{transport} is not installed '
                      f'({e})') from e


def otel_exporters_from_env():
  """(metric readers, span processors) named by the standard OTEL_* variables.

  OTEL_METRICS_EXPORTER / OTEL_TRACES_EXPORTER: comma-separated 'otlp' (the default),
  'console' or 'none'; OTLP's protocol from OTEL_EXPORTER_OTLP[_METRICS|_TRACES]_PROTOCOL
  ('http/protobuf' by default, or 'grpc'); endpoints, headers and intervals are read by
  the exporters themselves (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_METRIC_EXPORT_INTERVAL, ...).
  A missing OTLP package is a warning and that exporter is skipped.
  """
  # pylint: disable=g-import-not-at-top
  from opentelemetry.sdk.metrics import export as metrics_export
  from opentelemetry.sdk.trace import export as trace_export
  # pylint: enable=g-import-not-at-top
  readers, processors = [], []
  for signal in ('metrics', 'traces'):
    upper = signal.upper()
    names = os.environ.get(f'OTEL_{upper}_EXPORTER', 'otlp')
    protocol = os.environ.get(f'OTEL_EXPORTER_OTLP_{upper}_PROTOCOL',
                              os.environ.get('OTEL_EXPORTER_OTLP_PROTOCOL', 'http/protobuf'))
    for name in filter(None, (n.strip() for n in names.split(','))):
      if name == 'none':
        continue
      if name == 'console':
        exporter = (metrics_export.ConsoleMetricExporter() if signal == 'metrics'
                    else trace_export.ConsoleSpanExporter())
      elif name == 'otlp':
        try:
          exporter = _otel_exporter(signal, protocol)()
        except ImportError as e:
          logging.warning('OpenTelemetry %s not exported: OTEL_%s_EXPORTER=otlp but %s.',
                          signal, upper, e)
          continue
      else:
        raise ValueError(f'OTEL_{upper}_EXPORTER={names!r}: charred knows otlp, console '
                         f'and none, not {name!r}.')
      if signal == 'metrics':
        readers.append(metrics_export.PeriodicExportingMetricReader(exporter))
      else:
        processors.append(trace_export.BatchSpanProcessor(exporter))
  return readers, processors


@functools.cache
def _otel_writer_class():
  base = _metric_writer_base()

  class OpenTelemetryWriter(base):
    """OpenTelemetry as a clu MetricWriter: each scalar is a gauge of the same name.

    Each `write_scalars` call is also a span named after the metrics' prefix ('train',
    'validation', ...) that covers the time since the previous write with that prefix:
    a 'train' span covers the steps its metrics summarise. `train/steps_per_sec` also
    feeds a `train/step_time` histogram (seconds). Providers are the writer's own, not
    the global ones. `metric_readers` / `span_processors` default to the OTEL_* variables.
    """

    def __init__(self, metric_readers=None, span_processors=None,
                 attributes: Mapping[str, Any] | None = None):
      # pylint: disable=g-import-not-at-top
      from opentelemetry.sdk.metrics import MeterProvider
      from opentelemetry.sdk.resources import Resource
      from opentelemetry.sdk.trace import TracerProvider
      # pylint: enable=g-import-not-at-top
      if metric_readers is None or span_processors is None:
        env_readers, env_processors = otel_exporters_from_env()
        metric_readers = env_readers if metric_readers is None else metric_readers
        span_processors = env_processors if span_processors is None else span_processors
      # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES override these.
      resource = Resource.create({'service.name': 'charred', **(attributes or {})})
      self.meter_provider = MeterProvider(metric_readers=list(metric_readers),
                                          resource=resource)
      self.tracer_provider = TracerProvider(resource=resource)
      for processor in span_processors:
        self.tracer_provider.add_span_processor(processor)
      self._meter = self.meter_provider.get_meter('charred')
      self._tracer = self.tracer_provider.get_tracer('charred')
      self._gauges = {}
      self._step_time = self._meter.create_histogram(
          'train/step_time', unit='s', description='Seconds per training step.')
      self._last_write = {}
      self._start = time.time_ns()

    def _gauge(self, name: str):
      if name not in self._gauges:
        self._gauges[name] = self._meter.create_gauge(name)
      return self._gauges[name]

    def write_scalars(self, step, scalars):
      scalars = _scalars(scalars)
      if not scalars:
        return
      for name, value in scalars.items():
        self._gauge(name).set(value)
      self._gauge('step').set(step)
      if scalars.get('train/steps_per_sec', 0) > 0:
        self._step_time.record(1.0 / scalars['train/steps_per_sec'])
      prefix = next(iter(scalars)).split('/', 1)[0]
      now = time.time_ns()
      span = self._tracer.start_span(prefix, start_time=self._last_write.get(prefix, self._start),
                                     attributes={'step': step, **scalars})
      span.end(end_time=now)
      self._last_write[prefix] = now

    def write_images(self, step, images):
      pass

    def write_texts(self, step, texts):
      pass

    def write_histograms(self, step, arrays, num_buckets=None):
      pass

    def write_hparams(self, hparams):
      pass

    def write_summaries(self, step, values, metadata=None):
      pass

    def write_videos(self, step, videos):
      pass

    def write_audios(self, step, audios, *, sample_rate):
      pass

    def flush(self):
      self.meter_provider.force_flush()
      self.tracer_provider.force_flush()

    def close(self):
      self.meter_provider.shutdown()
      self.tracer_provider.shutdown()

  return OpenTelemetryWriter


def __getattr__(name):
  # The writer classes subclass clu's MetricWriter, whose package may import TensorFlow:
  # build them on first use, not at import.
  if name == 'WandbWriter':
    return _wandb_writer_class()
  if name == 'OpenTelemetryWriter':
    return _otel_writer_class()
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def make_writers(workdir: str, config: MonitoringConfig,
                 hparams: Mapping[str, Any] | None = None,
                 otel_kwargs: Mapping[str, Any] | None = None) -> list[Any]:
  """The run's writers: log + TensorBoard + W&B + OpenTelemetry on process 0, log elsewhere.

  Without TensorFlow, TensorBoard is skipped with one warning. `otel_kwargs` go to
  `OpenTelemetryWriter` (tests pass in-memory readers and span processors).
  """
  metric_writers, missing_tf = _clu_metric_writers()
  writers = [metric_writers.LoggingWriter()]
  if jax.process_index() > 0:
    return writers
  if config.tensorboard and missing_tf is not None:
    others = [', W&B'] * config.wandb + [', OpenTelemetry'] * config.opentelemetry
    logging.warning('No TensorBoard summaries: TensorFlow is not importable (%s); metrics go '
                    'to the log%s only.', missing_tf, ''.join(others))
  elif config.tensorboard:
    writers.append(metric_writers.SummaryWriter(workdir))
  if config.wandb:
    writers.append(_wandb_writer_class()(workdir, config.wandb_project, config.wandb_entity,
                                         config.wandb_run_name, hparams))
  if config.opentelemetry:
    writers.append(_otel_writer_class()(**(otel_kwargs or {})))
  return writers


def create_writer(workdir: str, config: MonitoringConfig, **kwargs):
  """`make_writers` behind one asynchronous `MultiWriter`."""
  return _clu_metric_writers()[0].AsyncMultiWriter(make_writers(workdir, config, **kwargs))


# --- Progress, MFU and the profiler inside the training loop -----------------------------


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class Progress:
  """One line per report: step, loss, steps/s, images/s, ETA (and MFU when known)."""

  def __init__(self, total_steps: int, batch_size: int, first_step: int):
    self.total, self.batch_size = total_steps, batch_size
    self.last_step, self.last_time = first_step, time.time()

  def line(self, step: int, loss: float) -> tuple[str, float]:
    """The progress line and the steps/s since the previous report."""
    now = time.time()
    steps_per_sec = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.total - step) / max(steps_per_sec, 1e-9)
    text = (f'step {step}/{self.total} | loss {loss:.4f} | {steps_per_sec:.2f} steps/s | '
            f'{steps_per_sec * self.batch_size:.1f} images/s | ETA {_hms(eta)}')
    return text, steps_per_sec


class Monitor:
  """The training loop's reporting: writer, progress line, FLOPs/MFU and profiler.

  `train()` calls `before_step` (with the jitted step and its arguments) and `after_step`
  around each step, and `report` at the log cadence.
  """

  def __init__(self, workdir: str, config: MonitoringConfig, *, total_steps: int,
               batch_size: int, first_step: int, hparams: Mapping[str, Any] | None = None,
               log: Callable[[str], None] = print, otel_kwargs=None):
    self.workdir, self.config, self.log = workdir, config, log
    writers = make_writers(workdir, config, hparams, otel_kwargs)
    self.wandb = next((w for w in writers if type(w).__name__ == 'WandbWriter'), None)
    self.writer = _clu_metric_writers()[0].AsyncMultiWriter(writers)
    self.progress = Progress(total_steps, batch_size, first_step)
    self.flops_per_step = None
    self._count_pending = config.count_flops
    self.peak = config.peak_flops_per_device or peak_flops(jax.devices()[0].device_kind)
    self._profiling = False
    self.profile_dir = os.path.join(workdir, 'profile')
    self._profile_window = (0, -1)  # none
    if config.profile_steps and jax.process_index() == 0:
      a, b = config.profile_steps
      # A resumed run traces what is left of the window.
      self._profile_window = (max(a, first_step + 1), b)

  def before_step(self, step: int, jitted_step, *args) -> None:
    """Counts the step's FLOPs on the first call; starts the profiler at its first step."""
    if self._count_pending:
      self._count_pending = False
      self._count_flops(jitted_step, *args)
    if step == self._profile_window[0] and not self._profiling:
      jax.profiler.start_trace(self.profile_dir)
      self._profiling = True

  def _count_flops(self, jitted_step, *args) -> None:
    try:
      self.flops_per_step = step_flops(jitted_step, *args)
    except Exception as e:  # pylint: disable=broad-except
      self.log(f'MFU unavailable: cost analysis of the train step failed ({e}).')
      return
    if self.flops_per_step is None:
      self.log('MFU unavailable: the backend reports no FLOPs for the train step.')
    elif self.peak is None:
      self.log(f'{self.flops_per_step / 1e9:,.3f} GFLOP per step; MFU unavailable: no peak '
               f'FLOP/s known for {jax.devices()[0].device_kind!r} (set '
               f'MonitoringConfig.peak_flops_per_device).')
    else:
      self.log(f'{self.flops_per_step / 1e9:,.3f} GFLOP per step; peak '
               f'{self.peak / 1e12:g} TFLOP/s per device x {jax.device_count()}.')

  def after_step(self, step: int, state, last: bool = False) -> None:
    if self._profiling and (step == self._profile_window[1] or last):
      jax.block_until_ready(state)
      self._stop_profile(step)

  def _stop_profile(self, step: int) -> None:
    jax.profiler.stop_trace()
    self._profiling = False
    self.log(f'Profile of steps {self._profile_window[0]}..{step} in {self.profile_dir}.')
    if self.config.profile_upload_url:
      upload_dir(self.profile_dir, self.config.profile_upload_url)
      self.log(f'Profile copied to {self.config.profile_upload_url}.')
    if self.wandb is not None:
      self.wandb.log_artifact(self.profile_dir, f'profile-{self.wandb.run.id}', 'profile',
                              {'steps': [self._profile_window[0], step]})

  def report(self, step: int, means: Mapping[str, float],
             extra: Mapping[str, float] | None = None) -> str:
    """Writes the train metrics (means over the interval) and returns the progress line."""
    line, steps_per_sec = self.progress.line(step, means['loss'])
    terms = sorted(k for k in means if k.startswith('loss_'))
    if terms:  # the loss is a sum: say of what
      line += ' (' + ', '.join(f'{k[5:]} {means[k]:.4f}' for k in terms) + ')'
    scalars = {**{f'train/{k}': v for k, v in means.items()},
               'train/steps_per_sec': steps_per_sec, **(extra or {})}
    if self.flops_per_step is not None:
      scalars['train/flops_per_step'] = self.flops_per_step
      if self.peak is not None:
        value = mfu(self.flops_per_step, steps_per_sec, jax.device_count(), self.peak)
        scalars['train/mfu'] = value
        line += f' | MFU {100 * value:.1f}%'
    self.writer.write_scalars(step, scalars)
    return line

  def close(self) -> None:
    if self._profiling:
      jax.profiler.stop_trace()
      self._profiling = False
    self.writer.flush()
    self.writer.close()


def upload_dir(local_dir: str, url: str) -> None:
  """Copies the files under `local_dir` to the fsspec `url` (file://, gs://, memory://...)."""
  import fsspec  # pylint: disable=g-import-not-at-top
  fs, root = fsspec.core.url_to_fs(url)
  for folder, _, files in os.walk(local_dir):
    relative = os.path.relpath(folder, local_dir)
    target = root if relative == '.' else f'{root.rstrip("/")}/{relative}'
    fs.makedirs(target, exist_ok=True)
    for name in files:
      fs.put_file(os.path.join(folder, name), f'{target.rstrip("/")}/{name}')
