"""Which address a request is attributed to: X-Forwarded-For believed only through trusted proxies."""

from __future__ import annotations

import pytest

from serve_app.security.client_ip import address_block, client_ip

PROXIES = ["10.0.0.0/8", "2001:db8:ffff::/48"]


def test_direct_peer_is_the_client_and_its_header_is_ignored():
    assert client_ip("203.0.113.9", ["198.51.100.1"], PROXIES) == "203.0.113.9"
    assert client_ip("203.0.113.9", [], PROXIES) == "203.0.113.9"


def test_no_trusted_proxies_configured_means_the_header_is_never_read():
    assert client_ip("10.0.0.5", ["198.51.100.1"], []) == "10.0.0.5"


def test_trusted_proxy_forwards_the_address_it_saw():
    assert client_ip("10.0.0.5", ["198.51.100.1"], PROXIES) == "198.51.100.1"


def test_walk_passes_a_chain_of_trusted_proxies():
    assert client_ip("10.0.0.5", ["198.51.100.1, 10.1.1.1, 10.2.2.2"], PROXIES) == "198.51.100.1"


def test_spoofed_entries_left_of_the_real_client_are_never_read():
    # The client sent "X-Forwarded-For: 1.2.3.4, 10.9.9.9"; our proxy appended the real address.
    assert client_ip("10.0.0.5", ["1.2.3.4, 10.9.9.9, 198.51.100.1"], PROXIES) == "198.51.100.1"


def test_client_cannot_spoof_by_posing_as_a_trusted_proxy_network():
    # Forged "trusted" hops to the left of the real client's address change nothing.
    assert client_ip("10.0.0.5", ["6.6.6.6, 10.0.0.1, 198.51.100.1"], PROXIES) == "198.51.100.1"


@pytest.mark.parametrize("garbage", ["unknown", "_hidden", "not an ip", "", "999.1.1.1", "[::1", "1.2.3.4:5:6"])
def test_malformed_entry_ends_the_walk_at_the_last_trusted_hop(garbage):
    assert client_ip("10.0.0.5", [f"6.6.6.6, {garbage}"], PROXIES) == "10.0.0.5"
    assert client_ip("10.0.0.5", [f"6.6.6.6, {garbage}, 10.1.1.1"], PROXIES) == "10.1.1.1"


def test_ports_brackets_and_mapped_addresses_are_normalised():
    assert client_ip("10.0.0.5", ["198.51.100.1:4711"], PROXIES) == "198.51.100.1"
    assert client_ip("10.0.0.5", ["[2001:db8::1]:443"], PROXIES) == "2001:db8::1"
    assert client_ip("::ffff:10.0.0.5", ["::ffff:198.51.100.1"], PROXIES) == "198.51.100.1"
    assert client_ip("2001:db8:ffff::1", ["2001:DB8:0:0::7"], PROXIES) == "2001:db8::7"


def test_all_hops_trusted_yields_the_leftmost():
    assert client_ip("10.0.0.5", ["10.3.3.3, 10.2.2.2"], PROXIES) == "10.3.3.3"


def test_non_ip_peer_is_returned_unchanged():
    assert client_ip("testclient", ["198.51.100.1"], PROXIES) == "testclient"


def test_header_with_thousands_of_entries_is_bounded():
    forged = ", ".join(["10.0.0.1"] * 10_000)
    assert client_ip("10.0.0.5", [forged], PROXIES) == "10.0.0.1"


def test_invalid_trusted_proxy_configuration_is_an_error():
    with pytest.raises(ValueError):
        client_ip("10.0.0.5", ["198.51.100.1"], ["10.0.0.0/33"])


# -- several header lines (RFC 9110 §5.3: one list, in order) -------------------------------------


def test_every_header_line_is_read_and_the_walk_starts_at_the_last():
    # The client sent its own line naming a victim; our proxy added a second line with what it saw.
    assert client_ip("10.0.0.5", ["192.0.2.66", "198.51.100.1"], PROXIES) == "198.51.100.1"
    # A chain split over lines walks as one list: the proxy hop on the last line is passed.
    assert client_ip("10.0.0.5", ["192.0.2.66, 198.51.100.1", "10.1.1.1"], PROXIES) == "198.51.100.1"


def test_lines_join_in_order_so_a_malformed_last_line_stops_the_walk():
    assert client_ip("10.0.0.5", ["198.51.100.1", "unknown"], PROXIES) == "10.0.0.5"


def test_the_hop_bound_holds_across_lines():
    assert client_ip("10.0.0.5", ["10.0.0.1"] * 5_000, PROXIES) == "10.0.0.1"


def test_one_line_passed_as_text_is_a_programming_error():
    with pytest.raises(TypeError):
        client_ip("10.0.0.5", "198.51.100.1", PROXIES)  # type: ignore[arg-type]


# -- the block that limits and bans apply to --------------------------------------------------------


def test_ipv6_clients_are_one_subject_per_64():
    assert address_block("2001:db8:1:2::7") == "2001:db8:1:2::/64"
    assert address_block("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert address_block("2001:db8:1:3::7") == "2001:db8:1:3::/64"
    assert address_block("[2001:DB8:1:2::9]:443") == "2001:db8:1:2::/64"


def test_ipv4_clients_are_one_subject_per_address():
    assert address_block("198.51.100.1") == "198.51.100.1"
    assert address_block("198.51.100.2") == "198.51.100.2"
    assert address_block("::ffff:198.51.100.1") == "198.51.100.1"


def test_text_that_is_no_address_is_its_own_subject():
    assert address_block("testclient") == "testclient"
