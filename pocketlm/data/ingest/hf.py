"""Hugging Face datasets by name (`hf:user/name`, streamed from the Hub) or by local path (a folder written
by `save_to_disk`, or a folder of data files), rows turned into records with the same `--field` /
`--template` as JSONL. Needs the optional `datasets` library; a saved dataset is memory-mapped Arrow, so
rows stream without loading the table.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pocketlm.data.records import Record
from pocketlm.errors import PocketLMError


def _datasets():
    try:
        import datasets
    except ImportError:
        raise PocketLMError("reading Hugging Face datasets needs the datasets library: "
                            "pip install datasets (or pip install 'pocketlm[data]')") from None
    return datasets


def open_dataset(item: str, split: str):
    """An iterable of row dicts for `item`, and a short label of where it came from."""
    from pocketlm.data.ingest import is_hf_folder

    ds_lib = _datasets()
    name = item.removeprefix("hf:")
    p = Path(name)
    try:
        if p.is_dir() and is_hf_folder(p):
            ds = ds_lib.load_from_disk(str(p))
        elif p.is_dir():
            ds = ds_lib.load_dataset(str(p), split=split, streaming=True)
        else:
            ds = ds_lib.load_dataset(name, split=split, streaming=True)
    except FileNotFoundError as e:
        raise PocketLMError(f"dataset {name!r} not found ({str(e).splitlines()[0]})") from None
    except (ValueError, ConnectionError, OSError) as e:  # DatasetNotFoundError, offline Hub, bad split...
        raise PocketLMError(f"cannot open dataset {name!r}: {str(e).splitlines()[0]}") from None
    if isinstance(ds, ds_lib.DatasetDict):
        if split not in ds:
            raise PocketLMError(f"dataset {name!r} has no split {split!r}; it has {', '.join(ds)} (--hf-split)")
        ds = ds[split]
    return ds, f"hf:{name}"


def read(item: str, ctx, fmt: str = "hf") -> Iterator[Record]:
    from pocketlm.data.ingest.tabular import RowTemplate

    tpl = ctx.state.get("row_template")
    if tpl is None:
        tpl = ctx.state["row_template"] = RowTemplate(ctx.opts.field, ctx.opts.template)
    ds, source = open_dataset(item, ctx.opts.hf_split)
    for i, row in enumerate(ds):
        rec = tpl.record(row, f"{source}:row {i + 1}", source, ctx, jsonable=True)
        if rec:
            yield rec
