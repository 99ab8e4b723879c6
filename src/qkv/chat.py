"""Chat templates: how a list of chat messages becomes the one text a model continues.

A chat model was trained on conversations written in a fixed format, for example

    <|user|>Hello<|end|><|assistant|>Hi! How can I help?<|end|>

Which markers, and where, is the model's own convention. Hugging Face stores it as a Jinja
template (`chat_template` in tokenizer_config.json, or a `chat_template.jinja` file) that is
rendered with the `messages` and `add_generation_prompt` (end with the opening of an assistant
turn, so that the model writes the reply).

A template comes with the model, so it is code from whoever published the model. It is rendered
in Jinja's *immutable sandbox*: it cannot reach Python attributes such as `__class__`, call
unsafe methods or change the data it is given.

The same module serves `qkv serve` (chat completions) and supervised fine-tuning, which renders
conversations with the same template to train on them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import InputError

ROLES = ("system", "developer", "user", "assistant", "tool")
TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


class ChatTemplate:
    """A compiled, sandboxed Jinja chat template.

        template = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
        text = template.render([{"role": "user", "content": "Hi"}])
    """

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        import jinja2

        if not isinstance(source, str) or not source.strip():
            raise InputError("a chat template must be a non-empty string")
        # The settings of Hugging Face's apply_chat_template, so that published templates
        # render the same: blocks trimmed, {% break %}/{% continue %}, an undefined name is
        # empty (templates test `tools` and friends that a request need not have).
        env = _sandbox()(trim_blocks=True, lstrip_blocks=True,
                         extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise_from_template
        env.globals["strftime_now"] = _strftime_now
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise InputError(f"the chat template does not parse: {e.message} "
                             f"(line {e.lineno})") from None
        self.source = source
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""

    def render(self, messages: Sequence[Mapping[str, Any]],
               add_generation_prompt: bool = True, **extra: Any) -> str:
        """The conversation as one text. Raises InputError for malformed messages or when the
        template itself refuses them (its `raise_exception(...)`)."""
        import jinja2
        from jinja2.exceptions import SecurityError

        plain = check_messages(messages)
        try:
            context = {"tools": None, "documents": None, **extra}
            return self._template.render(messages=plain,
                                         add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token,
                                         **context)
        except _TemplateRefusal as e:
            raise InputError(f"the chat template refused the messages: {e}") from None
        except SecurityError as e:
            raise InputError(f"the chat template tried an unsafe operation: {e}") from None
        except jinja2.TemplateError as e:
            raise InputError(f"the chat template failed: {e}") from None

    def render_spans(self, messages: Sequence[Mapping[str, Any]]
                     ) -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation as one text, and the (start, end) character range of each
        assistant turn in it: what supervised fine-tuning trains on (the rest is context).

        A turn's range runs from the end of the text rendered with the messages before it (and
        the generation prompt) to the end of the text rendered with it, so it includes what
        the template writes after the reply (an end-of-turn marker) and nothing the template
        writes before it. The template must render a conversation as its prefixes extended,
        as chat templates do; one that does not is an InputError.
        """
        plain = check_messages(messages)
        text = self.render(plain, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(plain):
            if m["role"] != "assistant":
                continue
            before = self.render(plain[:i], add_generation_prompt=True) if i else ""
            through = self.render(plain[:i + 1], add_generation_prompt=False)
            if not (text.startswith(through) and through.startswith(before)):
                raise InputError("the chat template does not render a conversation as an "
                                 f"extension of its beginning (at message {i}), so the "
                                 "assistant turns cannot be located")
            spans.append((len(before), len(through)))
        return text, spans

    @classmethod
    def from_model_dir(cls, path: str | Path, bos_token: str = "",
                       eos_token: str = "") -> ChatTemplate | None:
        """The template a model directory ships: `chat_template.jinja`, else the
        `chat_template` of tokenizer_config.json. None when it has neither."""
        path = Path(path)
        file = path / TEMPLATE_FILE
        if file.is_file():
            return cls(file.read_text(encoding="utf-8"), bos_token, eos_token)
        config = path / TOKENIZER_CONFIG
        if not config.is_file():
            return None
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{config} is not valid JSON ({e})") from None
        source = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(source, list):  # several named templates: take the default one
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if source is None:
            return None
        bos = bos_token or _token_text(data.get("bos_token"))
        eos = eos_token or _token_text(data.get("eos_token"))
        return cls(source, bos, eos)


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plain copies of chat messages after checking them: a non-empty list of
    {"role": one of ROLES, "content": str or a list of {"type": "text", "text": str}}.
    A list of text parts is joined into one string."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InputError("messages must be a non-empty list of {role, content} objects")
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InputError(f"messages[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InputError(f"messages[{i}].role={role!r} is not one of {', '.join(ROLES)}")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, Mapping) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise InputError(f"messages[{i}].content[{j}] must be "
                                     "{\"type\": \"text\", \"text\": ...}; only text is supported")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise InputError(f"messages[{i}].content must be a string or a list of text parts")
        plain.append({"role": role, "content": content})
    return plain


class _TemplateRefusal(Exception):
    pass


def _sandbox() -> type:
    """Jinja's immutable sandbox, made strict about unsafe attributes: where Jinja would give
    an empty value for `x.__class__` (and fail only when it is used), this raises at once."""
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            raise SecurityError(f"{type(obj).__name__}.{attribute} is not allowed")

    return Sandbox


def _strftime_now(fmt: str) -> str:
    import datetime

    return datetime.datetime.now().strftime(fmt)


def _raise_from_template(message: str) -> None:
    raise _TemplateRefusal(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _token_text(token: Any) -> str:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else ""
