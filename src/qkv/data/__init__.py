"""Corpora and batching: from text files to (input, target) batches of token ids.

    files = corpus_files("my_texts/")               # or None: the bundled tiny Shakespeare
    tok = fit_tokenizer(files, kind="char")         # or "bpe" with a vocab_size
    ids = tokenize_corpus(files, tok, cache_dir)    # np.memmap, tokenized once and cached
    train_ids, val_ids = split(ids, 0.1, context=128)
    x, y = next(LMBatches(train_ids, context=128, batch_size=32, seed=0))   # (B, T) each
    data = read_labelled("train.tsv")               # labelled texts for classification
"""

from .batches import LMBatches, eval_batches, windows
from .corpus import BUNDLED, corpus_files, fingerprint, text_chunks
from .labelled import LabelledData, as_labelled, label_order, read_labelled
from .tokens import fast_encoder, fit_tokenizer, split, token_dtype, tokenize_corpus

__all__ = [
    "BUNDLED", "LMBatches", "LabelledData", "as_labelled", "corpus_files", "eval_batches",
    "fast_encoder", "fingerprint", "fit_tokenizer", "label_order", "read_labelled", "split",
    "text_chunks", "token_dtype", "tokenize_corpus", "windows",
]
