"""The fleet page in a real browser: headless Chromium (Selenium) against a real ``python -m service``.

The service runs with API and admin keys; sessions are driven through it with rewards (so adaptation
curves exist) while a second version of the model is loaded and activated as a canary. The test checks
what a person would see: the key prompt first (the feed refuses a request without a key), then, with
the admin key, the model rows with the canary share, a non-zero actions/s, a drawn adaptation curve, the
recent sessions and their filter. It saves a screenshot (``fleet-page.png`` in the test's temporary
directory; with ``TRMRL_SCREENSHOT=path`` also there, which is how ``docs/img/fleet-page.png`` is made).

Skipped, saying why, without Chromium, chromedriver or Selenium; ``.ci/run`` installs them.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from service_support import ADMIN, REPO, USER, RunningServer, make_checkpoint

from bench import browser

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REASON = browser.missing()
if REASON is not None:
    pytest.skip(f"no headless browser: {REASON}", allow_module_level=True)

from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT_S = 90  # generous: two busy cores, a browser and a service


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("fleet-browser")
    # The family's observation and action sizes: the screenshot shows a realistic model row.
    cheetah = {"obs_dim": 20, "act_dim": 6, "family": "halfcheetah-vel", "policy_out_gain": 0.1}
    make_checkpoint(root / "halfcheetah-vel", seed=0, **cheetah)
    make_checkpoint(root / "halfcheetah-vel-v2", seed=3, **cheetah)
    env = {
        "TRMRL_API_KEYS": "user-key",
        "TRMRL_ADMIN_KEYS": "admin-key",
        "TRMRL_CHECKPOINT_ROOT": str(root),
    }
    running = RunningServer([root / "halfcheetah-vel"], env=env)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


class Traffic:
    """Sessions stepped through the service on a thread: episodes of 40 steps whose rewards rise over
    the first steps, more so in later episodes (what an adapting policy shows), until stopped."""

    def __init__(self, url: str, sessions: int = 6) -> None:
        self.client = httpx.Client(base_url=url, headers=USER, timeout=60)
        self.ids = []
        for _ in range(sessions):
            r = self.client.post("/v1/sessions", json={"model": "halfcheetah-vel"})
            assert r.status_code == 201, r.text
            self.ids.append(r.json()["session_id"])
        self.steps = dict.fromkeys(self.ids, 0)
        self.rng = np.random.default_rng(0)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def episode(self, sid: str, episode: int) -> None:
        for k in range(40):
            body: dict[str, Any] = {
                "session_id": sid,
                "observation": self.rng.normal(size=20).tolist(),
                "step": self.steps[sid],
            }
            if k == 0:
                body["episode_start"] = True
            else:
                rise = 1.0 - np.exp(-k / (4.0 if episode else 10.0))
                body["reward"] = float(-1.0 + 2.0 * rise + 0.1 * self.rng.normal())
            r = self.client.post("/v1/act", json=body)
            assert r.status_code == 200, r.text
            self.steps[sid] += 1

    def _run(self) -> None:
        try:
            episode = 2
            while not self.stop.is_set():
                for sid in self.ids:
                    self.episode(sid, episode)
                episode += 1
        except BaseException as exc:  # reported by the test
            self.error = exc

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=120)
        self.client.close()
        if self.error is not None:
            raise self.error


def wait_for(driver: Any, what: str, check: Any) -> Any:
    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(lambda d: check(d))
    except TimeoutException:
        state = driver.execute_script("return document.body.dataset.state + ' ' + document.body.innerText")
        raise AssertionError(f"the page never showed {what}; it shows: {state[:3000]}") from None


def test_the_fleet_page_in_a_browser(server: RunningServer, tmp_path: Path) -> None:
    # Two episodes per session first (first and later episodes for the curves), on version 1.
    traffic = Traffic(server.url)
    for sid in traffic.ids:
        traffic.episode(sid, 0)
        traffic.episode(sid, 1)
    admin = httpx.Client(base_url=server.url, headers=ADMIN, timeout=60)
    r = admin.post("/v1/admin/models", json={"name": "halfcheetah-vel", "checkpoint": "halfcheetah-vel-v2"})
    assert r.status_code == 201, r.text
    v2 = r.json()["version"]
    r = admin.post("/v1/admin/models/halfcheetah-vel/activate", json={"version": v2, "canary": 0.3})
    assert r.status_code == 200, r.text
    # Sessions created now go to version 2 at the canary's share: keep creating until one has.
    for _ in range(200):
        r = traffic.client.post("/v1/sessions", json={"model": "halfcheetah-vel"})
        sid = r.json()["session_id"]
        if traffic.client.get(f"/v1/sessions/{sid}").json()["model_version"] == v2:
            traffic.ids.append(sid)
            traffic.steps[sid] = 0
            traffic.episode(sid, 0)
            break
        traffic.client.delete(f"/v1/sessions/{sid}")
    # Without a key the feed refuses; with an API key too.
    assert httpx.get(f"{server.url}/v1/fleet").status_code == 401
    r = httpx.get(f"{server.url}/v1/fleet", headers=USER)
    assert (r.status_code, r.json()["error"]["code"]) == (403, "viewer_key_required")

    traffic.thread.start()
    driver = browser.chrome(tmp_path / "profile", width=1440, height=2060)
    try:
        driver.get(f"{server.url}/ui")
        # The key prompt, and nothing of the fleet.
        wait_for(driver, "the key prompt", lambda d: d.find_element(By.ID, "key-input").is_displayed())
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "auth"
        assert not driver.find_element(By.ID, "main").is_displayed()
        driver.find_element(By.ID, "key-input").send_keys("user-key")
        driver.find_element(By.ID, "key-submit").click()
        wait_for(
            driver,
            "the API key refused",
            lambda d: "admin or viewer key" in d.find_element(By.ID, "auth-error").text,
        )
        driver.find_element(By.ID, "key-input").send_keys("admin-key")
        driver.find_element(By.ID, "key-submit").click()
        wait_for(driver, "the live page", lambda d: d.find_element(By.ID, "main").is_displayed())

        # The model rows: version 1 active, version 2 a canary for 30 % of new sessions.
        def rows(d: Any) -> dict[str, Any]:
            found = d.find_elements(By.CSS_SELECTOR, "#models tbody tr[data-version]")
            return {row.get_attribute("data-version"): row for row in found}

        wait_for(driver, "two model rows", lambda d: len(rows(d)) == 2)
        canary = wait_for(
            driver,
            "the canary share",
            lambda d: rows(d)[v2].find_element(By.CSS_SELECTOR, ".serving").text == "canary 30%" and rows(d),
        )
        (v1,) = set(canary) - {v2}
        assert rows(driver)[v1].find_element(By.CSS_SELECTOR, ".serving").text == "active 70%"

        # A non-zero actions/s, in the row of the version the traffic runs on and in the tile.
        def actions(d: Any) -> float:
            text = rows(d)[v1].find_element(By.CSS_SELECTOR, "td.actions").text.replace(",", "")
            scale = 1e3 if text.endswith("k") else 1.0
            return float(text.rstrip("k")) * scale if re.fullmatch(r"[\d.]+k?", text) else 0.0

        wait_for(driver, "a non-zero actions/s", lambda d: actions(d) > 0)
        wait_for(
            driver, "the actions tile", lambda d: d.find_element(By.ID, "t-actions").text not in {"–", "0.00"}
        )

        # Adaptation curves: a drawn path of many points for each episode kind, per version.
        def curve(d: Any, kind: str) -> int:
            selector = f'figure.curve[data-version="{v1}"] path.curve-{kind}'
            paths = d.find_elements(By.CSS_SELECTOR, selector)
            return paths[0].get_attribute("d").count("L") if paths else 0

        wait_for(driver, "the first-episode curve", lambda d: curve(d, "first") >= 30)
        wait_for(driver, "the later-episodes curve", lambda d: curve(d, "later") >= 30)
        # The charts of the last minutes, drawn too.
        wait_for(
            driver,
            "the actions/s chart",
            lambda d: d.find_elements(By.CSS_SELECTOR, "#chart-actions path.line"),
        )

        # The recent sessions, then filtered to the canary version.
        wait_for(
            driver,
            "the recent sessions",
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "#sessions tbody tr td.mono")) >= 2,
        )
        # Updated in place: the page counts its renders without reloading.
        marker = driver.execute_script("window.__sameDocument = true; return document.body.dataset.renders")
        wait_for(
            driver,
            "a later update",
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-renders") != marker,
        )
        assert driver.execute_script("return window.__sameDocument === true")

        box = driver.find_element(By.ID, "filter")
        box.send_keys(f"halfcheetah-vel@{v2[:8]}")
        box.submit()
        wait_for(
            driver,
            "the filtered sessions",
            lambda d: (
                "@ " + v2[:8] in d.find_element(By.ID, "sessions-hint").text
                and {c.text for c in d.find_elements(By.CSS_SELECTOR, "#sessions tbody tr td:nth-child(3)")}
                == {v2[:8]}
            ),
        )
        box.clear()
        box.send_keys("no-such-model")
        box.submit()
        wait_for(
            driver,
            "the filter refused",
            lambda d: "unknown_model" in d.find_element(By.ID, "filter-error").text,
        )
        box.clear()
        box.submit()
        wait_for(
            driver,
            "every session again",
            lambda d: (
                "most recently active" in d.find_element(By.ID, "sessions-hint").text
                and "@" not in d.find_element(By.ID, "sessions-hint").text
            ),
        )
        driver.execute_script("window.scrollTo(0, 0)")
        wait_for(driver, "a fresh render", lambda d: d.find_element(By.ID, "t-errors").text != "–")
        shot = tmp_path / "fleet-page.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 20_000
        target = os.environ.get("TRMRL_SCREENSHOT")
        if target:
            shutil.copyfile(shot, REPO / target if not Path(target).is_absolute() else target)
        print(f"\nscreenshot: {shot}")
    finally:
        driver.quit()
        traffic.close()
        admin.close()
