"""The one decoding core: the KV cache (`kv_cache`), prefill and batched steps (`decoder`), choosing tokens and
log-probabilities (`sampling`), tokens to text with stop strings (`text`), the model's pieces compiled for this CPU
(`compiled`, cached on disk by `compile_cache`), and the engine that schedules rows and states the stop rules
(`engine`). `gpt2.inference.generate`, the server and the chat all run on the engine; nothing else steps the
decoder or reads or writes a KV cache. It prints nothing: callers pass `say`/`progress` callbacks for the lines a
user should see."""

from gpt2.decode.decoder import (
    COMPILE_MIN_PARAMS,
    WEIGHTS_DTYPE_HELP,
    WEIGHTS_DTYPE_METAVAR,
    Decoder,
    decoder_for,
    left_align,
    load_dtype,
    return_freed_memory,
    score_tokens,
    wants_compile,
)
from gpt2.decode.engine import SHUTDOWN, Engine, TokenEvent
from gpt2.decode.int8 import WEIGHTS_DTYPES
from gpt2.decode.kv_cache import KVCache, Rows
from gpt2.decode.sampling import (
    Choice,
    RowSampler,
    SamplingParams,
    TokenLogprob,
    adjusted_logits,
    choose,
    is_greedy,
    sample_next,
    token_logprob,
)
from gpt2.decode.text import TextStream
from gpt2.padding import PAD_ID, pad_right

__all__ = [
    "COMPILE_MIN_PARAMS", "SHUTDOWN", "WEIGHTS_DTYPES", "WEIGHTS_DTYPE_HELP", "WEIGHTS_DTYPE_METAVAR", "Choice",
    "Decoder", "Engine", "KVCache", "PAD_ID", "RowSampler", "Rows", "SamplingParams", "TextStream", "TokenEvent",
    "TokenLogprob", "adjusted_logits", "choose", "decoder_for", "is_greedy", "left_align", "load_dtype", "pad_right",
    "return_freed_memory", "sample_next", "score_tokens", "token_logprob", "wants_compile",
]
