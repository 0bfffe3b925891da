"""The page in a real browser (headless Chromium, Selenium) on loopback: the run list renders, a curve
has the points of metrics.jsonl (and follows a run that is still writing it), adapter reports chart the
inspection report, and a chat answer streams in equal to the API's greedy answer."""

import json
import re
import shutil

import pytest

from lorakit.train.logbook import read_metrics
from browser import chromium, wait
from pages import adapters_dir, page_alone, page_served, trained_runs  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow  # a browser start and a served model: over 15 s in all


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


def visit(browser, url):
    """A fresh load of the page (a same-URL get with a #view may keep the old document and its picks)."""
    browser.get("about:blank")
    browser.get(url)


def rows_of(browser, what):
    return wait(lambda: browser.find_elements("css selector", f"{what} tbody tr"), what=what)


def test_run_list_renders_and_a_curve_has_the_metrics_points(browser, page_alone, trained_runs):
    visit(browser, page_alone.url + "/#runs")
    rows = rows_of(browser, "#run-table")
    assert sorted(r.get_attribute("data-run") for r in rows) == ["fast", "sweep/slow"]
    assert all("finished" in r.text for r in rows)
    browser.find_element("css selector", '#run-table tr[data-run="fast"]').click()
    data = wait(lambda: browser.execute_script("const u = LK.charts.loss; return u && [u.data, u.lorakitSeries];"),
                what="the loss chart")
    metrics = read_metrics(trained_runs / "fast" / "metrics.jsonl")
    xs, train, evals = data[0]
    assert data[1] == ["train loss", "eval loss"]
    got_train = [(x, y) for x, y in zip(xs, train) if y is not None]
    got_eval = [(x, y) for x, y in zip(xs, evals) if y is not None]
    assert got_train == [(r["step"], r["loss"]) for r in metrics if "loss" in r]
    assert got_eval == [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r]
    lr = browser.execute_script("return LK.charts.lr.data")
    assert lr[1] == [r["lr"] for r in metrics if "lr" in r]
    assert "last eval loss" in browser.find_element("id", "run-final").text


def test_two_runs_side_by_side_show_their_config_differences(browser, page_alone):
    visit(browser, page_alone.url + "/#runs")
    rows_of(browser, "#run-table")
    for run in ("fast", "sweep/slow"):
        browser.find_element("css selector", f'#run-table tr[data-run="{run}"]').click()
    wait(lambda: len(browser.execute_script("return LK.charts.loss.lorakitSeries")) == 4, what="two runs' curves")
    browser.find_element("id", "diff-only").click()
    text = wait(lambda: browser.find_element("id", "run-config").text, what="the config table")
    assert "train.learning_rate" in text and "0.01" in text and "0.001" in text and "train.max_steps" not in text


def test_a_training_run_is_followed_live(browser, page_alone, trained_runs):
    live = trained_runs / "live"
    live.mkdir()
    (live / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0, "lr": 0.01}) + "\n")
    visit(browser, page_alone.url + "/#runs")
    wait(lambda: browser.find_element("css selector", '#run-table tr[data-run="live"]'), what="the live run").click()
    wait(lambda: browser.execute_script("return LK.charts.loss && LK.charts.loss.data[0].length === 1"), what="step 1")
    with open(live / "metrics.jsonl", "a") as f:  # the trainer appends while the page is open
        f.write(json.dumps({"step": 2, "loss": 2.5, "lr": 0.01}) + "\n" + '{"step": 3, "lo')
    got = wait(lambda: (lambda d: d if d[0] == [1, 2] else None)(browser.execute_script("return LK.charts.loss.data")),
               what="step 2 to appear")
    assert got[1] == [3.0, 2.5]
    assert "training" in browser.find_element("css selector", '#run-table tr[data-run="live"]').text
    shutil.rmtree(live)


