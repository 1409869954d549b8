"""Language identification, mT5's alpha = 0.3 target and rebalancing through SeqIO."""
import collections
import subprocess
import sys

import numpy as np
import pytest

from charred.datasets import languages

# The 101 languages of mT5's model card (huggingface.co/google/mt5-base, 'und' left out),
# with the card's 'iw' written 'he'.
MT5_CARD_LANGUAGES = set("""
af am ar az be bg bn ca ceb co cs cy da de el en eo es et eu fa fi fil fr fy ga gd gl gu
ha haw hi hmn ht hu hy ig is it he ja jv ka kk km kn ko ku ky la lb lo lt lv mg mi mk ml
mn mr ms mt my ne nl no ny pa pl ps pt ro ru sd si sk sl sm sn so sq sr st su sv sw ta
te tg th tr uk ur uz vi xh yi yo zh zu id""".split())

# mC4 tokens (billions) of the fixture's languages, typed from the mT5 paper's table.
PAPER_TOKENS = {"en": 2733, "ru": 713, "es": 433, "de": 347, "fr": 318, "ja": 164,
                "ar": 57, "hi": 24}

SENTENCES = {
    "en": ["A red bicycle leaning against a brick wall",
           "Two children playing football in the park",
           "A bowl of fresh strawberries on a wooden table",
           "The old lighthouse at sunset by the sea",
           "A black cat sleeping on a sunny windowsill"],
    "de": ["Ein rotes Fahrrad lehnt an einer Backsteinmauer",
           "Zwei Kinder spielen Fußball im Park",
           "Eine Schüssel mit frischen Erdbeeren auf einem Holztisch",
           "Der alte Leuchtturm bei Sonnenuntergang am Meer",
           "Eine schwarze Katze schläft auf einer sonnigen Fensterbank"],
    "fr": ["Un vélo rouge appuyé contre un mur de briques",
           "Deux enfants jouent au football dans le parc",
           "Un bol de fraises fraîches sur une table en bois",
           "Le vieux phare au coucher du soleil près de la mer",
           "Un chat noir qui dort sur le rebord d'une fenêtre ensoleillée"],
    "es": ["Una bicicleta roja apoyada contra una pared de ladrillos",
           "Dos niños jugando al fútbol en el parque",
           "Un cuenco de fresas frescas sobre una mesa de madera",
           "El viejo faro al atardecer junto al mar",
           "Un gato negro durmiendo en el alféizar soleado de la ventana"],
    "ru": ["Красный велосипед стоит у кирпичной стены",
           "Двое детей играют в футбол в парке",
           "Миска свежей клубники на деревянном столе",
           "Старый маяк на закате у моря",
           "Чёрная кошка спит на солнечном подоконнике"],
    "ja": ["レンガの壁に立てかけられた赤い自転車",
           "公園でサッカーをしている二人の子供",
           "木のテーブルの上の新鮮なイチゴのボウル",
           "海辺の夕暮れの古い灯台",
           "日当たりの良い窓辺で眠る黒猫"],
    "ar": ["دراجة حمراء مستندة إلى جدار من الطوب",
           "طفلان يلعبان كرة القدم في الحديقة",
           "وعاء من الفراولة الطازجة على طاولة خشبية",
           "المنارة القديمة عند غروب الشمس بجانب البحر",
           "قطة سوداء نائمة على حافة نافذة مشمسة"],
    "hi": ["ईंट की दीवार के सहारे खड़ी एक लाल साइकिल",
           "पार्क में फुटबॉल खेलते हुए दो बच्चे",
           "लकड़ी की मेज़ पर ताज़ी स्ट्रॉबेरी का एक कटोरा",
           "शाम को समुद्र के किनारे खड़ा पुराना लाइटहाउस",
           "धूप वाली खिड़की पर सोती हुई एक काली बिल्ली"],
}
# Heavily skewed toward English, as web captions are.
RAW_COUNTS = {"en": 300, "de": 40, "fr": 30, "es": 20, "ru": 12, "ja": 8, "ar": 5, "hi": 3}


def _closed_form(tokens, alpha):
  weights = {k: v ** alpha for k, v in tokens.items()}
  total = sum(weights.values())
  return {k: w / total for k, w in weights.items()}


def test_table_is_the_101_mc4_languages():
  assert set(languages.MC4_TOKENS_BILLIONS) == MT5_CARD_LANGUAGES
  assert len(MT5_CARD_LANGUAGES) == 101
  # The paper: mC4 totals 6.3T tokens.
  assert sum(languages.MC4_TOKENS_BILLIONS.values()) == pytest.approx(6300, rel=0.01)
  for code, tokens in PAPER_TOKENS.items():
    assert languages.MC4_TOKENS_BILLIONS[code] == tokens


