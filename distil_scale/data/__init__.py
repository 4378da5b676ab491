"""Data path: ingest, tokenizer, WebDataset shards, the resumable stream, masking and collation.

corpus.py     load_texts (local .txt/.jsonl/.parquet, saved datasets dirs) and the embedded synthetic corpus
tokenizer.py  train_wordpiece / load_tokenizer / tokenizer_fingerprint
shards.py     prepare (text -> cleaned sequences -> train/heldout tar shards + token counts + dataset.json),
              Manifest / read_manifest
stream.py     BatchStream (deterministic, rank x worker split, resumable) and make_loader
position.py   DataPosition / DataOrigin: what a run trained on, what lets a resume re-split the rest
masking.py    Masker (dynamic 80/10/10 masking with count**-0.7 smoothing) and collate
"""