def test_adapter_report_charts_the_inspection_report(browser, page_alone, adapters_dir):
    from lorakit.analysis.report import inspect_adapter
    visit(browser, page_alone.url + "/#adapters")
    rows_of(browser, "#adapter-table")
    browser.find_element("css selector", '#adapter-table tr[data-adapter="adapters:a2"]').click()
    data = wait(lambda: browser.execute_script("return LK.charts.norm && LK.charts.norm.data"), what="the norm chart")
    want = sorted(inspect_adapter(adapters_dir / "a2")["modules"],  # layer order: layers.2 before layers.10
                  key=lambda m: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", m["module"])])
    assert data[1] == [m["delta_norm"] for m in want]
    assert browser.execute_script("return LK.charts.rank.data[1]") == [m["effective_rank"] for m in want]
    browser.find_element("css selector", '#adapter-table tr[data-adapter="runs:fast"]').click()
    wait(lambda: browser.find_element("id", "compare-table").text.count("\n") >= 3, what="the similarity table")
    assert "mean over" in browser.find_element("id", "compare-table").text


def test_playground_without_a_model_says_it_needs_one(browser, page_alone):
    visit(browser, page_alone.url + "/#playground")
    text = wait(lambda: browser.find_element("id", "play-off").text, what="the playground message")
    assert "needs a model" in text and "--model" in text


def ask(browser, text):
    box = browser.find_element("id", "prompt")
    box.clear()
    box.send_keys(text)
    browser.find_element("id", "send").click()


def answers(browser, panes):
    def done():
        bubbles = [browser.find_elements("css selector", f"#pane-{i} .msg.assistant") for i in panes]
        if all(b and b[-1].get_attribute("data-done") == "1" for b in bubbles):
            return [b[-1] for b in bubbles]
    return wait(done, timeout=120, what="the answers")


def test_chat_streams_the_api_greedy_answer(browser, page_served):
    visit(browser, page_served.url + "/#playground")
    wait(lambda: browser.find_element("id", "keybox").is_displayed(), what="the key box")
    browser.find_element("id", "key").send_keys("secret")
    browser.find_element("id", "key-save").click()
    visit(browser, page_served.url + "/#playground")  # the key is kept for the tab
    wait(lambda: len(browser.find_elements("css selector", "#pane-0 option")) == 9, what="the model picker")
    browser.execute_script("document.getElementById('max-tokens').value = 24;"
                           "const s = document.querySelector('#pane-0 .picker'); s.value = 'a3';"
                           "s.dispatchEvent(new Event('change'));")
    ask(browser, "Name a colour")
    bubble = answers(browser, [0])[0]
    client = page_served.client("secret")
    want = client.chat.completions.create(model="a3", messages=[{"role": "user", "content": "Name a colour"}],
                                          max_tokens=24, temperature=0).choices[0].message.content
    assert bubble.find_element("css selector", ".text").text == want.strip()  # the DOM shows trimmed text
    assert browser.execute_script("return document.querySelector('#pane-0 .msg.assistant .text').textContent") == want
    assert int(bubble.get_attribute("data-chunks")) > 1  # it came in pieces, as it streamed
    assert bubble.get_attribute("data-finish") == "length"


def test_same_prompt_against_two_adapters_side_by_side(browser, page_served):
    visit(browser, page_served.url + "/#playground")
    wait(lambda: len(browser.find_elements("css selector", "#pane-1 option")) == 9, what="the pickers")
    browser.find_element("id", "side-by-side").click()
    browser.execute_script("document.getElementById('max-tokens').value = 12;"
                           "for (const [i, m] of [[0, 'a1'], [1, 'tiny']]) {"
                           "  const s = document.querySelector(`#pane-${i} .picker`); s.value = m;"
                           "  s.dispatchEvent(new Event('change')); }")
    ask(browser, "hello")
    got = [b.get_attribute("textContent") for b in
           [x.find_element("css selector", ".text") for x in answers(browser, [0, 1])]]
    client = page_served.client("secret")
    want = [client.chat.completions.create(model=m, messages=[{"role": "user", "content": "hello"}], max_tokens=12,
                                           temperature=0).choices[0].message.content for m in ("a1", "tiny")]
    assert got == want and got[0] != got[1]
