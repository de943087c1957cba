"""OpenAI request validation and conversion into bus jobs."""

from __future__ import annotations

import pytest

from bus_schema.messages import JobRequest
from cortex.dialects.openai.translate import chat_draft, parse_chat_request
from cortex.dispatch import stamp
from cortex.errors import ApiError
from cortex.settings import GatewaySettings

SETTINGS = GatewaySettings(gateway_id="gw-test")


def job_for(body: bytes) -> JobRequest:
    return stamp(chat_draft(parse_chat_request(body), model="m/x"), SETTINGS, job_id="j1")


def test_content_parts_are_flattened_and_developer_becomes_system() -> None:
    job = job_for(
        b'{"model":"m/x","messages":[{"role":"developer","content":"be brief"},'
        b'{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],'
        b'"unknown_field":{"nested":true}}'
    )
    assert [(m.role, m.content) for m in job.messages] == [("system", "be brief"), ("user", "ab")]
    assert job.gateway == "gw-test" and job.deadline is not None


def test_max_completion_tokens_wins_and_stop_becomes_a_tuple() -> None:
    job = job_for(b'{"model":"m","messages":[{"role":"user","content":"x"}],'
                  b'"max_tokens":5,"max_completion_tokens":7,"stop":"END","seed":4,'
                  b'"chat_template_kwargs":{"enable_thinking":false}}')
    assert job.params.max_tokens == 7
    assert job.params.stop == ("END",)
    assert job.params.seed == 4
    assert job.chat_template_kwargs == {"enable_thinking": False}


def test_defaults_follow_the_reference() -> None:
    job = job_for(b'{"model":"m","messages":[{"role":"user","content":"x"}]}')
    assert job.params.temperature == 0.7
    assert job.params.max_tokens is None
    assert job.params.repetition_penalty is None


def test_assistant_tool_calls_in_history_are_carried() -> None:
    job = job_for(
        b'{"model":"m","messages":[{"role":"user","content":"x"},{"role":"assistant",'
        b'"content":null,"tool_calls":[{"id":"c1","type":"function","function":'
        b'{"name":"f","arguments":"{\\"a\\":1}"}}]},'
        b'{"role":"tool","tool_call_id":"c1","content":"42"}]}'
    )
    assistant = job.messages[1]
    assert assistant.tool_calls[0].function.arguments == '{"a":1}'
    assert job.messages[2].tool_call_id == "c1"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model":"m","messages":[{"role":"user","content":[{"type":"image_url",'
         b'"image_url":{"url":"data:x"}}]}]}', "messages[0].content[0].type"),
        (b'{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function"}]}',
         "tools[0]"),
        (b'{"model":"m","messages":[{"role":"user","content":"x"}],"stop":["a",""]}', "stop"),
        (b'{"model":"m","messages":[{"role":"user","content":"x"}],"top_p":0}', "top_p"),
        (b'{"model":"m","messages":[{"role":"user","content":"x"}],"top_k":-1}', "top_k"),
        (b'{"model":"m","messages":[{"role":"user","content":"x"}],"max_completion_tokens":0}',
         "max_completion_tokens"),
    ],
)
def test_unsupported_or_invalid_values_are_400_with_param(body: bytes, param: str) -> None:
    with pytest.raises(ApiError) as info:
        job_for(body)
    assert info.value.spec.status == 400
    assert info.value.param == param


@pytest.mark.parametrize(
    "choice",
    [b'"auto"', b'"required"', b'{"type":"function","function":{"name":"f"}}',
     b'{"type":"allowed_tools","allowed_tools":{"mode":"auto","tools":[]}}'],
)
def test_tool_choices_are_accepted_and_keep_the_tools(choice: bytes) -> None:
    job = job_for(b'{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":'
                  b'"function","function":{"name":"f","parameters":{"type":"object"}}}],'
                  b'"tool_choice":' + choice + b'}')
    assert [t.name for t in job.tools] == ["f"]


def test_tool_choice_none_drops_the_tools() -> None:
    job = job_for(b'{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":'
                  b'"function","function":{"name":"f"}}],"tool_choice":"none"}')
    assert job.tools == ()
