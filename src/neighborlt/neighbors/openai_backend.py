"""``openai`` backend: any OpenAI-compatible chat-completions server through the official ``openai`` client.

The API key is read from an environment variable (``NeighborsConfig.api_key_env``, default ``OPENAI_API_KEY``)
when the client is built and is never written to a file, log, cache key or error message. Retries are done by
the search loop (the client's own retries are off) so that every retry is counted and backed off the same way.
"""

from __future__ import annotations

import logging
import os
import string
from typing import Any

from ..errors import ConfigError, NeighborLTError
from .base import BACKENDS, NeighborBackend, NeighborsConfig, RawAnswer, TargetClass, TransientError

logger = logging.getLogger(__name__)

# The paper's structured in-context prompt. Fields: {n} neighbours asked, {name} the class, {context_line}
# ("" or "The provided category is one of the <context>.\n").
DEFAULT_PROMPT = (
    "{context_line}"
    "Please create a list which contains {n} visually similar categories of the provided category. "
    "The categories must be different from the provided category and must not be synonyms of it.\n"
    "For example:\n"
    'Provided category: "husky". You should return: '
    '["alaskan malamute", "samoyed", "wolf", "akita", "shiba inu"]\n'
    'Provided category: "{name}". You should return:'
)
TEMPLATE_FIELDS = {"n", "name", "context_line"}


def check_template(template: str) -> str:
    """Validate a prompt template: only the fields {n}, {name}, {context_line}; {name} and {n} required."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ConfigError(f"prompt template: {e}; escape literal braces as {{{{ and }}}}") from None
    unknown = fields - TEMPLATE_FIELDS
    if unknown or not {"n", "name"} <= fields:
        raise ConfigError(
            f"prompt template uses fields {sorted(fields)}; allowed {sorted(TEMPLATE_FIELDS)}, "
            "{name} and {n} required; escape literal braces as {{ and }}"
        )
    return template


def render_prompt(template: str, name: str, n: int, context: str = "") -> str:
    """Fill the template (values are substituted, never re-parsed, so braces in names are harmless)."""
    ctx = f"The provided category is one of the {context.strip()}.\n" if context.strip() else ""
    return template.format(n=n, name=name, context_line=ctx)


@BACKENDS.register("openai", description="OpenAI-compatible chat-completions server (GPT-4, vLLM, Ollama, LiteLLM)")
class OpenAIBackend(NeighborBackend):
    """Ask a chat model for ``n`` visually similar categories with the paper's in-context prompt."""

    name = "openai"

    def __init__(self, cfg: NeighborsConfig) -> None:
        if not cfg.model:
            raise ConfigError("--backend openai needs --model (e.g. --model gpt-4o)")
        self.model = cfg.model
        self.cfg = cfg
        self.template = check_template(cfg.prompt_template or DEFAULT_PROMPT)
        self.max_concurrency = cfg.concurrency
        self._client: Any = None

    def _make_client(self) -> Any:
        import openai

        key = os.environ.get(self.cfg.api_key_env, "")
        if not key:
            if not self.cfg.base_url:
                raise ConfigError(
                    f"--backend openai: set the API key in ${self.cfg.api_key_env} "
                    "(or pass --base-url for a local server that needs no key)"
                )
            key = "no-key"  # local OpenAI-compatible servers usually ignore the key
        return openai.OpenAI(api_key=key, base_url=self.cfg.base_url, timeout=self.cfg.timeout_s, max_retries=0)

    def prepare(self, targets: list[TargetClass]) -> None:
        if self._client is None:
            self._client = self._make_client()

    def prompt(self, target: TargetClass, n: int) -> str:
        return render_prompt(self.template, target.name, n, self.cfg.context)

    def ask(self, target: TargetClass, n: int, prompt: str) -> RawAnswer:
        import openai

        if self._client is None:
            self.prepare([])
        try:
            resp = self._client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": prompt}],
                temperature=self.cfg.temperature,
                max_tokens=self.cfg.max_tokens,
            )
        except openai.APITimeoutError as e:
            raise TransientError(f"time-out after {self.cfg.timeout_s:g} s") from e
        except openai.APIConnectionError as e:
            raise TransientError(f"connection error ({e.__cause__ or e})") from e
        except openai.APIStatusError as e:
            if e.status_code == 429 or e.status_code >= 500:
                raise TransientError(f"HTTP {e.status_code}", _retry_after(e.response)) from e
            raise NeighborLTError(
                f"openai server {self.cfg.base_url or 'api.openai.com'} answered HTTP {e.status_code} "
                f"for model {self.model!r}; check --model, --base-url and ${self.cfg.api_key_env}"
            ) from None
        except openai.APIResponseValidationError as e:
            raise TransientError(f"malformed response ({e})") from e
        except ValueError as e:  # the body is not JSON (json.JSONDecodeError), e.g. an HTML error page
            raise TransientError(f"malformed response (not JSON: {e})") from e
        if not getattr(resp, "choices", None):  # e.g. a proxy answered 200 with a non-completion body
            raise TransientError("malformed response (no choices)")
        try:
            content = resp.choices[0].message.content if resp.choices else None
        except (AttributeError, IndexError, TypeError):
            content = None
        text = content if isinstance(content, str) else ""
        usage = getattr(resp, "usage", None)
        pt = int(getattr(usage, "prompt_tokens", 0) or 0) if usage is not None else 0
        ct = int(getattr(usage, "completion_tokens", 0) or 0) if usage is not None else 0
        return RawAnswer(text=text, note=None if text else "empty answer", prompt_tokens=pt, completion_tokens=ct)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _retry_after(response: Any) -> float | None:
    """The ``Retry-After`` header in seconds (numbers only), or None."""
    try:
        val = response.headers.get("retry-after")
        return max(0.0, float(val)) if val is not None else None
    except (AttributeError, TypeError, ValueError):
        return None
