"""cascada.stages: router, expert, decoder, verifier and the cascade patterns (coming with
the flows issue). Imports actors and cudakernels, never the other way round."""

__all__: list[str] = []
