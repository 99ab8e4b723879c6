"""Chat templates: rendering, loading from a model directory, and the sandbox."""

from __future__ import annotations

import json

import pytest

from qkv.chat import ChatTemplate, check_messages
from qkv.errors import InputError

SIMPLE = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
          "{% if add_generation_prompt %}[assistant] {% endif %}")


def test_render_with_and_without_generation_prompt():
    t = ChatTemplate(SIMPLE, bos_token="<s>")
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    assert t.render(msgs) == "<s>[system] S\n[user] Hi\n[assistant] "
    assert t.render(msgs, add_generation_prompt=False) == "<s>[system] S\n[user] Hi\n"


def test_text_parts_are_joined():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                         {"type": "text", "text": "b"}]}]
    assert check_messages(msgs) == [{"role": "user", "content": "ab"}]


@pytest.mark.parametrize("messages", [
    [], "hello", [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}],
    [{"role": "user", "content": [{"type": "image_url", "url": "x"}]}], [["user", "x"]],
])
def test_malformed_messages_are_refused(messages):
    with pytest.raises(InputError):
        ChatTemplate(SIMPLE).render(messages)


def test_the_template_can_refuse_messages():
    t = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}"
                     "{% endif %}{{ messages[0].content }}")
    assert t.render([{"role": "user", "content": "ok"}]) == "ok"
    with pytest.raises(InputError, match="user first"):
        t.render([{"role": "assistant", "content": "no"}])


@pytest.mark.parametrize("source", [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__base__.__subclasses__() }}",
    "{% set x = messages.append({'role': 'user', 'content': 'x'}) %}{{ x }}",
    "{{ messages[0].clear() }}",
    "{{ cycler.__init__.__globals__ }}",
])
def test_the_sandbox_blocks_unsafe_templates(source):
    with pytest.raises(InputError):
        ChatTemplate(source).render([{"role": "user", "content": "x"}])


def test_syntax_errors_are_one_line_input_errors():
    with pytest.raises(InputError, match="does not parse"):
        ChatTemplate("{% for m in messages %}")


def test_from_model_dir(tmp_path):
    assert ChatTemplate.from_model_dir(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": SIMPLE, "bos_token": {"content": "<B>"}, "eos_token": "</E>"}))
    t = ChatTemplate.from_model_dir(tmp_path)
    assert t.render([{"role": "user", "content": "q"}]).startswith("<B>[user] q")
    assert t.eos_token == "</E>"
    (tmp_path / "chat_template.jinja").write_text("{{ messages | length }}")
    assert ChatTemplate.from_model_dir(tmp_path).render([{"role": "user", "content": "q"}]) == "1"


def test_named_templates_take_the_default(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"},
                           {"name": "default", "template": "D"}]}))
    assert ChatTemplate.from_model_dir(tmp_path).render([{"role": "user", "content": ""}]) == "D"


def test_render_spans_locate_the_assistant_turns():
    t = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
                     "{% if add_generation_prompt %}<assistant>{% endif %}")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]
    text, spans = t.render_spans(msgs)
    assert text == "<user>Hi</s><assistant>Hello</s><user>Bye</s><assistant>Ciao</s>"
    assert [text[a:b] for a, b in spans] == ["Hello</s>", "Ciao</s>"]


def test_render_spans_refuses_a_template_that_is_not_prefix_stable():
    t = ChatTemplate("{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(InputError, match="extension"):
        t.render_spans([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def test_hugging_face_template_conventions():
    t = ChatTemplate("{% if tools %}TOOLS{% endif %}{% for m in messages %}"
                     "{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}"
                     "{% endfor %}{{ strftime_now('%Y')|length }}")
    assert t.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == \
        "a4"
