"""Writers (W&B offline, OpenTelemetry in memory, no TensorFlow), profiles, FLOPs and MFU."""

import dataclasses
import glob
import json
import os
import subprocess
import sys
import textwrap
import time

import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charred.models.diffusion_model import DiffusionModel
from charred.models.image_codec import PixelCodec
from charred.models.text_to_image import TextToImage, init_params
from charred.trainers import monitoring, trainer
from charred.evaluation.evaluators import PeriodicEvaluator
from charred.trainers.optimizer import OptimizerConfig
from test_trainer import fixed_batch, micro_model
from conftest import repeated_batches

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nano_model():
  """micro_model with a one-level U-Net: its train step compiles in about half the time."""
  config = micro_model()
  return dataclasses.replace(config, unet=dataclasses.replace(
      config.unet, block_out_channels=(16,), down_block_types=('CrossAttnDownBlock2D',),
      up_block_types=('CrossAttnUpBlock2D',), attention_head_dim=(1,)))


def run_python(code: str, *, env=None, timeout=120):
  proc = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=REPO, text=True,
                        capture_output=True, timeout=timeout,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', **(env or {})))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_step_flops_of_a_matmul_is_2mnk():
  m, n, k = 64, 48, 32
  flops = monitoring.step_flops(jax.jit(jnp.matmul), jnp.ones((m, k)), jnp.ones((k, n)))
  assert flops == 2 * m * n * k


