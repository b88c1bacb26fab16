"""Rows of a Hugging Face data set, `hf:NAME[:CONFIG][@SPLIT]`, read with the `datasets` library.

NAME is a hub id (tatsu-lab/alpaca), a folder that `datasets.load_dataset` reads (data files,
or a data set's repository cloned), or a folder written by `Dataset.save_to_disk` or
`DatasetDict.save_to_disk`. With @SPLIT that split comes back as one list, which the recipe
splits with its fractions and seed as it splits a file. Without it, a data set with a `train`
split and a validation (`validation`, `valid`, `dev`, `val`) or `test` split gives those three;
one with only `train` gives it as one list; any other asks for @SPLIT.

`streaming` reads the rows as they arrive (`load_dataset(..., streaming=True)`), so that the
first `max_rows` of a large data set are read without downloading the rest; by default a
source streams when `max_rows` is set. A saved folder is read in place (memory-mapped) either way.

Each row is a Record from "hf:NAME@SPLIT row I" (I counts from 0, as `dataset[I]` does). The
columns are renamed by `columns` ({field: column}, checked against the data set's columns), and a
null is left out, as a JSON row leaves out a field it does not have.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from mlxft.data.records import Record, check_columns, rename
from mlxft.errors import UserError

PREFIX = "hf:"
VALID_SPLITS = ("validation", "valid", "dev", "val")


def is_hub(source: str) -> bool:
    return source.startswith(PREFIX)


@dataclass(frozen=True)
class HubSource:
    name: str
    config: str | None
    split: str | None

    def origin(self, split: str | None) -> str:
        return f"{PREFIX}{self.name}{f':{self.config}' if self.config else ''}{f'@{split}' if split else ''}"


def parse_hub(source: str) -> HubSource:
    """'hf:NAME[:CONFIG][@SPLIT]' -> its parts; a NAME that is an existing path is taken whole."""
    body = source[len(PREFIX):]
    if body and Path(body).expanduser().exists():
        return HubSource(body, None, None)
    rest, at, split = body.rpartition("@") if "@" in body else (body, "", None)
    name, colon, config = rest.partition(":")
    if not name or (colon and not config) or (at and not split):
        raise UserError(f"data {source}: expected hf:NAME[:CONFIG][@SPLIT], like hf:tatsu-lab/alpaca@train "
                        f"or hf:./folder (a folder of data files, or one written by save_to_disk)")
    return HubSource(name, config or None, split)


def read_hub(source: str, *, columns: dict[str, str] | None = None, max_rows: int | None = None,
             streaming: bool | None = None) -> list[Record] | tuple[list[Record], list[Record], list[Record]]:
    """One list of rows (a split named, or a data set of only `train`), or the data set's own
    train / validation / test rows (see the module's docstring)."""
    hub = parse_hub(source)
    datasets = import_datasets(source)
    loaded = load(datasets, hub, max_rows is not None if streaming is None else streaming, source)

    def rows(part, split: str | None) -> list[Record]:
        origin = hub.origin(split)
        names = part.column_names  # None for a stream whose features are not known before its first row
        if columns and names:
            check_columns(f"data {origin}", names, columns)  # before a row is read
        try:
            found = list(islice(part, max_rows))  # all of them when max_rows is None
        except (ValueError, OSError, datasets.exceptions.DatasetsError) as e:  # streaming reads as it goes
            raise UserError(f"data {origin}: {first_line(e)}") from None
        if not found:
            raise UserError(f"data {origin}: no rows")
        if columns and not names:
            check_columns(f"data {origin}", list(found[0]), columns)
        return [Record(without_nulls(rename(row, columns)), f"{origin} row {i}") for i, row in enumerate(found)]

    if not isinstance(loaded, dict):  # one split: the one asked for, or a Dataset saved alone
        return rows(loaded, hub.split or (str(loaded.split) if loaded.split else None))
    splits = list(loaded)
    if hub.split is not None:  # a saved DatasetDict; load_dataset picks the split itself
        if hub.split not in loaded:
            raise UserError(f"data {source}: no split '{hub.split}'; the splits: {', '.join(splits)}")
        return rows(loaded[hub.split], hub.split)
    if "train" not in loaded:
        raise UserError(f"data {source}: no 'train' split; name the split to use, like {source}@{splits[0]} "
                        f"(the splits: {', '.join(splits)})")
    valid = next((name for name in VALID_SPLITS if name in loaded), None)
    if valid is None and "test" not in loaded:
        return rows(loaded["train"], "train")
    return rows(loaded["train"], "train"), rows(loaded[valid], valid) if valid else [], \
        rows(loaded["test"], "test") if "test" in loaded else []


def import_datasets(source: str):
    try:
        import datasets.exceptions
    except ImportError:
        raise UserError(f"data {source}: Hugging Face data sets are read with the `datasets` library, which is not "
                        f"installed: pip install 'mlxft[hub]'") from None
    return datasets


def load(datasets, hub: HubSource, streaming: bool, source: str):
    """A Dataset / IterableDataset (a split named) or a dict of them (DatasetDict)."""
    path = Path(hub.name).expanduser()
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        if hub.config:
            raise UserError(f"data {source}: {path} was written by save_to_disk, which keeps one config; "
                            f"drop ':{hub.config}'")
        try:
            loaded = datasets.load_from_disk(str(path))
        except (ValueError, OSError, datasets.exceptions.DatasetsError) as e:
            raise UserError(f"data {source}: {first_line(e)}") from None
        if hub.split is not None and not isinstance(loaded, dict) and str(loaded.split) != hub.split:
            raise UserError(f"data {source}: {path} holds one split ({loaded.split or 'unnamed'}, written by "
                            f"Dataset.save_to_disk); drop '@{hub.split}'")
        return loaded
    if streaming and hub.split and "[" in hub.split:
        raise UserError(f"data {source}: a streamed split cannot be sliced; data.max_rows takes its first rows "
                        f"(or --set data.streaming=false)")
    name = str(path) if path.exists() else hub.name
    try:
        return datasets.load_dataset(name, hub.config, split=hub.split, streaming=streaming)
    except (ValueError, OSError, datasets.exceptions.DatasetsError) as e:
        raise UserError(explain(datasets, name, hub, source, e)) from None


def explain(datasets, name: str, hub: HubSource, source: str, error: Exception) -> str:
    """One line on why the data set did not load: no such data set, config or split (naming the
    ones there are), or what `datasets` said."""
    said = first_line(error)
    try:
        configs = datasets.get_dataset_config_names(name)
    except Exception:  # no data set to ask: what load_dataset said is the answer
        return f"data {source}: no such data set, or it cannot be read here ({said})"
    if hub.config and configs and hub.config not in configs:
        return f"data {source}: no config '{hub.config}'; the configs: {', '.join(configs)}"
    if not hub.config and len(configs) > 1:
        return f"data {source}: name a config, like {PREFIX}{hub.name}:{configs[0]}; the configs: {', '.join(configs)}"
    if hub.split:
        try:
            splits = datasets.get_dataset_split_names(name, hub.config)
        except Exception:
            splits = None
        if splits and hub.split.split("[")[0] not in splits:  # train[:100] is a slice of train
            return f"data {source}: no split '{hub.split}'; the splits: {', '.join(splits)}"
    return f"data {source}: {said}"


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def without_nulls(value):
    """Arrow fills a field a row lacks with null (a message's unused `tool_calls`, say); a JSON
    row would leave it out, and so does this."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value
