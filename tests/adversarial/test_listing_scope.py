"""Each node is listed only what it may use, and providers are sent only http(s) or
inline images (issue 11, item 13).

Seen on main: ListModels named every alias to every node, whatever its
``allowed_models``; image URLs of any scheme (``file://``) were forwarded to the provider.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.server import SidecarSettings, start_sidecar
from exo_remote_engine.sidecar.config.loader import load_config
from tests.support.configs import write_config
from tests.support.harness import chat_request, raw_generate, sidecar_client
from tests.support.openai_upstream import OpenAIUpstream

TOKENS = {"node-a": "node-a-token-0123456789abcdef", "node-b": "node-b-token-0123456789abcdef"}
ALIASES = ["open-small", "open-large", "secret-model"]
NODES = "  default_model: secret-model\n  nodes:\n    node-a: {allowed_models: ['open-*']}\n"


@pytest.fixture
async def scoped(upstream: OpenAIUpstream, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "k")
    config = write_config(tmp_path / "c.yaml", upstream.url, ALIASES, NODES)
    sidecar = await start_sidecar(SidecarSettings(listen="127.0.0.1:0", named_tokens=TOKENS), load_config(config))
    yield sidecar
    await sidecar.stop(grace_s=None)


async def test_a_node_is_listed_only_the_models_it_may_use(scoped: Any) -> None:
    client = sidecar_client(scoped.address, token=TOKENS["node-a"])
    listing = await client.list_models()
    assert sorted(m.alias for m in listing.models) == ["open-large", "open-small"]
    assert listing.default_model in {"open-large", "open-small"}, "the default is one it may use"
    with pytest.raises(RemoteError) as caught:
        async for _ in client.generate(chat_request("no-such-model")):
            pass
    assert caught.value.reason is Reason.MODEL_NOT_FOUND
    assert "secret-model" not in caught.value.message and "open-small" in caught.value.message
    await client.close()
    unrestricted = sidecar_client(scoped.address, token=TOKENS["node-b"])
    listing = await unrestricted.list_models()
    assert sorted(m.alias for m in listing.models) == sorted(ALIASES)
    assert listing.default_model == "secret-model"
    await unrestricted.close()


def _image_request(url: str) -> pb.GenerateRequest:
    request = chat_request("open-small", request_id="img")
    request.messages[0].content.append(pb.ContentPart(image_url=pb.ImageUrl(url=url)))
    return request


AUTH = (("authorization", f"Bearer {TOKENS['node-b']}"),)


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "FILE:///etc/shadow",
        "ftp://127.0.0.1/x.png",
        "gopher://127.0.0.1:70/_x",
        "javascript:alert(1)",
        "/etc/passwd",
        "",
    ],
)
async def test_image_urls_other_than_http_https_or_data_are_refused(
    scoped: Any, upstream: OpenAIUpstream, url: str
) -> None:
    outcome = await raw_generate(scoped.address, _image_request(url), metadata=AUTH)
    assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT, (url, outcome.code, outcome.details)
    error = outcome.error()
    assert error.violations[0].field == "messages[0].content[1].image_url.url", error
    assert not upstream.requests, "the provider never saw it"


@pytest.mark.parametrize(
    "url", ["https://example.invalid/cat.png", "HTTP://example.invalid/a.png", "data:image/png;base64,AAAA"]
)
async def test_http_https_and_data_image_urls_reach_the_provider(
    scoped: Any, upstream: OpenAIUpstream, url: str
) -> None:
    outcome = await raw_generate(scoped.address, _image_request(url), metadata=AUTH)
    assert outcome.code is grpc.StatusCode.OK, outcome.details
    (sent,) = upstream.requests
    parts = sent.body["messages"][0]["content"]
    assert parts[1]["image_url"]["url"] == url


async def test_inline_image_media_type_cannot_inject_into_the_data_url(scoped: Any, upstream: OpenAIUpstream) -> None:
    request = chat_request("open-small", request_id="img")
    request.messages[0].content.append(
        pb.ContentPart(image_data=pb.ImageData(data=b"\x89PNG", mime_type="image/png;base64,AAAA,x"))
    )
    outcome = await raw_generate(scoped.address, request, metadata=AUTH)
    assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT
    assert outcome.error().violations[0].field == "messages[0].content[1].image_data.mime_type"
    assert not upstream.requests
