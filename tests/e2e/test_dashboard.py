"""The admin dashboard in a real headless Chromium (Debian's, through Playwright)
against a real fleet on CPU: sign-in, live nodes and charts under load, cards that
name their window and data age, request timelines on one time axis, latency lines
broken across idle seconds, drain, undrain and remove, a dead node without stale
figures, failed requests kept by their filter, a 900 px wide window, a wrong token."""

import itertools
import os
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from lightpd.common.tiny import write_tiny_checkpoint
from tests.e2e.fleet import ADMIN_TOKEN, LocalFleet
from tests.e2e.test_fleet_ops import Traffic, chat, run_lightctl

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The run's screenshot goes to a temporary folder; to refresh docs/dashboard.png, run
# with LIGHTPD_DASHBOARD_SCREENSHOT=docs/dashboard.png (tests write no tracked file).
SCREENSHOT_ENV = "LIGHTPD_DASHBOARD_SCREENSHOT"
RUNNING_STATES = ("queued", "prefilling", "transferring", "decoding")


@pytest.fixture
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"Debian's Chromium is missing ({CHROMIUM}); `make test` installs it, or run "
            "`apt-get install chromium` (Playwright's own browsers are not used)"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def fleet(tmp_path):
    model = str(write_tiny_checkpoint(tmp_path / "tiny", "llama"))
    fleet = LocalFleet(model, node_ttl_s=2.0, node_args=("--num-kv-slots", "8192"))
    fleet.start(prefill=1, decode=2)
    yield fleet
    fleet.stop()


def chart_sum(page: Page, chart: str) -> float:
    """The sum of a chart's first series over its window, as uPlot holds it."""
    return page.evaluate(
        "c => window.lightpd.charts.plots[c].data[1].reduce((s, v) => s + (v ?? 0), 0)", chart
    )


def last_point(page: Page, chart: str) -> float:
    return page.evaluate("c => window.lightpd.charts.plots[c].data[0].at(-1)", chart)


def sign_in(page: Page, token: str) -> None:
    page.fill("#token", token)
    page.click("#signin button[type=submit]")


def confirm(page: Page, row, action: str, answer: str) -> None:
    row.locator(f'button[data-action="{action}"]').click()
    expect(page.locator("#confirm")).to_be_visible()
    expect(page.locator("#confirm-text")).to_contain_text(row.get_attribute("data-node-id"))
    page.click(f"#confirm button[value={answer}]")
    expect(page.locator("#confirm")).to_be_hidden()


def decoding_since(fleet: LocalFleet, since: float) -> int:
    requests = fleet.admin("GET", "/admin/requests?running=true").json()
    return sum(r["state"] == "decoding" and r["timeline"][0]["at"] > since for r in requests)


def node_list(fleet: LocalFleet) -> str:
    listing = run_lightctl(fleet, "node", "list", "--control-plane", fleet.url)
    assert listing.returncode == 0, listing.stderr
    return listing.stdout


def node_command(fleet: LocalFleet, *args: str) -> str:
    run = run_lightctl(fleet, "node", *args, "--control-plane", fleet.url)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def assert_timelines_share_one_axis(page: Page) -> None:
    """Every row's track lies under the header's axis; bars start in the order their
    requests did, and a running request's bar reaches "now" (the axis' right end)."""
    layout = page.evaluate(
        """() => {
          const box = (e) => e.getBoundingClientRect();
          const axis = box(document.querySelector('#requests-axis .time-axis'));
          const rows = [...document.querySelectorAll('#requests tbody tr[data-start]')].map(r => ({
            start: Number(r.dataset.start), state: r.dataset.state,
            track: box(r.querySelector('.timeline-track')),
            bar: box(r.querySelector('.timeline-bar')),
          }));
          return { axis: { x: axis.x, width: axis.width }, rows };
        }"""
    )
    axis, rows = layout["axis"], layout["rows"]
    assert len(rows) >= 2
    for row in rows:
        assert (
            abs(row["track"]["x"] - axis["x"]) < 1
            and abs(row["track"]["width"] - axis["width"]) < 1
        )
        if row["state"] in RUNNING_STATES:
            assert abs(row["bar"]["x"] + row["bar"]["width"] - axis["x"] - axis["width"]) < 3
    by_start = sorted(rows, key=lambda r: r["start"])
    lefts = [r["bar"]["x"] for r in by_start]
    assert all(b >= a - 1 for a, b in itertools.pairwise(lefts)), lefts
    assert lefts[-1] > lefts[0]  # different starts, different places
    ticks = page.locator("#requests-axis .tick")
    expect(ticks.first).to_have_text("now")
    assert ticks.count() >= 2


