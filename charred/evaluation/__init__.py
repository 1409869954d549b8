"""charred.evaluation: OCR-based scoring of rendered text (no TensorFlow).

`ocr.OcrReader` reads sign images offline with RapidOCR (imported lazily on
first use), `text_metrics.score` turns its output into exact-match and NED
metrics, and `grid.make_grid` / `grid.save_png` lay samples out for viewing.
"""
from charred.evaluation.grid import make_grid, ocr_label, save_png
from charred.evaluation.ocr import OcrReader
from charred.evaluation.text_metrics import score
