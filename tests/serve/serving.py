"""A real lorakit server on loopback (uvicorn in a thread) over the tiny SmolLM2-vocabulary Llama (fixtures: import them)."""

import threading
import time

import pytest
import torch

import lorakit

ADAPTERS = [f"a{i}" for i in range(8)]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_adapter(model_dir, out, seed):
    """An adapter for the tiny model with random (non-zero) factors, saved in PEFT's format."""
    from lorakit.models.load import load_model
    model, _ = load_model(str(model_dir))
    cfg = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    lorakit.add_adapter(model, cfg, "x")
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.5)
    lorakit.save_adapter(model, out, "x")
    return out


@pytest.fixture(scope="session")
def adapters_dir(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate(ADAPTERS):
        random_adapter(tiny_model_dir, root / name, seed=10 + i)
    return root


class Running:
    def __init__(self, app, engine):
        import uvicorn
        self.engine = engine
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key="x"):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def start_server(model_dir, adapters_dir, **options):
    from lorakit.models.load import load_model
    from lorakit.serve.server import build
    model, tok = load_model(str(model_dir))
    app, engine = build(model, tok, "tiny", adapters_dir, **options)
    return Running(app, engine)


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapters_dir):
    s = start_server(tiny_model_dir, adapters_dir, max_loaded=4, api_key="secret", admin_key="root",
                     max_model_len=128, max_queue=64)
    yield s
    s.stop()
