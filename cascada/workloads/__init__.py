"""cascada.workloads: the seed workloads (F1 digits cascade, F2 speculative decoding, F3 MoE
dispatch): their data, models, trained weights and offline metrics."""

__all__: list[str] = []
