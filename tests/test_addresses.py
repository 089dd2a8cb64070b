"""Sidecar addresses as people type them (exo_remote_engine.addresses): the port defaults to
50505 instead of gRPC's 443, and URLs are refused with the address to use."""

from __future__ import annotations

import pytest

from exo_remote_engine.addresses import AddressError, grpc_address
from exo_remote_engine.engine.client import SidecarTarget


@pytest.mark.parametrize(
    ("typed", "target"),
    [
        ("127.0.0.1", "127.0.0.1:50505"),
        (" sidecar.lan ", "sidecar.lan:50505"),
        ("127.0.0.1:7000", "127.0.0.1:7000"),
        ("127.0.0.1:0", "127.0.0.1:0"),
        ("::1", "[::1]:50505"),
        ("[::1]", "[::1]:50505"),
        ("[fe80::1]:7000", "[fe80::1]:7000"),
        ("unix:/run/sidecar.sock", "unix:/run/sidecar.sock"),
        ("dns:///sidecar.lan:7000", "dns:///sidecar.lan:7000"),
    ],
)
def test_addresses_become_grpc_targets(typed: str, target: str) -> None:
    assert grpc_address(typed) == target


@pytest.mark.parametrize(
    ("typed", "said"),
    [
        ("http://127.0.0.1:7000/", "drop the http:// scheme, the sidecar speaks gRPC, not HTTP: "
         "--sidecar 127.0.0.1:7000"),
        ("https://sidecar.lan", "--sidecar sidecar.lan:50505 (TLS is set with EXO_REMOTE_TLS_CA, not https://)"),
        ("grpc://[::1]:9", "--sidecar [::1]:9"),
        ("127.0.0.1:http", "port 'http' is not a number from 0 to 65535"),
        ("127.0.0.1:70000", "port '70000' is not a number"),
        (":7000", "no host"),
        ("", "empty address"),
    ],
)
def test_unusable_addresses_say_what_to_write(typed: str, said: str) -> None:
    with pytest.raises(AddressError) as caught:
        grpc_address(typed)
    assert said in str(caught.value)


def test_the_environment_variable_gets_the_same_treatment() -> None:
    assert SidecarTarget.from_env({"EXO_REMOTE_SIDECAR": "10.0.0.5"}).address == "10.0.0.5:50505"
    assert SidecarTarget.from_env({}).address == "127.0.0.1:50505"
    with pytest.raises(AddressError, match=r"EXO_REMOTE_SIDECAR=10\.0\.0\.5:50505"):
        SidecarTarget.from_env({"EXO_REMOTE_SIDECAR": "http://10.0.0.5"})
