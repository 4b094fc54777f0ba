"""Tables (console and Markdown) and the PNG chart from a results dict."""
from __future__ import annotations

from pathlib import Path

from bench.stats import diff, ratio

BASE_SSE = "bare-stream"


def _f(v, fmt="{:.2f}", none="–"):
    return none if v is None else fmt.format(v)


def _signed(v, fmt="{:+.2f}"):
    return "–" if v is None else fmt.format(v)


def rows_for(results: dict, workload: str) -> list[dict]:
    """One row per (target, concurrency) with ratios against bare and direct."""
    cells = results["cells"]
    out = []
    for c in results["concurrency"]:
        base = cells.get(f"bare|{workload}|{c}")
        if workload == "sse" and f"{BASE_SSE}|{workload}|{c}" in cells:
            base = cells[f"{BASE_SSE}|{workload}|{c}"]
        direct = cells.get(f"direct|{workload}|{c}")
        for t in results["target_order"]:
            s = cells.get(f"{t}|{workload}|{c}")
            if s is None:
                continue
            row = {"target": t, "c": c, **s}
            row["x_bare"] = ratio(s["rps"], base["rps"]) if base else None
            row["x_direct"] = ratio(s["rps"], direct["rps"]) if direct else None
            for k in ("p50", "p99", "first_p50", "first_p99"):
                row[f"add_bare_{k}"] = diff(s.get(k), base.get(k)) if base else None
                row[f"add_direct_{k}"] = diff(s.get(k), direct.get(k)) if direct else None
            out.append(row)
    return out


def table(results: dict, workload: str) -> list[str]:
    rows = rows_for(results, workload)
    if workload == "sse":
        head = ["target", "c", "streams/s", "first p50", "first p99", "last p50", "last p99",
                f"+first p50 vs {BASE_SSE}", "+first p50 vs direct", "+last p50 vs direct", "err"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            lines.append("| " + " | ".join([
                r["target"], str(r["c"]), _f(r["rps"], "{:.1f}"), _f(r["first_p50"]), _f(r["first_p99"]),
                _f(r["p50"], "{:.1f}"), _f(r["p99"], "{:.1f}"), _signed(r["add_bare_first_p50"]),
                _signed(r["add_direct_first_p50"]), _signed(r["add_direct_p50"], "{:+.1f}"), str(r["errors"]),
            ]) + " |")
        return lines
    head = ["target", "c", "req/s", "× bare", "× direct", "p50 ms", "p95 ms", "p99 ms",
            "+p50 vs bare", "+p99 vs bare", "+p50 vs direct", "+p99 vs direct", "err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["target"], str(r["c"]), _f(r["rps"], "{:.0f}"), _f(r["x_bare"]), _f(r["x_direct"]),
            _f(r["p50"]), _f(r["p95"]), _f(r["p99"]), _signed(r["add_bare_p50"]), _signed(r["add_bare_p99"]),
            _signed(r["add_direct_p50"]), _signed(r["add_direct_p99"]), str(r["errors"]),
        ]) + " |")
    return lines


def console(results: dict) -> str:
    out = []
    for wl in results["workloads"]:
        out.append(f"\n== {wl}: {results['workload_desc'].get(wl, '')}")
        out.extend(table(results, wl))
    return "\n".join(out)