def test_step_flops_sums_over_the_devices_of_a_sharded_step():
  # XLA counts one device's share of a partitioned program; the total must not change.
  proc = run_python('''
      import jax, jax.numpy as jnp
      from jax.sharding import NamedSharding, PartitionSpec as P
      from charred.trainers import monitoring
      mesh = jax.make_mesh((2,), ('data',))
      a = jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, P('data', None)))
      b = jax.device_put(jnp.ones((32, 48)), NamedSharding(mesh, P()))
      print(monitoring.step_flops(jax.jit(jnp.matmul), a, b))
  ''', env={'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
  assert float(proc.stdout.split()[-1]) == 2 * 64 * 48 * 32


def test_mfu_and_peaks():
  # 1 TFLOP per step at 2 steps/s on 4 devices of 1 TFLOP/s peak: half the peak.
  assert monitoring.mfu(1e12, 2.0, 4, 1e12) == pytest.approx(0.5)
  assert monitoring.peak_flops('NVIDIA H100 80GB HBM3') == 989e12
  assert monitoring.peak_flops('NVIDIA H100 PCIe') == 756e12
  assert monitoring.peak_flops('NVIDIA A100-SXM4-40GB') == 312e12
  assert monitoring.peak_flops('TPU v4') == 275e12
  assert monitoring.peak_flops('TPU v5 lite') == 197e12
  assert monitoring.peak_flops('TPU v5') == 459e12  # v5p's device kind
  assert monitoring.peak_flops('cpu') is None


def test_bad_monitoring_config_is_a_clear_error():
  with pytest.raises(ValueError, match='profile_steps'):
    monitoring.MonitoringConfig(profile_steps=(5, 2))
  with pytest.raises(ValueError, match='peak_flops_per_device'):
    monitoring.MonitoringConfig(peak_flops_per_device=0.0)


def test_otel_exporters_from_env(monkeypatch, caplog):
  monkeypatch.setenv('OTEL_METRICS_EXPORTER', 'console')
  monkeypatch.setenv('OTEL_TRACES_EXPORTER', 'none')
  readers, processors = monitoring.otel_exporters_from_env()
  assert len(readers) == 1 and not processors
  readers[0].shutdown()
  # OTLP without its exporter package: a warning that names the package, nothing exported.
  monkeypatch.setenv('OTEL_METRICS_EXPORTER', 'otlp')
  monkeypatch.setitem(sys.modules, 'opentelemetry.exporter.otlp.proto.http.metric_exporter',
                      None)
  readers, _ = monitoring.otel_exporters_from_env()
  assert not readers
  assert 'opentelemetry-exporter-otlp-proto-http is not installed' in caplog.text
  monkeypatch.setenv('OTEL_METRICS_EXPORTER', 'prometheus')
  with pytest.raises(ValueError, match='OTEL_METRICS_EXPORTER'):
    monitoring.otel_exporters_from_env()


def otel_in_memory():
  from opentelemetry.sdk.metrics.export import InMemoryMetricReader
  from opentelemetry.sdk.trace.export import SimpleSpanProcessor
  from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
  reader, spans = InMemoryMetricReader(), InMemorySpanExporter()
  return reader, spans, SimpleSpanProcessor(spans)


def otel_points(reader):
  """{metric name: last data point} from an InMemoryMetricReader."""
  points = {}
  for resource in reader.get_metrics_data().resource_metrics:
    for scope in resource.scope_metrics:
      for metric in scope.metrics:
        points[metric.name] = metric.data.data_points[-1]
  return points


def test_otel_writer_gauges_histogram_and_interval_spans():
  reader, spans, processor = otel_in_memory()
  writer = monitoring.OpenTelemetryWriter(metric_readers=[reader], span_processors=[processor])
  writer.write_scalars(5, {'train/loss': 0.5, 'train/steps_per_sec': 4.0})
  time.sleep(0.2)
  writer.write_scalars(10, {'train/loss': 0.25, 'train/steps_per_sec': 2.0})
  writer.close()
  points = otel_points(reader)
  assert points['train/loss'].value == 0.25 and points['step'].value == 10
  assert points['train/step_time'].count == 2
  assert points['train/step_time'].sum == pytest.approx(1 / 4 + 1 / 2)
  first, second = spans.get_finished_spans()
  assert (first.name, first.attributes['step'], second.attributes['step']) == ('train', 5, 10)
  assert second.start_time == first.end_time  # consecutive intervals
  assert 0.2 <= (second.end_time - second.start_time) / 1e9 < 2.0


def read_wandb_records(workdir):
  """The records of the (only) offline W&B run under workdir: a LevelDB-style log of
  protobuf `Record`s after a 7-byte header, in 32 KiB blocks."""
  from wandb.proto import wandb_internal_pb2
  (path,) = glob.glob(os.path.join(workdir, 'wandb', 'offline-run-*', '*.wandb'))
  with open(path, 'rb') as f:
    data = f.read()
  assert data[:4] == b':W&B'
  records, chunk, pos, block = [], b'', 7, 32768
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's zero-padded tail
      pos += block - pos % block
      continue
    length, kind = int.from_bytes(data[pos + 4:pos + 6], 'little'), data[pos + 6]
    chunk += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # a FULL record, or the LAST piece of one
      record = wandb_internal_pb2.Record()
      record.ParseFromString(chunk)
      records.append(record)
      chunk = b''
  return records


def wandb_history(records):
  """{step: {key: value}} of the logged history."""
  history = {}
  for r in records:
    if r.WhichOneof('record_type') == 'history':
      row = {(i.key or '/'.join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
      history.setdefault(row['_step'], {}).update(row)
  return history


@pytest.mark.slow
def test_train_reports_to_wandb_otel_tensorboard_with_profile_and_mfu(tmp_path, monkeypatch):
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  reader, spans, processor = otel_in_memory()
  monkeypatch.setattr(monitoring, 'otel_exporters_from_env', lambda: ([reader], [processor]))
  upload = f'memory://charred-test-{os.getpid()}/profile'
  peak = 1e12
  config = trainer.TrainConfig(
      train_steps=4, batch_size=2, log_every=2,
      nan_policy='none',  # compiles several times faster than 'skip' on CPU
      optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=1),
      monitoring=monitoring.MonitoringConfig(
          wandb=True, opentelemetry=True, profile_steps=(2, 3), profile_upload_url=upload,
          peak_flops_per_device=peak))

  def images(step, params, writer):
    writer.write_images(step, {'samples': np.full((1, 4, 6, 3), step * 40, np.uint8)})
    return {}

  batch = fixed_batch(2)
  lines = []
  workdir = str(tmp_path)
  trainer.train(workdir, DiffusionModel(nano_model()), config, repeated_batches(lambda: batch),
                evaluators=[PeriodicEvaluator('images', 2, lambda: images)], log=lines.append)

  # The progress line gains MFU; flops_per_step is at least 6 FLOPs (forward 2, backward
  # 4) per U-Net parameter per image.
  (report,) = [line for line in lines if line.startswith('step 4/4 | loss ')]
  assert ' | ETA ' in report and ' | MFU ' in report and report.endswith('%')
  model = TextToImage(nano_model())
  num_unet_params = sum(x.size for x in jax.tree_util.tree_leaves(
      init_params(model, jax.random.PRNGKey(0), PixelCodec())['unet']))

  # OpenTelemetry: one 'train' span per report, whose attributes carry the same MFU.
  train_spans = [s for s in spans.get_finished_spans() if s.name == 'train']
  assert [s.attributes['step'] for s in train_spans] == [2, 4]
  for span in train_spans:
    a = span.attributes
    assert a['train/flops_per_step'] >= 6 * 2 * num_unet_params
    assert a['train/mfu'] == pytest.approx(
        a['train/flops_per_step'] * a['train/steps_per_sec'] / (jax.device_count() * peak))
  points = otel_points(reader)
  assert points['train/loss'].value == train_spans[-1].attributes['train/loss']

  # W&B (offline): the same scalars at the same steps, the images and the profile artifact.
  records = read_wandb_records(workdir)
  history = wandb_history(records)
  for span in train_spans:
    row = history[span.attributes['step']]
    for key in ('train/loss', 'train/mfu', 'train/flops_per_step'):
      assert row[key] == pytest.approx(span.attributes[key], rel=1e-6)
  assert history[2]['samples/count'] == 1 and history[4]['samples/count'] == 1
  assert len(glob.glob(os.path.join(workdir, 'wandb', 'offline-run-*', 'files', 'media', 'images',
                                    'samples_*.png'))) == 2
  artifacts = [r.artifact for r in records if r.WhichOneof('record_type') == 'artifact']
  assert [a.type for a in artifacts] == ['profile']

  # The trace, in the workdir and copied to the fsspec URL; the TensorBoard events.
  traces = glob.glob(os.path.join(workdir, 'profile', 'plugins', 'profile', '*', '*.xplane.pb'))
  assert len(traces) == 1
  relative = os.path.relpath(traces[0], os.path.join(workdir, 'profile'))
  assert any(e.path.endswith(os.path.basename(traces[0])) for e in artifacts[0].manifest.contents)
  with fsspec.open(f'{upload}/{relative}', 'rb') as f, open(traces[0], 'rb') as g:
    assert f.read() == g.read()
  assert glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))


def test_upload_dir_to_a_file_url(tmp_path):
  src = tmp_path / 'src'
  (src / 'a' / 'b').mkdir(parents=True)
  (src / 'top.txt').write_text('top')
  (src / 'a' / 'b' / 'deep.bin').write_bytes(b'\0\1\2')
  monitoring.upload_dir(str(src), f'file://{tmp_path}/dst')
  assert (tmp_path / 'dst' / 'top.txt').read_text() == 'top'
  assert (tmp_path / 'dst' / 'a' / 'b' / 'deep.bin').read_bytes() == b'\0\1\2'


def test_without_tensorflow_the_writers_fall_back_with_one_warning(tmp_path):
  proc = run_python(f'''
      import sys
      sys.modules['tensorflow'] = None  # as on a host without TensorFlow
      import numpy as np
      from charred.evaluation import evaluators  # no TensorFlow needed
      from charred.trainers import monitoring, trainer
      monitor = monitoring.Monitor(
          {str(tmp_path)!r}, monitoring.MonitoringConfig(opentelemetry=True, count_flops=False),
          total_steps=10, batch_size=2, first_step=0)
      print(monitor.report(5, {{'loss': 0.5}}))
      monitor.writer.write_images(5, {{'samples': np.zeros((1, 4, 4, 3), np.uint8)}})
      monitor.close()
      print(sorted(type(w._writer).__name__ for w in monitor.writer._writers))
      assert sys.modules['tensorflow'] is None
  ''', env={'OTEL_METRICS_EXPORTER': 'none', 'OTEL_TRACES_EXPORTER': 'none'})
  assert 'step 5/10 | loss 0.5000' in proc.stdout
  assert "['LoggingWriter', 'OpenTelemetryWriter']" in proc.stdout
  assert proc.stderr.count('No TensorBoard summaries: TensorFlow is not importable') == 1
  assert not glob.glob(str(tmp_path / 'events.out.tfevents.*'))
