"""Which addresses a webhook may target: every IANA special-purpose range of both families
refused, every IPv6 form embedding an IPv4 judged by that IPv4, at registration (real HTTP
through the API) and at send time (the dispatcher's resolve_public)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.auth import create_api_key
from service.main import create_app
from service.webhooks.targets import (
    IPV4_SPECIAL,
    IPV6_SPECIAL,
    TargetRefused,
    refusal,
    resolve_public,
)
from shortened.config import Settings

PUBLIC_V4 = "8.8.8.8"


def _teredo(server: str, client: str) -> str:
    value = (0x20010000 << 96) | (int(ipaddress.IPv4Address(server)) << 64)
    value |= int(ipaddress.IPv4Address(client)) ^ 0xFFFFFFFF
    return str(ipaddress.IPv6Address(value))


def _nat64_48(v4: str) -> str:
    ip = int(ipaddress.IPv4Address(v4))
    value = (0x0064FF9B0001 << 80) | ((ip >> 16) << 64) | ((ip & 0xFFFF) << 40)
    return str(ipaddress.IPv6Address(value))


# (address, refused?) -- written out by hand, independently of the tables under test.
CASES: list[tuple[str, bool]] = [
    # public
    ("8.8.8.8", False),
    ("1.1.1.1", False),
    ("2606:4700:4700::1111", False),
    # IPv4 special-purpose registry
    ("0.0.0.0", True),
    ("0.1.2.3", True),
    ("10.1.2.3", True),
    ("100.64.0.1", True),
    ("127.0.0.1", True),
    ("127.255.255.254", True),
    ("169.254.169.254", True),
    ("172.16.0.1", True),
    ("172.31.255.255", True),
    ("192.0.0.1", True),
    ("192.0.0.9", True),
    ("192.0.0.170", True),
    ("192.0.2.1", True),
    ("192.31.196.1", True),
    ("192.52.193.1", True),
    ("192.88.99.1", True),
    ("192.168.1.1", True),
    ("192.175.48.1", True),
    ("198.18.0.1", True),
    ("198.19.255.255", True),
    ("198.51.100.1", True),
    ("203.0.113.1", True),
    ("224.0.0.1", True),
    ("239.255.255.250", True),
    ("240.0.0.1", True),
    ("255.255.255.255", True),
    # IPv6 special-purpose registry
    ("::", True),
    ("::1", True),
    ("100::1", True),
    ("100:0:0:1::1", True),
    ("2001:1::1", True),
    ("2001:1::2", True),
    ("2001:2::1", True),
    ("2001:3::1", True),
    ("2001:4:112::1", True),
    ("2001:10::1", True),
    ("2001:20::1", True),
    ("2001:30::1", True),
    ("2001:db8::1", True),
    ("2001:100::1", True),  # in 2001::/23, IETF protocol assignments
    ("2620:4f:8000::1", True),
    ("3fff::1", True),
    ("5f00::1", True),
    ("fc00::1", True),
    ("fd12:3456::1", True),
    ("fe80::1", True),
    ("fe80::1%eth0", True),
    ("fec0::1", True),
    ("ff02::1", True),
    # IPv4-mapped ::ffff:0:0/96
    ("::ffff:127.0.0.1", True),
    ("::ffff:169.254.169.254", True),
    ("::ffff:10.0.0.1", True),
    ("::ffff:8.8.8.8", False),
    # IPv4-compatible ::/96
    ("::127.0.0.1", True),
    ("::169.254.169.254", True),
    ("::8.8.8.8", False),
    # IPv4-translated ::ffff:0:0:0/96
    ("::ffff:0:127.0.0.1", True),
    # NAT64 64:ff9b::/96
    ("64:ff9b::127.0.0.1", True),
    ("64:ff9b::10.0.0.1", True),
    ("64:ff9b::8.8.8.8", False),
    # local-use NAT64 64:ff9b:1::/48 (RFC 6052 /48 layout)
    (_nat64_48("127.0.0.1"), True),
    (_nat64_48("192.168.0.1"), True),
    (_nat64_48("8.8.8.8"), False),
    # 6to4 2002::/16
    ("2002:7f00:1::1", True),
    ("2002:a9fe:a9fe::1", True),
    ("2002:c0a8:101::1", True),
    ("2002:808:808::1", False),
    # Teredo 2001::/32: server and (XOR-ed) client
    (_teredo("127.0.0.1", PUBLIC_V4), True),
    (_teredo(PUBLIC_V4, "127.0.0.1"), True),
    (_teredo(PUBLIC_V4, "169.254.169.254"), True),
    (_teredo(PUBLIC_V4, "10.0.0.1"), True),
    (_teredo(PUBLIC_V4, "1.1.1.1"), False),
]


@pytest.mark.parametrize(("address", "refused"), CASES)
def test_address_is_judged_by_the_special_purpose_tables(address: str, refused: bool):
    assert (refusal(address) is not None) is refused


def test_teredo_client_is_unxored():
    # 2001:0:808:808::80ff:fefe: client 0x80fffefe ^ 0xffffffff = 127.0.1.1
    assert "loopback" in (refusal("2001:0:808:808::80ff:fefe") or "")


def test_every_table_row_is_refused_at_its_first_and_last_address():
    """Each row of both tables refuses its own addresses (the embedding rows: when the
    embedded IPv4 is refused, here 0.0.0.0 or 255.255.255.255 by construction)."""
    for network, _name in IPV4_SPECIAL:
        net = ipaddress.ip_network(network)
        assert refusal(net[0]) is not None and refusal(net[-1]) is not None, network
    for network, _name, _unwrap in IPV6_SPECIAL:
        net = ipaddress.ip_network(network)
        assert refusal(net[0]) is not None and refusal(net[-1]) is not None, network


@pytest.mark.parametrize(("address", "refused"), CASES)
def test_send_time_check_refuses_the_same(address: str, refused: bool):
    host = address.split("%", 1)[0]
    url = f"http://[{host}]/hook" if ":" in host else f"http://{host}/hook"
    if refused:
        with pytest.raises(TargetRefused):
            resolve_public(url)
    else:
        assert resolve_public(url) == [str(ipaddress.ip_address(host))]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """The API in auth-required mode, where private targets are refused."""
    root: Path = tmp_path_factory.mktemp("targets")
    settings = Settings(data_dir=root / "var", auth_required=True)
    with TestClient(create_app(settings)) as client:
        with client.app.state.sessionmaker() as session:
            _, key = create_api_key(session, "acme")
        client.headers["Authorization"] = f"Bearer {key}"
        yield client


@pytest.mark.parametrize(
    "address",
    [
        "::ffff:127.0.0.1",
        "64:ff9b::169.254.169.254",
        "2002:a9fe:a9fe::1",
        _teredo(PUBLIC_V4, "127.0.0.1"),
        _nat64_48("10.0.0.1"),
        "100.64.0.1",
        "3fff::1",
    ],
)
def test_registration_refuses_embedded_and_special_targets(api: TestClient, address: str):
    url = f"http://[{address}]/hook" if ":" in address else f"http://{address}/hook"
    response = api.post("/webhooks", json={"url": url})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "url"] and "not allowed on this server" in error["msg"]
    # The same for a job's own callback, checked by the submission policy.
    spec = {
        "model": "models/tiny-llama",
        "num_blocks": 1,
        "calibration": {"source": "data/calibration.jsonl"},
        "webhook": {"url": url},
    }
    response = api.post("/jobs/prune", json=spec)
    assert response.status_code == 422, response.text
    assert ["body", "webhook", "url"] in [e["loc"] for e in response.json()["detail"]]
