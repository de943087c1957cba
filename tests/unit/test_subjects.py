from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bus_schema import subjects

_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


@given(st.text(min_size=1))
def test_subject_token_round_trips_any_string(value: str) -> None:
    token = subjects.subject_token(value)
    assert _TOKEN.fullmatch(token), token
    assert subjects.decode_subject_token(token) == value


@given(st.text(min_size=1), st.text(min_size=1))
def test_distinct_ids_never_share_a_token(a: str, b: str) -> None:
    if a != b:
        assert subjects.subject_token(a) != subjects.subject_token(b)


def test_real_model_ids_stay_readable() -> None:
    assert subjects.subject_token("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB_2FSmolLM2-135M"
    assert subjects.subject_token("Qwen/Qwen3.6-27B:Q4_K_M") == "Qwen_2FQwen3_2E6-27B_3AQ4_5FK_5FM"


def test_job_subject_has_exactly_three_tokens_for_dotted_ids() -> None:
    subject = subjects.job_subject("Qwen/Qwen2.5-0.5B")
    assert subject.split(".")[:2] == ["cortex", "job"]
    assert len(subject.split(".")) == 3
    assert subjects.model_from_job_subject(subject) == "Qwen/Qwen2.5-0.5B"


def test_directed_job_subject_round_trips() -> None:
    subject = subjects.node_job_subject("beast", "a/b.c", root="test.x")
    assert subject == "test.x.node.beast.job.a_2Fb_2Ec"
    assert subjects.model_from_job_subject(subject, root="test.x") == "a/b.c"


@pytest.mark.parametrize("bad", ["", "a.b", "a*", "a>", "a b", "tab\t"])
def test_invalid_node_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="node name"):
        subjects.heartbeat_subject(bad)


@pytest.mark.parametrize("bad", ["", "_", "_2", "_zz", "a.b", "a_2f"])
def test_malformed_tokens_do_not_decode(bad: str) -> None:
    with pytest.raises(ValueError, match="subject token"):
        subjects.decode_subject_token(bad)


def test_empty_model_id_has_no_token() -> None:
    with pytest.raises(ValueError, match="empty"):
        subjects.subject_token("")


def test_control_and_fleet_subjects() -> None:
    assert subjects.control_subject("n1", "cancel") == "cortex.node.n1.ctl.cancel"
    assert subjects.heartbeat_subject("n1") == "cortex.fleet.heartbeat.n1"
    assert subjects.activation_subject("n1") == "cortex.fleet.activation.n1"
    assert subjects.heartbeat_wildcard(root="r") == "r.fleet.heartbeat.*"
    assert subjects.discover_subject() == "cortex.fleet.discover"
