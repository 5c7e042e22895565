"""Why the engine refuses a request: typed :class:`~llmc.compiler.errors.RequestError` s that
carry the numbers, so a caller (the HTTP server, a script) can answer in its own format without
checking the request a second time. :class:`EngineClosedError` is not the request's fault."""

from __future__ import annotations

from llmc.compiler.errors import LlmcError, RequestError


class EmptyPromptError(RequestError):
    """The prompt has no tokens."""

    def __init__(self) -> None:
        super().__init__("the prompt is empty")


class TokenIdError(RequestError):
    """Prompt token ids outside ``[0, vocab_size)``; ``token_ids`` lists (up to five of) them."""

    def __init__(self, token_ids: list[int], vocab_size: int) -> None:
        self.token_ids = list(token_ids[:5])
        self.vocab_size = vocab_size
        super().__init__(f"token ids {self.token_ids} are outside the vocabulary of {vocab_size}")

    @classmethod
    def check(cls, ids: list[int], vocab_size: int) -> None:
        """Raise one naming the ids of ``ids`` outside ``[0, vocab_size)``, if there are any."""
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise cls(bad, vocab_size)


class ContextLengthError(RequestError):
    """The prompt plus ``max_tokens`` does not fit the model's context.

    ``max_tokens`` is None when the request asked for the rest of the context
    (``SamplingParams(max_tokens=None)``) and the prompt leaves no room for it.
    """

    def __init__(self, prompt_tokens: int, max_tokens: int | None, context_length: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length
        if max_tokens is None:
            message = (f"the prompt ({prompt_tokens} tokens) leaves no room for the completion in the context of "
                       f"{context_length} tokens")
        else:
            message = (f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                       f"{context_length} tokens")
        super().__init__(message)


class KVCacheTooSmallError(RequestError):
    """One sequence of ``tokens`` tokens needs more than the whole KV cache."""

    def __init__(self, tokens: int, num_blocks: int, block_size: int) -> None:
        self.tokens = tokens
        self.num_blocks = num_blocks
        self.block_size = block_size
        super().__init__(f"prompt + max_tokens ({tokens} tokens) needs more than the whole kv cache "
                         f"({num_blocks} blocks of {block_size})")


class QueueFullError(RequestError):
    """The engine already holds ``max_queue`` requests (running and waiting)."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        super().__init__(f"the engine already holds {max_queue} requests (max_queue)")


class EngineClosedError(LlmcError):
    """The engine was closed (or its step loop has stopped): it takes no more requests."""

    def __init__(self) -> None:
        super().__init__("the engine is closed")
