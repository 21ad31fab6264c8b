"""``openai`` backend: any OpenAI-compatible chat-completions server through the official ``openai`` client.

The API key is read from an environment variable (``NeighborsConfig.api_key_env``, default ``OPENAI_API_KEY``)
when the client is built and is never written to a file, log, cache key or error message. Retries are done by
the search loop (the client's own retries are off) so that every retry is counted and backed off the same way.

What small and local models taught (issue 13):

* ``json_mode``: ``"auto"`` / ``"on"`` append :data:`JSON_INSTRUCTION` to the prompt (so the cache key changes)
  and send ``response_format={"type": "json_object"}``; with ``"auto"`` a server that rejects the parameter
  (HTTP 400/422) is asked again without it and is never sent it again in this run (``json_state`` says which);
  ``"on"`` makes the rejection an error; ``"off"`` (default) sends the paper's prompt unchanged.
* ``strict_retry``: an answer that parses to no name gets one follow-up turn with :data:`STRICT_INSTRUCTION`; the
  cached record keeps both texts (``extra.first_text``) and ``extra.strict_retry`` ("recovered" / "empty").
* The in-context example of the template (:func:`template_examples`) is exposed as ``example_names`` so the
  search can drop names copied from it (see ``NeighborsConfig.example_copy_min``).
"""

from __future__ import annotations

import logging
import os
import re
import string
import threading
from typing import Any

from ..errors import ConfigError, NeighborLTError
from .base import BACKENDS, NeighborBackend, NeighborsConfig, RawAnswer, TargetClass, TransientError
from .parse import name_key, parse_answer

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
# appended to the prompt when JSON output is requested (OpenAI requires the word "JSON" in the messages)
JSON_INSTRUCTION = ('\nAnswer with a JSON object of the form {{"categories": ["...", "..."]}} holding {n} names, and '
                    "nothing else.")  # {n}: a small model asked without a count gave exactly two names (bench)
# the follow-up turn when an answer parsed to no name ("..." placeholders: a copied placeholder is never a name)
STRICT_INSTRUCTION = 'Answer with a JSON list of names only, like ["...", "..."], with {n} names and no other text.'
STRICT_INSTRUCTION_JSON = ('Answer with a JSON object {{"categories": ["...", "..."]}} holding {n} names only, '
                           "and no other text.")
_EXAMPLE_CLASS_RE = re.compile(r'"([^"{}\n]{1,80})"[^"\n\[]*$')
_TEMPLATE_LIST_RE = re.compile(r"\[[^\[\]\n]{1,2000}\]")


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


