"""Parallel data: aligned files and TSV, counted skips, clear errors, token-budget batches."""

from __future__ import annotations

import gzip
import random

import pytest

from qkv.cli import main
from qkv.data.parallel import (
    Pairs,
    TokenBatches,
    hash_split,
    read_aligned,
    read_parallel,
    read_tsv,
    token_batches,
)
from qkv.errors import InputError


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_aligned_files_pair_line_by_line_and_count_what_they_skip(tmp_path):
    src = write(tmp_path / "train.de", b"Ein Hund.\n\nZwei Katzen.\n\xff\xfe kaputt\nGut.\n")
    write(tmp_path / "train.en", b"A dog.\nNothing.\nTwo cats.\nbroken\n\n")
    data = read_aligned(src, tmp_path / "train.en", "de", "en")
    assert data.src == ["Ein Hund.", "Zwei Katzen."]
    assert data.tgt == ["A dog.", "Two cats."]
    assert data.skipped == {"empty side": 2, "invalid UTF-8": 1}
    assert data.skipped_report() == "3 pairs skipped (2 empty side, 1 invalid UTF-8)"
    assert read_parallel(tmp_path, "de", "en").src == data.src  # a folder of splits


def test_misaligned_line_counts_are_refused(tmp_path):
    write(tmp_path / "train.de", b"a\nb\nc\n")
    write(tmp_path / "train.en", b"a\nb\n")
    with pytest.raises(InputError, match="has 3 lines but .* has 2"):
        read_parallel(tmp_path, "de", "en")


def test_gzipped_files_and_missing_splits(tmp_path):
    write(tmp_path / "train.de.gz", gzip.compress(b"Hallo.\n"))
    write(tmp_path / "train.en.gz", gzip.compress(b"Hello.\n"))
    assert read_parallel(tmp_path, "de", "en").tgt == ["Hello."]
    with pytest.raises(InputError, match="neither val.de"):
        read_parallel(tmp_path, "de", "en", "val")
    with pytest.raises(InputError, match="does not exist"):
        read_parallel(tmp_path / "nowhere", "de", "en")


def test_a_tsv_header_picks_the_columns_and_bad_lines_are_counted(tmp_path):
    path = write(tmp_path / "pairs.tsv",
                 b"en\tpt\nI am.\tEu sou.\nno tab here\nthree\tcol\tumns\n\tvazio\nOk.\tOk.\n")
    en_pt = read_tsv(path, "en", "pt")
    assert en_pt.src == ["I am.", "Ok."] and en_pt.tgt == ["Eu sou.", "Ok."]
    assert en_pt.skipped == {"not two columns": 2, "empty side": 1}
    pt_en = read_tsv(path, "pt", "en")
    assert pt_en.src == ["Eu sou.", "Ok."]
    with pytest.raises(InputError, match="not 'de'"):
        read_tsv(path, "de", "en")
    plain = read_tsv(write(tmp_path / "plain.tsv", b"Hi.\tOi.\n"), "en", "pt")
    assert plain.src == ["Hi."]  # no header: source first


def test_the_hash_split_is_deterministic_and_independent_of_order(tmp_path):
    lines = [f"s{i}\tt{i}" for i in range(50)]
    a = read_tsv(write(tmp_path / "a.tsv", "\n".join(lines).encode()))
    b = read_tsv(write(tmp_path / "b.tsv", "\n".join(reversed(lines)).encode()))
    _, held_a = hash_split(a, 5)
    _, held_b = hash_split(b, 5)
    assert sorted(held_a.src) == sorted(held_b.src) and len(held_a) == 5
    with pytest.raises(InputError):
        hash_split(a, 50)


def test_token_batches_respect_the_budget_and_resume_exactly():
    rng = random.Random(0)
    pairs = Pairs([[5] * rng.randint(2, 30) for _ in range(300)],
                  [[6] * rng.randint(2, 30) for _ in range(300)], skipped=None)  # type: ignore[arg-type]
    for batch in token_batches([len(s) for s in pairs.src], [len(t) for t in pairs.tgt], 400,
                               random.Random(1)):
        longest = max(len(pairs.src[i]) for i in batch) + max(len(pairs.tgt[i]) for i in batch)
        assert len(batch) * longest <= 400
    batches = TokenBatches(pairs, 400, pad=0, seed=3)
    seen = [next(batches)[0].shape for _ in range(len(batches.order) + 5)]  # into epoch 2
    state = batches.state_dict()
    after = [next(batches)[2].tolist() for _ in range(4)]
    again = TokenBatches(pairs, 400, pad=0, seed=0)
    again.load_state_dict(state)
    assert [next(again)[2].tolist() for _ in range(4)] == after
    assert len(seen) > 0 and state["epoch"] == 1
    with pytest.raises(InputError, match="smaller than the longest pair"):
        TokenBatches(pairs, 20, pad=0)


def test_resampled_epochs_read_their_own_pairs_and_resume_exactly():
    """BPE-dropout's batches: each epoch asks for its pairs by number, so a resumed run reads
    the same segmentation of its epoch as the run it continues."""
    asked = []

    def resample(epoch: int) -> Pairs:
        asked.append(epoch)
        rng = random.Random(epoch)
        n = [rng.randint(2, 20) for _ in range(100)]
        return Pairs([[7 + epoch] * k for k in n], [[9] * (k + 1) for k in n], skipped=None)  # type: ignore[arg-type]

    first = resample(0)
    batches = TokenBatches(first, 300, pad=0, seed=1, resample=resample)
    assert batches.pairs.src == first.src  # epoch 0 asked for again, not the pairs passed in
    epoch0 = {next(batches)[0][0, 0].item() for _ in range(len(batches.order))}
    epoch1 = next(batches)[0][0, 0].item()
    assert (epoch0, epoch1) == ({7}, 8)  # the second epoch reads its own pairs
    state = batches.state_dict()
    after = [next(batches)[2].tolist() for _ in range(3)]
    again = TokenBatches(first, 300, pad=0, seed=1, resample=resample)
    again.load_state_dict(state)
    assert [next(again)[2].tolist() for _ in range(3)] == after
    assert asked[-1] == 1


def test_the_command_line_reports_bad_data_in_one_line(tmp_path, capsys):
    write(tmp_path / "train.de", b"a\nb\nc\n")
    write(tmp_path / "train.en", b"a\nb\n")
    argv = ["train", "--family", "encoder-decoder", "--data", str(tmp_path), "--src", "de",
            "--tgt", "en", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 lines" in err[0] and "2" in err[0]
    assert main([*argv[:-1], "--batch-size", "8"]) == 2
    assert "--max-tokens" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--src", str(tmp_path / "train.de")]) == 2
    assert "--ref" in capsys.readouterr().err
