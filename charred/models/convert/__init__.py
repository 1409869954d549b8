"""Weight conversion into and out of charred: `python -m charred.convert --help`.

sources.py reads formats lazily, core.py drives a conversion from a per-format plan,
diffusers.py and t5.py hold the name mappings; charred.models.pretrained detects formats
and reads and writes charred's own.
"""
