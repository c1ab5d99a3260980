"""Datagen throughput on CPU.

- pairs/minute with the extractive teacher and a tiny random Llama policy (n=8, K=2 samples);
- an OpenAI-compatible fake teacher with 200 ms latency: requests per second with 8 in flight vs
  1 in flight, measured in the same run; the ratio goes to ``extra_info`` (expected >= 5x).

Run: ``.venv/bin/python -m pytest -q tests/benchmarks/test_bench_datagen.py --benchmark-only``
"""
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_teachers import CORPUS, build_retriever  # noqa: E402

from preflexor_core.datagen import generate_pairs  # noqa: E402
from preflexor_core.teachers import ExtractiveTeacher, OpenAITeacher  # noqa: E402

LATENCY_S = 0.2


def test_bench_pairs_per_minute_extractive_tiny_policy(benchmark):
    import torch
    from preflexor_core import Llama, ModelConfig
    from preflexor_core.sampler import SamplingParams
    from preflexor_core.tokenization.tokenizer import Tokenizer

    retriever = build_retriever()
    tok = Tokenizer.train_bpe(CORPUS * 2, vocab_size=400)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    policy = (Llama(cfg), tok)
    teacher = ExtractiveTeacher(retriever)
    n = 8
    params = SamplingParams(max_new_tokens=32, temperature=1.0, top_k=50)

    def run():
        return generate_pairs(retriever, teacher, policy=policy, n=n, k_samples=2, sampling=params,
                              progress=False)

    rows = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    assert len(rows) == n
    mean_s = benchmark.stats.stats.mean
    benchmark.extra_info["pairs"] = n
    benchmark.extra_info["k_samples"] = 2
    benchmark.extra_info["max_new_tokens"] = 32
    benchmark.extra_info["pairs_per_minute"] = round(60.0 * n / mean_s, 1)


class _SlowServer:
    def __init__(self, latency):
        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                time.sleep(latency)
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content":
                                   "ok " + body["messages"][-1]["content"][:20]}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_bench_http_teacher_concurrency(benchmark):
    server = _SlowServer(LATENCY_S)
    try:
        chats = [[{"role": "user", "content": f"question {i}"}] for i in range(16)]
        serial = OpenAITeacher(server.url, "fake", concurrency=1)
        serial.complete(chats[0])  # warm-up
        t0 = time.perf_counter()
        serial.complete_many(chats)
        serial_s = time.perf_counter() - t0

        parallel = OpenAITeacher(server.url, "fake", concurrency=8)
        out = benchmark.pedantic(lambda: parallel.complete_many(chats), rounds=3, iterations=1,
                                 warmup_rounds=1)
        assert len(out) == len(chats)
        parallel_s = benchmark.stats.stats.mean
    finally:
        server.close()
    ratio = serial_s / parallel_s
    benchmark.extra_info["latency_s"] = LATENCY_S
    benchmark.extra_info["requests"] = len(chats)
    benchmark.extra_info["req_per_s_concurrency_1"] = round(len(chats) / serial_s, 2)
    benchmark.extra_info["req_per_s_concurrency_8"] = round(len(chats) / parallel_s, 2)
    benchmark.extra_info["speedup_8_vs_1"] = round(ratio, 2)
    assert ratio >= 5.0, f"8 in flight gave only {ratio:.2f}x the throughput of 1"
