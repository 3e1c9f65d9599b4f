"""Fetch image URLs safely: only http(s), only to public addresses, within a size limit and a deadline.

`ImageFetcher.fetch` resolves the URL's host before it connects and refuses it (`errors.UrlNotAllowedError`) when
any of its addresses is loopback, private, link-local (the cloud metadata address among them), shared (CGNAT),
multicast, reserved or unspecified, unless the host is allowed by `FetchPolicy.allowed_hosts` or the policy allows
private addresses. The connection then goes to the very address that was checked, so a second DNS answer cannot
slip another address in between (DNS rebinding). Redirects are followed by hand, at most `max_redirects`, and
every hop is checked the same way before it is connected to. The body is streamed and cut at `max_bytes`
(`errors.UrlTooLargeError`); one deadline covers the whole fetch, redirects and a slowly trickling body included,
and every other failure (no answer, a refused connection, a name that does not resolve, an HTTP error status)
is an `errors.UrlFetchFailedError`.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

from errors import ServiceError, UrlFetchFailedError, UrlNotAllowedError, UrlTooLargeError

__all__ = ["USER_AGENT", "FetchPolicy", "ImageFetcher", "Resolver", "address_refusal", "system_resolver"]

log = logging.getLogger(__name__)

USER_AGENT = "imgcap-url-fetch/1"
ALLOWED_SCHEMES = frozenset({"http", "https"})
DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_FETCH_THREADS = 8  # per fetch_many call
DNS_THREADS = 8  # look-ups run here so that the deadline also bounds a resolver that hangs

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known NAT64 prefix: the last 32 bits are an IPv4 address


@dataclass(frozen=True)
class FetchPolicy:
    """What the fetcher may fetch and how long it may take; the service builds one from its config.

    `allowed_hosts` (lower-case) are reached even on private or loopback addresses: a host name or IP literal
    (any port), `host:port` or `[v6]:port` (that port only), or a CIDR network (`10.0.0.0/8`) that allows any
    host whose addresses all lie in allowed networks or are public. `allow_private` skips the address check.
    """

    max_bytes: int
    allowed_hosts: frozenset[str] = frozenset()
    allow_private: bool = False
    connect_timeout: float = 5.0
    total_timeout: float = 15.0  # the whole fetch: look-ups, redirects and the body
    max_redirects: int = 3


def system_resolver(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (IPv4 and IPv6, in the resolver's order, without duplicates)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)))


def address_refusal(ip: IPAddress) -> str | None:
    """Why this server will not connect to `ip` (the kind of address, e.g. "loopback"), or None if it may."""
    if isinstance(ip, ipaddress.IPv6Address):
        # Addresses that carry an IPv4 address reach that address (through the kernel, a NAT64 or a 6to4
        # relay), so they are judged as that address: ::ffff:127.0.0.1 is loopback, not "global IPv6".
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return address_refusal(embedded)
    if ip.is_global and not ip.is_multicast:
        return None
    for kind in ("loopback", "link_local", "multicast", "unspecified", "private"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return "reserved"  # not global and none of the above: CGNAT (100.64/10), documentation, benchmarking, ...


@dataclass(frozen=True)
class _Target:
    """One hop's URL, checked: where it may be connected to and what to tell the server."""

    url: httpx.URL
    host: str  # as the URL gives it (IDNA-encoded, lower-case, no brackets)
    port: int
    addresses: tuple[str, ...]


