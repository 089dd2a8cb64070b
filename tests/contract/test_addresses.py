"""Sidecar addresses as people type them (exo_remote_engine.contract.addresses): the port defaults to
50505 instead of gRPC's 443, and URLs are refused with the address to use."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from exo_remote_engine.contract.addresses import AddressError, TargetKind, grpc_address, sidecar_target
from exo_remote_engine.engine.connection.target import ClientTLS, SidecarTarget


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
        (
            "http://127.0.0.1:7000/",
            "drop the http:// scheme, the sidecar speaks gRPC, not HTTP: --sidecar 127.0.0.1:7000",
        ),
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


@pytest.mark.parametrize(
    ("typed", "target", "hosts"),
    [
        ("127.0.0.1", "127.0.0.1:50505", ("127.0.0.1:50505",)),
        ("sidecar.lan:7000", "sidecar.lan:7000", ("sidecar.lan:7000",)),
        ("127.0.0.2:7001, 127.0.0.3:7002", "ipv4:127.0.0.2:7001,127.0.0.3:7002", ("127.0.0.2:7001", "127.0.0.3:7002")),
        ("127.0.0.2,127.0.0.3", "ipv4:127.0.0.2:50505,127.0.0.3:50505", ("127.0.0.2:50505", "127.0.0.3:50505")),
        ("::1,[::2]:9", "ipv6:[::1]:50505,[::2]:9", ("[::1]:50505", "[::2]:9")),
        ("ipv4:10.0.0.5,10.0.0.6:7", "ipv4:10.0.0.5:50505,10.0.0.6:7", ("10.0.0.5:50505", "10.0.0.6:7")),
        ("ipv6:::1,[::2]:7", "ipv6:[::1]:50505,[::2]:7", ("[::1]:50505", "[::2]:7")),
        ("dns:///sidecars.lan:7000", "dns:///sidecars.lan:7000", ()),
        ("dns:sidecars.lan", "dns:sidecars.lan:50505", ()),
        ("dns://10.0.0.53/sidecars.lan", "dns://10.0.0.53/sidecars.lan:50505", ()),
        ("unix:/run/sidecar.sock", "unix:/run/sidecar.sock", ()),
    ],
)
def test_several_hosts_become_one_grpc_target(typed: str, target: str, hosts: tuple[str, ...]) -> None:
    parsed = sidecar_target(typed)
    assert (parsed.target, parsed.hosts) == (target, hosts)
    assert sidecar_target(parsed.target) == parsed, "a parsed target parses to itself"
    assert parsed.several == (typed.count(",") > 0 or typed.startswith(("ipv", "dns:")))
    if typed.startswith("dns:"):
        assert parsed.kind is TargetKind.DNS and parsed.dns_name == target.rpartition("/")[2].removeprefix("dns:")


@pytest.mark.parametrize(
    ("typed", "said"),
    [
        (
            "a.lan:7001,b.lan:7002",
            "'a.lan' is a host name, and gRPC cannot dial a list of names as one target; "
            "write IP addresses (127.0.0.2:50505,127.0.0.3:50505) or one name with several address records as "
            "dns:///a.lan:7001",
        ),
        ("127.0.0.2:7001,b.lan", "'b.lan' is a host name"),
        ("127.0.0.1,::1", "mixes IPv4 and IPv6 addresses"),
        ("127.0.0.2,,127.0.0.3", "empty address in the list"),
        ("127.0.0.2,", "empty address in the list"),
        ("ipv4:", "empty address in the list"),
        ("127.0.0.2:7001,127.0.0.2:7001", "127.0.0.2:7001 is listed twice"),
        ("127.0.0.2:7001,127.0.0.3:99999", "port '99999' is not a number from 0 to 65535"),
        ("127.0.0.2,http://127.0.0.3:7", "drop the http:// scheme"),
        ("ipv4:sidecar.lan:7", "'sidecar.lan' is not an IP address; ipv4: lists take IP addresses"),
        ("ipv4:::1", "::1 is not an IPv4 address"),
        ("ipv6:127.0.0.1", "127.0.0.1 is not an IPv6 address"),
        ("dns://sidecars.lan", "expected dns:///name:port (three slashes) or dns:name:port"),
        ("dns:///", "expected one name, as dns:///name:port"),
        ("dns:///a.lan,b.lan", "expected one name"),
        ("dns:///a.lan:port", "port 'port' is not a number"),
    ],
)
def test_unusable_targets_say_what_to_write(typed: str, said: str) -> None:
    with pytest.raises(AddressError) as caught:
        sidecar_target(typed, flag="EXO_REMOTE_SIDECAR")
    assert said in str(caught.value) and str(caught.value).startswith("EXO_REMOTE_SIDECAR ")


def test_the_environment_variable_takes_several_hosts() -> None:
    target = SidecarTarget.from_env({"EXO_REMOTE_SIDECAR": "127.0.0.2:7001,127.0.0.3:7002"})
    assert target.address == "ipv4:127.0.0.2:7001,127.0.0.3:7002"
    assert target.parsed.hosts == ("127.0.0.2:7001", "127.0.0.3:7002")
    with pytest.raises(AddressError, match=r"dns:///a\.lan:7"):
        SidecarTarget.from_env({"EXO_REMOTE_SIDECAR": "a.lan:7,b.lan:7"})


def test_channels_spread_calls_with_round_robin_and_health_check_only_under_mtls(tmp_path: Path) -> None:
    """gRPC's health Watch carries no token, so it is switched on only where a client
    certificate alone authenticates it (exo_remote_engine.engine.connection.client says why)."""
    plain = SidecarTarget(address="ipv4:127.0.0.2:1,127.0.0.3:1", token="t")
    config = json.loads(dict(plain.channel_options())["grpc.service_config"])  # type: ignore[arg-type]
    assert config == {"loadBalancingConfig": [{"round_robin": {}}]}
    mtls = SidecarTarget(
        address="ipv4:127.0.0.2:1,127.0.0.3:1", tls=ClientTLS(cert_file=tmp_path / "c.pem", key_file=tmp_path / "k.pem")
    )
    config = json.loads(dict(mtls.channel_options())["grpc.service_config"])  # type: ignore[arg-type]
    assert config["healthCheckConfig"] == {"serviceName": "exo.remote.v1.RemoteInferenceService"}
    assert not replace(mtls, token="t").health_checked
    # One host keeps gRPC's pick_first, which reconnects as soon as a call comes after the
    # host restarted (tests/test_faults.py restarts a sidecar on the same port).
    single = replace(mtls, address="127.0.0.1:50505")
    assert "grpc.service_config" not in dict(single.channel_options())
    assert not single.health_checked
