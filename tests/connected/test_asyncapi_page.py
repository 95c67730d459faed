"""The AsyncAPI page renders in a real browser with no network but the worker's: headless Chromium, every
host but 127.0.0.1 unresolvable, shows every command channel, and the page loads nothing from elsewhere.

The worker runs on a private RabbitMQ vhost and a private redis-server: it consumes nothing of the
shared queues and streams other tests use.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx2
import pytest

from streams.flows.catalog import FLOWS
from tests.conftest import require
from tests.connected.conftest import RABBIT_URL, Worker, start_worker, wait_ready_sync
from tests.connected.redisserver import RedisServer

PAGE = "/docs/asyncapi"
RENDER_TIMEOUT = 60.0
# Attributes through which an element makes the browser load (or point at) a URL.
URL_ATTRIBUTES = ("src", "href", "srcset", "poster", "data", "action", "xlink:href")
# The component links a message's content type to IANA's registry: a hyperlink the reader may follow,
# not something the page loads (the request log below proves nothing is fetched from there).
HYPERLINK_HOSTS = {"www.iana.org"}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def chromium_binary() -> str:
    """Debian's chromium; skips without it, except in CI, where it must be installed (.ci/run does)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if in_ci():
            pytest.fail("chromium is not installed (.ci/run installs Debian's package)")
        pytest.skip("chromium is not installed: apt-get install --no-install-recommends chromium")
    return found


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def private_brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A RabbitMQ vhost of its own on the local server and a redis-server of its own, removed afterwards."""
    require("rabbitmq")
    if shutil.which("rabbitmqctl") is None or shutil.which("redis-server") is None:
        message = "rabbitmqctl and redis-server are needed for a private vhost and Redis"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    vhost = f"asyncapi-page-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    redis = RedisServer()
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        redis.start()
        yield {"PIPELINE_RABBIT_URL": RABBIT_URL.rstrip("/") + "/" + vhost, "PIPELINE_REDIS_URL": redis.url}
    finally:
        redis.stop()
        shutil.rmtree(redis.dir, ignore_errors=True)
        rabbitmqctl("delete_vhost", vhost)


@pytest.fixture(scope="module")
def page_worker(private_brokers: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """`faststream run streams.app:app` on the private brokers, ready."""
    worker = start_worker(tmp_path_factory.mktemp("asyncapi-page"), private_brokers, name="asyncapi-page")
    try:
        wait_ready_sync(worker)
        yield worker
    finally:
        worker.stop()


def _above_stdio(fd: int) -> int:
    """The same pipe end on a descriptor of 10 or more, so moving it to 3 or 4 cannot clobber another."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Chromium:
    """Headless Chromium driven through the DevTools protocol on --remote-debugging-pipe: NUL-separated
    JSON, commands in on descriptor 3, answers and events out on descriptor 4."""

    def __init__(self, binary: str, profile: Path, log: Path, netlog: Path) -> None:
        to_chrome, self.writer = (_above_stdio(fd) for fd in os.pipe())
        self.reader, from_chrome = (_above_stdio(fd) for fd in os.pipe())
        args = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            # Every name but 127.0.0.1 fails to resolve: the worker is the only network there is.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            f"--user-data-dir={profile}",
            # Every URL request the browser makes, its own (the page's icon) as well as the page's.
            f"--log-net-log={netlog}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        # bash puts the pipe ends on 3 and 4 (sh takes single-digit descriptors only).
        script = f'exec "$0" "$@" 3<&{to_chrome} 4>&{from_chrome} {to_chrome}<&- {from_chrome}>&-'
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                ["bash", "-c", script, *args],
                pass_fds=(to_chrome, from_chrome),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        os.close(to_chrome)
        os.close(from_chrome)
        self.buffer = b""
        self.last_id = 0
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        os.close(self.writer)  # the browser exits when its command pipe closes
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        os.close(self.reader)

    def _message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no answer from chromium")
            if select.select([self.reader], [], [], remaining)[0]:
                chunk = os.read(self.reader, 1 << 16)
                if not chunk:
                    raise EOFError(f"chromium exited ({self.proc.poll()})")
                self.buffer += chunk
        raw, _, self.buffer = self.buffer.partition(b"\0")
        message: dict[str, Any] = json.loads(raw)
        return message

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        """Send one command and return its result; events that arrive meanwhile are kept in `events`."""
        self.last_id += 1
        command: dict[str, Any] = {"id": self.last_id, "method": method, "params": params or {}}
        if session is not None:
            command["sessionId"] = session
        data = json.dumps(command).encode() + b"\0"
        while data:
            data = data[os.write(self.writer, data) :]
        deadline = time.monotonic() + 30
        while True:
            message = self._message(deadline)
            if message.get("id") != self.last_id:
                self.events.append(message)
                continue
            if "error" in message:
                raise AssertionError(f"{method}: {message['error']}")
            return message["result"]

    def session_events(self, session: str, method: str) -> list[dict[str, Any]]:
        return [e["params"] for e in self.events if e.get("sessionId") == session and e.get("method") == method]


