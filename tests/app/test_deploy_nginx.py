"""The nginx example of docs/deploy.md, run for real (skipped where nginx is not installed).

The config block is taken from the doc as written (only certificates, listen ports and upstream
addresses are swapped for test ones) and put in front of two tiny backends that answer with their
name: a browser session (its route cookie) always reaches the same backend, different sessions are
spread over both, and ``/api/v1`` is balanced without any cookie.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import REPO, free_port

NGINX = shutil.which("nginx") or (Path("/usr/sbin/nginx") if Path("/usr/sbin/nginx").exists() else None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")


def _backend(name: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = name.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _config_from_doc(tmp_path: Path, backends: list[int], http_port: int, https_port: int) -> Path:
    doc = (REPO / "docs" / "deploy.md").read_text()
    conf = re.search(r"```nginx\n# /etc/nginx/conf.d/mmapp.conf\n(.*?)```", doc, re.S).group(1)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem"), "-days", "1", "-subj", "/CN=localhost"],
                   check=True, capture_output=True)
    conf = re.sub(r"ssl_certificate\s+\S+;", f"ssl_certificate {tmp_path / 'cert.pem'};", conf)
    conf = re.sub(r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {tmp_path / 'key.pem'};", conf)
    conf = conf.replace("listen 80;", f"listen 127.0.0.1:{http_port};")
    conf = re.sub(r"listen 443 ssl", f"listen 127.0.0.1:{https_port} ssl", conf)
    for address, port in zip(("10.0.0.11:7861", "10.0.0.12:7861"), backends):
        conf = conf.replace(address, f"127.0.0.1:{port}")
    assert "10.0.0." not in conf
    main = tmp_path / "nginx.conf"
    main.write_text(f"daemon off; pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log; worker_processes 1;\n"
                    f"events {{}}\nhttp {{ access_log off; client_body_temp_path {tmp_path}/body; "
                    f"proxy_temp_path {tmp_path}/proxy;\n{conf}\n}}\n")
    return main


def test_the_documented_nginx_config_keeps_sessions_sticky_and_balances_the_api(tmp_path):
    backends = [_backend("a"), _backend("b")]
    http_port, https_port = free_port(), free_port()
    conf = _config_from_doc(tmp_path, [b.server_address[1] for b in backends], http_port, https_port)
    subprocess.run([str(NGINX), "-t", "-c", str(conf)], check=True, capture_output=True)
    proxy = subprocess.Popen([str(NGINX), "-c", str(conf)], stderr=subprocess.PIPE)
    url = f"https://127.0.0.1:{https_port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                first = httpx.get(url + "/", verify=False, timeout=2)
                break
            except httpx.HTTPError:
                assert proxy.poll() is None and time.monotonic() < deadline, (tmp_path / "error.log").read_text()
                time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{http_port}/x", timeout=5).status_code == 301  # HTTP -> HTTPS
        cookie = first.cookies["mmapp_route"]
        assert "HttpOnly" in first.headers["set-cookie"] and "Secure" in first.headers["set-cookie"]
        with httpx.Client(verify=False, cookies={"mmapp_route": cookie}) as browser:  # one session: one backend
            assert {browser.get(url + "/").text for _ in range(20)} == {first.text}
        sessions = {httpx.get(url + "/", verify=False).text for _ in range(30)}  # new sessions: both backends
        assert sessions == {"a", "b"}
        api = {httpx.get(url + "/api/v1/health", verify=False).text for _ in range(10)}  # stateless: balanced
        assert api == {"a", "b"}
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)
        for backend in backends:
            backend.shutdown()