def template_examples(template: str) -> dict[str, frozenset[str]]:
    """The in-context examples of a prompt template: ``{class key: name keys of the class and its example list}``.

    An example is a bracket list in the template text with the quoted class name before it on the same line, as in
    the paper's ``Provided category: "husky". You should return: ["alaskan malamute", ...]``; a list without a
    quoted class before it is keyed ``""`` (its names are never the right answer for any target).

    Example:
        >>> sorted(template_examples(DEFAULT_PROMPT)["husky"])[:3]
        ['akita', 'alaskan malamute', 'husky']
    """
    out: dict[str, set[str]] = {}
    for m in _TEMPLATE_LIST_RE.finditer(template):
        names = {k for k in (name_key(x) for x in parse_answer(m.group(0)).names) if k}
        if not names:
            continue
        line_start = template.rfind("\n", 0, m.start()) + 1
        cm = _EXAMPLE_CLASS_RE.search(template[line_start: m.start()])
        cls = name_key(cm.group(1)) if cm else None
        if cls:
            names.add(cls)
        out.setdefault(cls or "", set()).update(names)
    return {k: frozenset(v) for k, v in out.items()}


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
        self.example_names = template_examples(self.template)
        self._client: Any = None
        self._json_ok: bool | None = None  # None: untried; False: the server rejected response_format
        self._json_lock = threading.Lock()

    @property
    def json_state(self) -> str:
        """``off`` (not requested), ``untried``, ``used`` or ``rejected`` (plain requests after an HTTP 400/422)."""
        if self.cfg.json_mode == "off":
            return "off"
        return {None: "untried", True: "used", False: "rejected"}[self._json_ok]

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
        text = render_prompt(self.template, target.name, n, self.cfg.context)
        return text + JSON_INSTRUCTION.format(n=n) if self.cfg.json_mode != "off" else text

    def _create(self, messages: list[dict[str, str]], json_req: bool) -> Any:
        """One chat-completions call, errors mapped to TransientError (retry) or NeighborLTError (user error)."""
        import openai

        kwargs: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.cfg.temperature,
                                  "max_tokens": self.cfg.max_tokens}
        if json_req:
            kwargs["response_format"] = {"type": "json_object"}
        try:
            return self._client.chat.completions.create(**kwargs)
        except openai.APITimeoutError as e:
            raise TransientError(f"time-out after {self.cfg.timeout_s:g} s") from e
        except openai.APIConnectionError as e:
            raise TransientError(f"connection error ({e.__cause__ or e})") from e
        except openai.APIStatusError as e:
            if e.status_code == 429 or e.status_code >= 500:
                raise TransientError(f"HTTP {e.status_code}", _retry_after(e.response)) from e
            if json_req and e.status_code in (400, 422):
                raise _JSONRejected(e.status_code) from None
            raise NeighborLTError(
                f"openai server {self.cfg.base_url or 'api.openai.com'} answered HTTP {e.status_code} "
                f"for model {self.model!r}; check --model, --base-url and ${self.cfg.api_key_env}"
            ) from None
        except openai.APIResponseValidationError as e:
            raise TransientError(f"malformed response ({e})") from e
        except ValueError as e:  # the body is not JSON (json.JSONDecodeError), e.g. an HTML error page
            raise TransientError(f"malformed response (not JSON: {e})") from e

    def _complete(self, messages: list[dict[str, str]]) -> tuple[str, int, int, dict[str, Any]]:
        """Send ``messages`` (with JSON output requested where configured and not rejected); returns
        ``(text, prompt_tokens, completion_tokens, extra)``."""
        json_req = self.cfg.json_mode == "on" or (self.cfg.json_mode == "auto" and self._json_ok is not False)
        try:
            resp = self._create(messages, json_req)
        except _JSONRejected as e:
            if self.cfg.json_mode == "on":
                raise NeighborLTError(
                    f"openai server {self.cfg.base_url or 'api.openai.com'} rejected response_format (HTTP "
                    f"{e.status}) for model {self.model!r}; use --json-mode auto (falls back) or off"
                ) from None
            with self._json_lock:
                if self._json_ok is not False:
                    logger.warning("server rejected response_format json_object (HTTP %d); sending plain requests",
                                   e.status)
                self._json_ok = False
            json_req = False
            resp = self._create(messages, False)
        if json_req:
            self._json_ok = True
        if not getattr(resp, "choices", None):  # e.g. a proxy answered 200 with a non-completion body
            raise TransientError("malformed response (no choices)")
        extra: dict[str, Any] = {}
        try:
            choice = resp.choices[0]
            msg = choice.message
            content = msg.content
            refusal = getattr(msg, "refusal", None)
            if isinstance(refusal, str) and refusal:
                extra["refusal"] = refusal[:500]
            if isinstance(getattr(choice, "finish_reason", None), str):
                extra["finish_reason"] = choice.finish_reason
        except (AttributeError, IndexError, TypeError):
            content = None
        if json_req:
            extra["json"] = True
        text = content if isinstance(content, str) else ""
        usage = getattr(resp, "usage", None)
        pt = int(getattr(usage, "prompt_tokens", 0) or 0) if usage is not None else 0
        ct = int(getattr(usage, "completion_tokens", 0) or 0) if usage is not None else 0
        return text, pt, ct, extra

    def ask(self, target: TargetClass, n: int, prompt: str) -> RawAnswer:
        if self._client is None:
            self.prepare([])
        messages = [{"role": "user", "content": prompt}]
        text, pt, ct, extra = self._complete(messages)
        if self.cfg.strict_retry and not parse_answer(text, cut_off=extra.get("finish_reason") == "length").names:
            strict = (STRICT_INSTRUCTION_JSON if self.cfg.json_mode != "off" else STRICT_INSTRUCTION).format(n=n)
            follow = [*messages, {"role": "assistant", "content": text}] if text.strip() else []
            follow = [*follow, {"role": "user", "content": strict}] if follow else \
                [{"role": "user", "content": prompt + "\n" + strict}]
            text2, pt2, ct2, extra2 = self._complete(follow)
            pt, ct = pt + pt2, ct + ct2
            recovered = bool(parse_answer(text2, cut_off=extra2.get("finish_reason") == "length").names)
            logger.debug("class %r: empty answer; strict retry %s", target.name, "recovered" if recovered else "empty")
            extra = {**extra, **extra2, "strict_retry": "recovered" if recovered else "empty", "first_text": text}
            if recovered or not text.strip():
                text = text2
            else:
                extra["strict_text"] = text2
        note = None if text else "empty answer"
        if extra.get("refusal") and not text:
            note = "refused"
        return RawAnswer(text=text, note=note, prompt_tokens=pt, completion_tokens=ct, extra=extra)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class _JSONRejected(Exception):
    """The server answered 400/422 to a request carrying ``response_format``."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def _retry_after(response: Any) -> float | None:
    """The ``Retry-After`` header in seconds (numbers only), or None."""
    try:
        val = response.headers.get("retry-after")
        return max(0.0, float(val)) if val is not None else None
    except (AttributeError, TypeError, ValueError):
        return None
