"""The add-on's script for exo's tinychat page (engine/tinychat.py): where it goes, what it
is told, and the sidebar fields remote models carry. Its behaviour in a browser is tested
in Chromium by tests/real_exo/test_tinychat.py."""

from __future__ import annotations

from exo_remote_engine.engine.tinychat import family_of, page_with_addon, sidebar_fields
from exo_remote_engine.generated import remote_inference_pb2 as pb

PAGE = '<head><script src="/index.js"></script></head><main x-data="state"></main>'


def test_the_script_follows_exo_script_and_its_config_cannot_close_the_tag() -> None:
    page = page_with_addon(PAGE, "evil</script><script>alert(1)")
    assert page.index("/index.js") < page.index("exo-remote-tinychat")
    assert "evil<\\/script><script>alert(1)" in page and page.count("</script>") == 2
    assert 'const config = {"default_model": null};' in page_with_addon(PAGE, None)


def test_a_page_without_exo_script_is_served_unchanged() -> None:
    assert page_with_addon("<html>other exo</html>", "m") == "<html>other exo</html>"


def test_remote_models_carry_provider_family_and_a_readable_name() -> None:
    fields = sidebar_fields("claude-3-5-haiku", pb.Model(alias="claude-3-5-haiku", provider="anthropic"))
    assert fields == {"provider": "Anthropic", "family": "Claude", "name": "Claude 3 5 Haiku"}
    llama = sidebar_fields("qwen", pb.Model(alias="qwen", provider="llama.cpp", display_name="Qwen 2.5 0.5B"))
    assert llama == {"provider": "llama.cpp", "family": "Qwen", "name": "Qwen 2.5 0.5B"}
    assert sidebar_fields("gpt-4o-mini", None) == {"provider": "Remote", "family": "GPT", "name": "GPT 4o Mini"}
    assert family_of("x") == "X" and family_of("mistral_large:latest") == "Mistral"
