"""cascada.stages: the stage library — router, expert, decoder, verifier.

- Routing: ``Router`` (actor) with the policies ``ConfidenceThreshold``, ``Window``,
  ``TopK``, ``ContentKey``, ``LeastLoaded``; ``Recorder``, ``replay`` and
  ``tune_threshold`` for offline replay and threshold tuning.
- Experts: ``Expert`` (actor: a torch module or callable on a device, dynamically batched,
  with MACs and seconds per item); ``DynamicBatcher`` (pure asyncio); ``count_macs``.
- Decoding: ``Decoder`` (actor: streaming generation, greedy or seeded sampling, KV cache,
  ``draft``); ``generate_tokens``, ``draft_tokens``; ``TinyCausalLM`` (a reference model of
  the decoder protocol).
- Verification: ``Verifier`` (actor: checks, and speculative ``verify``); ``ConfidenceCheck``,
  ``AgreementCheck``, ``PredicateCheck`` giving ``Accept`` / ``Reject`` / ``Abstain``;
  ``speculative_generate`` (over two actors) and ``speculative_decode`` (one process).

Names load on first use, so ``import cascada.stages`` imports neither torch nor numpy;
the torch-backed names import torch when first touched. Imports actors, never the other way
round.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._batching import BatchStats as BatchStats
    from ._batching import DynamicBatcher as DynamicBatcher
    from ._checks import Abstain as Abstain
    from ._checks import Accept as Accept
    from ._checks import AgreementCheck as AgreementCheck
    from ._checks import Check as Check
    from ._checks import ConfidenceCheck as ConfidenceCheck
    from ._checks import PredicateCheck as PredicateCheck
    from ._checks import Reject as Reject
    from ._checks import Verdict as Verdict
    from ._checks import verdict_from_wire as verdict_from_wire
    from ._decoder import Decoder as Decoder
    from ._decoder import Stepper as Stepper
    from ._decoder import draft_tokens as draft_tokens
    from ._decoder import generate_tokens as generate_tokens
    from ._errors import BatcherClosed as BatcherClosed
    from ._errors import RoutingError as RoutingError
    from ._errors import StageInputError as StageInputError
    from ._expert import Expert as Expert
    from ._macs import count_macs as count_macs
    from ._policies import ConfidenceThreshold as ConfidenceThreshold
    from ._policies import ContentKey as ContentKey
    from ._policies import Decision as Decision
    from ._policies import Gate as Gate
    from ._policies import LeastLoaded as LeastLoaded
    from ._policies import Policy as Policy
    from ._policies import TopK as TopK
    from ._policies import Window as Window
    from ._recorder import Recorder as Recorder
    from ._recorder import Replay as Replay
    from ._recorder import ThresholdChoice as ThresholdChoice
    from ._recorder import replay as replay
    from ._recorder import tune_threshold as tune_threshold
    from ._router import Router as Router
    from ._sampling import Sampler as Sampler
    from ._sampling import TorchSampler as TorchSampler
    from ._sampling import derive_seed as derive_seed
    from ._sampling import sampling_probs as sampling_probs
    from ._speculative import SpeculativeResult as SpeculativeResult
    from ._speculative import SpeculativeStats as SpeculativeStats
    from ._speculative import Verification as Verification
    from ._speculative import accept_reject as accept_reject
    from ._speculative import greedy_accept as greedy_accept
    from ._speculative import score_drafted as score_drafted
    from ._speculative import speculative_decode as speculative_decode
    from ._speculative import speculative_generate as speculative_generate
    from ._speculative import verify_drafted as verify_drafted
    from ._tinylm import TinyCausalLM as TinyCausalLM
    from ._tinylm import tiny_lm as tiny_lm
    from ._verifier import Verifier as Verifier

_WHERE: dict[str, str] = {
    "BatchStats": "_batching", "DynamicBatcher": "_batching",
    "Abstain": "_checks", "Accept": "_checks", "AgreementCheck": "_checks", "Check": "_checks",
    "ConfidenceCheck": "_checks", "PredicateCheck": "_checks", "Reject": "_checks", "Verdict": "_checks",
    "verdict_from_wire": "_checks",
    "Decoder": "_decoder", "Stepper": "_decoder", "draft_tokens": "_decoder", "generate_tokens": "_decoder",
    "BatcherClosed": "_errors", "RoutingError": "_errors", "StageInputError": "_errors",
    "Expert": "_expert",
    "count_macs": "_macs",
    "ConfidenceThreshold": "_policies", "ContentKey": "_policies", "Decision": "_policies", "Gate": "_policies",
    "LeastLoaded": "_policies", "Policy": "_policies", "TopK": "_policies", "Window": "_policies",
    "Recorder": "_recorder", "Replay": "_recorder", "ThresholdChoice": "_recorder", "replay": "_recorder",
    "tune_threshold": "_recorder",
    "Router": "_router",
    "Sampler": "_sampling", "TorchSampler": "_sampling", "derive_seed": "_sampling", "sampling_probs": "_sampling",
    "SpeculativeResult": "_speculative", "SpeculativeStats": "_speculative", "Verification": "_speculative",
    "accept_reject": "_speculative", "greedy_accept": "_speculative", "score_drafted": "_speculative",
    "speculative_decode": "_speculative", "speculative_generate": "_speculative", "verify_drafted": "_speculative",
    "TinyCausalLM": "_tinylm", "tiny_lm": "_tinylm",
    "Verifier": "_verifier",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'cascada.stages' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