def test_target_distribution_closed_form():
  target = languages.target_distribution()
  assert len(target) == 101 and sum(target.values()) == pytest.approx(1.0)
  assert list(target)[:3] == ["en", "ru", "es"]
  assert target["en"] / target["de"] == pytest.approx((2733 / 347) ** 0.3)
  assert target["en"] / target["yo"] == pytest.approx((2733 / 0.05) ** 0.3)
  uniform = languages.target_distribution(alpha=0.0)
  assert all(p == pytest.approx(1 / 101) for p in uniform.values())
  proportional = languages.target_distribution(alpha=1.0)
  assert proportional["en"] == pytest.approx(2733 / 6300, rel=0.01)
  subset = languages.target_distribution(languages=["en", "iw", "de"])
  expected = _closed_form({"en": 2733, "he": 17, "de": 347}, 0.3)
  assert subset == pytest.approx(expected)
  with pytest.raises(ValueError, match="Not mC4 languages.*'hr'"):
    languages.target_distribution(languages=["en", "hr"])


def test_canonical_language():
  cases = {"en": "en", "EN-us": "en", "pt_BR": "pt", "iw": "he", "tl": "fil", "nb": "no",
           "nn": "no", "ru-Latn": "ru", "zh-Hant": "zh", b"de": "de", "": "", "  ": "",
           "haw": "haw"}
  for code, expected in cases.items():
    assert languages.canonical_language(code) == expected, code


def test_identify_real_sentences():
  confidences = []
  for code, sentences in SENTENCES.items():
    for sentence in sentences:
      language, p = languages.identify(sentence)
      assert language == code, (sentence, language)
      confidences.append(p)
  # One Spanish sentence is 0.71 (Portuguese and Galician share its words); most are ~1.
  assert 0.6 < min(confidences) and max(confidences) <= 1.0 + 1e-9
  assert np.median(confidences) > 0.999
  assert languages.identify("Dette er en fin dag i Oslo, og vi går en lang tur.")[0] == "no"
  assert languages.identify("Ang pusa ay natutulog sa tabi ng bintana.")[0] == "fil"
  assert languages.identify("הכלב הקטן רץ בגינה מול הבית")[0] == "he"
  assert languages.identify(b"Ein Hund am Strand")[0] == "de"
  assert languages.identify("   ") == ("", 0.0)
  # No language evidence: langid's posterior stays spread out.
  assert languages.identify("IMG_1234")[1] < 0.5


def test_identify_probabilities_are_langid_posteriors():
  from langid import langid  # pylint: disable=g-import-not-at-top
  text = "Der Hund spielt im Garten"
  language, p = languages.identify(text)
  identifier = langid.LanguageIdentifier.from_modelstring(langid.model, norm_probs=True)
  every = identifier.classify(text)
  identifier.set_languages(["en", "de", "fr", "nl"])
  few = identifier.classify(text)
  # identify() normalises over 82 of langid's 97 languages: the winner's posterior lies
  # between its posteriors over all 97 and over 4 candidates.
  assert every[0] == few[0] == language == "de"
  assert every[1] - 1e-12 <= p <= few[1] + 1e-12 and every[1] < few[1]


def test_sampling_rates_water_filling():
  target = {"a": 0.5, "b": 0.3, "c": 0.2, "d": 0.1}
  counts = {"a": 1000, "b": 100, "c": 10}  # 'd' is absent from the data.
  # Unlimited repeats: the target renormalised over the present languages.
  assert languages.sampling_rates(counts, target) == pytest.approx(
      {"a": 0.5, "b": 0.3, "c": 0.2})
  # At most 2 reads per example in 1000 outputs: caps a 2.0, b 0.2, c 0.02; b and c are
  # capped and a takes the remaining 0.78 (hand-computed).
  assert languages.sampling_rates(counts, target, num_examples=1000,
                                  max_repeat=2) == pytest.approx(
                                      {"a": 0.78, "b": 0.2, "c": 0.02})
  # Enough data everywhere: exactly the target.
  assert languages.sampling_rates(counts, target, num_examples=50,
                                  max_repeat=1) == pytest.approx(
                                      {"a": 0.5, "b": 0.3, "c": 0.2})
  # Not enough data in total: the data's own mix.
  assert languages.sampling_rates(counts, target, num_examples=10_000,
                                  max_repeat=1) == pytest.approx(
                                      {"a": 1000 / 1110, "b": 100 / 1110, "c": 10 / 1110})
  with pytest.raises(ValueError, match="No language"):
    languages.sampling_rates({"x": 3}, target)


def test_language_report_hand_computed():
  report = languages.language_report({"en": 6, "de": 3, "": 1}, {"en": 0.5, "de": 0.25,
                                                                  "fr": 0.25})
  rows = {code: (n, a, t) for code, n, a, t in report.rows}
  assert rows["en"] == (6, 0.6, 0.5) and rows["de"] == (3, 0.3, 0.25)
  assert rows["fr"] == (0, 0.0, 0.25) and rows[""] == (1, 0.1, 0.0)
  assert report.total_variation == pytest.approx(0.5 * (0.1 + 0.05 + 0.25 + 0.1))
  assert "total variation distance: 0.2500" in str(report)


