"""cascada.workloads: the seed workloads (F1 digits cascade, F2 speculative decoding, F3 MoE
dispatch): their data, models, trained weights and offline metrics.

Import the submodule you need; importing this package imports nothing heavy (no torch):

- ``cascada.workloads.f1_data``: F1 data (scikit-learn's bundled digits and breast cancer,
  or zero-dependency generated 8x8 glyphs), fixed splits, out-of-distribution copies.
- ``cascada.workloads.f1``: F1 tiered classifiers and ensemble members with exact MAC
  counts, training, committed weights (``load_tiers``, ``load_members``, ``load_meta``).
- ``cascada.workloads.f1_cascade``: F1 offline analysis over per-tier softmax outputs:
  confidence and window cascades, accuracy against MACs, risk-coverage, the seed-shape check.
- ``cascada.workloads.f2``: F2 character tokenizer, draft and target causal transformer LMs
  with the KV-cache protocol the Decoder/Verifier stages call, generation, committed weights
  (``load_models``).
- ``cascada.workloads.f3``: F3 reference MoE layer split into ``route``, ``dispatch``,
  ``expert_forward``, ``combine``; ``moe_reference``; drop and load statistics; bytes moved.

Weights and their JSON records live in ``cascada/workloads/weights/`` and are made by
``scripts/train_f1.py`` and ``scripts/train_f2.py``. Nothing is downloaded at run time.
"""

__all__: list[str] = []
