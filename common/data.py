"""Data: read a user's table, hold back an evaluation split, fix the label set, tokenise, batch.

Sources: a CSV/JSON/JSONL/Parquet file, a folder holding train.* and (optionally) test.* files,
or a hub data set name. Everything returned is a ``datasets.Dataset`` so the flwr-datasets
partitioners apply directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.config import FedLoraConfig
from common.errors import FedLoraError

SUFFIXES = {".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}
LABEL_KEY = "label_id"


@dataclass
class DataSplits:
    # Every row as read, blank ones too: the sites' data checks count and judge them
    # (common/data_checks.py).
    train: "datasets.Dataset"  # noqa: F821  (imported lazily: heavy)
    # Only rows with a text and a target: an evaluation has no use for the others.
    test: "datasets.Dataset"  # noqa: F821


def is_blank(value: str) -> bool:
    """An empty or missing text or label (missing values are read as empty strings)."""
    return not value.strip()


def columns(rows, *names: str) -> tuple[list, ...]:
    """Whole columns of `rows` as lists, each read at once: iterating a datasets column
    decodes it row by row, ~20x slower (a second for a few thousand rows)."""
    return tuple(rows[name][:] for name in names)


def read_table(path: Path):
    import pandas as pd

    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise FedLoraError(f"data file {str(path)!r} has an unsupported type; use one of "
                           f"{', '.join(SUFFIXES)}")
    try:
        if kind == "csv":
            return pd.read_csv(path)
        if kind == "jsonl":
            return pd.read_json(path, lines=True)
        if kind == "json":
            try:
                return pd.read_json(path)
            except ValueError:
                return pd.read_json(path, lines=True)
        return pd.read_parquet(path)
    except FedLoraError:
        raise
    except Exception as err:  # pandas raises many types; the user needs the file and reason
        raise FedLoraError(f"cannot read data file {str(path)!r}: {err}") from None


def _split_file(folder: Path, stem: str) -> Path | None:
    for suffix in SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _looks_like_path(source: str) -> bool:
    return (source.startswith((".", "/", "~")) or Path(source).suffix.lower() in SUFFIXES
            or source.count("/") > 1)


def load_splits(cfg: FedLoraConfig) -> DataSplits:
    """The training pool and the server's evaluation split, identical on every process."""
    import datasets

    datasets.disable_progress_bars()  # per-call bars for in-memory tables are noise
    source = cfg.data_source
    path = Path(source).expanduser()
    if path.is_dir():
        train_file = _split_file(path, "train")
        if train_file is None:
            raise FedLoraError(f"data folder {source!r} has no train file (train.csv, "
                               f"train.json, train.jsonl or train.parquet)")
        test_file = _split_file(path, "test") or _split_file(path, "validation")
        train = _to_dataset(read_table(train_file), cfg, str(train_file))
        test = _to_dataset(read_table(test_file), cfg, str(test_file)) if test_file else None
    elif path.is_file():
        train, test = _to_dataset(read_table(path), cfg, str(path)), None
    elif _looks_like_path(source):
        raise FedLoraError(f"data file or folder {source!r} does not exist")
    else:
        try:
            hub = datasets.load_dataset(source)
        except Exception as err:  # the hub raises many types; one line says which data set
            raise FedLoraError(f"data set {source!r} is not a local file or folder and cannot "
                               f"be loaded from the Hugging Face hub ({type(err).__name__})"
                               ) from None
        if "train" not in hub:
            raise FedLoraError(f"hub data set {source!r} has no 'train' split")
        train = _to_dataset(hub["train"].to_pandas(), cfg, source)
        test_name = next((s for s in ("test", "validation") if s in hub), None)
        test = _to_dataset(hub[test_name].to_pandas(), cfg, source) if test_name else None
    if test is None:
        if cfg.test_fraction <= 0:
            raise FedLoraError(f"data {source!r} has no test split and test-fraction is 0")
        held = train.train_test_split(test_size=cfg.test_fraction, seed=cfg.seed)
        train, test = held["train"], held["test"]
    test = _evaluable(test)
    if len(test) == 0:
        raise FedLoraError(f"the test split of data {source!r} has no rows with both a text and "
                           f"a target: the server would have nothing to evaluate on")
    if cfg.max_train_examples and len(train) > cfg.max_train_examples:
        train = train.shuffle(seed=cfg.seed).select(range(cfg.max_train_examples))
    if cfg.max_eval_examples and len(test) > cfg.max_eval_examples:
        test = test.shuffle(seed=cfg.seed).select(range(cfg.max_eval_examples))
    if len(train) == 0:
        raise FedLoraError(f"data {source!r} has no training rows")
    return DataSplits(train=train, test=test)


