"""16 concurrent requests over 8 adapters and the base: each greedy output equals the request sent alone."""

from concurrent.futures import ThreadPoolExecutor

from serving import ADAPTERS, adapters_dir, server  # noqa: F401  (fixtures)


def test_concurrent_mixed_requests_equal_alone(server):
    c = server.client("secret")
    models = (["tiny"] + ADAPTERS) * 2  # 18 requests, 9 models; max_loaded=4: adapters load and evict meanwhile
    jobs = [(m, f"Tell me about {w}", 6 + i % 5) for i, (m, w) in enumerate(zip(models[:16], "abcdefghijklmnop"))]

    def one(job):
        model, prompt, n = job
        if model == "tiny" or int(model[1:]) % 2:  # half chat, half completions
            r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=n,
                                          temperature=0)
            return r.choices[0].message.content
        return c.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(one, jobs))
    alone = [one(job) for job in jobs]
    assert together == alone
    assert len(set(together)) > 8  # the adapters really differ
    assert len(server.engine.registry.resident) <= 4
