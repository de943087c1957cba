"""Chat templates: source precedence, named templates, rendering context and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neuron.errors import ChatTemplateError
from neuron.text.chat_template import ChatTemplate

USER = [{"role": "user", "content": "Hi"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


def test_chat_template_jinja_file_wins_over_every_other_source(tmp_path: Path) -> None:
    jinja = tmp_path / "chat_template.jinja"
    jinja.write_text("file:{{ messages[0].content }}")
    template = ChatTemplate.resolve(
        chat_template_file=jinja,
        tokenizer_config={"chat_template": "config:{{ messages[0].content }}"},
        gguf_template="gguf:{{ messages[0].content }}",
    )
    assert template.origin == "chat_template.jinja"
    assert template.render(USER) == "file:Hi"


def test_tokenizer_config_wins_over_gguf_metadata() -> None:
    template = ChatTemplate.resolve(
        tokenizer_config={"chat_template": "config"}, gguf_template="gguf"
    )
    assert (template.origin, template.render(USER)) == ("tokenizer_config.json", "config")
    template = ChatTemplate.resolve(tokenizer_config={"eos_token": "x"}, gguf_template="gguf")
    assert (template.origin, template.render(USER)) == ("gguf", "gguf")


def test_chatml_is_the_last_resort() -> None:
    template = ChatTemplate.resolve()
    assert template.origin == "chatml"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert template.render(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_named_templates_pick_tool_use_with_tools_else_default() -> None:
    config = {
        "chat_template": [
            {"name": "rag", "template": "rag"},
            {"name": "default", "template": "default"},
            {"name": "tool_use", "template": "tools:{{ tools[0].function.name }}"},
        ]
    }
    template = ChatTemplate.resolve(tokenizer_config=config)
    assert template.names == ("rag", "default", "tool_use")
    assert template.render(USER) == "default"
    assert template.render(USER, tools=TOOLS) == "tools:get_weather"


def test_named_templates_without_default_use_the_first() -> None:
    config = {"chat_template": [{"name": "first", "template": "1"}, {"name": "x", "template": "2"}]}
    template = ChatTemplate.resolve(tokenizer_config=config)
    assert template.render(USER) == "1"
    assert template.render(USER, tools=TOOLS) == "1"


@pytest.mark.parametrize(
    "bad", [[{"name": "a"}], ["just a string"], 42, [], [{"name": 1, "template": "x"}]]
)
def test_malformed_template_lists_are_rejected(bad: object) -> None:
    with pytest.raises(ChatTemplateError):
        ChatTemplate.resolve(tokenizer_config={"chat_template": bad})


def test_template_that_does_not_compile_is_rejected_at_load() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}", origin="test")


def test_raise_exception_becomes_chat_template_error() -> None:
    template = ChatTemplate(
        "{% if messages[0].role != 'system' %}{{ raise_exception('system first!') }}{% endif %}",
        origin="test",
    )
    with pytest.raises(ChatTemplateError, match="system first!"):
        template.render(USER)


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages[0].content + none_value }}",  # undefined + str
        "{{ messages[3].content }}",  # undefined attribute of undefined
        "{{ messages[0]['content'] + 1 }}",  # TypeError
        "{{ messages.append(1) }}",  # immutable sandbox
    ],
)
def test_bad_expressions_become_chat_template_error(source: str) -> None:
    with pytest.raises(ChatTemplateError):
        ChatTemplate(source, origin="test").render(USER)


def test_context_has_special_tokens_kwargs_tools_and_generation_prompt() -> None:
    template = ChatTemplate(
        "{{ bos_token }}|{{ eos_token }}|{{ enable_thinking }}|{{ tools | length }}|"
        "{{ add_generation_prompt }}",
        origin="test",
        special_tokens={"bos_token": "<s>", "eos_token": "</s>"},
    )
    rendered = template.render(USER, tools=TOOLS, template_kwargs={"enable_thinking": False})
    assert rendered == "<s>|</s>|False|1|True"
    assert template.render(USER, tools=TOOLS, add_generation_prompt=False).endswith("|False")


def test_template_kwargs_override_special_tokens_but_not_messages() -> None:
    template = ChatTemplate(
        "{{ bos_token }}{{ messages[0].content }}",
        origin="test",
        special_tokens={"bos_token": "<s>"},
    )
    kwargs = {"bos_token": "[B]", "messages": "ignored"}
    assert template.render(USER, template_kwargs=kwargs) == "[B]Hi"


def test_enable_thinking_switches_a_qwen3_style_template() -> None:
    source = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and enable_thinking is false %}"
        "<think>\n\n</think>\n\n{% endif %}{% endif %}"
    )
    template = ChatTemplate(source, origin="test")
    assert template.render(USER).endswith("assistant\n")
    off = template.render(USER, template_kwargs={"enable_thinking": False})
    assert off.endswith("assistant\n<think>\n\n</think>\n\n")


def test_tojson_keeps_non_ascii_and_html_characters() -> None:
    template = ChatTemplate("{{ tools | tojson }}", origin="test")
    tools = [{"name": "météo", "description": "<b>&'"}]
    assert template.render(USER, tools=tools) == json.dumps(tools, ensure_ascii=False)
    indented = ChatTemplate("{{ tools[0] | tojson(indent=2) }}", origin="test")
    assert indented.render(USER, tools=tools) == json.dumps(tools[0], ensure_ascii=False, indent=2)


def test_strftime_now_and_loop_controls_and_generation_tag() -> None:
    template = ChatTemplate(
        "{{ strftime_now('%Y') | length }}"
        "{% for i in [1, 2, 3] %}{% if i == 2 %}{% continue %}{% endif %}{{ i }}{% endfor %}"
        "{% generation %}G{% endgeneration %}",
        origin="test",
    )
    assert template.render(USER) == "413G"


def test_trim_blocks_and_lstrip_blocks_are_on() -> None:
    template = ChatTemplate("  {% if true %}\nA\n  {% endif %}\nB", origin="test")
    assert template.render(USER) == "A\nB"


def test_unreadable_template_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ChatTemplateError, match="cannot read"):
        ChatTemplate.resolve(chat_template_file=tmp_path / "chat_template.jinja")


def test_a_failing_template_falls_back_to_chatml_unless_tools_are_present() -> None:
    failing = ChatTemplate("{{ raise_exception('no system role') }}", origin="test",
                           special_tokens={"eos_token": "</s>"})
    messages = [{"role": "user", "content": "hi"}]
    assert failing.render_or_chatml(messages) == ChatTemplate.chatml().render(messages)
    with pytest.raises(ChatTemplateError, match="no system role"):
        failing.render_or_chatml(messages, tools=[{"type": "function", "function": {"name": "f"}}])


def test_the_model_template_can_be_turned_off() -> None:
    chosen = ChatTemplate.resolve(gguf_template="{{ messages[0].content }}",
                                  use_model_template=False)
    assert chosen.origin == "chatml"
    assert ChatTemplate.resolve(gguf_template="{{ messages[0].content }}").origin == "gguf"
