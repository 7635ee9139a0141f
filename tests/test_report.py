"""The visual report: self-contained, XSS-safe, and rendered for real by headless Chromium.

The browser tests drive Debian's `chromium` over the DevTools protocol (a small client on the
`websockets` package that Prefect already brings): they wait until every plot reports it rendered,
collect every exception, console error and network request, use the search box, and take a screenshot.
"""

import base64
import json
import re
import shlex
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from curation.report import ReportConfig, report_html, write_report

FIGURES = 6
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                                              "(apt-get install -y chromium)")
XSS = '</script><img src=x onerror="window.__xss=1"><script>window.__xss=2</script>&amp;'


class _Tags(HTMLParser):
    """Every tag with its attributes (script bodies are not parsed as markup)."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _report_data(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    return json.loads(match.group(1))


def test_report_is_self_contained(demo_build):
    path = demo_build / "report.html"
    page = path.read_text(encoding="utf-8")
    assert path.stat().st_size < 10_000_000
    parser = _Tags()
    parser.feed(page)
    external = [(tag, attrs) for tag, attrs in parser.tags
                if tag in ("script", "img", "iframe", "link") and (attrs.get("src") or attrs.get("href"))]
    assert external == [], "everything is inline: no file or URL is fetched"
    assert page.count("Plotly.newPlot(") == FIGURES
    assert len(re.findall(r"plotly\.js v\d", page)) == 1, "plotly.js is inlined exactly once"


def test_sample_browser_rows_are_real_and_auditable(demo_build):
    data = _report_data((demo_build / "report.html").read_text(encoding="utf-8"))
    lineage = pl.read_parquet(demo_build / "lineage")
    rejected = pl.read_parquet(demo_build / "rejected")
    rows = data["rows"]
    kept_rows = [r for r in rows if r["kept"]]
    rejected_rows = [r for r in rows if not r["kept"]]
    config = ReportConfig()
    assert len(kept_rows) == min(config.sample_kept, lineage.filter(pl.col("stage").is_null()).height)
    assert len(rejected_rows) == min(config.sample_rejected, rejected.height)
    # every rejection reason is represented, every source that kept rows too
    assert {r["reason"] for r in rejected_rows} == set(rejected["reason"])
    assert {r["source"] for r in kept_rows} == set(lineage.filter(pl.col("stage").is_null())["source"])
    stages = dict(lineage.select("id", "stage").iter_rows())
    prefix = f"curate audit {shlex.quote(str(demo_build.resolve()))} --id "
    for row in rows:
        assert row["audit"] == prefix + row["id"]
        assert (stages[row["id"]] is None) == row["kept"], row["id"]
        assert row["values"]["source_record"] and row["values"]["source_sha256"]
    # the text shown is the row's own: a rejected row's answer is in its rejected/ messages
    messages = dict(rejected.select("id", "messages").iter_rows())
    for row in rejected_rows[:20]:
        answer = messages[row["id"]][-1]["content"]
        assert answer[:40].strip() in row["text"], row["id"]


def test_report_without_lineage_matches(demo_build):
    """A build that predates lineage/ still gets the same funnel and reasons (rebuilt from the outputs)."""
    from curation.report import funnel_table, load_records, reason_counts

    manifest = json.loads((demo_build / "manifest.json").read_text())
    old = json.loads(json.dumps(manifest))
    del old["outputs"]["lineage"]
    with_lineage, without = load_records(demo_build, manifest), load_records(demo_build, old)
    assert with_lineage.height == without.height == manifest["counts"]["kept"] + manifest["counts"]["rejected"]
    assert funnel_table(with_lineage, manifest) == funnel_table(without, old)
    assert reason_counts(with_lineage).equals(reason_counts(without))
    levels, table = funnel_table(without, old)
    assert sum(values[0] for values in table.values()) == manifest["counts"]["input_records"]
    assert sum(values[-1] for values in table.values()) == manifest["counts"]["kept"]
    assert report_html(demo_build, old).count("Plotly.newPlot(") == FIGURES


@pytest.fixture(scope="module")
def xss_build(demo_build, tmp_path_factory) -> Path:
    """A copy of the demo build whose first rejected row's answer is an HTML/script injection."""
    out = tmp_path_factory.mktemp("xss") / "build"
    shutil.copytree(demo_build, out)
    part = sorted((out / "rejected").glob("*.parquet"))[0]
    table = pq.read_table(part)
    frame = pl.from_arrow(table)
    target = frame["id"][0]
    frame = frame.with_columns(pl.when(pl.col("id") == target).then(
        pl.col("messages").list.eval(pl.struct(pl.element().struct.field("role"), pl.lit(XSS).alias("content"))))
        .otherwise(pl.col("messages")).alias("messages"))
    pq.write_table(frame.to_arrow().cast(table.schema), part)
    write_report(out)
    return out


def test_untrusted_text_is_escaped(xss_build):
    page = (xss_build / "report.html").read_text(encoding="utf-8")
    assert XSS not in page and "<img src=x" not in page
    texts = [r["text"] for r in _report_data(page)["rows"]]
    assert any(XSS in text for text in texts), "the text is kept, as data"


# --- the page in a real browser ------------------------------------------------------------------

