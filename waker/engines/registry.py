"""Maps an EngineKind to its adapter.

The adapters are stateless, so one shared instance each is enough; the table is built once at import
and never changed.
"""

from waker.config.spec import EngineKind
from waker.engines.base import Engine
from waker.engines.generic import GenericEngine
from waker.engines.llamacpp import LlamacppEngine
from waker.engines.service import ServiceEngine
from waker.engines.sglang import SglangEngine
from waker.engines.trtllm import TrtllmEngine
from waker.engines.vllm import VllmEngine

_ENGINES: dict[EngineKind, Engine] = {
    EngineKind.VLLM: VllmEngine(),
    EngineKind.SGLANG: SglangEngine(),
    EngineKind.TRTLLM: TrtllmEngine(),
    EngineKind.LLAMACPP: LlamacppEngine(),
    EngineKind.GENERIC: GenericEngine(),
    EngineKind.SERVICE: ServiceEngine(),
}


def engine_for(kind: EngineKind | str) -> Engine:
    """The adapter for `kind` (an EngineKind or its string value); KeyError naming the known kinds."""
    try:
        key = EngineKind(kind)
    except ValueError:
        known = ", ".join(k.value for k in EngineKind)
        raise KeyError(f"unknown engine {kind!r} (known engines: {known})") from None
    return _ENGINES[key]