def _fixture_examples():
  """Captions with RAW_COUNTS per language; every 4th has no language metadata."""
  captions, metadata, truth = [], [], []
  for code, n in RAW_COUNTS.items():
    for i in range(n):
      captions.append(SENTENCES[code][i % len(SENTENCES[code])])
      metadata.append("" if len(captions) % 4 == 0 else code)
      truth.append(code)
  return captions, metadata, truth


def _register_source_task(name):
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  captions, metadata, _ = _fixture_examples()

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices({"caption": captions, "language": metadata})

  source = seqio.FunctionDataSource(dataset_fn, splits=["train"],
                                    num_input_examples={"train": len(captions)})
  copy = lambda ds: ds.map(lambda ex: {**ex, "text_tokens": ex["caption"]})
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=source,
      preprocessors=[copy, seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features={"text_tokens": seqio.Feature(seqio.ByteVocabulary())})


def test_count_languages_uses_metadata_then_langid():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  captions, metadata, truth = _fixture_examples()
  ds = tf.data.Dataset.from_tensor_slices({"caption": captions, "language": metadata})
  assert languages.count_languages(ds) == collections.Counter(truth)
  # Metadata wins over langid: a mislabelled caption keeps its label.
  ds = tf.data.Dataset.from_tensor_slices({"caption": ["A dog", "Ein Hund im Garten"],
                                           "language": ["iw", ""]})
  assert languages.count_languages(ds) == {"he": 1, "de": 1}


def test_rebalanced_mixture_reaches_the_target():
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  _register_source_task("languages_test_source")
  counts = languages.count_languages(
      seqio.get_mixture_or_task("languages_test_source").source.get_dataset("train"))
  assert counts == RAW_COUNTS
  rates = languages.register_rebalanced_mixture("languages_test_mix", "languages_test_source",
                                                counts)
  # Only languages with data get a task (the other 93 target languages are absent).
  mixture = seqio.get_mixture_or_task("languages_test_mix")
  assert sorted(t.name for t in mixture.tasks) == sorted(
      f"languages_test_mix_{c}" for c in RAW_COUNTS)
  expected = _closed_form(PAPER_TOKENS, 0.3)
  assert rates == pytest.approx(expected)

  num = 6000
  ds = mixture.get_dataset({"text_tokens": 64}, split="train", seed=0,
                           passthrough_features=["language"]).take(num)
  achieved = collections.Counter(ex["language"].decode() for ex in tfds.as_numpy(ds))
  assert sum(achieved.values()) == num
  for code, p in expected.items():
    tolerance = 4.5 * np.sqrt(p * (1 - p) / num)  # binomial standard deviations
    assert abs(achieved[code] / num - p) < tolerance, (code, achieved[code] / num, p)

  full_target = languages.target_distribution()
  raw_report = languages.language_report(RAW_COUNTS, full_target)
  report = languages.language_report(achieved, full_target)
  print(f"raw:\n{raw_report}\nrebalanced:\n{report}")
  # The 93 absent languages keep their target mass unmatched: at best the TV is that mass.
  absent_mass = 1 - sum(full_target[c] for c in RAW_COUNTS)
  assert report.total_variation == pytest.approx(absent_mass, abs=0.02)
  assert report.total_variation < raw_report.total_variation
  present = languages.target_distribution(languages=RAW_COUNTS)
  assert languages.language_report(achieved, present).total_variation < 0.03
  assert languages.language_report(RAW_COUNTS, present).total_variation > 0.4


def test_annotate_language_canonicalises_like_python():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  codes = ["en", "EN-us", "pt_BR", "iw", "tl", "nb", "ru-Latn", " de ", "in", ""]
  captions = ["x"] * (len(codes) - 1) + ["Ein Hund spielt im Garten"]
  ds = tf.data.Dataset.from_tensor_slices({"caption": captions, "language": codes})
  out = [ex["language"].decode()
         for ex in languages.annotate_language(ds).as_numpy_iterator()]
  assert out == ["en", "en", "pt", "he", "fil", "no", "ru", "de", "id", "de"]


def test_rebalance_tf_data_variant():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  captions, metadata, _ = _fixture_examples()
  ds = tf.data.Dataset.from_tensor_slices({"caption": captions, "language": metadata})
  rates = {"de": 0.5, "hi": 0.3, "ja": 0.2, "sw": 0.0}
  out = languages.rebalance(ds, rates, seed=1, cache=True).take(3000)
  achieved = collections.Counter(ex["language"].decode() for ex in out.as_numpy_iterator())
  for code, p in rates.items():
    assert abs(achieved[code] / 3000 - p) < 4.5 * np.sqrt(p * (1 - p) / 3000) + 1e-9


def test_tf_free_import():
  code = ("import sys; from charred.datasets import languages, aesthetic; "
          "languages.target_distribution(); languages.identify('Ein Hund'); "
          "assert 'tensorflow' not in sys.modules, 'imported TF'")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
