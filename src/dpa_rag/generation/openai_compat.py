"""Any OpenAI-compatible HTTP server (OpenAI, vLLM ``serve``, llama.cpp, TGI, Ollama…) over plain ``httpx``.

Chats go to ``{base_url}/chat/completions``, plain strings to ``{base_url}/completions``. Requests run in parallel
(``max_concurrency`` threads sharing one connection pool); connection errors, timeouts, 429, 5xx and 2xx answers whose
body is not JSON or lacks ``choices[0]`` text are retried with exponential backoff and jitter (``Retry-After``
honoured); other 4xx fail at once. Either way the failure is a :class:`BackendError` naming the endpoint, the last
status and how many prompts this run already answered (those are in the cache, so a re-run resumes).

Answer scoring (:meth:`OpenAICompatibleGenerator.loglik`) needs prompt log-probabilities: the completions API with
``echo`` + ``logprobs``, as vLLM's server provides; a server without them raises
:class:`~dpa_rag.generation.base.LoglikUnsupported`.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import os
import random
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from dpa_rag.generation.base import GenerationParams, LoglikUnsupported, Prompt, prompt_to_text
from dpa_rag.generation.hf import truncate_at_stop

__all__ = ["DEFAULT_BASE_URL", "BackendError", "OpenAICompatibleGenerator", "parse_retry_after"]

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
_RETRY_STATUS = {408, 409, 425, 429}  # plus every 5xx
LOGLIK_CAPABILITY = "prompt logprobs: completions API with echo + logprobs, as vLLM's server provides"
# a 4xx answer to a scoring request whose body says so: the server cannot echo prompt logprobs
_UNSUPPORTED_STATUS = {400, 404, 405, 422, 501}
_UNSUPPORTED_BODY = re.compile(r"echo|logprob|not supported|unsupported|chat model|completions endpoint", re.I)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date); ``None`` if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "…"


class BackendError(RuntimeError):
    """The server could not answer a prompt (retries exhausted, or a status that is not retried).

    Attributes:
        url: the endpoint.
        status: the last HTTP status, or ``None`` for connection errors and timeouts.
        answered: prompts this generator had answered before the failure (the cache wrapper stored them).
    """

    def __init__(self, message: str, url: str, status: int | None, answered: int) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.answered = answered


def _load_tokenizer(name: str) -> Any:
    """The tokenizer of ``name`` (hub id, local folder or bundled alias), for rendering chats to score."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from dpa_rag.models import check_model, resolve_llm

    folder = Path(name).expanduser()
    if not (folder.is_dir() and any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))):
        check_model(name, "tokenizer")  # a tokenizer-only folder is fine; anything else must look like a model
    return AutoTokenizer.from_pretrained(resolve_llm(name))


