"""Split Tatoeba en-pt (../../../../shared/data/tatoeba_en_pt/en_pt.tsv) into train / val / test.

    python benchmarks/data/tatoeba_en_pt/split.py PATH/en_pt.tsv

Deterministic: the 500 pairs with the smallest sha256("qkv-tatoeba-en-pt", en, pt) are the test
set, the next 500 the validation set (qkv.data.parallel.hash_split), independent of the file's
order. Pairs whose English sentence appears in the test or validation set are moved out of the
training set, so no test sentence is seen in training. Writes train.tsv.gz, val.tsv, test.tsv
with an `en<TAB>pt` header and prints their sha256.
"""

from __future__ import annotations

import gzip
import hashlib
import sys
from pathlib import Path

from qkv.data.parallel import hash_split, read_tsv

SALT = "qkv-tatoeba-en-pt"


def main(source: str) -> None:
    here = Path(__file__).parent
    data = read_tsv(source, "en", "pt")
    print(f"{source}: {len(data)} pairs, sha256 "
          f"{hashlib.sha256(Path(source).read_bytes()).hexdigest()}")
    rest, test = hash_split(data, 500, SALT)
    train, val = hash_split(rest, 500, SALT + "-val")
    held = set(test.src) | set(val.src)
    keep = [i for i, s in enumerate(train.src) if s not in held]
    dropped = len(train) - len(keep)
    train = train.subset(keep)
    for name, part in (("train.tsv.gz", train), ("val.tsv", val), ("test.tsv", test)):
        text = "en\tpt\n" + "".join(f"{s}\t{t}\n" for s, t in zip(part.src, part.tgt,
                                                                   strict=True))
        raw = text.encode()
        if name.endswith(".gz"):
            raw = gzip.compress(raw, compresslevel=9, mtime=0)
        (here / name).write_bytes(raw)
        print(f"{name}: {len(part)} pairs, sha256 {hashlib.sha256(raw).hexdigest()}")
    print(f"{dropped} training pairs dropped: their English is in val or test")


if __name__ == "__main__":
    main(sys.argv[1])