def assert_fits_the_window(page: Page) -> None:
    overflow = page.evaluate(
        """() => ({
          page: document.documentElement.scrollWidth - document.documentElement.clientWidth,
          inner: [...document.querySelectorAll('.scroll, section')]
            .map(e => e.scrollWidth - e.clientWidth),
        })"""
    )
    assert overflow["page"] <= 0, f"the page scrolls sideways by {overflow['page']} px"
    assert max(overflow["inner"]) <= 0, f"a table overflows its section: {overflow['inner']}"


def test_dashboard_on_a_live_fleet(fleet: LocalFleet, browser: Browser, tmp_path: Path):
    page = browser.new_page(viewport={"width": 1440, "height": 1250})
    problems: list[str] = []  # script errors and CSP violations fail the test
    outage = threading.Event()  # while set, the page's reads get a 503 on purpose

    def expected(text: str) -> bool:
        return "status of 401" in text or (outage.is_set() and "status of 503" in text)

    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on(
        "console",
        lambda m: m.type == "error" and not expected(m.text) and problems.append(m.text),
    )
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    prefill, first_decode, second_decode = (n.node_id for n in fleet.nodes)

    # A wrong token is refused: the page stays the sign-in form, the data stays 401.
    assert page.goto(f"{fleet.url}/dashboard").status == 401
    sign_in(page, "not-the-admin-token")
    expect(page.locator("#signin-error")).to_have_text("Wrong admin token.")
    assert page.evaluate("fetch('/admin/overview').then(r => r.status)") == 401
    assert httpx.get(f"{fleet.url}/admin/nodes", headers={"Authorization": "Bearer x"}).is_error

    # Signed in, the page lists every node with live figures, and loads in under a second.
    sign_in(page, ADMIN_TOKEN)
    rows = page.locator("#nodes tbody tr")
    expect(rows).to_have_count(3)
    page.reload()
    expect(rows).to_have_count(3)
    load_ms = page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd")
    assert 0 < load_ms < 1000, f"the page took {load_ms:.0f} ms to load"
    for node_id in (prefill, first_decode, second_decode):
        row = page.locator(f'#nodes tr[data-node-id="{node_id}"]')
        expect(row.locator(".status")).to_have_text("ready")
        expect(row.locator(".kvtext")).to_have_text(re.compile(r"^\d+/8192 · \d+$"))
        # Prompt tokens its prefix cache held, then its last heartbeat.
        expect(row.locator("td").nth(9)).to_have_text(re.compile(r"^\d+(\.\d+)?%$"))
        expect(row.locator("td").nth(10)).to_have_text(re.compile(r"^\d+\.\d s ago$"))
    ids = sorted((prefill, first_decode, second_decode))
    page.click('#nodes th[data-sort="node_id"]')  # sorted by id already: now descending
    expect(page.locator('#nodes th[aria-sort="descending"]')).to_have_text("Node")
    expect(rows.locator("td:first-child")).to_have_text(ids[::-1])
    page.click('#nodes th[data-sort="role"]')
    expect(rows.locator("td:nth-child(2)")).to_have_text(["decode", "decode", "prefill"])
    polls = page.evaluate("window.lightpd.polls")
    expect(page.locator("#live")).to_have_text(re.compile(r"^live · "))
    assert chart_sum(page, "tokens") == 0 and chart_sum(page, "requests") == 0

    # Every card names its window and shows the age of its data; with no request yet,
    # the latency cards say so instead of keeping a value.
    for name, window in (("nodes", "now"), ("requests", "last 60 s"), ("ttft", "last 60 s")):
        expect(page.locator(f"#card-{name} .window")).to_have_text(window)
    expect(page.locator("#card-tokens .age")).to_have_text(re.compile(r"^data from \d+\.\d s ago$"))
    expect(page.locator("#card-ttft .value")).to_have_text("–")
    expect(page.locator("#card-ttft .age")).to_have_text("none in the last 5 min")

    # Under load the charts move, the nodes show work, the requests their states.
    traffic = Traffic(fleet, workers=4)
    traffic.start()
    try:
        page.wait_for_function(
            "() => ['tokens', 'requests', 'ttft'].every(c => window.lightpd.charts.plots[c]"
            ".data[1].some(v => v > 0))",
            timeout=20_000,
        )
        moved_from = last_point(page, "tokens")
        page.wait_for_function(
            "() => [...document.querySelectorAll('#requests tbody tr[data-state]')]"
            ".some(r => r.dataset.state !== 'finished' && r.dataset.state !== 'failed')",
            timeout=10_000,
        )
        page.wait_for_function(
            "() => [...document.querySelectorAll('#nodes tbody tr')]"
            ".some(r => parseFloat(r.cells[8].textContent) > 0)",
            timeout=10_000,
        )
        page.select_option("#window", "60")  # the last minute: the load fills the charts
        page.wait_for_timeout(5000)
        assert last_point(page, "tokens") > moved_from  # the window slid on
        assert page.evaluate("window.lightpd.charts.plots.tokens.data[0].length") == 60
        assert chart_sum(page, "tokens") > 0
        assert page.evaluate("window.lightpd.polls") > polls
        assert_timelines_share_one_axis(page)
        expect(page.locator("#card-ttft .value")).not_to_have_text("–")
        expect(page.locator("#card-ttft .age")).to_have_text(
            re.compile(r"^newest sample \d+\.\d s ago$")
        )
        screenshot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "dashboard.png")
        page.screenshot(path=str(screenshot))
        assert screenshot.stat().st_size > 0

        # Drain, with a confirmation: cancelled first, then confirmed.
        victim = page.locator(f'#nodes tr[data-node-id="{first_decode}"]')
        confirm(page, victim, "drain", "cancel")
        expect(victim.locator(".status")).to_have_text("ready")
        confirm(page, victim, "drain", "ok")
        expect(victim.locator(".status")).to_have_text("draining", timeout=1000)
        expect(page.locator("#toast")).to_have_text(f"{first_decode}: draining")
        line = next(r for r in node_list(fleet).splitlines() if r.startswith(first_decode))
        assert "draining" in line
        expect(victim.locator('button[data-action="drain"]')).to_be_hidden()
        expect(victim.locator('button[data-action="undrain"]')).to_be_visible()
    finally:
        traffic.done.set()
        traffic.join(timeout=120)
    assert traffic.replies and all(r.status_code == 200 for r in traffic.replies)

    # Idle seconds, then one request: the latency lines break over the seconds without
    # data (uPlot leaves a gap) instead of joining the points across them.
    time.sleep(3)
    assert chat(fleet, 4).status_code == 200
    page.wait_for_function(
        """() => {
          const plot = window.lightpd.charts.plots.ttft;
          const values = plot.data[1];
          const first = values.findIndex(v => v !== null);
          const last = values.findLastIndex(v => v !== null);
          const hole = values.slice(first, last).includes(null);
          return hole && plot.series[1].spanGaps === false && plot.series[1]._paths.gaps.length > 0;
        }""",
        timeout=15_000,
    )

    # Long requests on the one ready decode node, which dies: it shows as dead, and
    # the requests it held as failed with their error (no ready node to move to).
    failed: list[list[str]] = []
    long_ones = [
        threading.Thread(target=lambda: failed.append(chat(fleet, 1500, stream=True)))
        for _ in range(3)
    ]
    started = time.time()
    for thread in long_ones:
        thread.start()
    deadline = time.monotonic() + 20
    while decoding_since(fleet, started) != 3:  # all past their first token: no retry
        assert time.monotonic() < deadline, "the long requests did not start decoding"
        time.sleep(0.2)
    survivor = page.locator(f'#nodes tr[data-node-id="{second_decode}"]')
    page.wait_for_function(  # it is decoding: it shows a rate
        "id => parseFloat(document.querySelector(`#nodes tr[data-node-id='${id}']`).cells[8]"
        ".textContent) > 0",
        arg=second_decode,
        timeout=10_000,
    )
    next(n for n in fleet.nodes if n.node_id == second_decode).kill()
    expect(survivor.locator(".status")).to_have_text("dead", timeout=15_000)
    # They would move to another decode node, but the only other one is draining.
    interrupted = (
        "error: the request could not move to another node: "
        "no ready decode node can take the request"
    )
    expect(page.locator("#requests tr.error-row")).to_have_text([interrupted] * 3, timeout=15_000)
    expect(page.locator("#requests tr[data-state=failed]")).to_have_count(3)
    for thread in long_ones:
        thread.join(timeout=60)
    assert len(failed) == 3 and all("could not move" in "".join(lines) for lines in failed)
    # A dead node shows none of its last heartbeat's figures: no rate, no load.
    for cell in (5, 6, 7, 8):
        expect(survivor.locator("td").nth(cell)).to_have_text("–")
    expect(page.locator("#card-nodes .detail")).to_have_text("1 draining · 0 migrating · 1 dead")

    # 900 px wide, with a dead and a draining node and error rows: nothing overflows.
    page.set_viewport_size({"width": 900, "height": 1250})
    page.wait_for_timeout(1500)  # a new render at this width
    assert_fits_the_window(page)

    # Undrain from the page; then drain --migrate and undrain with lightctl.
    victim.locator('button[data-action="undrain"]').click()
    expect(victim.locator(".status")).to_have_text("ready", timeout=1000)
    expect(page.locator("#toast")).to_have_text(f"{first_decode}: ready")
    expect(victim.locator('button[data-action="drain"]')).to_be_enabled()
    assert node_command(fleet, "drain", first_decode, "--migrate") == f"{first_decode}: migrating"
    expect(victim.locator(".status")).to_have_text("migrating", timeout=5000)
    expect(victim.locator('button[data-action="undrain"]')).to_be_visible()
    assert node_command(fleet, "undrain", first_decode) == f"{first_decode}: ready"
    expect(victim.locator(".status")).to_have_text("ready", timeout=5000)
    missing = run_lightctl(fleet, "node", "undrain", "nope", "--control-plane", fleet.url)
    assert missing.returncode == 2 and "no node nope" in missing.stderr

    # Newer requests push the failed ones out of the recent list; the filter keeps them.
    newer = [threading.Thread(target=lambda: [chat(fleet, 2) for _ in range(8)]) for _ in range(4)]
    for thread in newer:
        thread.start()
    for thread in newer:
        thread.join(timeout=120)
    expect(page.locator("#requests tr[data-state=failed]")).to_have_count(0, timeout=10_000)
    page.click('#request-filter button[data-filter="failed"]')
    expect(page.locator('#request-filter button[data-filter="failed"]')).to_have_attribute(
        "aria-pressed", "true"
    )
    expect(page.locator("#failed-count")).to_have_text("3")
    expect(page.locator("#requests tbody tr[data-state]")).to_have_count(3)
    expect(page.locator("#requests tr[data-state=failed]")).to_have_count(3)
    expect(page.locator("#requests tr.error-row")).to_have_text([interrupted] * 3)
    assert_fits_the_window(page)
    page.click('#request-filter button[data-filter="all"]')
    expect(page.locator("#requests tbody tr[data-state]")).to_have_count(30)

    # While updates fail, the cards say how old their data is and turn stale.
    outage.set()
    page.route("**/admin/overview*", lambda route: route.fulfill(status=503, json={}))
    expect(page.locator("#live")).to_have_text(re.compile(r"^update failed"), timeout=5000)
    expect(page.locator("#card-running")).to_have_class(re.compile(r"\bstale\b"), timeout=15_000)
    expect(page.locator("#card-running .age")).to_have_text(
        re.compile(r"^data from 1\d\.\d s ago$")
    )
    page.unroute("**/admin/overview*")
    expect(page.locator("#card-running")).not_to_have_class(re.compile(r"\bstale\b"), timeout=5000)
    outage.clear()

    # Remove the dead node, with a confirmation: gone from the page and from lightctl.
    confirm(page, survivor, "remove", "ok")
    expect(survivor).to_have_count(0, timeout=1000)
    expect(page.locator("#toast")).to_have_text(f"{second_decode}: removed")
    listing = node_list(fleet)
    assert second_decode not in listing and first_decode in listing

    assert not any(ADMIN_TOKEN in url for url in urls), "the admin token went into a URL"
    assert not problems, problems