class _Deadline:
    """The one deadline of a fetch."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.at


class _AllowList:
    """`FetchPolicy.allowed_hosts`, parsed once."""

    def __init__(self, entries: frozenset[str]) -> None:
        self.names: set[str] = set()
        self.name_ports: set[tuple[str, int]] = set()
        self.ips: set[IPAddress] = set()
        self.ip_ports: set[tuple[IPAddress, int]] = set()
        self.networks: list[IPNetwork] = []
        for raw in entries:
            entry = raw.strip().lower().rstrip(".")
            try:
                self._add(entry)
            except ValueError:
                raise ValueError(f"not a host, host:port, IP address or CIDR network: {raw!r}") from None

    def _add(self, entry: str) -> None:
        if "/" in entry:
            self.networks.append(ipaddress.ip_network(entry, strict=False))
        elif entry.startswith("["):  # [v6] or [v6]:port
            literal, _, rest = entry[1:].partition("]")
            ip = ipaddress.ip_address(literal)
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(entry)
                self.ip_ports.add((ip, _port(rest[1:])))
            else:
                self.ips.add(ip)
        elif _ip_or_none(entry) is not None:
            self.ips.add(ipaddress.ip_address(entry))
        elif entry.count(":") == 1:
            host, _, port = entry.partition(":")
            ip = _ip_or_none(host)
            if ip is not None:
                self.ip_ports.add((ip, _port(port)))
            elif host:
                self.name_ports.add((host, _port(port)))
            else:
                raise ValueError(entry)
        elif entry and ":" not in entry:
            self.names.add(entry)
        else:
            raise ValueError(entry)

    def host_allowed(self, host: str, port: int) -> bool:
        """Whether the URL's host (and port) is listed by name or as an IP literal."""
        ip = _ip_or_none(host)
        if ip is not None:
            return ip in self.ips or (ip, port) in self.ip_ports
        host = host.rstrip(".")
        return host in self.names or (host, port) in self.name_ports

    def network_allowed(self, ip: IPAddress) -> bool:
        """Whether a resolved address lies in one of the listed networks."""
        return any(ip.version == net.version and ip in net for net in self.networks)


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(text)
    return port


