"""The Prometheus /metrics HTTP endpoint, bound apart from gRPC, optionally behind TLS (mutual
TLS with a client CA) and a bearer token.

prometheus_client's own ``start_http_server`` offers TLS but no token check, so this wraps
its WSGI app with one (Prometheus sends ``Authorization: Bearer <token>`` from a scrape
config's ``authorization`` section) and serves it the way ``start_http_server`` does: a
threading WSGI server on a daemon thread.
"""
from __future__ import annotations

import logging
import ssl
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from catcascade.serving.front_door.authentication import TokenSet

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class _QuietHandler(WSGIRequestHandler):
    timeout = 10.0  # a client that stalls (in the TLS handshake too) loses its connection, not a thread forever

    def setup(self):
        if isinstance(self.request, ssl.SSLSocket):  # handshake here, on this connection's thread,
            self.request.settimeout(self.timeout)    # not in the accept loop every scrape goes through
            self.request.do_handshake()
        super().setup()

    def log_message(self, format, *args):  # noqa: A002 - wsgiref's signature
        """No access log line per scrape."""


def _require_token(app, tokens: TokenSet):
    def guarded(environ, start_response):
        if tokens.accepts(environ.get("HTTP_AUTHORIZATION")):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                            ("WWW-Authenticate", 'Bearer realm="metrics"')])
        return [b"missing or invalid bearer token\n"]

    return guarded


def tls_context(cert_file, key_file, client_ca_file=None) -> ssl.SSLContext:
    """Server-side TLS 1.2+; with a client CA, clients must present a certificate it signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    if client_ca_file is not None:
        ctx.load_verify_locations(str(client_ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def start_metrics_server(registry: CollectorRegistry, port: int, host: str = "127.0.0.1", tls=None,
                         tokens: list[str] | None = None) -> tuple[ThreadingWSGIServer, threading.Thread]:
    """Serves ``registry`` on ``host:port`` (0 picks a port; ``server.server_port`` says which).
    ``tls`` is a serving.config.TlsConfig (or anything with cert_file, key_file,
    client_ca_file); ``tokens`` turns on the bearer check. Stop with ``server.shutdown()``."""
    app = make_wsgi_app(registry)
    if tokens:
        app = _require_token(app, TokenSet(tokens))
    if host not in LOOPBACK and tls is None and not tokens:
        log.warning("Prometheus metrics on %s:%s are plain HTTP without a token: anyone who can reach the "
                    "address reads them (set metrics_tls and/or metrics_auth)", host, port)

    class Server(ThreadingWSGIServer):
        def handle_error(self, request, client_address):  # failed handshakes, resets: not worth a traceback
            log.debug("metrics request from %s failed", client_address, exc_info=True)

    if ":" in host:
        import socket

        Server.address_family = socket.AF_INET6
    httpd = make_server(host, port, app, Server, handler_class=_QuietHandler)
    if tls is not None:
        ctx = tls_context(tls.cert_file, tls.key_file, tls.client_ca_file)
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return httpd, thread