class Browser:
    """Headless Chromium driven over the DevTools protocol."""

    def __init__(self, user_data: Path, width: int = 1280, height: int = 2400):
        from websockets.sync.client import connect

        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--mute-audio",
             "--remote-debugging-port=0", f"--user-data-dir={user_data}", f"--window-size={width},{height}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        url = None
        while url is None and time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line and self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode}")
            if "DevTools listening on " in line:
                url = line.split("DevTools listening on ", 1)[1].strip()
        assert url, "chromium did not open its DevTools port within 60 s"
        self.socket = connect(url, max_size=None, open_timeout=30)
        self.next_id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=True)

    def call(self, method: str, params: dict | None = None, session: bool = False, timeout: float = 60) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        self.socket.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self.socket.recv(timeout=max(deadline - time.monotonic(), 0.01)))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, session=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, path: Path, timeout: float = 60) -> None:
        self.call("Page.navigate", {"url": path.resolve().as_uri()}, session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate("document.documentElement?.getAttribute('data-report-ready')") == "1":
                return
            time.sleep(0.2)
        state = self.evaluate("[document.readyState, document.documentElement?.getAttribute('data-plots-rendered'),"
                              " document.getElementById('js-errors')?.textContent]")
        raise AssertionError(f"the report did not finish rendering within {timeout} s: {state}")

    def problems(self) -> list[str]:
        """Exceptions, console errors and warnings, browser log errors, and any request that leaves the file."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails'].get('text')} "
                             f"{params['exceptionDetails'].get('exception', {}).get('description', '')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(f"log: {params['entry']['text']} {params['entry'].get('url', '')}")
            elif method == "Network.requestWillBeSent" and not params["request"]["url"].startswith(
                    ("file:", "data:", "about:", "blob:")):
                found.append(f"network: {params['request']['url']}")
        return found

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - the browser may close the socket before answering
            pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    session = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield session
    session.close()


@needs_chromium
def test_report_renders_in_chromium(demo_build, browser, tmp_path):
    from PIL import Image, ImageStat

    browser.events.clear()
    browser.open(demo_build / "report.html")
    plots = browser.evaluate("""Array.from(document.querySelectorAll('.plotly-graph-div')).map(d => ({
        id: d.id, svg: d.querySelectorAll('.main-svg').length, traces: d._fullData ? d._fullData.length : -1,
        shapes: d.querySelectorAll('.trace, .point, .bars path').length}))""")
    assert len(plots) == FIGURES
    for plot in plots:
        assert plot["svg"] >= 1 and plot["traces"] >= 1 and plot["shapes"] > 0, plot
    assert browser.evaluate("document.documentElement.getAttribute('data-plots-rendered')") == str(FIGURES)
    assert browser.evaluate("document.documentElement.getAttribute('data-js-errors')") == "0"
    assert browser.problems() == []

    # the sample browser: every row is there; search by id, by reason, and filter by status
    data = _report_data((demo_build / "report.html").read_text(encoding="utf-8"))
    rows = data["rows"]
    assert browser.evaluate("document.querySelectorAll('#rows details').length") == len(rows)

    def search(text: str, status: str = "all") -> int:
        return browser.evaluate(f"""(() => {{
            const box = document.getElementById('search'), select = document.getElementById('status-filter');
            box.value = {json.dumps(text)}; box.dispatchEvent(new Event('input'));
            select.value = {json.dumps(status)}; select.dispatchEvent(new Event('change'));
            return document.querySelectorAll('#rows details:not([hidden])').length; }})()""")

    rejected = next(r for r in rows if not r["kept"])
    assert search(rejected["id"]) == 1
    assert search("semantic_duplicate") == sum("semantic_duplicate" in (r["status"] + r["detail"]) for r in rows) > 0
    assert search("", "kept") == sum(r["kept"] for r in rows)
    assert search("no row has this text, surely") == 0
    assert search("") == len(rows)
    # opening a row shows its recorded values (its audit view) and the exact audit command
    view = browser.evaluate(f"""(() => {{
        const row = Array.from(document.querySelectorAll('#rows details'))
            .find(d => d.querySelector('.rid').textContent === {json.dumps(rejected['id'])});
        row.open = true; return new Promise(done => setTimeout(() => done({{
            audit: row.querySelector('.audit code').textContent,
            values: Array.from(row.querySelectorAll('table.values th')).map(th => th.textContent)}}), 100)); }})()""")
    assert view["audit"] == rejected["audit"]
    assert {"source_record", "stage", "reason"} <= set(view["values"])
    assert browser.problems() == []

    shot = browser.screenshot(tmp_path / "report.png")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2400)
    stats = ImageStat.Stat(image.convert("L"))
    assert stats.stddev[0] > 20, "the screenshot is not blank"
    assert len(image.getcolors(maxcolors=1 << 20) or []) > 500, "charts, not just text on white"


@needs_chromium
def test_injected_text_stays_text_in_chromium(xss_build, browser):
    browser.events.clear()
    browser.open(xss_build / "report.html")
    assert browser.evaluate("window.__xss === undefined && document.querySelectorAll('img').length === 0")
    shown = browser.evaluate("Array.from(document.querySelectorAll('#rows pre.text')).map(p => p.textContent)")
    assert any(XSS in text for text in shown), "the injected markup is shown as text"
    assert browser.problems() == []
