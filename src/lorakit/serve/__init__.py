"""lorakit serve: one base model, many adapters, an OpenAI-compatible server with continuous batching.

    sampling.py  SamplingParams, the next token per request, incremental text and stop strings
    cache.py     per-sequence preallocated KV buffers and the attention function that uses them
    engine.py    the continuous-batching engine: scheduler, flat mixed-adapter steps, its thread
    store.py     the disk tier (watched folders, fingerprints), the host-memory LRU in bytes, the loader
    registry.py  adapter names and folders, safe paths, the resident tier, versions, loads off the engine thread
    metrics.py   Prometheus metrics (prometheus_client, a registry per server)
    app.py       the HTTP layer (FastAPI): OpenAI/vLLM-shaped endpoints, errors, auth, the per-request log
    server.py    putting a server together; uvicorn with draining on Ctrl-C / SIGTERM
"""
