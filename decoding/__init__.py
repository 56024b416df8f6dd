"""Decoding-time personalization of a frozen model, many users with different preferences in one batch.

    loop.py        the one decode loop: per-row seeded token picks, the running Batch, `generate`
    combiners.py   per-step rules as pure functions: PAD, Drift, GenARM, ARGS (fp32, masks kept, no NaN)
    guides.py      guide models with their own KV caches; ARGS candidate scoring in one masked forward
    processors.py  rules for a batch of users (per-row preference tensors) and the transformers LogitsProcessor
    drift.py       Drift's attribute rewards and weight fitting (closed form, sparse)
    scheduler.py   continuous batching for the decode API (serve.py), over loop.py's Batch
    generate.py    entry point `python -m decoding.generate config=pad.yaml`: every arm on held-out users
"""