class _Retryable(Exception):
    def __init__(self, message: str, wait: float | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.wait = wait
        self.status = status


class OpenAICompatibleGenerator:
    """Generate through an OpenAI-compatible REST API.

    Args:
        model: the server's model name (e.g. ``gpt-4o-mini-2024-07-18`` or what ``vllm serve`` was given).
        base_url: API root including the version, e.g. ``http://localhost:8000/v1``; default ``$OPENAI_BASE_URL`` or
            the OpenAI API.
        api_key_env: name of the environment variable holding the key, sent as ``Authorization: Bearer``; optional
            for local servers, required for the OpenAI API.
        max_concurrency: parallel requests.
        timeout: seconds per request (connect, read, write, pool).
        max_retries: retries per prompt after the first attempt (so ``max_retries + 1`` attempts at most).
        backoff_base: first backoff in seconds; doubles per retry, capped at ``backoff_max``, times a jitter in
            [0.5, 1.5).
        backoff_max: largest backoff (a server's ``Retry-After`` is honoured up to ``retry_after_max``).
        retry_after_max: largest ``Retry-After`` honoured, in seconds.
        max_tokens_field: request field for the new-token limit (``max_completion_tokens`` for newer OpenAI models).
        extra_body: extra JSON fields merged into every request (e.g. ``{"top_k": 20}`` for vLLM).
        tokenizer: the served model's tokenizer (hub id, local folder or bundled alias); its chat template renders
            chats for :meth:`loglik` as the server renders them for chat completions. Without it chats are scored as
            :func:`~dpa_rag.generation.base.prompt_to_text` text (a warning, once).

    Attributes:
        model_id: ``openai:{base_url}:{model}``, plus ``:chat-`` and a hash of the ``tokenizer``'s chat template when
            one is given (it shapes the scored text); part of the cache key.
        requests_sent: HTTP attempts made so far (retries included).
        answered: prompts answered so far (by :meth:`generate` calls that returned).
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        retry_after_max: float = 300.0,
        max_tokens_field: str = "max_tokens",
        extra_body: dict[str, Any] | None = None,
        tokenizer: str | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.model = model
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.api_key_env = api_key_env
        api_key = os.environ.get(api_key_env) if api_key_env else None
        if not api_key and self.base_url == DEFAULT_BASE_URL:
            raise ValueError(f"the OpenAI API needs a key: set the environment variable {api_key_env}")
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.retry_after_max = retry_after_max
        self.max_tokens_field = max_tokens_field
        self.extra_body = dict(extra_body or {})
        self.model_id = f"openai:{self.base_url}:{model}"
        self.tokenizer = _load_tokenizer(tokenizer) if tokenizer else None
        template = getattr(self.tokenizer, "chat_template", None) if self.tokenizer is not None else None
        self._chat_template = template if isinstance(template, str) and template else None
        if self._chat_template:  # the template shapes every scored chat; cached scores must follow it
            self.model_id += ":chat-" + hashlib.sha1(self._chat_template.encode("utf-8")).hexdigest()[:8]
        elif tokenizer:
            logger.warning("tokenizer %s has no chat template: chats are scored as plain text", tokenizer)
        self._warned_plain_chat = False
        self.requests_sent = 0
        self.answered = 0
        self._count_lock = threading.Lock()
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
        )

    # -- request building -------------------------------------------------------------------------------------------

    def request_for(self, prompt: Prompt, params: GenerationParams) -> tuple[str, dict[str, Any]]:
        """The endpoint URL and JSON body for one prompt."""
        body: dict[str, Any] = {
            "model": self.model,
            self.max_tokens_field: params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": params.seed,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        body.update(self.extra_body)
        if isinstance(prompt, str):
            return f"{self.base_url}/completions", {**body, "prompt": prompt}
        return f"{self.base_url}/chat/completions", {**body, "messages": list(prompt)}

    @staticmethod
    def _extract(url: str, data: Any, status: int = 200) -> str:
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
        except (KeyError, IndexError, TypeError):
            raise _Retryable(
                f"HTTP {status} without choices[0] text: {_one_line(str(data))}", status=status
            ) from None
        if text is not None and not isinstance(text, str):
            raise _Retryable(f"HTTP {status} with a non-string completion: {_one_line(str(text))}", status=status)
        return text or ""

    # -- one prompt, with retries -----------------------------------------------------------------------------------

    def _attempt(self, url: str, body: dict[str, Any], parse: Any = None) -> Any:
        with self._count_lock:
            self.requests_sent += 1
        try:
            resp = self._client.post(url, json=body)
        except httpx.TimeoutException as e:
            raise _Retryable(f"timed out after {self.timeout:g} s ({type(e).__name__})") from e
        except httpx.TransportError as e:
            raise _Retryable(f"connection error: {type(e).__name__}: {e}") from e
        status = resp.status_code
        if 200 <= status < 300:
            try:
                data = resp.json()
            except ValueError:
                body = _one_line(resp.text)
                raise _Retryable(f"HTTP {status} with a non-JSON body: {body!r}", status=status) from None
            return (parse or self._extract)(url, data, status)
        excerpt = _one_line(resp.text, 500)
        if status in _RETRY_STATUS or status >= 500:
            raise _Retryable(
                f"HTTP {status}: {excerpt}", wait=parse_retry_after(resp.headers.get("Retry-After")), status=status
            )
        hint = "check the API key variable --api-key-env" if status in (401, 403) else "check --model and the request"
        raise BackendError(
            f"{url} answered HTTP {status} (not retried): {excerpt}; {hint}; {self._resume_note()}",
            url=url,
            status=status,
            answered=self.answered,
        )

    def _resume_note(self) -> str:
        return (
            f"{self.answered} prompt(s) answered before this one are in the cache, so re-running the same command "
            "resumes from there"
        )

    def _backoff(self, retry: int, wait: float | None) -> float:
        if wait is not None:
            return min(wait, self.retry_after_max)
        return min(self.backoff_max, self.backoff_base * 2**retry) * (0.5 + random.random())

    def _complete(self, prompt: Prompt, params: GenerationParams) -> str:
        url, body = self.request_for(prompt, params)
        return truncate_at_stop(self._post(url, body), params.stop).strip()

    def _post(self, url: str, body: dict[str, Any], parse: Any = None) -> Any:
        """POST ``body`` with retries and backoff; ``parse(url, data, status)`` reads a 2xx JSON answer (default: the
        completion text)."""
        for attempt in range(self.max_retries + 1):
            try:
                return self._attempt(url, body, parse)
            except _Retryable as e:
                if attempt == self.max_retries:
                    raise BackendError(
                        f"{url} failed after {attempt + 1} attempt(s) (max_retries={self.max_retries}): {e}; "
                        f"check that the server is up, or raise --max-retries/--timeout; {self._resume_note()}",
                        url=url,
                        status=e.status,
                        answered=self.answered,
                    ) from e
                delay = self._backoff(attempt, e.wait)
                logger.warning("%s: %s; retry %d/%d in %.2f s", url, e, attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- protocol ---------------------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[str]:
        """One completion per prompt, in order; up to ``max_concurrency`` requests in flight.

        Raises:
            BackendError: a prompt failed (non-retryable status, or retries exhausted); the other requests of this
                call are cancelled (finished ones are lost only for this call; the cache wrapper keeps earlier
                batches).
        """
        if not prompts:
            return []
        if self.max_concurrency == 1 or len(prompts) == 1:
            out = [self._complete(p, params) for p in prompts]
        else:
            pool = ThreadPoolExecutor(
                max_workers=min(self.max_concurrency, len(prompts)), thread_name_prefix="openai"
            )
            try:
                futures = [pool.submit(self._complete, p, params) for p in prompts]
                out = [f.result() for f in futures]
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        self.answered += len(out)
        return out

    # -- answer scoring ---------------------------------------------------------------------------------------------

    def render(self, prompt: Prompt) -> str:
        """The text a scoring request sends for ``prompt``: chats through the ``tokenizer``'s chat template (with the
        generation prompt), or as plain ``role: content`` text without one (a warning, once)."""
        if isinstance(prompt, str):
            return prompt
        if self._chat_template:
            return self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        if not self._warned_plain_chat:
            self._warned_plain_chat = True
            logger.warning(
                "scoring chats on %s without the model's chat template (set the generator option tokenizer, e.g. "
                "--tokenizer HUB_ID, to the served model): they are scored as plain 'role: content' text, which "
                "differs from what the model sees in chat completions",
                self.base_url,
            )
        return prompt_to_text(prompt)

    def loglik_request(self, prompt: Prompt, continuation: str) -> tuple[str, dict[str, Any], str]:
        """The endpoint, JSON body and full text (rendered prompt + continuation) of one scoring request.

        ``max_tokens`` is 1: vLLM rejects 0, and the one generated token is dropped by :meth:`_parse_loglik`.
        """
        text = self.render(prompt) + continuation
        body: dict[str, Any] = {**self.extra_body}
        body.update({"model": self.model, "prompt": text, "max_tokens": 1, "temperature": 0.0, "echo": True,
                     "logprobs": 1})
        if not isinstance(prompt, str) and self._chat_template:
            body["add_special_tokens"] = False  # the template wrote them (vLLM; as the hf backend does)
        return f"{self.base_url}/completions", body, text

    def _unsupported(self, url: str, what: str) -> LoglikUnsupported:
        return LoglikUnsupported(
            f"{url} cannot score answers: {what}; it lacks {LOGLIK_CAPABILITY} (serve the model with `vllm serve`, "
            "or use --backend hf/vllm, or --label-rule hit)"
        )

    def _parse_loglik(self, url: str, data: Any, status: int, n_chars: int) -> tuple[float, int]:
        """``(sum, n)`` over the echoed tokens of the continuation's last ``n_chars`` characters.

        The echoed prompt ends where the generated token starts (``usage.prompt_tokens`` echoed tokens, else all but
        the last); a token counts if it ends after ``end - n_chars`` (the prompt's length when the server echoes the
        text unchanged), so a token straddling the prompt/continuation boundary counts with the continuation.
        """
        try:
            choice = data["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise _Retryable(f"HTTP {status} without choices[0]: {_one_line(str(data))}", status=status) from None
        lp = choice.get("logprobs") if isinstance(choice, dict) else None
        if not isinstance(lp, dict) or not lp.get("token_logprobs") or not lp.get("text_offset"):
            raise self._unsupported(url, "the answer has no logprobs")
        tokens, offsets, logprobs = lp.get("tokens") or [], lp["text_offset"], lp["token_logprobs"]
        if not (len(tokens) == len(offsets) == len(logprobs)):
            raise _Retryable(f"HTTP {status} with logprobs of unequal lengths: {_one_line(str(lp))}", status=status)
        usage = data.get("usage") if isinstance(data, dict) else None
        n_prompt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        if not isinstance(n_prompt, int) or n_prompt < 1:
            n_prompt = len(tokens) - 1  # max_tokens=1: everything but the last token was echoed
        if n_prompt > len(tokens) or n_prompt < 1 or offsets[0] != 0:
            raise self._unsupported(url, f"it returned logprobs for {len(tokens)} token(s), not the echoed prompt")
        end = offsets[n_prompt] if n_prompt < len(offsets) else offsets[-1] + len(str(tokens[-1]))
        boundary = end - n_chars
        total, n = 0.0, 0
        for i in range(n_prompt):
            stop = offsets[i + 1] if i + 1 < len(offsets) else end
            if stop <= boundary:
                continue
            value = logprobs[i]
            if value is None:
                raise self._unsupported(url, f"no log-probability for echoed token {i} ({tokens[i]!r})")
            total += float(value)
            n += 1
        if n == 0:
            raise self._unsupported(url, "no echoed token covers the answer")
        return total, n

    def _score(self, prompt: Prompt, continuation: str) -> tuple[float, int]:
        if not continuation:
            raise ValueError("cannot score an empty continuation")
        url, body, _ = self.loglik_request(prompt, continuation)
        try:
            return self._post(url, body, lambda u, d, st: self._parse_loglik(u, d, st, len(continuation)))
        except BackendError as e:
            excerpt = str(e).split(" (not retried): ", 1)[-1].split("; check ", 1)[0]
            if e.status in _UNSUPPORTED_STATUS and _UNSUPPORTED_BODY.search(excerpt):
                raise self._unsupported(url, f"it answered HTTP {e.status}: {_one_line(excerpt, 200)}") from e
            raise

    def loglik(self, prompts: Sequence[Prompt], continuations: Sequence[str]) -> list[tuple[float, int]]:
        """Per pair: ``(sum of the continuation tokens' log-probabilities, n tokens)``, from the server's echo.

        One ``/completions`` request per pair (``echo: true``, ``logprobs: 1``, ``max_tokens: 1``, temperature 0) over
        the rendered prompt + continuation, up to ``max_concurrency`` in flight, with the retries of :meth:`generate`.
        The server tokenises the text as a whole, so a token straddling the boundary counts with the continuation.

        Raises:
            LoglikUnsupported: the server returned no prompt logprobs, or said it cannot (one line, endpoint named).
            BackendError: as for :meth:`generate`.
        """
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts for {len(continuations)} continuations")
        if not prompts:
            return []
        pairs = list(zip(prompts, continuations, strict=True))
        if self.max_concurrency == 1 or len(pairs) == 1:
            out = [self._score(p, c) for p, c in pairs]
        else:
            pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(pairs)), thread_name_prefix="openai")
            try:
                futures = [pool.submit(self._score, p, c) for p, c in pairs]
                out = [f.result() for f in futures]
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        self.answered += len(out)
        return out

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()

    def __enter__(self) -> OpenAICompatibleGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OpenAICompatibleGenerator({self.model!r}, base_url={self.base_url!r})"
