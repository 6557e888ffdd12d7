"""Rendered text images with ground truth, for measuring the PP-OCR models on their own task.

Everything is drawn with PIL in the DejaVu fonts Debian ships (`fonts-dejavu-core`, under
/usr/share/fonts/truetype/dejavu/); nothing is downloaded. A sample depends only on `(seed,
index)`, so every call with the same seed returns the same pixels and the same truth, whatever
`n` is. Images are HxWx3 uint8 in BGR order (what cv2 and rapidocr use; the colours are grey, so
the order does not matter).

    lines(n, seed)           text lines: (image, text). Random words and numbers from a fixed
                             vocabulary, five fonts, sizes 22-40 px, grey ink on a lighter grey
                             background, Gaussian noise (sigma 4). For the recognizer.
    oriented_lines(n, seed)  the same kind of lines, every other one turned 180 degrees:
                             (image, label), label 0 upright, 1 upside down. For the classifier.
    pages(n, seed, size)     size x size pages with 3-7 lines at known places:
                             (image, [(box, text, flipped)]), box = (x0, y0, x1, y1), the ink box of
                             the line (font ascent to descent, first to last glyph), flipped = that
                             line is drawn upside down (a quarter of them). For the detector and the
                             three models together.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansCondensed.ttf")
LINE_SIZES = (22, 28, 34, 40)
PAGE_SIZES = (20, 24, 28, 34)
NOISE = 4.0
FLIP_ON_PAGE = 0.25

_VOCABULARY = """
account address after again amount answer april area back balance bank before below between bill black
block blue board book bottom box branch brown building business call card case center change check
city class clear close code color company contact copy corner cost count country court credit cross
customer daily data date day delivery design detail direct document door down draft east energy entry
even every export field figure file final first floor form forward free front fuel general glass gold
green ground group guide half hand head health heavy high home hotel hour house image import index
input item july june key kind label land large last level light limit line list local long machine
main market master member message metal method middle model money month morning motor name north
note number office order owner page paper park part pass payment period phone place plan plant point
post power press price print private product public quality quarter range rate record region report
return right river road room route sales school second section service share short side signal single
south space speed staff start state station steel stock store street summer supply system table tax
test text third ticket time total tower trade train travel unit upper value view volume water week
west white window winter word work world year yellow zone
"""
WORDS = tuple(_VOCABULARY.split())


@cache
def _font(name: str, size: int):
    from PIL import ImageFont

    path = FONT_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"font {path} not found (install the Debian package fonts-dejavu-core)")
    # no ligatures: one glyph per character
    return ImageFont.truetype(str(path), size, layout_engine=ImageFont.Layout.BASIC)


def _rng(seed: int, kind: int, index: int) -> np.random.Generator:
    """One independent stream per (seed, kind of data, sample index)."""
    return np.random.default_rng([seed, kind, index])


def _token(rng: np.random.Generator) -> str:
    """A word (lower, Capitalised or UPPER), an integer, a price or a code such as 'A-1234'."""
    kind = rng.integers(10)
    if kind < 6:
        word = WORDS[rng.integers(len(WORDS))]
        return (word, word.capitalize(), word.upper())[rng.choice(3, p=(0.6, 0.3, 0.1))]
    if kind < 8:
        return str(int(rng.integers(0, 10 ** int(rng.integers(1, 6)))))
    if kind < 9:
        return f"{rng.integers(1, 1000)}.{rng.integers(0, 100):02d}"
    return f"{chr(65 + int(rng.integers(26)))}-{rng.integers(100, 10000)}"


def random_text(rng: np.random.Generator, max_tokens: int = 3) -> str:
    return " ".join(_token(rng) for _ in range(int(rng.integers(1, max_tokens + 1))))


def _noisy(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grey uint8 image plus Gaussian noise, as HxWx3 uint8."""
    noisy = gray.astype(np.float32) + rng.normal(0.0, NOISE, gray.shape).astype(np.float32)
    return np.repeat(np.clip(noisy, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def _draw_line(text: str, font, ink: int, paper: int, pad: tuple[int, int]):
    """The line drawn on its own canvas: (grey image, ink box inside it)."""
    from PIL import Image, ImageDraw

    x0, y0, x1, y1 = font.getbbox(text)
    ascent, descent = font.getmetrics()
    top, bottom = min(y0, 0), max(y1, ascent + descent)
    w, h = x1 - x0 + 2 * pad[0], bottom - top + 2 * pad[1]
    canvas = Image.new("L", (w, h), paper)
    ImageDraw.Draw(canvas).text((pad[0] - x0, pad[1] - top), text, font=font, fill=ink)
    return np.asarray(canvas), (pad[0], pad[1], w - pad[0], h - pad[1])


def _line(rng: np.random.Generator, sizes=LINE_SIZES):
    """(grey line image with a margin, text)."""
    text = random_text(rng)
    font = _font(FONTS[rng.integers(len(FONTS))], int(rng.choice(sizes)))
    ink, paper = int(rng.integers(0, 70)), int(rng.integers(200, 256))
    pad = (int(rng.integers(4, 16)), int(rng.integers(3, 10)))
    gray, _ = _draw_line(text, font, ink, paper, pad)
    return gray, text


def lines(n: int, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    out = []
    for i in range(n):
        rng = _rng(seed, 1, i)
        gray, text = _line(rng)
        out.append((_noisy(gray, rng), text))
    return out


def oriented_lines(n: int, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    out = []
    for i in range(n):
        rng = _rng(seed, 2, i)
        gray, _ = _line(rng)
        flipped = i % 2
        out.append((_noisy(gray[::-1, ::-1] if flipped else gray, rng), flipped))
    return out


def _page(rng: np.random.Generator, size: int):
    paper = int(rng.integers(210, 256))
    page = np.full((size, size), paper, dtype=np.uint8)
    truth, y = [], int(rng.integers(10, 40))
    for _ in range(int(rng.integers(3, 8))):
        font = _font(FONTS[rng.integers(len(FONTS))], int(rng.choice(PAGE_SIZES)))
        text = random_text(rng, max_tokens=4)
        gray, (bx0, by0, bx1, by1) = _draw_line(text, font, int(rng.integers(0, 70)), paper, (0, 0))
        h, w = gray.shape
        x = int(rng.integers(10, max(11, size // 3)))
        if y + h > size - 10 or x + w > size - 10:
            break
        flipped = bool(rng.random() < FLIP_ON_PAGE)
        page[y:y + h, x:x + w] = gray[::-1, ::-1] if flipped else gray
        truth.append(((x + bx0, y + by0, x + bx1, y + by1), text, flipped))
        y += h + int(rng.integers(h // 2 + 8, 3 * h))
    return page, truth


def pages(n: int, seed: int = 0, size: int = 736) -> list[tuple[np.ndarray, list]]:
    out = []
    for i in range(n):
        rng = _rng(seed, 3, i)
        page, truth = _page(rng, size)
        out.append((_noisy(page, rng), truth))
    return out
