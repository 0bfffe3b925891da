"""Headless Chromium (Debian's chromium + chromium-driver) driven by Selenium, for the page tests.

Started with --headless --no-sandbox and Chromium's background networking off (no component
updates, sync, metrics or field trials), against the page on loopback only. Skipped, saying what to
install, when chromium, chromedriver or selenium is missing.
"""

import shutil
import time

import pytest

CHROMIUM = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
DRIVER = ["/usr/bin/chromedriver"]
SWITCHES = ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", "--disable-extensions", "--no-first-run", "--no-default-browser-check",
            "--metrics-recording-only", "--disable-domain-reliability", "--disable-client-side-phishing-detection",
            "--disable-features=OptimizationHints,MediaRouter,Translate", "--password-store=basic",
            "--window-size=1400,1000", "--force-device-scale-factor=1"]


def _first(paths):
    return next((p for p in paths if shutil.which(p)), None)


def chromium():
    """A selenium webdriver on headless Chromium, or pytest.skip with the reason."""
    binary, driver = _first(CHROMIUM), _first(DRIVER)
    if binary is None or driver is None:
        pytest.skip("the page tests need Debian's chromium and chromium-driver: apt-get install -y chromium "
                    "chromium-driver (.ci/run installs them)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("the page tests need selenium: pip install 'lorakit[test]'")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for switch in SWITCHES:
        options.add_argument(switch)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def wait(predicate, timeout=30.0, what="the page"):
    """predicate() until truthy (returned) or timeout (AssertionError naming what was awaited)."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = predicate()
        except Exception as e:  # an element not there yet
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")
