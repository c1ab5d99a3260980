"""Render the benchmark tables of docs/benchmarks.md from the committed JSON results.

    python docs/build_docs.py           # rewrite the generated sections of docs/benchmarks.md in place
    python docs/build_docs.py --check   # exit 1 (and say which section) when the file is not up to date

Each table lives between ``<!-- begin generated: NAME -->`` and ``<!-- end generated: NAME -->``; the
text outside those markers is written by hand and kept as it is. The numbers come only from
``tests/benchmarks/results/*.json`` (pytest-benchmark files, their ``extra_info`` and ``stats``), so
regenerating from the same files gives the same bytes. Standard library only.
Tests: ``python -m pytest -q tests/test_docs.py``.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "tests" / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS_LINK = "../tests/benchmarks/results/"

MARKER = re.compile(r"<!-- begin generated: (?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- end generated: (?P=name) -->",
                    re.S)

CPU_RUN = "cpu-2026-11-27-amd-epyc-2core.json"
DECODE_RUN = "cpu-decode-2026-12-01-amd-epyc-2core.json"
DECODE_RUN_2T = "cpu-decode-2026-12-01-amd-epyc-2core-2threads.json"
ISA_RUN_GLOB = "cpu-decode-2026-12-08-intel-xeon-2core-*.json"
ISA_ORDER = ("avx512", "avx2", "generic")


class DocsError(Exception):
    pass


def load(name: str, results: Path) -> dict[str, dict]:
    """Benchmarks of one results file by test name: {name: {"extra": extra_info, "mean": seconds}}."""
    path = results / name
    if not path.is_file():
        raise DocsError(f"{path.name}: not found under tests/benchmarks/results/")
    data = json.loads(path.read_text(encoding="utf-8"))
    return {b["name"]: {"extra": b.get("extra_info", {}), "mean": b["stats"]["mean"]} for b in data["benchmarks"]}


def get(run: dict[str, dict], name: str, source: str) -> dict:
    if name not in run:
        raise DocsError(f"{source}: no benchmark named {name!r}")
    return run[name]


def ratio(x: float) -> str:
    """A ratio: one decimal from 10 up, two below (11.2, 2.74, 0.21)."""
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def rate(x: float) -> str:
    """A throughput: whole numbers from 100 up, one decimal below."""
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def pct(fraction: float) -> str:
    return f"{fraction * 100:.0f}%"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def source_line(*names: str) -> str:
    return "Source: " + ", ".join(f"[`{n}`]({RESULTS_LINK}{n})" for n in names) + "."


def cpu_bench(results: Path) -> list[str]:
    run = load(CPU_RUN, results)

    def e(name: str) -> dict:
        return get(run, name, CPU_RUN)["extra"]

    mem = e("test_bench_logprobs_cpu_peak_memory")
    t_chunked = get(run, "test_bench_logprobs_time[chunked]", CPU_RUN)["mean"]
    t_naive = get(run, "test_bench_logprobs_time[naive]", CPU_RUN)["mean"]
    rms, rms_bwd = e("test_rms_norm_fwd_cpu_csrc"), e("test_rms_norm_fwd_bwd_cpu_csrc")
    s1, s32 = e("test_sample_cpu_csrc[1]"), e("test_sample_cpu_csrc[32]")
    pf32, pbf16 = e("test_bench_decode_vs_transformers[small-float32-16]"), \
        e("test_bench_decode_vs_transformers[small-bfloat16-16]")
    om_s, om_t = e("test_bench_orpo_step_peak_memory[small]"), e("test_bench_orpo_step_peak_memory[tiny]")
    os_s, on_s = e("test_bench_orpo_step_speed[small-ours]"), e("test_bench_orpo_step_speed[small-naive]")
    os_t, on_t = e("test_bench_orpo_step_speed[tiny-ours]"), e("test_bench_orpo_step_speed[tiny-naive]")
    hn = e("test_bench_index_query[hnsw-100000]")
    ml = e("test_bench_minilm_ours")
    ht = e("test_bench_http_teacher_concurrency")
    dg = e("test_bench_pairs_per_minute_extractive_tiny_policy")
    shape = f"N={mem['N']} H={mem['H']} V={mem['V']}"
    rows = [
        [f"`linear_logprobs` peak extra memory, {shape}, fwd+bwd", f"{mem['chunked_extra_mib']:.0f} MiB (chunked)",
         f"{mem['naive_extra_mib']:.0f} MiB (`log_softmax(h @ W.T)`)", f"{ratio(mem['ratio'])}x"],
        ["`linear_logprobs` time, same shape", f"{t_chunked:.2f} s", f"{t_naive:.2f} s",
         f"{ratio(t_chunked / t_naive)}x slower (recomputes in backward)"],
        ["`rms_norm` forward [4096, 3072] fp32", f"{rms['csrc_median_ms']:.1f} ms (C++)",
         f"{rms['torch_eager_median_ms']:.1f} ms (torch eager)", f"{ratio(rms['speedup'])}x faster"],
        ["`rms_norm` forward+backward", f"{rms_bwd['csrc_median_ms']:.1f} ms",
         f"{rms_bwd['torch_eager_median_ms']:.1f} ms", f"{ratio(rms_bwd['speedup'])}x faster"],
        ["`sample` top-p, V=128256, B=1 / B=32", f"{s1['csrc_median_ms']:.2f} / {s32['csrc_median_ms']:.1f} ms",
         f"{s1['torch_sort_reference_median_ms']:.1f} / {s32['torch_sort_reference_median_ms']:.0f} ms (sort-based torch)",
         f"{ratio(s1['speedup'])}x / {ratio(s32['speedup'])}x faster"],
        [f"prefill, `small` fp32 / bf16, batch {pf32['batch']}, {pf32['prompt_len']}-token prompts",
         f"{pf32['ours_prefill_tok_s']:.0f} / {pbf16['ours_prefill_tok_s']:.0f} tok/s",
         f"{pf32['hf_prefill_tok_s']:.0f} / {pbf16['hf_prefill_tok_s']:.0f} tok/s (transformers)",
         f"{ratio(pf32['prefill_ratio'])}x / {ratio(pbf16['prefill_ratio'])}x"],
        [f"ORPO step peak extra RSS, `small`, {om_s['pairs']} pairs, padded {om_s['padded_shape'][0]} x "
         f"{om_s['padded_shape'][1]}", f"{om_s['ours_peak_extra_mib']:.0f} MiB",
         f"{om_s['naive_peak_extra_mib']:.0f} MiB (full logits, padded)", f"{ratio(om_s['memory_ratio'])}x"],
        ["ORPO step peak extra RSS, `tiny`", f"{om_t['ours_peak_extra_mib']:.0f} MiB",
         f"{om_t['naive_peak_extra_mib']:.0f} MiB", f"{ratio(om_t['memory_ratio'])}x"],
        ["ORPO step tokens/s, `small` / `tiny`", f"{os_s['tokens_per_s']:.0f} / {os_t['tokens_per_s']:.0f}",
         f"{on_s['tokens_per_s']:.0f} / {on_t['tokens_per_s']:.0f}",
         f"{ratio(os_s['tokens_per_s'] / on_s['tokens_per_s'])}x / {ratio(os_t['tokens_per_s'] / on_t['tokens_per_s'])}x faster"],
        [f"hnswlib, {hn['n'] // 1000}k x 384-d, recall@10 {hn['recall_at_10']:.3f}, one query at a time",
         f"{hn['queries_per_s_single']:.0f} q/s", f"{hn['bruteforce_queries_per_s_single']:.0f} q/s (numpy brute force)",
         f"{ratio(hn['speedup_single_vs_bruteforce_single'])}x"],
        ["same, all queries in one call", f"{hn['queries_per_s_batched']:.0f} q/s",
         f"{hn['bruteforce_queries_per_s_batched']:.0f} q/s", f"{ratio(hn['speedup_batched_vs_bruteforce_batched'])}x"],
        [f"MiniLM embedding, {ml['sentences']} mixed sentences, {ml['threads']} threads",
         f"{ml['sentences_per_s']} sent/s", "see the note below", ""],
        [f"HTTP teacher, {ht['latency_s'] * 1000:.0f} ms latency, 8 in flight vs 1",
         f"{ht['req_per_s_concurrency_8']} req/s", f"{ht['req_per_s_concurrency_1']} req/s",
         f"{ratio(ht['speedup_8_vs_1'])}x"],
        [f"pairs per minute, extractive teacher + `tiny` policy ({dg['k_samples']} samples of "
         f"{dg['max_new_tokens']} tokens)", f"{dg['pairs_per_minute']:.0f}", "", ""],
    ]
    return table(["what", "ours", "baseline", "ratio"], rows) + ["", source_line(CPU_RUN)]


def _decode_rows(run: dict[str, dict], source: str) -> list[list[str]]:
    rows = []
    for model in ("tiny", "small", "smollm2"):
        for dtype, short in (("float32", "fp32"), ("bfloat16", "bf16")):
            b1 = get(run, f"test_bench_decode_vs_bandwidth[{model}-{dtype}-1]", source)["extra"]
            b16 = get(run, f"test_bench_decode_vs_bandwidth[{model}-{dtype}-16]", source)["extra"]
            cached = model == "tiny"      # weights in the last-level cache: the DRAM bound does not apply

            def ours(x: dict) -> str:
                return rate(x["ours_tok_s"]) + ("" if cached else f" ({pct(x['ours_bound_fraction'])})")

            def int8(x: dict, with_bound: bool) -> str:
                return rate(x["int8_tok_s"]) + (f" ({pct(x['int8_bound_fraction'])})" if with_bound and not cached else "")

            llama = rate(b1["llama.cpp_tok_s"]) if "llama.cpp_tok_s" in b1 else ""
            name = f"`{model}`" if model != "smollm2" else "SmolLM2"
            rows.append([f"{name} {short}", "1 / 16", f"{ours(b1)} / {ours(b16)}", f"{int8(b1, True)} / {int8(b16, False)}",
                         f"{rate(b1['hf_tok_s'])} / {rate(b16['hf_tok_s'])}", llama,
                         f"{ratio(b1['vs_hf'])}x / {ratio(b16['vs_hf'])}x",
                         f"{ratio(b1['first_call_vs_hf'])}x / {ratio(b16['first_call_vs_hf'])}x"])
    return rows


DECODE_HEADER = ["model, dtype", "batch", "ours tok/s (% of bound)", "int8 tok/s (% of its bound)", "transformers",
                 "llama.cpp Q4_1", "ours / transformers", "first call, ours / transformers"]


def decode_bandwidth(results: Path) -> list[str]:
    run = load(DECODE_RUN, results)
    return table(DECODE_HEADER, _decode_rows(run, DECODE_RUN)) + ["", source_line(DECODE_RUN)]


def decode_bandwidth_2threads(results: Path) -> list[str]:
    run = load(DECODE_RUN_2T, results)
    return table(DECODE_HEADER, _decode_rows(run, DECODE_RUN_2T)) + ["", source_line(DECODE_RUN_2T)]


def decode_step_share(results: Path) -> list[str]:
    rows = []
    for name in (DECODE_RUN, DECODE_RUN_2T):
        run = load(name, results)
        for dtype, short in (("float32", "fp32"), ("bfloat16", "bf16")):
            x = get(run, f"test_bench_decode_step_share_outside_products[smollm2-{dtype}]", name)["extra"]
            rows.append([f"SmolLM2 {short}", str(x["threads"]), f"{x['fused_step_ms']:.1f} ms",
                         pct(x["fused_outside_share"]), f"{x['torch_step_ms']:.1f} ms", pct(x["torch_outside_share"])])
    return table(["model, dtype", "threads", "fused step", "outside the products", "layer-by-layer torch step",
                  "outside the products"], rows) + ["", source_line(DECODE_RUN, DECODE_RUN_2T)]


def isa_paths(results: Path) -> list[str]:
    found, b16 = [], {}
    for path in sorted(results.glob(ISA_RUN_GLOB)):
        for b in load(path.name, results).values():
            x = b["extra"]
            if x.get("model") != "smollm2":
                continue
            if x.get("batch") == 1:
                found.append((path.name, x))
            elif x.get("batch") == 16:
                b16[(x["isa"], x["dtype"])] = x
    if not found:
        raise DocsError(f"no SmolLM2 batch-1 result matches {ISA_RUN_GLOB}")
    found.sort(key=lambda nx: (nx[1]["dtype"] != "float32", ISA_ORDER.index(nx[1]["isa"])))
    rows = []
    for _, x in found:
        forced = ("" if x["isa"] == x["native_isa"]
                  else " (forced, torch's libraries capped too)" if x.get("library_caps") else " (forced)")
        short = {"float32": "fp32", "bfloat16": "bf16"}[x["dtype"]]
        stream = (f"{x['bandwidth_stream_gb_s']:.1f} GB/s: {pct(x['ours_stream_fraction'])} / "
                  f"{pct(x['int8_stream_fraction'])}" if "bandwidth_stream_gb_s" in x else "")
        llama = (f"{rate(x['llama.cpp_tok_s'])} ({ratio(x['int8_vs_llama_cpp'])}x)" if "llama.cpp_tok_s" in x else "")
        y = b16.get((x["isa"], x["dtype"]))
        batch16 = f"{rate(y['ours_tok_s'])} / {rate(y['hf_tok_s'])} ({ratio(y['vs_hf'])}x)" if y else ""
        rows.append([f"{x['isa']}{forced}, {short}", f"{x['bandwidth_1thread_gb_s']:.1f} GB/s",
                     f"{rate(x['ours_tok_s'])} ({pct(x['ours_bound_fraction'])})",
                     f"{rate(x['int8_tok_s'])} ({pct(x['int8_bound_fraction'])})", stream, llama, rate(x["hf_tok_s"]),
                     f"{ratio(x['vs_hf'])}x", batch16])
    return table(["ISA path, dtype", "`sum` bandwidth (1 thread)", "ours tok/s (% of bound)",
                  "int8 tok/s (% of its bound)", "our weight stream: ours / int8 share", "llama.cpp Q4_1 (int8 / it)",
                  "transformers", "ours / transformers", "batch 16: ours / transformers tok/s"],
                 rows) + ["", source_line(*dict.fromkeys(n for n, _ in found))]


SECTIONS = {
    "cpu-bench": cpu_bench,
    "decode-bandwidth": decode_bandwidth,
    "decode-bandwidth-2threads": decode_bandwidth_2threads,
    "decode-step-share": decode_step_share,
    "isa-paths": isa_paths,
}


def render(text: str, results: Path = RESULTS) -> str:
    """`text` with every generated section rebuilt from `results`; every section must appear exactly once."""
    seen = [m.group("name") for m in MARKER.finditer(text)]
    unknown = sorted(set(seen) - set(SECTIONS))
    missing = sorted(set(SECTIONS) - set(seen))
    twice = sorted({n for n in seen if seen.count(n) > 1})
    if unknown or missing or twice:
        raise DocsError(f"docs/benchmarks.md markers: unknown {unknown}, missing {missing}, repeated {twice}")

    def rebuild(m: re.Match) -> str:
        name = m.group("name")
        body = "\n".join(SECTIONS[name](results))
        return f"<!-- begin generated: {name} -->\n{body}\n<!-- end generated: {name} -->"

    return MARKER.sub(rebuild, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Render docs/benchmarks.md's tables from tests/benchmarks/results/*.json.")
    ap.add_argument("--check", action="store_true", help="only report whether docs/benchmarks.md is up to date")
    args = ap.parse_args(argv)
    try:
        old = DOC.read_text(encoding="utf-8")
        new = render(old)
    except DocsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        if new != old:
            print("docs/benchmarks.md is out of date: run python docs/build_docs.py", file=sys.stderr)
            return 1
        return 0
    if new != old:
        DOC.write_text(new, encoding="utf-8")
        print("docs/benchmarks.md rewritten")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