def _ip_or_none(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class ImageFetcher:
    """Fetches image URLs under a `FetchPolicy`; one per service, shared by every request thread.

    `resolver(host, port)` returns the host's addresses as strings (`system_resolver` when not given; tests
    inject their own). `fetch` raises `UrlNotAllowedError`, `UrlFetchFailedError` or `UrlTooLargeError`.
    """

    def __init__(self, policy: FetchPolicy, resolver: Resolver | None = None) -> None:
        self.policy = policy
        self._resolver: Resolver = resolver or system_resolver
        self._allowed = _AllowList(policy.allowed_hosts)
        self._dns = ThreadPoolExecutor(max_workers=DNS_THREADS, thread_name_prefix="urlfetch-dns")
        self._client = httpx.Client(
            follow_redirects=False,  # every hop is checked before it is connected to (fetch)
            # No proxies or .netrc from the environment: a proxy would resolve the host itself, behind our check.
            trust_env=False,
            # Still honour SSL_CERT_FILE / SSL_CERT_DIR for the CA bundle, as httpx does by default.
            verify=httpx.create_ssl_context(),
            # No connection is reused: a pooled connection is keyed by the pinned IP alone, so one made and
            # verified for a.example could otherwise carry a request for b.example on the same IP unverified.
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=0),
            # A jar that accepts nothing: no cookie from one fetch is sent with another.
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
            headers={"User-Agent": USER_AGENT, "Accept": "image/*",
                     # An encoded body would be decoded past max_bytes (a gzip bomb); we count what arrives.
                     "Accept-Encoding": "identity"},
        )

    def fetch(self, url: str) -> bytes:
        """The body of `url`, following at most `policy.max_redirects` redirects, each hop checked."""
        deadline = _Deadline(self.policy.total_timeout)
        current = first = self._parse(url)
        for hop in range(self.policy.max_redirects + 1):
            target = self._check(current, deadline)
            outcome = self._get(target, deadline)
            if isinstance(outcome, bytes):
                return outcome
            try:
                current = current.join(outcome)  # a relative Location is relative to the URL that sent it
            except httpx.InvalidURL:
                raise UrlFetchFailedError(f"{_where(target.host)} redirects to an invalid URL") from None
            log.debug("image URL %s redirects (hop %d)", target.host, hop + 1)
        raise UrlNotAllowedError(f"{_where(first.raw_host.decode('ascii'))}: too many redirects (more than "
                                 f"{self.policy.max_redirects})")

    def fetch_many(self, urls: Sequence[str]) -> list[bytes | ServiceError]:
        """Fetch `urls` concurrently; each item is that URL's body or its error, in the order given."""
        if not urls:
            return []

        def one(url: str) -> bytes | ServiceError:
            try:
                return self.fetch(url)
            except ServiceError as exc:
                return exc

        with ThreadPoolExecutor(max_workers=min(MAX_FETCH_THREADS, len(urls)),
                                thread_name_prefix="urlfetch") as pool:
            return list(pool.map(one, urls))

    def close(self) -> None:
        """Close the HTTP client and stop the look-up threads (a look-up still hanging is abandoned)."""
        self._client.close()
        self._dns.shutdown(wait=False, cancel_futures=True)

    # ----- one hop -------------------------------------------------------------------------------------------
    @staticmethod
    def _parse(url: str) -> httpx.URL:
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError):
            raise UrlNotAllowedError("the image URL is not a valid URL") from None
        if parsed.scheme not in ALLOWED_SCHEMES:
            scheme = f"{parsed.scheme}:" if parsed.scheme else "missing"
            raise UrlNotAllowedError(f"the image URL's scheme is {scheme}; only http and https URLs are fetched")
        host = parsed.raw_host.decode("ascii")
        if not host:
            raise UrlNotAllowedError("the image URL has no host")
        if parsed.userinfo:
            raise UrlNotAllowedError(f"the image URL for {host} carries a user name or password; "
                                     "such URLs are not fetched")
        return parsed

    def _check(self, url: httpx.URL, deadline: _Deadline) -> _Target:
        """Validate one hop's URL, resolve its host and check every address, before anything connects."""
        url = self._parse(str(url))  # a redirect's URL is checked like the first one
        host = url.raw_host.decode("ascii")
        port = url.port or DEFAULT_PORTS[url.scheme]
        addresses = self._resolve(host, port, deadline)
        verb = "is" if _ip_or_none(host) is not None else "resolves to"
        if not (self.policy.allow_private or self._allowed.host_allowed(host, port)):
            for address in addresses:
                ip = ipaddress.ip_address(address)
                refusal = address_refusal(ip)
                if refusal is not None and not self._allowed.network_allowed(ip):
                    log.info("refused the image URL host %s: resolves to %s (%s)", host, address, refusal)
                    # The address itself stays in the log: the client learns the kind, not the internal address.
                    raise UrlNotAllowedError(f"{_where(host)} {verb} a {refusal} address; this server does "
                                             "not fetch from those")
        return _Target(url=url, host=host, port=port, addresses=tuple(addresses))

    def _resolve(self, host: str, port: int, deadline: _Deadline) -> list[str]:
        literal = _ip_or_none(host)
        if literal is not None:
            return [str(literal)]
        future = self._dns.submit(self._resolver, host, port)
        try:
            found = future.result(timeout=deadline.remaining())
        except FutureTimeoutError:
            future.cancel()
            raise UrlFetchFailedError(f"{_where(host)}: the name did not resolve within "
                                      f"{deadline.seconds:g} s") from None
        except (OSError, UnicodeError):
            raise UrlFetchFailedError(f"{_where(host)}: the name does not resolve") from None
        addresses = []
        for address in found:
            ip = _ip_or_none(str(address).split("%", 1)[0])  # a scope (fe80::1%eth0) is not needed to judge it
            if ip is None:
                raise UrlFetchFailedError(f"{_where(host)}: the resolver returned an invalid address")
            addresses.append(str(ip))
        if not addresses:
            raise UrlFetchFailedError(f"{_where(host)}: the name does not resolve")
        return addresses

    def _get(self, target: _Target, deadline: _Deadline) -> bytes | str:
        """GET one checked hop: its body, or the Location it redirects to. Tries each address in turn."""
        for index, address in enumerate(target.addresses):
            last = index == len(target.addresses) - 1
            try:
                return self._get_from(target, address, deadline)
            except httpx.ConnectError as exc:
                if last or deadline.expired():
                    raise UrlFetchFailedError(f"{_where(target.host)}: could not connect ({_brief(exc)})") from None
            except httpx.TimeoutException:
                raise UrlFetchFailedError(f"{_where(target.host)}: no answer within {deadline.seconds:g} s") from None
            except httpx.TransportError as exc:
                if deadline.expired():
                    raise UrlFetchFailedError(f"{_where(target.host)}: the fetch took longer than "
                                              f"{deadline.seconds:g} s") from None
                raise UrlFetchFailedError(f"{_where(target.host)}: the connection failed ({_brief(exc)})") from None
        raise AssertionError("unreachable: a target has at least one address")

    def _get_from(self, target: _Target, address: str, deadline: _Deadline) -> bytes | str:
        # The pinned connection: the request URL names the checked address, so httpcore connects there and
        # never resolves the name again; the Host header keeps the original host (and port), and the
        # "sni_hostname" extension makes httpcore pass the original host to the TLS handshake as
        # server_hostname, which is both the SNI and the name the certificate is verified against
        # (check_hostname stays on in httpx's default context). An IP-literal URL verifies against its IP.
        pinned = target.url.copy_with(host=address)
        remaining = deadline.remaining()
        if remaining <= 0:
            raise UrlFetchFailedError(f"{_where(target.host)}: the fetch took longer than {deadline.seconds:g} s")
        timeout = httpx.Timeout(connect=min(self.policy.connect_timeout, remaining), read=remaining,
                                write=remaining, pool=remaining)
        with self._client.stream("GET", pinned, headers={"Host": target.url.netloc.decode("ascii")},
                                 extensions={"sni_hostname": target.host}, timeout=timeout) as response:
            status = response.status_code
            if status in REDIRECT_STATUSES:
                location = response.headers.get("location")
                if not location:
                    raise UrlFetchFailedError(f"{_where(target.host)} answered HTTP {status} without a Location")
                return location
            if not 200 <= status < 300:
                raise UrlFetchFailedError(f"{_where(target.host)} answered HTTP {status}")
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise UrlFetchFailedError(f"{_where(target.host)} sent an encoded body (Content-Encoding: "
                                          f"{encoding[:40]}) although asked for identity")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.policy.max_bytes:
                raise UrlTooLargeError(f"the image at {target.host} is larger than {self.policy.max_bytes} bytes "
                                       f"(Content-Length {declared})")
            return self._read_body(response, target, deadline)

    def _read_body(self, response: httpx.Response, target: _Target, deadline: _Deadline) -> bytes:
        # httpx's read timeout bounds each read, not their sum: a server that trickles a byte now and then, or
        # sends a little and then stalls, would outlast the deadline. So the clock is checked after every
        # chunk, and a timer shuts the socket down at the deadline to wake a read that is still waiting.
        watchdog = _Watchdog(response, deadline.remaining())
        body = bytearray()
        try:
            for chunk in response.iter_raw():
                body += chunk
                if len(body) > self.policy.max_bytes:
                    raise UrlTooLargeError(f"the image at {target.host} is larger than {self.policy.max_bytes} "
                                           "bytes (reading stopped there)")
                if deadline.expired():
                    break
        finally:
            watchdog.cancel()
        # A body without a length ends where the connection ends, and the watchdog's shutdown ends it too: a
        # body cut by the deadline must not pass for a whole one.
        if watchdog.fired or deadline.expired():
            raise UrlFetchFailedError(f"{_where(target.host)}: the fetch took longer than {deadline.seconds:g} s")
        return bytes(body)


class _Watchdog:
    """Shuts a response's socket down when the fetch's deadline passes, so that a waiting read returns."""

    def __init__(self, response: httpx.Response, seconds: float) -> None:
        self.fired = False
        stream = response.extensions.get("network_stream")
        self._sock = stream.get_extra_info("socket") if stream is not None else None
        self._timer: threading.Timer | None = None
        if isinstance(self._sock, socket.socket):  # httpcore exposes it; if a version did not, reads still end
            self._timer = threading.Timer(seconds, self._shut)
            self._timer.daemon = True
            self._timer.start()

    def _shut(self) -> None:
        self.fired = True
        try:
            # The plain socket's shutdown, also for a TLS socket: SSLSocket.shutdown would drop its TLS state
            # under the reading thread. A blocked recv then returns at once, and the read fails or ends.
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
        except OSError:
            pass  # already closed: the fetch has finished

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _where(host: str) -> str:
    return f"the image URL's host {host}"


def _brief(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