def load_site_rows(cfg: FedLoraConfig, data_path: str, what: str = "node-config data-path"):
    """A deployed site's own rows (its SuperNode's node-config data-path), all of them for local
    training and validation: the server evaluates on its own data, so nothing is held back. In
    a folder, the train file is the site's data. Blank rows are kept for the data checks.
    `what` names the path in messages."""
    return _load_rows(cfg, data_path, what, ("train",))


def load_server_splits(cfg: FedLoraConfig) -> DataSplits:
    """What the server evaluates on: all of eval-data when set (a deployment's coordinator
    holds no training data), else the test split of data (a simulation's pooled data set)."""
    if not cfg.eval_data:
        return load_splits(cfg)
    rows = _load_rows(cfg, cfg.eval_data, "config eval-data", ("test", "validation", "train"))
    test = _evaluable(rows)
    if len(test) == 0:
        raise FedLoraError(f"config eval-data {cfg.eval_data!r} has no rows with both a text "
                           f"and a target")
    if cfg.max_eval_examples and len(test) > cfg.max_eval_examples:
        test = test.shuffle(seed=cfg.seed).select(range(cfg.max_eval_examples))
    # train: every row, so the label set read from the splits misses none of them.
    return DataSplits(train=rows, test=test)


def data_file(data_path: str, what: str, stems: tuple[str, ...] = ("train",)) -> Path:
    """The file itself, or a folder's first split file among `stems`."""
    path = Path(data_path).expanduser()
    if path.is_dir():
        file = next((f for f in (_split_file(path, stem) for stem in stems) if f), None)
        if file is None:
            raise FedLoraError(f"{what} {data_path!r} is a folder without a "
                               f"{' or '.join(stems)} file (.csv, .json, .jsonl or .parquet)")
        return file
    if path.is_file():
        return path
    raise FedLoraError(f"{what} {data_path!r} does not exist")


def _load_rows(cfg: FedLoraConfig, data_path: str, what: str, stems: tuple[str, ...]):
    """Every usable row of a file, or of a folder's first split file among `stems`."""
    file = data_file(data_path, what, stems)
    rows = _to_dataset(read_table(file), cfg, str(file))
    if len(rows) == 0:
        raise FedLoraError(f"{what} {data_path!r} has no usable rows")
    return rows


def _to_dataset(frame, cfg: FedLoraConfig, where: str):
    import datasets

    columns = ([cfg.text_column, cfg.label_column] if cfg.is_classification
               else [cfg.prompt_column, cfg.response_column])
    for column in columns:
        if column not in frame.columns:
            option = {cfg.text_column: "text-column", cfg.label_column: "label-column",
                      cfg.prompt_column: "prompt-column",
                      cfg.response_column: "response-column"}[column]
            raise FedLoraError(f"data {where!r} has no column {column!r} (set {option}; "
                               f"columns found: {', '.join(map(str, frame.columns))})")
    frame = frame[columns]
    # Missing values become empty strings rather than vanishing here: the data checks count
    # them. Labels are compared as strings everywhere, so 3 and "3" from two sites agree.
    frame = frame.astype(str).mask(frame.isna(), "")
    frame = frame.rename(columns=dict(zip(columns, ("text", "target"))))
    return datasets.Dataset.from_pandas(frame.reset_index(drop=True), preserve_index=False)


def _evaluable(rows):
    """The rows with both a text and a target."""
    keep = [i for i, (text, target) in enumerate(zip(*columns(rows, "text", "target")))
            if not (is_blank(text) or is_blank(target))]
    return rows if len(keep) == len(rows) else rows.select(keep)


def resolve_labels(cfg: FedLoraConfig, splits: DataSplits | None = None) -> list[str]:
    """The label set shared by every client: config `labels` if given, else all labels seen in
    the data (train and test), sorted, so a client that never saw a label maps it the same."""
    if cfg.labels.strip():
        text = cfg.labels.strip()
        candidate = Path(text).expanduser()
        if candidate.suffix.lower() == ".json":
            if not candidate.is_file():
                raise FedLoraError(f"labels file {text!r} does not exist")
            try:
                labels = [str(x) for x in json.loads(candidate.read_text())]
            except (ValueError, TypeError) as err:
                raise FedLoraError(f"labels file {text!r} is not a JSON list: {err}") from None
        else:
            labels = [x.strip() for x in text.split(",") if x.strip()]
        if len(set(labels)) != len(labels):
            raise FedLoraError("config labels lists a label twice")
        return labels
    if splits is None:
        raise FedLoraError("no label set: give config labels or data to read them from")
    (train,), (test,) = columns(splits.train, "target"), columns(splits.test, "target")
    return sorted(label for label in set(train) | set(test) if not is_blank(label))


