"""Decoding-time personalization of a frozen model, many users with different preferences in one batch.

    combiners.py   per-step rules as pure functions: PAD, Drift, GenARM, ARGS (fp32, masks kept, no NaN)
    guides.py      guide models with their own KV caches; ARGS candidate scoring in one masked forward
    processors.py  rules for a batch of users (per-row preference tensors) and the transformers LogitsProcessor
    drift.py       Drift's attribute rewards and weight fitting (closed form, sparse)
    generate.py    the batched KV-cached generate loop; entry point `python -m decoding.generate config=pad.yaml`
"""
