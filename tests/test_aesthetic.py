"""LAION aesthetic head: loader and numpy/TF forward passes against the same MLP in torch."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from charred.datasets import aesthetic  # pylint: disable=g-import-not-at-top,wrong-import-position

FILENAME = "sac+logos+ava1-l14-linearMSE.pth"


class ReferenceMLP(torch.nn.Module):
  """The published architecture (improved-aesthetic-predictor's MLP), built here in torch."""

  def __init__(self):
    super().__init__()
    self.layers = torch.nn.Sequential(
        torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1))

  def forward(self, x):
    return self.layers(x)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(torch model in eval mode, path of its state dict saved as the release is)."""
  torch.manual_seed(0)
  model = ReferenceMLP().eval()
  with torch.no_grad():  # Scale up so that scores spread over a few units, as real ones do.
    for layer in model.layers:
      if isinstance(layer, torch.nn.Linear):
        layer.weight.mul_(3.0)
        layer.bias.add_(1.0)
  path = str(tmp_path_factory.mktemp("aesthetic") / FILENAME)
  torch.save(model.state_dict(), path)
  return model, path


def _torch_scores(model, embeddings):
  with torch.no_grad():
    x = torch.nn.functional.normalize(torch.from_numpy(embeddings), dim=-1)
    return model(x)[:, 0].numpy()


def test_state_dict_layout(reference):
  _, path = reference
  keys = set(torch.load(path, weights_only=True))
  assert keys == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}


def test_numpy_head_matches_torch(reference):
  model, path = reference
  head = aesthetic.load(path)
  embeddings = np.random.default_rng(0).normal(size=(64, 768)).astype(np.float32) * 5
  expected = _torch_scores(model, embeddings)
  assert np.std(expected) > 0.1  # Not a degenerate comparison.
  np.testing.assert_allclose(head(embeddings), expected, rtol=1e-5, atol=1e-5)
  w, b = head.affine()
  unit = embeddings / np.linalg.norm(embeddings, axis=-1, keepdims=True)
  np.testing.assert_allclose(unit @ w + b, expected, rtol=1e-5, atol=1e-5)
  # A single embedding, and a zero one (left unnormalised, as the reference's
  # `normalized` does): the head's output is then its bias path alone.
  np.testing.assert_allclose(head(embeddings[3]), expected[3], rtol=1e-5, atol=1e-5)
  with torch.no_grad():
    zero = model(torch.zeros(1, 768))[0, 0].item()
  assert head(np.zeros(768, np.float32)) == pytest.approx(zero, rel=1e-5)


def test_bad_files_are_one_line_errors(reference, tmp_path):
  _, path = reference
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(open(path, "rb").read()[:1000])
  with pytest.raises(ValueError, match="truncated.pth") as error:
    aesthetic.load(str(truncated))
  assert "\n" not in str(error.value)

  state = torch.load(path, weights_only=True)
  missing = tmp_path / "missing.pth"
  torch.save({k: v for k, v in state.items() if k != "layers.7.bias"}, missing)
  with pytest.raises(ValueError, match=r"missing.pth: no 'layers.7.bias'"):
    aesthetic.load(str(missing))

  wrong = tmp_path / "wrong.pth"
  torch.save({**state, "layers.0.weight": torch.zeros(1024, 512)}, wrong)
  with pytest.raises(ValueError, match=r"wrong.pth: layers.0.weight has shape \(1024, 512\)"):
    aesthetic.load(str(wrong))


def test_annotate_and_filter(reference):
  tf = pytest.importorskip("tensorflow")
  from charred.datasets import filters  # pylint: disable=g-import-not-at-top
  model, path = reference
  head = aesthetic.load(path)
  rng = np.random.default_rng(1)
  nan = np.float32("nan")
  embeddings = rng.normal(size=(10, 768)).astype(np.float32)
  embeddings[6:] = nan  # Rows 6..9 have no embedding.
  predicted = _torch_scores(model, embeddings[:6])
  threshold = float(np.median(predicted))
  # Rows 6, 7: metadata scores either side of the threshold; rows 8, 9: nothing.
  metadata = np.array([nan] * 6 + [threshold + 1, threshold - 1, nan, nan], np.float32)
  metadata[0] = threshold + 5  # A delivered score wins over the embedding.
  ds = tf.data.Dataset.from_tensor_slices({"key": np.arange(10),
                                           "clip_image_embedding": embeddings,
                                           "aesthetic_score": metadata})
  counts = filters.FilterCounts()
  out = list(aesthetic.annotate_and_filter(ds, head, min_score=threshold,
                                           counts=counts).as_numpy_iterator())
  expected_scores = np.concatenate([[threshold + 5], predicted[1:], metadata[6:]])
  expected_kept = [i for i in range(10)
                   if np.isnan(expected_scores[i]) or expected_scores[i] >= threshold]
  assert [int(ex["key"]) for ex in out] == expected_kept
  got = np.array([ex["aesthetic_score"] for ex in out])
  np.testing.assert_allclose(got, expected_scores[expected_kept], rtol=1e-5, atol=1e-5)
  low = sum(1 for s in expected_scores if s < threshold)
  assert counts.as_dict()["aesthetic"] == {"kept": 10 - 2 - low, "unscored": 2,
                                           "low_score": low}

  # Without a head, or without the features (e.g. WiT), examples pass as 'unscored'.
  counts = filters.FilterCounts()
  out = list(aesthetic.annotate_and_filter(ds, None, min_score=threshold,
                                           counts=counts).as_numpy_iterator())
  assert counts.as_dict()["aesthetic"] == {"kept": 2, "unscored": 7, "low_score": 1}
  counts = filters.FilterCounts()
  bare = tf.data.Dataset.from_tensor_slices({"caption": ["a", "b", "c"]})
  out = list(aesthetic.annotate_and_filter(bare, head, min_score=5.0,
                                           counts=counts).as_numpy_iterator())
  assert len(out) == 3 and all(np.isnan(ex["aesthetic_score"]) for ex in out)
  assert counts.as_dict()["aesthetic"] == {"kept": 0, "unscored": 3, "low_score": 0}