def tokenize(dataset, tokenizer, cfg: FedLoraConfig, labels: list[str] | None = None):
    """Return a list of examples (dicts of int lists), ready for `batches`."""
    texts, targets = columns(dataset, "text", "target")
    if cfg.is_classification:
        label_to_id = {label: i for i, label in enumerate(labels or [])}
        unknown = sorted(set(targets) - set(label_to_id))
        if unknown:
            raise FedLoraError(f"{len(unknown)} label(s) in the data are not in the shared "
                               f"label set, e.g. {unknown[0]!r}")
        encoded = tokenizer(texts, truncation=True, max_length=cfg.max_length)
        return [{"input_ids": ids, "attention_mask": mask, "labels": label_to_id[target]}
                for ids, mask, target in zip(encoded["input_ids"], encoded["attention_mask"],
                                             targets)]
    return [_causal_example(prompt, response, tokenizer, cfg)
            for prompt, response in zip(texts, targets)]


def _causal_example(prompt: str, response: str, tokenizer, cfg: FedLoraConfig) -> dict:
    """Prompt tokens get label -100: the loss is on the response (and its eos) only."""
    prompt_ids = tokenizer(cfg.prompt_template.format(prompt=prompt),
                           add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[: cfg.max_length]
    labels = ([-100] * len(prompt_ids) + response_ids)[: cfg.max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


# Rows sorted by length together in training: this many batches' worth (enough to pad little,
# few enough that a batch's rows still come from anywhere in the data).
LENGTH_WINDOW_BATCHES = 50


def batch_indices(lengths: list[int], batch_size: int,
                  shuffle_seed: int | None = None) -> list[list[int]]:
    """The rows of each batch, grouped by length so that a batch pads little. With a seed
    (training): the rows shuffled, sorted by length within windows of LENGTH_WINDOW_BATCHES
    batches, cut into batches, and the batches shuffled: every row once, the same order for the
    same seed. Without (evaluation, where order does not matter): all rows sorted by length."""
    rows = range(len(lengths))
    if shuffle_seed is None:
        order = sorted(rows, key=lambda i: (lengths[i], i))
        return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    generator = torch.Generator().manual_seed(shuffle_seed)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * LENGTH_WINDOW_BATCHES
    chunks = []
    for start in range(0, len(order), window):
        part = sorted(order[start:start + window], key=lambda i: lengths[i])
        chunks.extend(part[at:at + batch_size] for at in range(0, len(part), batch_size))
    return [chunks[i] for i in torch.randperm(len(chunks), generator=generator).tolist()]


def batches(examples: list[dict], batch_size: int, pad_id: int, shuffle_seed: int | None = None,
            by_length: bool = True, micro_batches: int = 1):
    """Yield padded tensor batches (padding to the longest in each batch, not to max-length),
    grouped by length (batch_indices); by_length=False: in order, or shuffled with the seed.
    With micro_batches=k, the rows are grouped k batches at a time (one optimiser step under
    gradient accumulation: the same rows as one batch k times as large), each group yielded as
    k batches."""
    group = batch_size * micro_batches
    if by_length:
        chunks = batch_indices([len(e["input_ids"]) for e in examples], group, shuffle_seed)
    else:
        order = list(range(len(examples)))
        if shuffle_seed is not None:
            generator = torch.Generator().manual_seed(shuffle_seed)
            order = torch.randperm(len(examples), generator=generator).tolist()
        chunks = [order[start:start + group] for start in range(0, len(order), group)]
    for chunk in chunks:
        for start in range(0, len(chunk), batch_size):
            yield collate([examples[i] for i in chunk[start:start + batch_size]], pad_id)


def collate(chunk: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of examples to the longest of them: input ids, attention mask, labels."""
    width = max(len(e["input_ids"]) for e in chunk)
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for row, example in enumerate(chunk):
        ids[row, : len(example["input_ids"])] = torch.tensor(example["input_ids"])
        mask[row, : len(example["attention_mask"])] = 1
    if isinstance(chunk[0]["labels"], int):
        labels = torch.tensor([e["labels"] for e in chunk])
    else:
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, example in enumerate(chunk):
            labels[row, : len(example["labels"])] = torch.tensor(example["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_val_split(indices: list[int], val_fraction: float,
                    seed: int) -> tuple[list[int], list[int]]:
    """A site's own train/validation split; validation gets at least one example if asked for."""
    if val_fraction <= 0:
        return list(indices), []
    order = np.random.default_rng(seed).permutation(len(indices))
    n_val = min(max(1, round(len(indices) * val_fraction)), len(indices) - 1)
    val = [indices[i] for i in sorted(order[:n_val])]
    train = [indices[i] for i in sorted(order[n_val:])]
    return train, val
