"""The generated leaderboard page in headless Chromium: rows render, clicking a header sorts.

Chromium is driven through the DevTools protocol over ``--remote-debugging-pipe`` (JSON messages
separated by NUL bytes on file descriptors 3 and 4), so no websocket client or webdriver is needed:
only Debian's ``chromium`` package. The clicks are real mouse events at the header's position.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from kb_results import make_result

from knowbench.leaderboard import submit

CHROMIUM = os.environ.get("KNOWBENCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# locally a missing browser skips; in CI it fails (a skip there would hide a missing install step)
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists() and not IN_CI,
    reason=f"headless browser test needs Chromium at {CHROMIUM} (Debian: apt-get install chromium; "
    "or set KNOWBENCH_CHROMIUM); .ci/run installs it",
)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
         "--remote-debugging-pipe", "--window-size=1280,1000"]


class Chromium:
    """A headless Chromium and one page, spoken to with DevTools protocol commands."""

    def __init__(self, profile: Path, timeout: float = 60.0):
        self.timeout = timeout
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4; bash puts the child's pipe ends
        # there (a redirect cannot collide with fds the subprocess module uses internally)
        place = f'exec "$@" 3<&{to_chrome_r} 4>&{from_chrome_w} {to_chrome_r}<&- {from_chrome_w}>&-'
        # stderr to a file: an unread pipe could fill up and stall the browser
        self.log = profile.parent / "chromium-stderr.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["bash", "-c", place, "chromium", CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                pass_fds=(to_chrome_r, from_chrome_w),
            )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._w, self._r = to_chrome_w, from_chrome_r
        self._buf = b""
        self._id = 0
        self.session: str | None = None

    def send(self, method: str, params: dict | None = None, session: bool = True) -> dict:
        self._id += 1
        msg: dict = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._next(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _next(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._r], [], [], max(0.0, left))
            if not ready:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                err = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"Chromium closed the DevTools pipe; stderr tail:\n{err}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        self.send("Page.navigate", {"url": url})
        deadline = time.monotonic() + self.timeout
        while self.js("document.readyState") != "complete":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not finish loading")
            time.sleep(0.05)

    def js(self, expression: str):
        out = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in out:
            raise RuntimeError(f"JavaScript error in {expression!r}: {out['exceptionDetails']}")
        return out["result"].get("value")

    def click(self, selector: str) -> None:
        """A real left click (pointer events) at the centre of the element ``selector`` finds."""
        box = self.js(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
            " el.scrollIntoView({block: 'center'}); const r = el.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        x, y = box
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left",
                                                   "clickCount": 0 if kind == "mouseMoved" else 1})

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.send("Browser.close", session=False)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._w, self._r):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The leaderboard page of a small submitted leaderboard, open in Chromium."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"CI is set but Chromium is not installed at {CHROMIUM}: .ci/run must apt-get install chromium")
    tmp = tmp_path_factory.mktemp("lbhtml")
    runs = [
        dict(editor="ft-m", post={"edit_succ": 97.25, "portability": 45.5, "locality": 88.0, "fluency": 560.1}),
        dict(editor="ft-l", post={"edit_succ": 60.0, "portability": 30.0, "locality": 95.5}),  # no fluency
        dict(editor="rome", post={"edit_succ": 99.0, "portability": 50.0, "locality": 70.0, "fluency": 570.0}),
        dict(editor="memit", post={"edit_succ": 8.5, "portability": 52.0, "locality": 9.0, "fluency": 400.0}),
        dict(editor="ft-m", task="convsent", kind="convsent", post={"edit_succ": 70.0, "locality": 0.4}),
        dict(editor="rome", task="convsent", kind="convsent", post={"edit_succ": 80.0, "locality": 2.5}),
    ]
    files = []
    for i, kw in enumerate(runs):
        f = tmp / f"r{i}.json"
        f.write_text(json.dumps(make_result(**kw)))
        files.append(f)
    root = tmp / "leaderboard"
    submit(files, root)
    browser = Chromium(tmp / "profile")
    try:
        browser.open((root / "index.html").resolve().as_uri())
        yield browser
    finally:
        browser.close()


def column(page: Chromium, table: str, col: int) -> list[str]:
    return page.js(
        f"Array.from(document.querySelectorAll({json.dumps(table + ' tbody tr')}))"
        f".map(tr => tr.cells[{col}].textContent.trim())"
    )


ZSRE = 'table[data-task="zsre"][data-protocol="single"]'
CONV = 'table[data-task="convsent"]'


def test_rows_render_ranked(page):
    assert page.js("document.querySelectorAll('table.kb').length") == 2
    assert column(page, ZSRE, 1) == ["rome", "ft-m", "ft-l", "memit"]  # ranked on Edit Succ.
    assert column(page, ZSRE, 0) == ["1", "2", "3", "4"]
    heads = page.js(f"Array.from(document.querySelectorAll('{ZSRE} th')).map(th => th.textContent)")
    assert heads == ["#", "Editor", "Model", "Data", "Edits", "Seeds", "Edit Succ. ↑", "Portability ↑",
                     "Locality ↑", "Fluency ↑"]
    # ft-l did not measure fluency: the cell is empty, never 0
    assert column(page, ZSRE, 9) == ["570.00", "560.10", "", "400.00"]
    assert page.js("document.body.innerText").count("embedded") >= 6


def test_clicking_a_header_sorts(page):
    loc = f'{ZSRE} th[data-col="locality"]'
    page.click(loc)  # first click: best first (higher is better)
    assert column(page, ZSRE, 8) == ["95.50", "88.00", "70.00", "9.00"]
    assert column(page, ZSRE, 1) == ["ft-l", "ft-m", "rome", "memit"]
    assert page.js(f"document.querySelector('{loc}').getAttribute('aria-sort')") == "descending"
    page.click(loc)  # second click reverses
    assert column(page, ZSRE, 8) == ["9.00", "70.00", "88.00", "95.50"]
    assert page.js(f"document.querySelector('{loc}').getAttribute('aria-sort')") == "ascending"
    flu = f'{ZSRE} th[data-col="fluency"]'
    page.click(flu)
    assert column(page, ZSRE, 9) == ["570.00", "560.10", "400.00", ""]  # unmeasured stays last
    page.click(flu)
    assert column(page, ZSRE, 9) == ["400.00", "560.10", "570.00", ""]
    assert page.js(f"document.querySelector('{loc}').getAttribute('aria-sort')") == "none"
    page.click(f'{ZSRE} th[data-col="editor"]')
    assert column(page, ZSRE, 1) == ["ft-l", "ft-m", "memit", "rome"]
    page.click(f'{ZSRE} th[data-col="rank"]')
    assert column(page, ZSRE, 1) == ["rome", "ft-m", "ft-l", "memit"]
    # sorting one table leaves the other alone
    assert column(page, CONV, 1) == ["rome", "ft-m"]


def test_lower_is_better_column_sorts_best_first(page):
    kl = f'{CONV} th[data-col="locality"]'
    assert page.js(f"document.querySelector('{kl}').textContent") == "Locality (KL) ↓"
    page.click(kl)
    assert column(page, CONV, 7) == ["0.40", "2.50"] and column(page, CONV, 1) == ["ft-m", "rome"]
