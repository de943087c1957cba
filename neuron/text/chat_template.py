"""Chat templates rendered with jinja2 the way transformers' ``apply_chat_template`` does.

Sources, first found wins (REFERENCE §6.4): ``chat_template.jinja``; ``chat_template`` in
``tokenizer_config.json`` (a string, or a list of ``{name, template}``: ``tool_use`` when tools
are present, else ``default``, else the first); GGUF ``tokenizer.chat_template``; else ChatML.

This module never imports torch.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Final, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from neuron.errors import ChatTemplateError

#: A chat message as a jinja chat template consumes it (role, content, tool_calls, ...).
TemplateMessage = Mapping[str, object]
#: Scalar template kwargs such as ``enable_thinking``.
TemplateValue = str | int | float | bool | None

logger = logging.getLogger(__name__)

#: The template used when a model has none: one ChatML block per message, then the assistant's.
CHATML_TEMPLATE: Final = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' ``tojson``: no HTML escaping, non-ASCII kept as is."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)  # local time, as transformers


class _GenerationTag(jinja2.ext.Extension):
    """transformers' ``{% generation %}...{% endgeneration %}``: renders its body unchanged."""

    tags: Final = {"generation"}  # type: ignore[misc]

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols", _GenerationTag],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


# Errors a template can raise while rendering user-supplied messages: jinja's own, plus the
# Python errors of expressions such as ``'a' + None`` or ``messages[5]``.
_RENDER_ERRORS: Final = (
    jinja2.exceptions.TemplateError,
    TypeError,
    ValueError,
    KeyError,
    IndexError,
    AttributeError,
    ZeroDivisionError,
    RecursionError,
)


class ChatTemplate:
    """A model's chat template, compiled once; safe to render from several threads."""

    def __init__(
        self,
        source: str | Mapping[str, str],
        *,
        origin: str,
        special_tokens: Mapping[str, str] | None = None,
    ) -> None:
        """Compile a template.

        Args:
            source: the template text, or named templates (``default``, ``tool_use``, ...).
            origin: where it came from (for logs and errors), e.g. ``tokenizer_config.json``.
            special_tokens: template variables such as ``bos_token`` and ``eos_token``.

        Raises:
            ChatTemplateError: a template does not compile.
        """
        self.origin = origin
        self._special_tokens = dict(special_tokens or {})
        named = {"default": source} if isinstance(source, str) else dict(source)
        if not named:
            raise ChatTemplateError(f"chat template from {origin} is an empty list")
        env = _environment()
        self._templates: dict[str, jinja2.Template] = {}
        for name, text in named.items():
            try:
                self._templates[name] = env.from_string(text)
            except jinja2.exceptions.TemplateSyntaxError as exc:
                raise ChatTemplateError(
                    f"chat template {name!r} from {origin} does not compile: {exc}"
                ) from exc
        self._first = next(iter(self._templates))

    @classmethod
    def chatml(cls, special_tokens: Mapping[str, str] | None = None) -> ChatTemplate:
        """The ChatML fallback template."""
        return cls(CHATML_TEMPLATE, origin="chatml", special_tokens=special_tokens)

    @classmethod
    def resolve(
        cls,
        *,
        chat_template_file: Path | None = None,
        tokenizer_config: Mapping[str, object] | None = None,
        gguf_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        use_model_template: bool = True,
    ) -> ChatTemplate:
        """Pick the template from the first source that has one (see the module docstring);
        ChatML whatever the files say when not ``use_model_template``
        (``NEURON_USE_CHAT_TEMPLATE=false``).

        Raises:
            ChatTemplateError: the chosen template is malformed or does not compile.
        """
        if not use_model_template:
            return cls.chatml(special_tokens)
        if chat_template_file is not None:
            try:
                text = chat_template_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ChatTemplateError(f"cannot read {chat_template_file}: {exc}") from exc
            return cls(text, origin=chat_template_file.name, special_tokens=special_tokens)
        configured = (tokenizer_config or {}).get("chat_template")
        if configured is not None:
            return cls(
                _named_templates(configured),
                origin="tokenizer_config.json",
                special_tokens=special_tokens,
            )
        if gguf_template:
            return cls(gguf_template, origin="gguf", special_tokens=special_tokens)
        return cls.chatml(special_tokens)

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the templates held (``("default",)`` for a single template)."""
        return tuple(self._templates)

    def render(
        self,
        messages: Sequence[TemplateMessage],
        *,
        tools: Sequence[Mapping[str, object]] | None = None,
        template_kwargs: Mapping[str, TemplateValue] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """Render ``messages`` (and ``tools``) to the prompt text.

        The context holds the special tokens, then ``template_kwargs`` (which may override them),
        then ``messages``, ``tools`` and ``add_generation_prompt``.

        Raises:
            ChatTemplateError: the template failed (``raise_exception``, a bad expression, ...).
        """
        template = self._select(tools)
        context: dict[str, object] = {
            **self._special_tokens,
            **(template_kwargs or {}),
            "messages": [dict(m) for m in messages],
            "tools": [dict(t) for t in tools] if tools else None,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return template.render(context)
        except _RENDER_ERRORS as exc:
            raise ChatTemplateError(f"chat template from {self.origin} failed: {exc}") from exc

    def render_or_chatml(
        self,
        messages: Sequence[TemplateMessage],
        *,
        tools: Sequence[Mapping[str, object]] | None = None,
        template_kwargs: Mapping[str, TemplateValue] | None = None,
    ) -> str:
        """`render` with ``add_generation_prompt=True``; a template that fails without tools
        falls back to ChatML (REFERENCE §6.4). With tools the error is raised, since ChatML would
        silently drop them.

        Raises:
            ChatTemplateError: the template failed and tools were present (or ChatML failed too).
        """
        try:
            return self.render(messages, tools=tools, template_kwargs=template_kwargs)
        except ChatTemplateError as exc:
            if tools or self.origin == "chatml":
                raise
            logger.warning("%s; falling back to ChatML", exc)
            return self._chatml.render(messages, template_kwargs=template_kwargs)

    @functools.cached_property
    def _chatml(self) -> ChatTemplate:
        return ChatTemplate.chatml(self._special_tokens)

    def _select(self, tools: Sequence[Mapping[str, object]] | None) -> jinja2.Template:
        if tools and "tool_use" in self._templates:
            return self._templates["tool_use"]
        return self._templates.get("default", self._templates[self._first])


def _named_templates(value: object) -> str | dict[str, str]:
    """``chat_template`` from tokenizer_config.json: a string or ``[{name, template}, ...]``."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named: dict[str, str] = {}
        for item in value:
            if not isinstance(item, Mapping):
                raise ChatTemplateError("chat_template list items must be {name, template}")
            name, template = item.get("name"), item.get("template")
            if not isinstance(name, str) or not isinstance(template, str):
                raise ChatTemplateError("chat_template list items must be {name, template}")
            named[name] = template
        return named
    raise ChatTemplateError(f"chat_template must be a string or a list, not {type(value).__name__}")