def chart(results: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cells = results["cells"]
    targets = [t for t in results["target_order"] if t != BASE_SSE]
    conc = results["concurrency"]
    mid = 16 if 16 in conc else conc[len(conc) // 2]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    cmap = {t: colors[i % len(colors)] for i, t in enumerate(results["target_order"])}

    # (a) req/s per workload at mid concurrency, relative to direct
    ax = axes[0][0]
    wls = [w for w in results["workloads"] if w != "sse"]
    width = 0.8 / max(1, len(targets))
    for i, t in enumerate(targets):
        vals = [(cells.get(f"{t}|{w}|{mid}") or {}).get("rps", 0) for w in wls]
        ax.bar([x + i * width for x in range(len(wls))], vals, width, label=t, color=cmap[t])
    ax.set_xticks([x + width * (len(targets) - 1) / 2 for x in range(len(wls))], wls)
    ax.set_ylabel("requests/s")
    ax.set_yscale("log")
    ax.set_title(f"Throughput at concurrency {mid} (log scale)")
    ax.legend(fontsize=7, ncol=2)

    # (b) small: req/s vs concurrency, gateways only (direct is 10-60x higher and flattens them)
    ax = axes[0][1]
    for t in [t for t in targets if t != "direct"]:
        ys = [(cells.get(f"{t}|small|{c}") or {}).get("rps") for c in conc]
        if any(y is not None for y in ys):
            ax.plot(conc, [y or 0 for y in ys], marker="o", label=t, color=cmap[t])
    ax.set_xscale("log", base=2)
    ax.set_xticks(conc, [str(c) for c in conc])
    ax.set_xlabel("concurrency")
    ax.set_ylabel("requests/s")
    ax.set_title("small tools/call: gateway throughput vs concurrency")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)

    # (c) p50 / p99 latency at concurrency 1 per workload
    ax = axes[1][0]
    c1 = conc[0]
    for i, t in enumerate(targets):
        p50 = [(cells.get(f"{t}|{w}|{c1}") or {}).get("p50") or 0 for w in wls]
        p99 = [(cells.get(f"{t}|{w}|{c1}") or {}).get("p99") or 0 for w in wls]
        xs = [x + i * width for x in range(len(wls))]
        ax.bar(xs, p99, width, color=cmap[t], alpha=0.35)
        ax.bar(xs, p50, width, color=cmap[t], label=t)
    ax.set_xticks([x + width * (len(targets) - 1) / 2 for x in range(len(wls))], wls)
    ax.set_yscale("log")
    ax.set_ylabel("ms (solid p50, light p99)")
    ax.set_title(f"Latency at concurrency {c1} (log scale)")

    # (d) SSE: time to first and last event at each concurrency
    ax = axes[1][1]
    sse_t = [t for t in results["target_order"] if f"{t}|sse|{conc[0]}" in cells]
    width2 = 0.8 / max(1, len(sse_t))
    for i, t in enumerate(sse_t):
        first = [(cells.get(f"{t}|sse|{c}") or {}).get("first_p50") or 0 for c in conc]
        last = [(cells.get(f"{t}|sse|{c}") or {}).get("p50") or 0 for c in conc]
        xs = [x + i * width2 for x in range(len(conc))]
        ax.bar(xs, last, width2, color=cmap[t], alpha=0.35)
        ax.bar(xs, first, width2, color=cmap[t], label=t)
    ax.set_xticks([x + width2 * (len(sse_t) - 1) / 2 for x in range(len(conc))], [f"c={c}" for c in conc])
    ax.set_yscale("log")
    ax.set_ylabel("ms (solid: first event p50, light: last event p50)")
    ax.set_title("SSE, 100 events: time to first / last event")
    ax.legend(fontsize=7, ncol=2)

    fig.suptitle(f"mcp-bastion benchmark — {results['date']} — {results['machine']['cores']} cores, "
                 f"{results['rounds']} interleaved rounds × {results['duration']} s per cell")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def targets_summary(results: dict) -> str:
    """The performance goals (issue 23), computed from this run, for the stock-mitmdump
    full chain (`full`) and the lean master (`lean`, `mcp-bastion serve`)."""
    cells = results["cells"]
    g = lambda t, w, c, k: (cells.get(f"{t}|{w}|{c}") or {}).get(k)  # noqa: E731
    conc = results["concurrency"]
    c16 = 16 if 16 in conc else conc[-1]
    c1 = conc[0]
    lines = [f"\ntargets (ratios in this run; concurrency {c16} for throughput, {c1} for latency):"]

    def line(name, val, goal, ok):
        lines.append(f"  {'PASS' if ok else 'MISS' if ok is False else '  ? '}  {name}: {val}  (target {goal})")

    def rps_ratio(name, a, b, w, c, goal):
        r = ratio(g(a, w, c, "rps"), g(b, w, c, "rps"))
        line(name, "–" if r is None else f"{r:.2f}×", f"≥ {goal}×", None if r is None else r >= goal)

    for t in ("full", "lean"):
        rps_ratio(f"{t} / bare req/s, small, c={c16}", t, "bare", "small", c16, 0.65)
        d = diff(g(t, "small", c1, "p50"), g("bare", "small", c1, "p50"))
        line(f"{t} added p50 vs bare, small, c={c1}", "–" if d is None else f"{d:+.2f} ms", "≤ 0.6 ms",
             None if d is None else d <= 0.6)
        rps_ratio(f"{t} / mcp-airlock req/s, small, c={c1}", t, "airlock", "small", c1, 1.0)
        for c in [x for x in conc if x >= 16]:
            rps_ratio(f"{t} / mcp-airlock req/s, small, c={c}", t, "airlock", "small", c, 1.5)
        rps_ratio(f"{t} / bare req/s, masked 256 KiB, c={c1}", t, "bare", "masked", c1, 0.15)
        rps_ratio(f"{t} / bare req/s, tools/list, c={c16}", t, "bare", "list", c16, 0.5)
    d = diff(g("full", "sse", c1, "first_p50"), g("bare-stream", "sse", c1, "first_p50"))
    line("SSE first event added vs streaming bare", "–" if d is None else f"{d:+.2f} ms", "≤ 2 ms",
         None if d is None else d <= 2)
    return "\n".join(lines)
