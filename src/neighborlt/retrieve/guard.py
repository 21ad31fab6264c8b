"""Address guard for the download engine: only public http(s) addresses, checked after DNS, and pinned.

A URL passes :func:`check_url` only when its scheme is http or https and *every* address its host resolves
to is a public unicast address: loopback, private (RFC 1918, CGNAT 100.64/10, ULA fc00::/7), link-local,
unspecified, multicast, reserved and documentation ranges, IPv4 addresses embedded in IPv6 (mapped,
6to4, Teredo, NAT64) of those, and the cloud metadata endpoints are refused with :class:`Refused`.
``allow_hosts`` lifts the refusal explicitly for named hosts, IP addresses or networks (for tests against a
server on 127.0.0.1, or an intranet mirror).

The fetcher then connects to the checked address itself (:func:`pinned_connection`), never to the host
name again, so a DNS answer that changes between the check and the connect (DNS rebinding) cannot steer the
request to another address. The ``Host`` header, TLS SNI and certificate check still use the host name.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import socket
import ssl
from collections.abc import Callable, Iterable, Sequence
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Sequence[str]]

ALLOWED_SCHEMES = ("http", "https")
METADATA_HOSTS = frozenset({
    "metadata", "metadata.google.internal", "metadata.goog", "metadata.azure.internal", "instance-data",
    "instance-data.ec2.internal", "metadata.tencentyun.com", "metadata.platformequinix.com",
})
METADATA_IPS = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, ...
    "169.254.170.2",  # AWS ECS task metadata
    "169.254.169.123",  # AWS time sync
    "fd00:ec2::254",  # AWS IMDS over IPv6
    "100.100.100.200",  # Alibaba Cloud
    "192.0.0.192",  # Oracle Cloud
))
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


class Refused(Exception):
    """A URL the guard (or the fetcher) refuses; ``code`` is a short status such as ``"blocked_address"``."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


