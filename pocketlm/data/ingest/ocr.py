"""Images (screenshots, scans) -> text with Tesseract through pytesseract, one document per image.

The text is rebuilt from Tesseract's word boxes (lines joined with newlines, blocks with a blank line), and
the mean word confidence (0-100) goes into meta with the image's path, so `review` can show both and a
filter can drop poor reads. An image Pillow cannot open is reported and counted; a missing `tesseract`
binary or language pack stops the run with the apt command that installs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pocketlm.data.records import Record, make
from pocketlm.errors import PocketLMError

APT_HINT = "sudo apt-get install tesseract-ocr"


def _modules():
    try:
        import pytesseract
        from PIL import Image
    except ImportError:
        raise PocketLMError("OCR needs pytesseract and Pillow: pip install 'pocketlm[data]'") from None
    return pytesseract, Image


def check_tesseract(pytesseract) -> str:
    try:
        return str(pytesseract.get_tesseract_version())
    except pytesseract.TesseractNotFoundError:
        raise PocketLMError(f"the tesseract program is not installed (needed for OCR): {APT_HINT}") from None


def recognise(img, lang: str, pytesseract) -> tuple[str, float, int]:
    """(text, mean word confidence, words) of one Pillow image."""
    data = pytesseract.image_to_data(img, lang=lang, output_type=pytesseract.Output.DICT)
    blocks: dict[int, dict[tuple[int, int], list[str]]] = {}
    confs: list[float] = []
    for i, word in enumerate(data["text"]):
        conf = float(data["conf"][i])
        if conf < 0 or not word.strip():  # -1: a layout box, not a word
            continue
        confs.append(conf)
        lines = blocks.setdefault(data["block_num"][i], {})
        lines.setdefault((data["par_num"][i], data["line_num"][i]), []).append(word.strip())
    text = "\n\n".join("\n".join(" ".join(words) for words in lines.values()) for lines in blocks.values())
    return text, (sum(confs) / len(confs) if confs else 0.0), len(confs)


def read(item: str, ctx, fmt: str = "ocr") -> Iterator[Record]:
    pytesseract, Image = _modules()
    if "tesseract" not in ctx.state:
        ctx.state["tesseract"] = check_tesseract(pytesseract)
    path = Path(item)
    try:
        with Image.open(path) as im:
            im.load()
            img = im.convert("RGB") if im.mode not in ("RGB", "L") else im.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        ctx.problems.report(str(path), "unreadable image", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return
    try:
        text, conf, words = recognise(img, ctx.opts.lang, pytesseract)
    except pytesseract.TesseractError as e:
        msg = str(e.message if hasattr(e, "message") else e)
        if "Failed loading language" in msg or "Error opening data file" in msg:
            raise PocketLMError(f"Tesseract has no language data for {ctx.opts.lang!r}: "
                                f"{APT_HINT}-{ctx.opts.lang.split('+')[0]}") from None
        ctx.problems.report(str(path), "OCR failed", msg.strip().splitlines()[-1] if msg.strip() else "")
        return
    if not text.strip():
        ctx.problems.report(str(path), "no text recognised", "an image without readable text")
        return
    yield make(text, str(path), image=str(path.resolve()), ocr_confidence=round(conf, 1), words=words,
               lang=ctx.opts.lang, width=img.width, height=img.height)
