"""Fonts found at their package's path: the `fontpkg-*` wheels' and one Debian package's.

The TF-free renderers (`render.font_path`, so `signs` source='render' and the ladder's
handwriting face) and the `calligraphy` builder draw with these, so the table lives here,
free of TensorFlow and TFDS. Each file is found at its package's path, never by a system
font lookup: setup.py pins the wheels, as the pixels depend on the font bytes. The wheels'
fonts are redistributed unmodified from github.com/google/fonts, each with its LICENSE in
the wheel: Great Vibes (ofl/greatvibes), Dancing Script (ofl/dancingscript), Caveat
(ofl/caveat), Kalam (Indian Type Foundry, ofl/kalam) and Amiri (ofl/amiri) under the SIL
Open Font License 1.1, Satisfy (Font Diner, apache/satisfy) under Apache 2.0. No CJK
brush font ships on PyPI: Han regular script (kaishu) is AR PL UKai (Arphic Public
License) from the Debian package fonts-arphic-ukai (`apt-get install fonts-arphic-ukai`).
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import os

LATIN, DEVANAGARI, ARABIC, HAN = "Latin", "Devanagari", "Arabic", "Han"


@dataclasses.dataclass(frozen=True)
class PackagedFont:
  """A bundled font: its package, its file, and what it writes."""
  package: str  # Module of a fontpkg-* wheel, the file at <package>/files/<file>; with
  # `debian`, a Debian package, the file at the absolute path it installs (Debian fixes it).
  file: str
  script: str
  style: str  # The caption's noun phrase for the hand.
  debian: bool = False


FONTS = {
    "great_vibes": PackagedFont("fontpkg_great_vibes", "GreatVibes-Regular.ttf", LATIN,
                                "copperplate calligraphy"),
    "dancing_script": PackagedFont("fontpkg_dancing_script", "DancingScript[wght].ttf",
                                   LATIN, "casual script calligraphy"),
    "satisfy": PackagedFont("fontpkg_satisfy", "Satisfy-Regular.ttf", LATIN,
                            "brush script lettering"),
    "caveat": PackagedFont("fontpkg_caveat", "Caveat[wght].ttf", LATIN, "handwriting"),
    "kalam": PackagedFont("fontpkg_kalam", "Kalam-Regular.ttf", DEVANAGARI, "handwriting"),
    "amiri": PackagedFont("fontpkg_amiri", "Amiri-Regular.ttf", ARABIC, "naskh calligraphy"),
    # A TrueType collection: its first face, 'AR PL UKai CN', is the one drawn.
    "ukai": PackagedFont("fonts-arphic-ukai", "/usr/share/fonts/truetype/arphic/ukai.ttc",
                         HAN, "regular-script (kaishu) brush calligraphy", debian=True),
}
# The default fonts: the wheels' only, as setup.py pins them on every machine.
WHEEL_FONTS = tuple(name for name, font in FONTS.items() if not font.debian)


def font_path(name: str) -> str:
  """Absolute path of FONTS[name]'s file inside its wheel or Debian package;
  FileNotFoundError names the package to install when it is missing."""
  font = FONTS[name]
  if font.debian:
    if not os.path.isfile(font.file):
      raise FileNotFoundError(f"calligraphy font {name!r} needs the Debian package "
                              f"{font.package} (apt-get install {font.package}): no "
                              f"{font.file}")
    return font.file
  wheel = font.package.replace("_", "-")
  try:
    path = importlib.resources.files(font.package) / "files" / font.file
  except ModuleNotFoundError:
    raise FileNotFoundError(f"calligraphy font {name!r} needs the {wheel} package "
                            f"(pip install {wheel})") from None
  if not path.is_file():
    raise FileNotFoundError(f"{path}: font file missing from the {wheel} package")
  return str(path)