def netlog_requests(path: Path) -> list[tuple[str, str]]:
    """(network isolation key, URL) of every URL request in a Chromium net log written at exit."""
    log = json.loads(path.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [
        (str(event["params"].get("network_isolation_key", "")), str(event["params"]["url"]))
        for event in log["events"]
        if event["type"] == start_job and "url" in event.get("params", {})
    ]


# What the page shows: each operation's heading (action and channel address) and text, every URL an
# element names, and the icons it links.
SNAPSHOT = """(() => {
  const operations = {};
  for (const el of document.querySelectorAll('li[id^="operation-"]')) {
    const heading = el.querySelector('h3');
    operations[el.id] = {heading: heading ? heading.textContent : '', text: el.textContent};
  }
  const urls = [];
  for (const el of document.querySelectorAll('*')) {
    for (const name of %s) {
      const value = el.getAttribute(name);
      if (value) urls.push([el.tagName.toLowerCase(), name, value]);
    }
    const style = el.getAttribute('style');
    if (style && style.includes('url(')) urls.push([el.tagName.toLowerCase(), 'style', style]);
  }
  const icons = [...document.querySelectorAll('link[rel~="icon"]')].map((link) => link.getAttribute('href'));
  return {operations, urls, icons};
})()""" % json.dumps(URL_ATTRIBUTES)  # noqa: UP031 - the JavaScript's braces stay readable


def command_operations(document: dict[str, Any]) -> dict[tuple[str, str], list[tuple[str, str, list[str]]]]:
    """Every flow's command queue (amqp) and stream (redis): its receive operations as (id, address, servers)."""
    expected: dict[tuple[str, str], list[tuple[str, str, list[str]]]] = {}
    for flow in FLOWS:
        for protocol, address in (("amqp", flow.queue), ("redis", flow.stream)):
            found = expected.setdefault((protocol, address), [])
            for op_id, operation in document["operations"].items():
                channel = document["channels"][operation["channel"]["$ref"].rsplit("/", 1)[-1]]
                if operation["action"] == "receive" and channel.get("address") == address:
                    servers = [ref["$ref"].rsplit("/", 1)[-1] for ref in channel.get("servers", [])]
                    if any(document["servers"][s]["protocol"] == protocol for s in servers):
                        found.append((op_id, flow.command.__name__, servers))
    return expected


def test_page_renders_every_command_channel_offline(page_worker: Worker, tmp_path: Path) -> None:
    """In headless Chromium that can reach only the worker, the page renders every command queue and stream,
    names no other host in what it loads, and requests nothing but the worker's own URLs."""
    binary = chromium_binary()
    base = page_worker.base_url
    origin = urlsplit(base).netloc
    served = httpx2.get(base + PAGE, timeout=10)
    assert served.status_code == 200, served.text[:2000]
    document = httpx2.get(base + PAGE + ".json", timeout=10).json()
    expected = command_operations(document)
    assert all(expected.values()), f"command channels missing from the document: {expected}"

    netlog = tmp_path / "netlog.json"
    browser = Chromium(binary, tmp_path / "profile", tmp_path / "chromium.log", netlog)
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Network", "Runtime", "Page"):
            browser.call(f"{domain}.enable", session=session)
        browser.call("Page.navigate", {"url": base + PAGE}, session=session)

        # Rendered (every command operation shown), loaded (the load event fired) and settled (every
        # request the page made has finished or failed), so the request log below is complete.
        wanted = {f"operation-receive-{op_id}" for ops in expected.values() for op_id, _, _ in ops}
        deadline = time.monotonic() + RENDER_TIMEOUT
        while True:
            snapshot = browser.call(
                "Runtime.evaluate", {"expression": SNAPSHOT, "returnByValue": True}, session=session
            )["result"]["value"]
            missing = wanted - set(snapshot["operations"])
            loaded = bool(browser.session_events(session, "Page.loadEventFired"))
            pending = {e["requestId"] for e in browser.session_events(session, "Network.requestWillBeSent")} - {
                e["requestId"]
                for method in ("Network.loadingFinished", "Network.loadingFailed")
                for e in browser.session_events(session, method)
            }
            if not missing and loaded and not pending:
                break
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not rendered within {RENDER_TIMEOUT}s: missing {sorted(missing)}, loaded {loaded}, "
                    f"pending {pending}; exceptions: {browser.session_events(session, 'Runtime.exceptionThrown')}"
                )
            time.sleep(0.2)
        requests = [e["request"]["url"] for e in browser.session_events(session, "Network.requestWillBeSent")]
        failed = browser.session_events(session, "Network.loadingFailed")
        exceptions = browser.session_events(session, "Runtime.exceptionThrown")
    finally:
        browser.close()

    # Every command queue and stream, on the server of its broker, with its command.
    for (protocol, address), operations in expected.items():
        for op_id, command, servers in operations:
            shown = snapshot["operations"][f"operation-receive-{op_id}"]
            assert shown["heading"].split() == ["RECEIVE", address], (protocol, address, shown["heading"])
            assert command in shown["text"], (op_id, command)
            assert all(server in shown["text"] for server in servers), (op_id, servers)

    # Nothing the page loads or names lives on another host (hyperlinks to documentation aside).
    assert "http://" not in served.text.replace(base, "")
    assert "https://" not in served.text
    elsewhere = []
    for tag, attribute, value in snapshot["urls"]:
        url = urlsplit(urljoin(base + PAGE, value))
        if url.scheme in ("http", "https") and url.netloc != origin:
            if tag == "a" and attribute == "href" and url.hostname in HYPERLINK_HOSTS:
                continue
            elsewhere.append((tag, attribute, value))
    assert not elsewhere, elsewhere

    # The page asked the worker for itself, its script and stylesheet, and nobody else for anything; so
    # did the browser for the page (an icon, were it fetched by then), by the net log of all it requested
    # for the worker's site (its own background requests, under other keys, found no host anyway).
    def foreign(urls: list[str]) -> list[str]:
        return [url for url in urls if urlsplit(url).scheme in ("http", "https") and urlsplit(url).netloc != origin]

    assert not foreign(requests), requests
    for asset in ("index.js", "default.min.css"):
        assert f"{base}{PAGE}/assets/{asset}" in requests, asset
    assert not failed, failed
    site = f"http://{urlsplit(base).hostname}"
    for_page = [url for key, url in netlog_requests(netlog) if key.split(" ")[0] == site]
    assert not foreign(for_page), for_page
    assert f"{base}{PAGE}" in for_page, for_page
    # The only icon named is the worker's own.
    assert [urljoin(base + PAGE, icon) for icon in snapshot["icons"]] == [f"{base}{PAGE}/assets/icon.svg"]
    assert not exceptions, exceptions

    # The component's licence and the bundle's notices are served beside it.
    licence = httpx2.get(f"{base}{PAGE}/assets/LICENSE", timeout=10)
    assert licence.status_code == 200
    assert "Apache License" in licence.text
    assert httpx2.get(f"{base}{PAGE}/assets/index.js.LICENSE.txt", timeout=10).status_code == 200
