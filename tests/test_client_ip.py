"""Which address a request is attributed to: X-Forwarded-For believed only through trusted proxies."""

from __future__ import annotations

import pytest

from serve_app.security.client_ip import client_ip

PROXIES = ["10.0.0.0/8", "2001:db8:ffff::/48"]


def test_direct_peer_is_the_client_and_its_header_is_ignored():
    assert client_ip("203.0.113.9", "198.51.100.1", PROXIES) == "203.0.113.9"
    assert client_ip("203.0.113.9", None, PROXIES) == "203.0.113.9"


def test_no_trusted_proxies_configured_means_the_header_is_never_read():
    assert client_ip("10.0.0.5", "198.51.100.1", []) == "10.0.0.5"


def test_trusted_proxy_forwards_the_address_it_saw():
    assert client_ip("10.0.0.5", "198.51.100.1", PROXIES) == "198.51.100.1"


def test_walk_passes_a_chain_of_trusted_proxies():
    assert client_ip("10.0.0.5", "198.51.100.1, 10.1.1.1, 10.2.2.2", PROXIES) == "198.51.100.1"


def test_spoofed_entries_left_of_the_real_client_are_never_read():
    # The client sent "X-Forwarded-For: 1.2.3.4, 10.9.9.9"; our proxy appended the real address.
    assert client_ip("10.0.0.5", "1.2.3.4, 10.9.9.9, 198.51.100.1", PROXIES) == "198.51.100.1"


def test_client_cannot_spoof_by_posing_as_a_trusted_proxy_network():
    # Forged "trusted" hops to the left of the real client's address change nothing.
    assert client_ip("10.0.0.5", "6.6.6.6, 10.0.0.1, 198.51.100.1", PROXIES) == "198.51.100.1"


@pytest.mark.parametrize("garbage", ["unknown", "_hidden", "not an ip", "", "999.1.1.1", "[::1", "1.2.3.4:5:6"])
def test_malformed_entry_ends_the_walk_at_the_last_trusted_hop(garbage):
    assert client_ip("10.0.0.5", f"6.6.6.6, {garbage}", PROXIES) == "10.0.0.5"
    assert client_ip("10.0.0.5", f"6.6.6.6, {garbage}, 10.1.1.1", PROXIES) == "10.1.1.1"


def test_ports_brackets_and_mapped_addresses_are_normalised():
    assert client_ip("10.0.0.5", "198.51.100.1:4711", PROXIES) == "198.51.100.1"
    assert client_ip("10.0.0.5", "[2001:db8::1]:443", PROXIES) == "2001:db8::1"
    assert client_ip("::ffff:10.0.0.5", "::ffff:198.51.100.1", PROXIES) == "198.51.100.1"
    assert client_ip("2001:db8:ffff::1", "2001:DB8:0:0::7", PROXIES) == "2001:db8::7"


def test_all_hops_trusted_yields_the_leftmost():
    assert client_ip("10.0.0.5", "10.3.3.3, 10.2.2.2", PROXIES) == "10.3.3.3"


def test_non_ip_peer_is_returned_unchanged():
    assert client_ip("testclient", "198.51.100.1", PROXIES) == "testclient"


def test_header_with_thousands_of_entries_is_bounded():
    forged = ", ".join(["10.0.0.1"] * 10_000)
    assert client_ip("10.0.0.5", forged, PROXIES) == "10.0.0.1"


def test_invalid_trusted_proxy_configuration_is_an_error():
    with pytest.raises(ValueError):
        client_ip("10.0.0.5", "198.51.100.1", ["10.0.0.0/33"])
