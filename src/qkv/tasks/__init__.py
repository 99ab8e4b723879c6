"""Jobs a user runs with a Transformer, one module each.

    mlm.py       masked-language-model pre-training pieces (BERT masking, loss) and fill-mask
    classify.py  sequence classification: read labelled text, add a head, fine-tune, evaluate
    search.py    semantic search: embed passages into an index on disk, query it

Each module works with any qkv model and tokenizer; the command line (`qkv finetune`,
`qkv fill-mask`, `qkv embed`, `qkv search`) and `qkv.pipeline` are thin layers over them.
"""