def default_resolve(host: str, port: int) -> list[str]:
    """Resolve ``host`` with :func:`socket.getaddrinfo` (TCP); the IP strings in the order returned."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    out: list[str] = []
    for info in infos:
        ip = str(info[4][0]).split("%", 1)[0]  # drop an IPv6 zone id
        if ip not in out:
            out.append(ip)
    return out


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, Teredo client, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64 or ip in _NAT64_LOCAL:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def blocked_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public unicast address (``None`` when it is public).

    Args:
        ip: an IPv4 or IPv6 address.

    Returns:
        A short reason such as ``"private address"``, or None for a public address.
    """
    if ip in METADATA_IPS:
        return "cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            why = blocked_reason(inner)
            if why is not None:
                return f"{why} embedded in IPv6 ({inner})"
    checks = (
        ("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast), ("shared (CGNAT)", isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT),
        ("private", ip.is_private), ("reserved", ip.is_reserved),
    )
    for name, hit in checks:
        if hit:
            return f"{name} address"
    if not ip.is_global:
        return "non-global address"
    if isinstance(ip, ipaddress.IPv4Address) and int(ip) == 0xFFFFFFFF:
        return "broadcast address"
    return None


def _parse_allow(allow_hosts: Iterable[str]) -> tuple[frozenset[str], tuple[_Network, ...]]:
    return _parse_allow_cached(tuple(allow_hosts))


@functools.lru_cache(maxsize=64)
def _parse_allow_cached(allow_hosts: tuple[str, ...]) -> tuple[frozenset[str], tuple[_Network, ...]]:
    """``allow_hosts`` as (host names, networks); cached, since every fetch of a run passes the same list."""
    names: set[str] = set()
    nets: list[_Network] = []
    for entry in allow_hosts:
        entry = entry.strip()
        if not entry:
            continue
        try:
            nets.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
        except ValueError:
            names.add(normalize_host(entry))
    return frozenset(names), tuple(nets)


def normalize_host(host: str) -> str:
    """Lower-case a host name, strip IPv6 brackets and a trailing dot."""
    return host.strip().strip("[]").rstrip(".").lower()


def _literal_ip(host: str) -> IPAddress | None:
    """``host`` as an IP address when it is one, including legacy IPv4 forms (``2130706433``, ``0x7f.1``)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if host and all(c in "0123456789abcdefx." for c in host) and any(c.isdigit() for c in host):
        try:  # inet_aton accepts the forms a resolver would also turn into an address
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def split_url(url: str) -> tuple[str, str, int]:
    """The scheme, normalized host and port of ``url``; :class:`Refused` (``bad_scheme``/``bad_url``) if unusable.

    Args:
        url: an absolute URL.

    Returns:
        ``(scheme, host, port)`` with the scheme's default port filled in.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise Refused("bad_url", f"malformed URL ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise Refused("bad_scheme", f"scheme {scheme or '(none)'!r} is not http or https")
    host = normalize_host(parts.hostname or "")
    if not host:
        raise Refused("bad_url", "URL has no host")
    if parts.username is not None or parts.password is not None:
        raise Refused("bad_url", "URL carries credentials")
    return scheme, host, port if port is not None else (443 if scheme == "https" else 80)


def check_url(url: str, allow_hosts: Iterable[str] = (), resolve: Resolver | None = None) -> list[IPAddress]:
    """Check ``url`` and return the addresses it may be fetched from.

    The host is resolved (IP literals are not) and every address must be public; one refused address refuses
    the URL, since a client cannot know which one an attacker would get. Call it again for every redirect.

    Args:
        url: the absolute http(s) URL to check.
        allow_hosts: host names, IP addresses or networks (``"127.0.0.1"``, ``"localhost"``, ``"10.0.0.0/8"``)
            for which the refusal of non-public addresses is lifted. A listed host name allows every address it
            resolves to; a listed address or network allows those addresses for any host name.
        resolve: ``fn(host, port) -> [ip, ...]``; defaults to :func:`socket.getaddrinfo`. Tests inject one.

    Returns:
        The checked addresses (at least one) in resolver order; connect only to these.

    Raises:
        Refused: ``bad_url``, ``bad_scheme``, ``dns_error`` or ``blocked_address``.
    """
    _, host, port = split_url(url)
    names, nets = _parse_allow(allow_hosts)
    host_allowed = host in names
    if host in METADATA_HOSTS and not host_allowed:
        raise Refused("blocked_address", f"{host} is a cloud metadata host name")
    literal = _literal_ip(host)
    if literal is not None:
        ips: list[IPAddress] = [literal]
    else:
        try:
            answers = (resolve or default_resolve)(host, port)
        except (OSError, UnicodeError) as e:
            raise Refused("dns_error", f"cannot resolve {host} ({e})") from None
        ips = []
        for a in answers:
            try:
                ip = ipaddress.ip_address(str(a).split("%", 1)[0])
            except ValueError:
                raise Refused("dns_error", f"resolver returned {a!r} for {host}, not an IP address") from None
            if ip not in ips:
                ips.append(ip)
        if not ips:
            raise Refused("dns_error", f"{host} has no address")
    if not host_allowed:
        for ip in ips:
            why = blocked_reason(ip)
            if why is not None and not any(ip.version == n.version and ip in n for n in nets):
                shown = host if literal is not None else f"{host} -> {ip}"
                raise Refused("blocked_address", f"{shown} is a {why} (list it in allow_hosts to fetch it anyway)")
    return ips


class PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to a fixed IP address; ``host`` is only used for the ``Host`` header."""

    def __init__(self, host: str, port: int, ip: IPAddress, *, connect_timeout: float, read_timeout: float) -> None:
        super().__init__(host, port, timeout=connect_timeout)
        self.pinned_ip = ip
        self.read_timeout = read_timeout

    def _open_socket(self) -> socket.socket:
        sock = socket.create_connection((str(self.pinned_ip), self.port), self.timeout)
        sock.settimeout(self.read_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        return sock

    def connect(self) -> None:
        self.sock = self._open_socket()


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection to a fixed IP address with SNI and certificate check against ``host``."""

    def __init__(self, host: str, port: int, ip: IPAddress, *, connect_timeout: float, read_timeout: float,
                 context: ssl.SSLContext | None = None) -> None:
        super().__init__(host, port, timeout=connect_timeout, context=context or ssl.create_default_context())
        self.pinned_ip = ip
        self.read_timeout = read_timeout

    def connect(self) -> None:
        sock = PinnedHTTPConnection._open_socket(self)  # type: ignore[arg-type]
        sock.settimeout(self.timeout)  # the TLS handshake is part of connecting
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        self.sock.settimeout(self.read_timeout)


def pinned_connection(scheme: str, host: str, port: int, ip: IPAddress, *, connect_timeout: float,
                      read_timeout: float, ssl_context: ssl.SSLContext | None = None) -> http.client.HTTPConnection:
    """An unopened :mod:`http.client` connection to ``ip`` that presents itself as ``host:port``.

    Args:
        scheme: ``"http"`` or ``"https"``.
        host: the URL's host name (``Host`` header, SNI, certificate name).
        port: the URL's port.
        ip: a checked address from :func:`check_url`.
        connect_timeout: seconds for the TCP connect (and TLS handshake).
        read_timeout: seconds a single socket read may wait.
        ssl_context: TLS context for https (default: the system's verified default context).

    Returns:
        The connection; the request opens it.
    """
    if scheme == "https":
        return PinnedHTTPSConnection(host, port, ip, connect_timeout=connect_timeout, read_timeout=read_timeout,
                                     context=ssl_context)
    return PinnedHTTPConnection(host, port, ip, connect_timeout=connect_timeout, read_timeout=read_timeout)
