"""Tests for urlfetch.py: fetching image URLs against local servers that the tests start on loopback.

Every outgoing connection goes through a guard (`connections`): it records the address and refuses anything
that is not a loopback IP literal, so a refused fetch is seen to connect nowhere, the pinned connection is seen
to go to the checked address, and no test can ever send a packet off this machine.
"""
from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import errors
import urlfetch
from urlfetch import FetchPolicy, ImageFetcher, address_refusal

pytestmark = pytest.mark.inprocess

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
FLOOD_BYTES = 10 * 1024 * 1024


class BlockedConnection(Exception):
    """The guard refused a connection (to an address that is not a loopback IP literal)."""


@pytest.fixture(autouse=True)
def connections(monkeypatch):
    """Every host httpcore connects to, in order; only loopback IP literals are let through."""
    attempts: list[str] = []
    real = socket.create_connection

    def guarded(address, *args, **kwargs):
        host = address[0]
        attempts.append(host)
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:  # a name: the connection was not pinned to a checked address
            raise BlockedConnection(f"connect to a name: {host}") from None
        if not loopback:
            raise BlockedConnection(f"connect to {host}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)
    return attempts


def ipv6_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


# ----- local servers ------------------------------------------------------------------------------------------
class Server:
    """A ThreadingHTTPServer on loopback that answers from `routes` (path -> handler function) and records
    every request it receives (path and headers)."""

    def __init__(self, routes, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.sent: list[int] = []  # bytes of body each flood route managed to write
        self.done = threading.Event()  # set when a flood route has stopped writing
        self.stopping = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                outer.requests.append((self.path, dict(self.headers)))
                route = routes.get(self.path)
                if route is None:
                    send(self, b"no such image", status=404)
                else:
                    route(self, outer)

            def log_message(self, *args) -> None:
                pass

        class HTTPServer(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # clients here hang up mid-answer on purpose (limits, deadlines, refused redirects)

        self.httpd = HTTPServer((host, 0), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.host = host
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def url(self, path: str = "/", host: str | None = None, scheme: str = "http") -> str:
        host = host or (f"[{self.host}]" if ":" in self.host else self.host)
        return f"{scheme}://{host}:{self.port}{path}"

    def close(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class SilentServer:
    """Accepts connections and never answers (until closed)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted.append(conn)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(2)
        for conn in self.accepted:
            conn.close()
        self.listener.close()


@pytest.fixture
def serve():
    """serve(routes, host=..., tls=...) -> a started Server, closed after the test."""
    started: list = []

    def start(routes, **kwargs) -> Server:
        server = Server(routes, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture
def silent():
    server = SilentServer()
    yield server
    server.close()


@pytest.fixture
def make_fetcher():
    """make_fetcher(resolver=..., **policy) -> an ImageFetcher, closed after the test."""
    made: list[ImageFetcher] = []

    def make(resolver=None, **policy) -> ImageFetcher:
        policy.setdefault("max_bytes", 100_000)
        if "allowed_hosts" in policy:
            policy["allowed_hosts"] = frozenset(policy["allowed_hosts"])
        fetcher = ImageFetcher(FetchPolicy(**policy), resolver=resolver)
        made.append(fetcher)
        return fetcher

    yield make
    for fetcher in made:
        fetcher.close()


def mapping_resolver(table: dict[str, list[str]], calls: list | None = None):
    """A resolver that answers from `table` and fails (like getaddrinfo) for any other name."""
    def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append((host, port))
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(table[host])
    return resolve


# ----- routes ---------------------------------------------------------------------------------------------------
def send(handler, data: bytes, status: int = 200, headers=()) -> None:
    handler.send_response(status)
    for name, value in headers:
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def body(data: bytes = PNG, status: int = 200, headers=()):
    return lambda handler, server: send(handler, data, status, headers)


def redirect(location: str, status: int = 302):
    return lambda handler, server: send(handler, b"", status, [("Location", location)])


def delayed(seconds: float, data: bytes = PNG):
    def route(handler, server) -> None:
        server.stopping.wait(seconds)
        send(handler, data)
    return route


def flood(chunked: bool):
    """Sends FLOOD_BYTES without a Content-Length (chunked, or until the connection closes), counting what the
    socket accepted before the client went away."""
    def route(handler, server) -> None:
        # A fixed send buffer (the kernel would grow it to megabytes), so that what the socket accepts is close
        # to what the client read.
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        if chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        else:
            handler.send_header("Connection", "close")
            handler.close_connection = True
        handler.end_headers()
        chunk, sent = b"\xab" * 65536, 0
        try:
            while sent < FLOOD_BYTES:
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                sent += len(chunk)
            if chunked:
                handler.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass
        finally:
            server.sent.append(sent)
            server.done.set()
    return route


def trickle(byte_every: float, count: int, then_stall: float = 0.0):
    """Headers promising 1000 bytes, then one byte every `byte_every` seconds, `count` times, then silence."""
    def route(handler, server) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        try:
            for _ in range(count):
                if server.stopping.wait(byte_every):
                    return
                handler.wfile.write(b"x")
                handler.wfile.flush()
            server.stopping.wait(then_stall)
        except OSError:
            pass
    return route


# ----- allowed hosts --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["127.0.0.1", "127.0.0.1:{port}", "127.0.0.0/8", "127.0.0.1/32"])
def test_allowed_loopback_host_fetches_the_bytes(serve, make_fetcher, connections, entry):
    server = serve({"/cat.png": body()})
    fetcher = make_fetcher(allowed_hosts={entry.format(port=server.port)})
    assert fetcher.fetch(server.url("/cat.png")) == PNG
    path, headers = server.requests[0]
    assert path == "/cat.png"
    assert headers["User-Agent"] == urlfetch.USER_AGENT
    assert headers["Accept"] == "image/*"
    assert headers["Accept-Encoding"] == "identity"
    assert connections == ["127.0.0.1"]


def test_host_port_entry_allows_that_port_only(serve, make_fetcher):
    server = serve({"/cat.png": body()})
    fetcher = make_fetcher(allowed_hosts={f"127.0.0.1:{server.port + 1 if server.port < 65535 else 1}"})
    with pytest.raises(errors.UrlNotAllowedError):
        fetcher.fetch(server.url("/cat.png"))
    assert server.requests == []


def test_named_allowed_host_connects_to_the_checked_address_with_its_own_host_header(serve, make_fetcher,
                                                                                      connections):
    server = serve({"/cat.png": body()})
    calls: list = []
    fetcher = make_fetcher(allowed_hosts={"images.test"},
                           resolver=mapping_resolver({"images.test": ["127.0.0.1"]}, calls))
    assert fetcher.fetch(server.url("/cat.png", host="images.test")) == PNG
    assert calls == [("images.test", server.port)]
    assert connections == ["127.0.0.1"]  # the checked address, not the name
    assert server.requests[0][1]["Host"] == f"images.test:{server.port}"


def test_named_host_port_entry(serve, make_fetcher):
    server = serve({"/cat.png": body()})
    fetcher = make_fetcher(allowed_hosts={f"images.test:{server.port}"},
                           resolver=mapping_resolver({"images.test": ["127.0.0.1"]}))
    assert fetcher.fetch(server.url("/cat.png", host="Images.TEST")) == PNG


def test_the_next_address_is_tried_when_one_refuses_the_connection(serve, make_fetcher, connections):
    server = serve({"/cat.png": body()})
    fetcher = make_fetcher(allowed_hosts={"images.test"},
                           resolver=mapping_resolver({"images.test": ["127.0.0.2", "127.0.0.1"]}))
    assert fetcher.fetch(server.url("/cat.png", host="images.test")) == PNG
    assert connections == ["127.0.0.2", "127.0.0.1"]


def test_allow_private_skips_the_address_check_but_not_the_scheme(serve, make_fetcher):
    server = serve({"/cat.png": body()})
    fetcher = make_fetcher(allow_private=True)
    assert fetcher.fetch(server.url("/cat.png")) == PNG
    with pytest.raises(errors.UrlNotAllowedError):
        fetcher.fetch(f"ftp://127.0.0.1:{server.port}/cat.png")


@pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback here")
def test_allowed_ipv6_loopback_literal(serve, make_fetcher, connections):
    server = serve({"/cat.png": body()}, host="::1")
    fetcher = make_fetcher(allowed_hosts={"::1"})
    assert fetcher.fetch(server.url("/cat.png")) == PNG
    assert connections == ["::1"]
    assert server.requests[0][1]["Host"] == f"[::1]:{server.port}"


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "host:port", "a:b:c", "[::1]x", "", "host:0"])
def test_a_malformed_allowed_host_entry_is_refused_at_construction(entry):
    with pytest.raises(ValueError, match="not a host"):
        ImageFetcher(FetchPolicy(max_bytes=1, allowed_hosts=frozenset({entry})))


# ----- refused addresses ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", [
    "127.0.0.1", "127.1.2.3", "[::1]", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "224.0.0.1", "255.255.255.255", "[::ffff:127.0.0.1]", "[::ffff:169.254.169.254]", "[fc00::1]",
    "[fe80::1]", "[ff02::1]", "[::]", "[64:ff9b::7f00:1]", "[2002:a00:1::]", "[2001:db8::1]"])
def test_non_public_addresses_are_refused_before_connecting(make_fetcher, connections, host):
    fetcher = make_fetcher()
    with pytest.raises(errors.UrlNotAllowedError) as caught:
        fetcher.fetch(f"http://{host}/cat.png")
    assert host.strip("[]") in caught.value.message
    assert connections == []


def test_loopback_without_allow_list_reaches_no_server(serve, make_fetcher, connections):
    server = serve({"/cat.png": body()})
    with pytest.raises(errors.UrlNotAllowedError, match="loopback"):
        make_fetcher().fetch(server.url("/cat.png"))
    assert server.requests == [] and connections == []


@pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback here (the refusal itself is tested above)")
def test_ipv6_loopback_without_allow_list_reaches_no_server(serve, make_fetcher, connections):
    server = serve({"/cat.png": body()}, host="::1")
    with pytest.raises(errors.UrlNotAllowedError, match="loopback"):
        make_fetcher().fetch(server.url("/cat.png"))
    assert server.requests == [] and connections == []


def test_a_name_resolving_to_loopback_is_refused(make_fetcher, connections):
    with pytest.raises(errors.UrlNotAllowedError, match="localhost resolves to a loopback address"):
        make_fetcher().fetch("http://localhost/cat.png")  # the system resolver
    assert connections == []


def test_one_private_address_among_public_ones_is_enough_to_refuse(make_fetcher, connections):
    fetcher = make_fetcher(resolver=mapping_resolver({"public.example": ["93.184.216.34", "10.1.2.3"]}))
    with pytest.raises(errors.UrlNotAllowedError, match="private"):
        fetcher.fetch("https://public.example/cat.png")
    assert connections == []


def test_a_public_address_passes_the_check_and_is_the_one_connected_to(make_fetcher, connections):
    # The guard stops the connection before any packet leaves; what matters is where it was going.
    fetcher = make_fetcher(resolver=mapping_resolver({"public.example": ["93.184.216.34"]}))
    with pytest.raises(BlockedConnection):
        fetcher.fetch("https://public.example/cat.png")
    assert connections == ["93.184.216.34"]


def test_cidr_entry_allows_addresses_inside_it_only(serve, make_fetcher, connections):
    server = serve({"/cat.png": body()})
    fetcher = make_fetcher(allowed_hosts={"127.0.0.0/8"},
                           resolver=mapping_resolver({"inside.test": ["127.0.0.1"],
                                                      "mixed.test": ["127.0.0.1", "10.0.0.1"]}))
    assert fetcher.fetch(server.url("/cat.png", host="inside.test")) == PNG
    with pytest.raises(errors.UrlNotAllowedError):
        fetcher.fetch(server.url("/cat.png", host="mixed.test"))
    assert len(server.requests) == 1 and connections == ["127.0.0.1"]


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/cat.png", "file:///etc/passwd", "gopher://127.0.0.1:70/",
                                 "data:image/png;base64,AAAA", "javascript:alert(1)", "//127.0.0.1/cat.png",
                                 "cat.png", "http:///cat.png", "https://", "http://[::1/"])
def test_other_schemes_and_malformed_urls_are_refused(make_fetcher, connections, url):
    with pytest.raises(errors.UrlNotAllowedError):
        make_fetcher(allow_private=True).fetch(url)
    assert connections == []


def test_userinfo_is_refused(serve, make_fetcher, connections):
    server = serve({"/cat.png": body()})
    fetcher = make_fetcher(allowed_hosts={"127.0.0.1"})
    for url in (f"http://user:pw@127.0.0.1:{server.port}/cat.png", f"http://user@127.0.0.1:{server.port}/cat.png"):
        with pytest.raises(errors.UrlNotAllowedError, match="user name or password"):
            fetcher.fetch(url)
    assert server.requests == [] and connections == []


@pytest.mark.parametrize("address, kind", [
    ("93.184.216.34", None), ("2606:2800:220:1:248:1893:25c8:1946", None), ("127.0.0.1", "loopback"),
    ("::1", "loopback"), ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("239.1.2.3", "multicast"),
    ("0.0.0.0", "unspecified"), ("192.168.0.1", "private"), ("fd00::1", "private"), ("100.64.0.1", "reserved"),
    ("::ffff:10.0.0.1", "private"), ("::ffff:8.8.8.8", None), ("64:ff9b::a9fe:a9fe", "link-local"),
    ("64:ff9b::808:808", None), ("2002:c0a8:1::", "private")])
def test_address_refusal(address, kind):
    assert address_refusal(ipaddress.ip_address(address)) == kind


# ----- redirects ------------------------------------------------------------------------------------------------
def test_a_redirect_to_loopback_is_refused_and_never_reaches_its_target(serve, make_fetcher, connections):
    target = serve({"/x": body()})
    redirector = serve({"/start": redirect(target.url("/x"))})
    fetcher = make_fetcher(allowed_hosts={"redirector.test"},
                           resolver=mapping_resolver({"redirector.test": ["127.0.0.1"]}))
    with pytest.raises(errors.UrlNotAllowedError, match="127.0.0.1 is a loopback address"):
        fetcher.fetch(redirector.url("/start", host="redirector.test"))
    assert len(redirector.requests) == 1
    assert target.requests == []
    assert connections == ["127.0.0.1"]  # the redirector only


@pytest.mark.parametrize("location", ["ftp://redirector.test/x", "file:///etc/passwd",
                                      "http://user:pw@redirector.test/x", "http://10.0.0.1/x"])
def test_a_redirect_to_a_refused_url_is_refused(serve, make_fetcher, connections, location):
    redirector = serve({"/start": redirect(location)})
    fetcher = make_fetcher(allowed_hosts={"redirector.test"},
                           resolver=mapping_resolver({"redirector.test": ["127.0.0.1"]}))
    with pytest.raises(errors.UrlNotAllowedError):
        fetcher.fetch(redirector.url("/start", host="redirector.test"))
    assert connections == ["127.0.0.1"]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_relative_redirects_are_followed(serve, make_fetcher, status):
    server = serve({"/a/start": redirect("../final", status), "/final": body()})
    fetcher = make_fetcher(allowed_hosts={"127.0.0.1"})
    assert fetcher.fetch(server.url("/a/start")) == PNG
    assert [path for path, _ in server.requests] == ["/a/start", "/final"]


def chain(length: int) -> dict:
    routes = {f"/{hop}": redirect(f"/{hop + 1}") for hop in range(length)}
    routes[f"/{length}"] = body()
    return routes


def test_max_redirects_are_followed(serve, make_fetcher):
    server = serve(chain(3))
    assert make_fetcher(allowed_hosts={"127.0.0.1"}).fetch(server.url("/0")) == PNG
    assert len(server.requests) == 4


def test_one_redirect_too_many_is_refused(serve, make_fetcher):
    server = serve(chain(4))
    with pytest.raises(errors.UrlNotAllowedError, match="too many redirects"):
        make_fetcher(allowed_hosts={"127.0.0.1"}).fetch(server.url("/0"))
    assert [path for path, _ in server.requests] == ["/0", "/1", "/2", "/3"]  # "/4" is never asked for


def test_a_redirect_without_location_fails(serve, make_fetcher):
    server = serve({"/start": body(b"", status=302)})
    with pytest.raises(errors.UrlFetchFailedError, match="302"):
        make_fetcher(allowed_hosts={"127.0.0.1"}).fetch(server.url("/start"))


# ----- failures and timeouts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [404, 403, 500, 503])
def test_http_error_status_fails(serve, make_fetcher, status):
    server = serve({"/cat.png": body(b"<html>nope</html>", status=status)})
    with pytest.raises(errors.UrlFetchFailedError, match=str(status)) as caught:
        make_fetcher(allowed_hosts={"127.0.0.1"}).fetch(server.url("/cat.png"))
    assert "nope" not in caught.value.message


def test_missing_path_is_a_404(serve, make_fetcher):
    server = serve({})
    with pytest.raises(errors.UrlFetchFailedError, match="404"):
        make_fetcher(allowed_hosts={"127.0.0.1"}).fetch(server.url("/missing.png"))


def test_connection_refused_fails(make_fetcher):
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    with pytest.raises(errors.UrlFetchFailedError, match="could not connect"):
        make_fetcher(allowed_hosts={"127.0.0.1"}).fetch(f"http://127.0.0.1:{port}/cat.png")


def test_a_name_that_does_not_resolve_is_a_fetch_failure(make_fetcher, connections):
    fetcher = make_fetcher(resolver=mapping_resolver({}))
    with pytest.raises(errors.UrlFetchFailedError, match="does not resolve"):
        fetcher.fetch("https://nowhere.invalid/cat.png")
    assert connections == []


def test_a_hanging_resolver_is_bounded_by_the_deadline(make_fetcher):
    release = threading.Event()

    def hanging(host, port):
        release.wait(5)
        return ["93.184.216.34"]

    fetcher = make_fetcher(resolver=hanging, total_timeout=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(errors.UrlFetchFailedError, match="did not resolve"):
            fetcher.fetch("https://slow-dns.example/cat.png")
    finally:
        release.set()
    assert time.monotonic() - started < 2


def test_a_server_that_never_answers_times_out(silent, make_fetcher):
    fetcher = make_fetcher(allowed_hosts={"127.0.0.1"}, total_timeout=1.5)
    started = time.monotonic()
    with pytest.raises(errors.UrlFetchFailedError):
        fetcher.fetch(f"http://127.0.0.1:{silent.port}/cat.png")
    assert 1.0 < time.monotonic() - started < 4
    assert len(silent.accepted) == 1


def test_a_trickling_body_is_cut_at_the_deadline(serve, make_fetcher):
    server = serve({"/slow.png": trickle(0.2, count=100)})
    fetcher = make_fetcher(allowed_hosts={"127.0.0.1"}, total_timeout=1.5)
    started = time.monotonic()
    with pytest.raises(errors.UrlFetchFailedError, match="longer than"):
        fetcher.fetch(server.url("/slow.png"))
    assert time.monotonic() - started < 2.5


def test_a_body_that_stalls_late_is_cut_at_the_deadline(serve, make_fetcher):
    # Five bytes in the first second, then silence: each read is within httpx's read timeout, but the fetch must
    # still end at the deadline (1.5 s), not a whole read timeout after the last byte (about 2.5 s).
    server = serve({"/stall.png": trickle(0.2, count=5, then_stall=10)})
    fetcher = make_fetcher(allowed_hosts={"127.0.0.1"}, total_timeout=1.5)
    started = time.monotonic()
    with pytest.raises(errors.UrlFetchFailedError, match="longer than"):
        fetcher.fetch(server.url("/stall.png"))
    assert time.monotonic() - started < 2.2


def test_the_deadline_covers_redirects_too(serve, make_fetcher):
    routes = {f"/{hop}": (lambda h, s, hop=hop: (s.stopping.wait(0.6), redirect(f"/{hop + 1}")(h, s)))
              for hop in range(3)}
    routes["/3"] = body()
    server = serve(routes)
    fetcher = make_fetcher(allowed_hosts={"127.0.0.1"}, total_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(errors.UrlFetchFailedError):
        fetcher.fetch(server.url("/0"))
    assert time.monotonic() - started < 2


# ----- size -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "close-delimited"])
def test_an_oversized_body_without_length_is_cut_at_the_limit(serve, make_fetcher, chunked):
    server = serve({"/big.png": flood(chunked)})
    fetcher = make_fetcher(allowed_hosts={"127.0.0.1"}, max_bytes=100_000)
    with pytest.raises(errors.UrlTooLargeError, match="100000 bytes"):
        fetcher.fetch(server.url("/big.png"))
    assert server.done.wait(10), "the server never noticed that the client went away"
    # What the server could write is what the client read (up to the limit and one chunk) plus the kernel's
    # socket buffers (a few hundred KB here); nowhere near the 10 MB it had to send.
    assert server.sent[0] < 2 * 1024 * 1024


def test_a_content_length_over_the_limit_is_refused_before_the_body(serve, make_fetcher):
    server = serve({"/big.png": body(b"\0" * 200_001)})
    with pytest.raises(errors.UrlTooLargeError, match="Content-Length 200001"):
        make_fetcher(allowed_hosts={"127.0.0.1"}, max_bytes=200_000).fetch(server.url("/big.png"))


def test_a_body_of_exactly_the_limit_is_fetched(serve, make_fetcher):
    data = bytes(range(256)) * 100
    server = serve({"/exact.png": body(data), "/over.png": body(data + b"!")})
    fetcher = make_fetcher(allowed_hosts={"127.0.0.1"}, max_bytes=len(data))
    assert fetcher.fetch(server.url("/exact.png")) == data
    with pytest.raises(errors.UrlTooLargeError):
        fetcher.fetch(server.url("/over.png"))


def test_an_encoded_body_is_refused(serve, make_fetcher):
    server = serve({"/cat.png": body(b"\x1f\x8b\x08\x00", headers=[("Content-Encoding", "gzip")])})
    with pytest.raises(errors.UrlFetchFailedError, match="Content-Encoding: gzip"):
        make_fetcher(allowed_hosts={"127.0.0.1"}).fetch(server.url("/cat.png"))


# ----- cookies, concurrency, TLS --------------------------------------------------------------------------------
def test_no_cookie_is_kept_between_fetches(serve, make_fetcher):
    server = serve({"/cat.png": body(headers=[("Set-Cookie", "session=secret; Path=/")])})
    fetcher = make_fetcher(allowed_hosts={"127.0.0.1"})
    fetcher.fetch(server.url("/cat.png"))
    fetcher.fetch(server.url("/cat.png"))
    assert all("Cookie" not in headers for _, headers in server.requests)


def test_fetch_many_keeps_the_order_and_returns_errors_in_place(serve, make_fetcher):
    server = serve({"/a.png": body(b"a"), "/b.png": body(b"b"), "/teapot": body(b"", status=418)})
    fetcher = make_fetcher(allowed_hosts={"127.0.0.1"})
    results = fetcher.fetch_many([server.url("/a.png"), "ftp://127.0.0.1/x", server.url("/teapot"),
                                  "http://10.0.0.1/x", server.url("/b.png")])
    assert results[0] == b"a" and results[4] == b"b"
    assert isinstance(results[1], errors.UrlNotAllowedError)
    assert isinstance(results[2], errors.UrlFetchFailedError)
    assert isinstance(results[3], errors.UrlNotAllowedError)
    assert fetcher.fetch_many([]) == []


def test_fetch_many_runs_concurrently(serve, make_fetcher):
    server = serve({f"/{name}.png": delayed(1.0, name.encode()) for name in "xyz"})
    fetcher = make_fetcher(allowed_hosts={"127.0.0.1"})
    started = time.monotonic()
    results = fetcher.fetch_many([server.url(f"/{name}.png") for name in "xyz"])
    assert results == [b"x", b"y", b"z"]
    assert time.monotonic() - started < 2.5


def test_one_fetcher_is_shared_by_threads(serve, make_fetcher):
    server = serve({f"/{n}.png": body(str(n).encode() * 1000) for n in range(16)})
    fetcher = make_fetcher(allowed_hosts={"127.0.0.1"})
    results: dict[int, bytes] = {}

    def worker(n: int) -> None:
        for _ in range(3):
            results[n] = fetcher.fetch(server.url(f"/{n}.png"))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert results == {n: str(n).encode() * 1000 for n in range(16)}


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for images.test only (no IP address in it), as (cert, key) paths."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=images.test",
                    "-addext", "subjectAltName=DNS:images.test"], check=True, capture_output=True, timeout=30)
    return cert, key


def test_tls_verifies_the_original_host_name_over_the_pinned_address(serve, make_fetcher, monkeypatch,
                                                                      certificate, connections):
    cert, key = certificate
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    names: list = []
    server_context.sni_callback = lambda sock, name, context: names.append(name)
    server = serve({"/cat.png": body()}, tls=server_context)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust our certificate (read when the fetcher is made)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    fetcher = make_fetcher(allowed_hosts={"images.test", "other.test"},
                           resolver=mapping_resolver({"images.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}))

    assert fetcher.fetch(server.url("/cat.png", host="images.test", scheme="https")) == PNG
    assert names == ["images.test"]  # the SNI is the URL's host, though the connection went to 127.0.0.1
    assert server.requests[0][1]["Host"] == f"images.test:{server.port}"

    # Same address, same certificate, another name: verification is against the name, so it fails.
    with pytest.raises(errors.UrlFetchFailedError, match="(?i)certificate"):
        fetcher.fetch(server.url("/cat.png", host="other.test", scheme="https"))
    assert len(server.requests) == 1
    assert connections == ["127.0.0.1", "127.0.0.1"]
