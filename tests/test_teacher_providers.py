"""crs_core.teacher.providers: each provider's answers, and a provider registered once reaching
TeacherConfig, a real call through the Teacher wrapper, and the Synthesis page's choices."""

from __future__ import annotations

import pytest

from conftest import copy_workspace, studio_page
from crs_core.teacher import Teacher, TeacherConfig, TeacherSetupError
from crs_core.teacher.providers import PROVIDERS, LocalLlama, OpenAICompatible, provider_labels
from openai_stub_server import OpenAIStubServer


class GatewayProvider(OpenAICompatible):
    """A company gateway in front of several vendors: the same protocol, its own name."""

    name = "gateway"
    label = "Company LLM gateway"


@pytest.fixture()
def gateway(monkeypatch):
    monkeypatch.setitem(PROVIDERS, GatewayProvider.name, GatewayProvider)
    return GatewayProvider


def test_builtin_providers():
    assert list(provider_labels())[:2] == ["openai", "local"]
    assert LocalLlama.free and LocalLlama.default_concurrency == 1
    assert not OpenAICompatible.free and OpenAICompatible.default_concurrency == 8
    assert TeacherConfig.openai("http://127.0.0.1:9/v1", "m").default_concurrency == 8
    assert TeacherConfig.local().default_concurrency == 1
    with pytest.raises(TeacherSetupError, match="needs a model name"):
        TeacherConfig(provider="openai", model="")
    with pytest.raises(TeacherSetupError, match="unknown teacher provider 'magic'"):
        TeacherConfig(provider="magic")


def test_a_registered_provider_is_usable_by_name_end_to_end(gateway, monkeypatch, studio_workspace_file, tmp_path):
    with OpenAIStubServer(reply=lambda messages: "a quiet heist film, please") as stub:
        config = TeacherConfig(provider="gateway", base_url=stub.base_url, model="gw-model")
        with Teacher(config) as teacher:
            assert isinstance(teacher.provider, GatewayProvider)
            assert teacher.endpoint == stub.base_url.rstrip("/")
            reply = teacher.chat([{"role": "user", "content": "hi"}])
        assert reply.text == "a quiet heist film, please" and stub.chat_requests == 1
    at = studio_page(monkeypatch, copy_workspace(studio_workspace_file, tmp_path / "w.duckdb"), "pages/synthesis.py")
    radio = at.radio(key="syn_provider")
    assert radio.value == "local" and "Company LLM gateway" in radio.options
    radio.set_value("gateway").run()
    assert at.text_input(key="syn_base_url")  # an endpoint provider asks for its URL, model and key


def test_a_registered_provider_is_a_cli_choice(gateway):
    from crs_core.cli import _teacher, build_parser

    with OpenAIStubServer(reply=lambda messages: "noted") as stub:
        args = build_parser().parse_args(["synth", "--selection", "s1", "--provider", "gateway",
                                          "--base-url", stub.base_url, "--model", "gw-model"])
        with _teacher(None, args) as teacher:
            assert isinstance(teacher.provider, GatewayProvider) and teacher.model == "gw-model"
            assert teacher.chat([{"role": "user", "content": "hi"}]).text == "noted"
    with pytest.raises(SystemExit):  # an unregistered name is not a choice
        build_parser().parse_args(["synth", "--selection", "s1", "--provider", "magic"])
