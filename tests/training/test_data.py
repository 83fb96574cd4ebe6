"""Pretraining data: shards, embedded corpus, best-fit packing (spec §6.7), rank striding, exact resume."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from training import data as D

BOS = 0


def char_tokenize(texts):
    return [[(ord(c) % 250) + 1 for c in t] for t in texts]


def write_shards(folder, docs_per_shard, n_shards=3, row_group=16, seed=0):
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    all_docs = []
    for s in range(n_shards):
        docs = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 120))) for _ in range(docs_per_shard)]
        all_docs.append(docs)
        pq.write_table(pa.table({"text": docs}), folder / f"shard_{s:05d}.parquet", row_group_size=row_group)
    return all_docs


def reference_pack(docs_tokens, row_len, n_rows, buffer_size):
    """The original's packer written as plainly as possible: list scan, strict '>' ties, refills of
    128-document slices whenever the buffer holds fewer than `buffer_size` documents."""
    slices = iter([docs_tokens[i:i + 128] for i in range(0, len(docs_tokens), 128)])
    buffer, rows = [], []
    for _ in range(n_rows):
        row = []
        while len(row) < row_len:
            while len(buffer) < buffer_size:
                buffer.extend(next(slices))
            remaining = row_len - len(row)
            best, best_len = -1, 0
            for i, d in enumerate(buffer):
                if len(d) <= remaining and len(d) > best_len:
                    best, best_len = i, len(d)
            if best >= 0:
                row.extend(buffer.pop(best))
            else:
                shortest = min(range(len(buffer)), key=lambda i: (len(buffer[i]), i))
                row.extend(buffer.pop(shortest)[:remaining])
        rows.append(row)
    return rows


def test_packer_matches_the_original_rules():
    rng = random.Random(1)
    texts = ["x" * rng.choice([1, 3, 5, 8, 8, 13, 40, 90, 200]) + str(i) for i in range(5000)]
    docs_tokens = [[BOS, *t] for t in char_tokenize(texts)]
    slices = iter([texts[i:i + 128] for i in range(0, len(texts), 128)])
    packer = D.BestFitPacker(slices, char_tokenize, BOS, seq_len=63, buffer_size=50)
    got = [packer.next_row() for _ in range(120)]
    assert got == reference_pack(docs_tokens, 64, 120, 50)
    assert all(len(r) == 64 and r[0] == BOS for r in got)
    assert packer.tokens_cropped > 0


def test_embedded_corpus_prepare_and_read(tmp_path):
    paths = D.prepare_embedded_corpus(tmp_path / "data", num_shards=3)
    assert [p.name for p in paths] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    files = D.list_parquet_shards(tmp_path / "data")
    assert D.split_shards(files, "val") == files[-1:]
    texts = list(D.iter_texts(str(tmp_path / "data"), "train", max_chars=50_000, doc_cap=1000))
    assert 40 <= len(texts) <= 60 and all(len(t) <= 1000 for t in texts)
    joined = " ".join(texts)
    assert "gutenberg" not in joined.lower()
    table = pq.read_table(paths[0])
    assert table.num_rows > 100 and pq.ParquetFile(paths[0]).metadata.row_group(0).column(0).compression == "ZSTD"


def test_loader_batches_are_bos_aligned_and_shifted(tmp_path):
    write_shards(tmp_path, 200)
    loader = D.build_pretrain_loader(str(tmp_path), char_tokenize, BOS, batch_size=4, seq_len=32)
    inputs, targets = next(loader)
    assert inputs.shape == targets.shape == (4, 32) and inputs.dtype == torch.long
    assert (inputs[:, 0] == BOS).all()
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_ranks_read_disjoint_row_groups(tmp_path):
    docs = write_shards(tmp_path, 64, n_shards=3, row_group=16)  # 4 row groups per shard
    files = D.split_shards(D.list_parquet_shards(tmp_path), "train")
    seen = []
    for rank in range(2):
        stream = D.ParquetDocumentStream(files, rank=rank, world_size=2)
        it = iter(stream)
        got = []
        while stream.position.epoch == 1:
            got.extend(next(it))
        seen.append(got[:-16] if stream.position.epoch > 1 else got)
    expected = [d for shard in docs[:2] for d in shard if d]
    flat = seen[0] + seen[1]
    assert sorted(flat) == sorted(expected)
    assert not set(seen[0]) & set(seen[1]) - {""}


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_is_exact(tmp_path, world_size):
    write_shards(tmp_path, 300, n_shards=3, row_group=32)
    for rank in range(world_size):
        full = D.build_pretrain_loader(str(tmp_path), char_tokenize, BOS, 3, 40, rank=rank, world_size=world_size)
        reference = [next(full)[0].clone() for _ in range(25)]
        first = D.build_pretrain_loader(str(tmp_path), char_tokenize, BOS, 3, 40, rank=rank, world_size=world_size)
        for _ in range(11):
            next(first)
        state = first.state_dict()
        resumed = D.build_pretrain_loader(str(tmp_path), char_tokenize, BOS, 3, 40, rank=rank, world_size=world_size)
        resumed.load_state_dict(state)
        for step in range(11, 25):
            assert torch.equal(next(resumed)[0], reference[step]), step


def test_multi_epoch_wraps(tmp_path):
    write_shards(tmp_path, 20, n_shards=2, row_group=10)
    loader = D.build_pretrain_loader(str(tmp_path), char_tokenize, BOS, 2, 64)
    for _ in range(30):
        next(loader)
    assert loader.packer.source.position.epoch > 1


def test_hub_source_on_local_parquet_with_exact_resume(tmp_path):
    write_shards(tmp_path, 300, n_shards=2, row_group=50)
    files = {"train": [str(p) for p in sorted(tmp_path.glob("*.parquet"))]}

    def make():
        source = D.HubTextSource("parquet", split="train", data_files=files)
        return D.PretrainLoader(D.BestFitPacker(source, char_tokenize, BOS, 40, buffer_size=100), 2, 40)

    full = make()
    reference = [next(full)[0].clone() for _ in range(20)]
    first = make()
    for _ in range(8):
        next(first)
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert all(torch.equal(next(resumed)[0], reference[i]) for i in range(8, 20))


def test_hub_source_missing_column(tmp_path):
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "x.parquet")
    with pytest.raises(D.DataError, match="no 'text' column"):
        D.HubTextSource("parquet", split="train", data_files={"train": [str(tmp_path / "x.parquet")]})


def test_bad_data_gives_clear_errors(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.list_parquet_shards(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataError, match="contains no .parquet files"):
        D.list_parquet_shards(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "shard_00000.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(D.DataError, match="shard_00000.parquet"):
        D.list_parquet_shards(bad)
    nocol = tmp_path / "nocol"
    nocol.mkdir()
    pq.write_table(pa.table({"content": ["a"]}), nocol / "shard_00000.parquet")
    with pytest.raises(D.DataError, match="has no 'text' column"):
        D.list_parquet_shards(nocol)
    one = tmp_path / "one"
    write_shards(one, 5, n_shards=1)
    with pytest.raises(D.DataError, match="at least 2 parquet shards"):
        D.split_shards(D.list_parquet_shards(one), "train")
    with pytest.raises(D.DataError, match="no parquet files match"):
        D.list_parquet_shards(str(tmp_path / "*.nothing"))


def test_prepare_cli(tmp_path, capsys):
    assert D.main(["prepare", "--out", str(tmp_path / "d"), "--shards", "2"]) == 0
    assert "wrote 2 shards" in capsys.readouterr().out


def test_hub_dataset_of_shards_splits_like_the_original(tmp_path):
    # ClimbMix on the Hub is a folder of parquet shards without a validation split: last shard = validation
    docs = write_shards(tmp_path, 40, n_shards=3, row_group=10)
    assert D.last_file_split(str(tmp_path)) == {
        "train": [str(tmp_path / "shard_00000.parquet"), str(tmp_path / "shard_00001.parquet")],
        "validation": [str(tmp_path / "shard_00002.parquet")],
    }
    val = list(D.iter_texts(f"hf:{tmp_path}", "val"))
    assert val == [d for d in docs[2] if d]
    train = list(D.iter_texts(f"hf:{tmp_path}", "train"))
    assert sorted(train) == sorted(d for shard in docs[:2] for d in shard if d)
    one = tmp_path / "one"
    write_shards(one, 5, n_shards=1)
    with pytest.raises(D.DataError, match="at least 2 parquet shards"):
        D.last_file_split(str(one))
