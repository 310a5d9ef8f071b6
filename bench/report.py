"""Turn a bench/run.py results JSON into growth slopes, PNG plots and docs/benchmarks.md.

Re-render a saved run: .venv/bin/python bench/report.py bench/results/<date>.json [--docs]
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
MODES = ("iptables", "nftables")
TARGET_N = 30000


def fit(points: list[tuple[float, float]]) -> float | None:
    """The least-squares slope of log(y) against log(x): ~0 is O(1), ~1 is O(N)."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return round(sum((p[0] - mx) * (p[1] - my) for p in pts) / den, 2) if den else None


def _ok(results: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    return sorted(
        (m for m in results["modes"] if m["mode"] == mode and "failed" not in m), key=lambda m: m["services"]
    )


def figures(results: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """Every figure as (N, value) points, keyed 'figure [mode]'."""
    out: dict[str, list[tuple[float, float]]] = {}
    for mode in MODES:
        rows = _ok(results, mode)
        for label, get in (
            ("ClusterIP conn/s", lambda m: m["service"]["rate"]),
            ("ClusterIP connect p99 (us)", lambda m: m["service"]["connect_p99_us"]),
            ("cold start to programmed (s)", lambda m: m["cold_start_s"]),
            ("first full sync (s)", lambda m: m["first_sync_s"]),
            ("one change end-to-end, add (s)", lambda m: m["add_e2e_s"]),
            ("one change end-to-end, remove (s)", lambda m: m["remove_e2e_s"]),
            ("one change sync duration (s)", lambda m: m["add_sync_s"]),
            ("one change CPU (s)", lambda m: m["add_cpu_s"]),
            ("1000-change burst programmed (s)", lambda m: m["burst"]["e2e_s"]),
            ("peak RSS (MB)", lambda m: m["peak_rss_mb"]),
            ("CPU to first sync (s)", lambda m: m["cold_cpu_s"]),
        ):
            out[f"{label} [{mode}]"] = [(m["services"], get(m)) for m in rows]
    for variant in sorted({k["variant"] for k in results["kernel"]}):
        rows = [k for k in results["kernel"] if k["variant"] == variant]
        out[f"kernel tool, cold full sync (s) [{variant}]"] = [
            (k["services"], k["cold"]["kernel_s"]) for k in rows
        ]
        out[f"kernel tool, one-Service partial (s) [{variant}]"] = [
            (k["services"], k["partial"]["kernel_s"]) for k in rows
        ]
        out[f"renderer+tool, one-Service partial (s) [{variant}]"] = [
            (k["services"], k["partial"]["total_s"]) for k in rows
        ]
    out["API decode, one relist (s)"] = [(d["services"], d["seconds"]) for d in results["decode"]]
    return out


def slopes(results: dict[str, Any]) -> dict[str, float | None]:
    """The log-log slope of every figure against N."""
    return {name: fit(points) for name, points in figures(results).items()}


def _baseline(results: dict[str, Any], n: int) -> dict[str, Any] | None:
    return next((b for b in results["baseline"] if b["services"] == n), None)


def ratio(results: dict[str, Any], m: dict[str, Any]) -> float | None:
    """A mode's ClusterIP connection rate over direct-to-pod-IP without rules, measured in the same lab just
    before the daemon started (older runs: the baseline lab's at the same N)."""
    direct = m.get("direct") or (_baseline(results, m["services"]) or {}).get("direct")
    return round(m["service"]["rate"] / direct["rate"], 2) if direct and direct["rate"] else None


def _dataplane_table(results: dict[str, Any]) -> str:
    lines = [
        "| N | mode | direct, no rules conn/s | direct, rules loaded conn/s | ClusterIP conn/s | × direct | × direct, rules loaded "
        "| ClusterIP connect p50/p99 µs | ClusterIP request p50/p99 µs | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in sorted((m for m in results["modes"] if "failed" not in m), key=lambda m: (m["services"], m["mode"])):
        d, w, s = m.get("direct"), m.get("direct_with_rules"), m["service"]
        with_rules = s["rate"] / w["rate"] if w and w["rate"] else None
        lines.append(
            f"| {m['services']} | {m['mode']} | {_f(d and d['rate'], '{:.0f}')} | {_f(w and w['rate'], '{:.0f}')} "
            f"| {s['rate']:.0f} | {_f(ratio(results, m), '{:.2f}')} | {_f(with_rules, '{:.2f}')} | {s['connect_p50_us']:.0f}/{s['connect_p99_us']:.0f} "
            f"| {s['request_p50_us']:.0f}/{s['request_p99_us']:.0f} | {s['errors']} |"
        )
    for b in sorted(results["baseline"], key=lambda b: b["services"]):
        if "haproxy" in b:
            h, d = b["haproxy"], b["direct"]
            lines.append(
                f"| {b['services']} | HAProxy (no kproxyd) | {d['rate']:.0f} | | {h['rate']:.0f} "
                f"| {h['rate'] / d['rate']:.2f} | | {h['connect_p50_us']:.0f}/{h['connect_p99_us']:.0f} "
                f"| {h['request_p50_us']:.0f}/{h['request_p99_us']:.0f} | {h['errors']} |"
            )
    return "\n".join(lines)


def plots(results: dict[str, Any], directory: Path, name: str) -> list[Path]:
    """PNG plots next to the JSON; [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.stderr.write("matplotlib missing: no plots\n")
        return []
    made = []
    colors = {"iptables": "tab:red", "nftables": "tab:blue", "direct": "black", "haproxy": "tab:green"}

    # 1. Data plane.
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    base = sorted(results["baseline"], key=lambda b: b["services"])
    ns = [b["services"] for b in base]
    ax1.plot(ns, [b["direct"]["rate"] for b in base], "o-", color=colors["direct"], label="direct to pod IP")
    if all("haproxy" in b for b in base):
        ax1.plot(
            ns, [b["haproxy"]["rate"] for b in base], "o-", color=colors["haproxy"], label="HAProxy (userspace)"
        )
    for mode in MODES:
        rows = _ok(results, mode)
        ax1.plot(
            [m["services"] for m in rows],
            [m["service"]["rate"] for m in rows],
            "o-",
            color=colors[mode],
            label=f"kproxyd {mode}",
        )
        ax2.plot(
            [m["services"] for m in rows],
            [m["service"]["connect_p99_us"] for m in rows],
            "o-",
            color=colors[mode],
            label=f"kproxyd {mode}",
        )
    ax2.plot(
        ns, [b["direct"]["connect_p99_us"] for b in base], "o-", color=colors["direct"], label="direct to pod IP"
    )
    ax1.set(
        xscale="log",
        xlabel="Services installed (N)",
        ylabel="new TCP connections / s",
        title="Connection rate to the target Service",
    )
    ax2.set(
        xscale="log",
        yscale="log",
        xlabel="Services installed (N)",
        ylabel="connect latency p99 (µs)",
        title="Connect latency p99",
    )
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    made.append(directory / f"{name}-dataplane.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)

    # 2. Control plane.
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode in MODES:
        rows = _ok(results, mode)
        x = [m["services"] for m in rows]
        ax1.plot(
            x, [m["add_e2e_s"] * 1000 for m in rows], "o-", color=colors[mode], label=f"{mode}: end-to-end (add)"
        )
        ax1.plot(
            x, [m["add_sync_s"] * 1000 for m in rows], "s--", color=colors[mode], label=f"{mode}: sync duration"
        )
        ax2.plot(x, [m["cold_start_s"] for m in rows], "o-", color=colors[mode], label=f"{mode}: cold start")
        ax2.plot(
            x, [m["burst"]["e2e_s"] for m in rows], "s--", color=colors[mode], label=f"{mode}: 1000-change burst"
        )
    ax1.axhline(20, color="gray", linestyle=":", label="target 20 ms (nftables, 30k)")
    ax1.set(
        xscale="log",
        yscale="log",
        xlabel="Services installed (N)",
        ylabel="milliseconds",
        title="One endpoint change: programmed",
    )
    ax2.set(
        xscale="log",
        yscale="log",
        xlabel="Services installed (N)",
        ylabel="seconds",
        title="Cold start to programmed; 1000-change burst",
    )
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    made.append(directory / f"{name}-controlplane.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)

    # 3. Kernel tool time and resources.
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant in sorted({k["variant"] for k in results["kernel"]}):
        rows = sorted((k for k in results["kernel"] if k["variant"] == variant), key=lambda k: k["services"])
        x = [k["services"] for k in rows]
        line = ax1.plot(x, [k["cold"]["kernel_s"] for k in rows], "o-", label=f"{variant}: tool, cold full")[0]
        ax1.plot(
            x,
            [k["cold"]["total_s"] for k in rows],
            "s--",
            color=line.get_color(),
            label=f"{variant}: renderer+tool, cold full",
        )
        ax1.plot(
            x,
            [k["partial"]["kernel_s"] for k in rows],
            "^:",
            color=line.get_color(),
            label=f"{variant}: tool, one-Service partial",
        )
    for mode in MODES:
        rows = _ok(results, mode)
        ax2.plot(
            [m["services"] for m in rows],
            [m["peak_rss_mb"] for m in rows],
            "o-",
            color=colors[mode],
            label=f"kproxyd {mode} peak RSS",
        )
    ax2.axhline(250, color="gray", linestyle=":", label="target 250 MB (30k)")
    ax1.set(
        xscale="log",
        yscale="log",
        xlabel="Services installed (N)",
        ylabel="seconds",
        title="iptables-restore / nft -f time (scratch namespace)",
    )
    ax2.set(xscale="log", xlabel="Services installed (N)", ylabel="MB (VmHWM)", title="Daemon peak RSS")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    made.append(directory / f"{name}-kernel-resources.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)
    return made


def _f(value: Any, fmt: str = "{:.3g}") -> str:
    return "–" if value is None else fmt.format(value)


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1000:.0f}"


def summary(results: dict[str, Any]) -> str:
    """The headline table as markdown."""
    lines = [
        "| N | mode | conn/s | × direct | connect p50/p99 µs | cold start s | 1 change add/remove ms (sync ms) "
        "| burst 1000 s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in sorted({b["services"] for b in results["baseline"]}):
        base = _baseline(results, n)
        assert base is not None
        d = base["direct"]
        lines.append(
            f"| {n} | direct (baseline lab) | {d['rate']:.0f} | 1.00 | {d['connect_p50_us']:.0f}/{d['connect_p99_us']:.0f} "
            "| | | | |"
        )
        if "haproxy" in base:
            h = base["haproxy"]
            lines.append(
                f"| {n} | HAProxy | {h['rate']:.0f} | {h['rate'] / d['rate']:.2f} "
                f"| {h['connect_p50_us']:.0f}/{h['connect_p99_us']:.0f} | | | | "
                f"{_f(base.get('haproxy_peak_rss_mb'), '{:.0f}')} |"
            )
        for m in results["modes"]:
            if m["services"] != n:
                continue
            if "failed" in m:
                lines.append(f"| {n} | {m['mode']} | failed: {m['failed'][:60]} | | | | | | |")
                continue
            s = m["service"]
            lines.append(
                f"| {n} | {m['mode']} | {s['rate']:.0f} | {_f(ratio(results, m), '{:.2f}')} "
                f"| {s['connect_p50_us']:.0f}/{s['connect_p99_us']:.0f} | {m['cold_start_s']:.2f} "
                f"| {_ms(m['add_e2e_s'])}/{_ms(m['remove_e2e_s'])} ({_ms(m['add_sync_s'])}) "
                f"| {m['burst']['e2e_s']:.2f} | {m['peak_rss_mb']:.0f} |"
            )
    return "\n".join(lines)


def _kernel_table(results: dict[str, Any]) -> str:
    lines = [
        "| N | variant | cold: tool s / total s | resync: tool s / total s | one-Service partial: tool ms / total ms "
        "| cold bytes |",
        "|---|---|---|---|---|---|",
    ]
    for k in sorted(results["kernel"], key=lambda k: (k["services"], k["variant"])):
        resync = f"{k['resync']['kernel_s']:.3f} / {k['resync']['total_s']:.3f}" if "resync" in k else "(skipped)"
        lines.append(
            f"| {k['services']} | {k['variant']} | {k['cold']['kernel_s']:.3f} / {k['cold']['total_s']:.3f} | {resync} "
            f"| {_ms(k['partial']['kernel_s'])} / {_ms(k['partial']['total_s'])} | {k['cold']['bytes']} |"
        )
    return "\n".join(lines)


def _targets(results: dict[str, Any]) -> str:
    nft = _ok(results, "nftables")
    if not nft:
        return "No nftables run completed: no target can be judged."
    top = nft[-1]
    n = top["services"]
    at = f"measured at N={n}" + (
        "" if n >= TARGET_N else f" (the target is stated at {TARGET_N}: not measured there)"
    )
    lines = []
    e2e = max(top["add_e2e_s"], top["remove_e2e_s"])
    lines.append(
        f"- One-change programming ≤ 20 ms at 30k Services, nftables: **{'met' if e2e <= 0.020 else 'NOT met'}** "
        f"— {e2e * 1000:.0f} ms end-to-end (worse of add/remove medians; the sync itself "
        f"{top['add_sync_s'] * 1000:.0f} ms), {at}."
    )
    r = ratio(results, top)
    lines.append(
        f"- ClusterIP connection rate ≥ 0.95× direct at 30k, nftables: **{'met' if r and r >= 0.95 else 'NOT met'}**"
        f" — {_f(r, '{:.2f}')}×, {at}."
    )
    eps = 3 * n
    lines.append(
        f"- Daemon RSS ≤ 250 MB at 30k Services / 100k endpoints: **{'met' if top['peak_rss_mb'] <= 250 else 'NOT met'}**"
        f" — {top['peak_rss_mb']:.0f} MB peak at {n} Services / {eps} endpoints"
        f"{'' if eps >= 100000 else ' (100k endpoints not measured; 3 per Service here)'}."
    )
    return "\n".join(lines)


def _slope_table(results: dict[str, Any]) -> str:
    lines = ["| figure | log-log slope vs N |", "|---|---|"]
    for name, value in (results.get("slopes") or slopes(results)).items():
        lines.append(f"| {name} | {_f(value, '{:.2f}')} |")
    return "\n".join(lines)


def _decode_table(results: dict[str, Any]) -> str:
    lines = [
        "| N | objects | seconds | objects/s (convert+tracker) | Services/s (json.loads only) |",
        "|---|---|---|---|---|",
    ]
    for d in results["decode"]:
        lines.append(
            f"| {d['services']} | {d['objects']} | {d['seconds']:.3f} | {d['objects_per_s']} "
            f"| {_f(d.get('json_services_per_s'), '{:.0f}')} |"
        )
    return "\n".join(lines)


def _resources_table(results: dict[str, Any]) -> str:
    lines = [
        "| N | mode | RSS after start MB | peak RSS MB | CPU s to first sync | CPU s per one-change sync "
        "| CPU s whole run |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in sorted((m for m in results["modes"] if "failed" not in m), key=lambda m: (m["services"], m["mode"])):
        lines.append(
            f"| {m['services']} | {m['mode']} | {m['rss_after_start_mb']:.0f} | {m['peak_rss_mb']:.0f} "
            f"| {m['cold_cpu_s']:.2f} | {m['add_cpu_s']:.3f} | {m['total_cpu_s']:.1f} |"
        )
    return "\n".join(lines)


def _at(rows: list[dict[str, Any]], n: int) -> dict[str, Any] | None:
    return next((m for m in rows if m["services"] == n), None)


def _reading(results: dict[str, Any]) -> str:
    """What the figures say, computed from them (so it stays true when the document is regenerated)."""
    out = []
    ipt, nft = _ok(results, "iptables"), _ok(results, "nftables")
    sl = results.get("slopes") or slopes(results)
    if ipt and nft:
        lo, hi = min(m["services"] for m in nft), max(m["services"] for m in nft)
        i_lo, i_hi, n_lo, n_hi = _at(ipt, lo), _at(ipt, hi), _at(nft, lo), _at(nft, hi)
        if i_lo and i_hi and n_lo and n_hi:
            out.append(
                f"- **Connection rate.** From N={lo} to N={hi} the ClusterIP rate goes "
                f"{i_lo['service']['rate']:.0f} → {i_hi['service']['rate']:.0f}/s in iptables mode "
                f"({_f(ratio(results, i_lo), '{:.2f}')}× → {_f(ratio(results, i_hi), '{:.2f}')}× direct) and "
                f"{n_lo['service']['rate']:.0f} → {n_hi['service']['rate']:.0f}/s in nftables mode "
                f"({_f(ratio(results, n_lo), '{:.2f}')}× → {_f(ratio(results, n_hi), '{:.2f}')}×). iptables mode "
                "matches a new connection against KUBE-SERVICES rule by rule (linear in N, here emulated on "
                "nf_tables by iptables-nft), nftables mode with one map lookup. Even at small N neither reaches "
                "direct: a Service connection needs conntrack and DNAT, and direct connections in a namespace "
                'without rules most likely skip conntrack altogether (its hooks are registered on demand); compare the "rules loaded" column, where the same '
                "direct connections pay conntrack too."
            )
            out.append(
                f"- **One change.** Programming one endpoint change takes {n_lo['add_e2e_s'] * 1000:.0f} → "
                f"{n_hi['add_e2e_s'] * 1000:.0f} ms in nftables mode and {i_lo['add_e2e_s'] * 1000:.0f} → "
                f"{i_hi['add_e2e_s'] * 1000:.0f} ms in iptables mode (N={lo} → {hi}); log-log slopes "
                f"{_f(sl.get('one change end-to-end, add (s) [nftables]'), '{:.2f}')} and "
                f"{_f(sl.get('one change end-to-end, add (s) [iptables]'), '{:.2f}')}. iptables-restore has to "
                "rewrite whole chains (KUBE-SERVICES and its jumps), nft applies a small transaction, but kproxyd "
                "has its own per-sync cost (the 'sync' column) — the bare tool table shows how much of it is the "
                "kernel tool."
            )
            out.append(
                f"- **Cold start** (daemon start → first IPv4 sync logged) at N={hi}: "
                f"{i_hi['cold_start_s']:.1f} s iptables, {n_hi['cold_start_s']:.1f} s nftables, of which the first "
                f"sync itself {i_hi['first_sync_s']:.1f} s / {n_hi['first_sync_s']:.1f} s; the rest is Python "
                "start-up, the informers' lists over HTTP and decoding (the decode table)."
            )
            out.append(
                f"- **Bursts** coalesce: 1000 changes were programmed in {i_hi['burst']['e2e_s']:.1f} s "
                f"({i_hi['burst']['syncs']} syncs) in iptables mode and {n_hi['burst']['e2e_s']:.1f} s "
                f"({n_hi['burst']['syncs']} syncs) in nftables mode at N={hi}."
            )
            out.append(
                f"- **Memory** is {n_hi['peak_rss_mb']:.0f} MB peak at N={hi} (nftables), "
                f"{i_hi['peak_rss_mb']:.0f} MB (iptables); slope "
                f"{_f(sl.get('peak RSS (MB) [nftables]'), '{:.2f}')} (a ~80 MB Python baseline plus the "
                "objects). HAProxy, for one Service, needs ~15 MB."
            )
    kernel = {k["variant"]: k for k in results["kernel"] if nft and k["services"] == nft[-1]["services"]}
    if "nftables" in kernel and nft:
        k, top = kernel.get("nftables-text", kernel["nftables"]), nft[-1]  # the backend writing through nft -f
        out.append(
            f"- **Where a one-change sync goes** at N={top['services']}, nftables: the daemon's sync took "
            f"{top['add_sync_s'] * 1000:.0f} ms; the bare `nft -f` of a one-Service transaction into the same-size "
            f"ruleset takes {k['partial']['kernel_s'] * 1000:.0f} ms of a {k['partial']['total_s'] * 1000:.0f} ms "
            "backend apply (scratch namespace): the nft tool itself, not kproxyd's renderer, dominates and grows "
            "with the installed ruleset (most likely nft reading back the table before applying even a small batch; not profiled here)."
            + (
                f" iptables-nft: {kernel['iptables-nft']['partial']['kernel_s']:.1f} s of bare "
                "iptables-restore for the same one-Service change."
                if "iptables-nft" in kernel
                else ""
            )
        )
    haproxy = [b for b in results["baseline"] if "haproxy" in b]
    if haproxy:
        rates = [b["haproxy"]["rate"] / b["direct"]["rate"] for b in haproxy]
        out.append(
            f"- **HAProxy** (userspace, one Service, no kproxyd) reaches {min(rates):.2f}–{max(rates):.2f}× direct: "
            "each connection is accepted and re-opened in userspace, on the same two CPUs as the client and "
            "the servers. Its cost does not grow with N (it only knows the one Service)."
        )
    out.append(
        '- **Where kproxyd loses**: every target above that is "NOT met"; iptables mode at large N '
        "(per-connection matching and partial syncs with iptables-nft); cold start and relists are bound by "
        "Python decoding (objects/s in the decode table); one-change slopes near 1 mean the per-sync cost "
        "still grows linearly with N."
    )
    return "\n".join(out)


def newest_rows(results_dir: Path, pattern: str) -> tuple[list[dict[str, Any]], Path] | None:
    """The rows of the newest results file matching pattern, and its path relative to the repository."""
    files = sorted(results_dir.glob(pattern))
    if not files:
        return None
    return json.loads(files[-1].read_text()), files[-1].resolve().relative_to(ROOT)


def writer_section(results_dir: Path = ROOT / "bench" / "results") -> str:
    """The nftables writer's table from the newest `bench/syncbench.py OUT N VARIANT…` file, "" without one."""
    newest = newest_rows(results_dir, "*-nft-netlink.json")
    if newest is None:
        return ""
    rows, rel = newest
    lines = [
        "",
        "## nftables writer: partial syncs as netlink batches",
        "",
        f"`bench/syncbench.py {rel} N VARIANT…` (one run per row, the machine shared with other",
        "work; load: its 1-minute load average): when these ran, the nftables backend wrote a partial sync as one",
        "nf_tables netlink batch and a full sync through `nft -f` (full syncs: next section). 'tool' is the time in",
        "`nft -f` / iptables-restore / the netlink send, 'total' adds kproxyd's rendering and diffing. For",
        "nftables the cold 'tool' time is the bare `nft -f` of the same ruleset.",
        "",
        "| N | variant | cold: tool s / total s (total ÷ tool) | one-Service partial: tool ms / total ms "
        "| when | load |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["services"], r["variant"], r["when"])):
        cold, part = r["cold"], r["partial"]
        ratio = cold["total_s"] / cold["kernel_s"] if cold["kernel_s"] else float("nan")
        lines.append(
            f"| {r['services']} | {r['variant']} | {cold['kernel_s']:.2f} / {cold['total_s']:.2f} ({ratio:.2f}) "
            f"| {part['kernel_s'] * 1000:.0f} / {part['total_s'] * 1000:.0f} "
            f"| {r['when']} | {r.get('load', '?')} |"
        )
    return "\n".join(lines) + "\n"


def cold_section(results_dir: Path = ROOT / "bench" / "results") -> str:
    """The nftables cold full sync against bare `nft -f` and iptables-legacy-restore, from the newest
    `*-nft-cold.json` (bench/syncbench.py, one process per variant); "" without one.
    """
    newest = newest_rows(results_dir, "*-nft-cold.json")
    if newest is None:
        return ""
    rows, rel = newest
    lines = [
        "",
        "## nftables cold full sync over netlink",
        "",
        f"`bench/syncbench.py {rel} N VARIANT` (one process per variant, the variants back to back, their order",
        "rotated between repeats; load: the 1-minute load average when the variant started). 'nftables' is the",
        "backend as it runs (one netlink batch), 'nftables-text' the same backend with `KPROXYD_NFT_WRITER=nft`",
        "(its 'tool' time is the bare `nft -f` of the same ruleset), 'iptables-legacy' the iptables backend on",
        "iptables-legacy-restore (its 'tool' time the bare restore of the equivalent ruleset). 'tool' for",
        "nftables is the netlink send: the kernel checks and commits the batch inside sendmsg. CPU: user +",
        "system seconds of the process and its children (the kernel's work on the batch counts as the sender's).",
        "",
        "| N | variant | cold: total s | tool s | Python share (wall) | CPU s | tool CPU s | when | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for r in sorted(rows, key=lambda r: (r["services"], r["variant"], r["when"])):
        cold = r["cold"]
        share = 1 - cold["kernel_s"] / cold["total_s"]
        lines.append(
            f"| {r['services']} | {r['variant']} | {cold['total_s']:.2f} | {cold['kernel_s']:.2f} | {share:.0%} "
            f"| {cold.get('cpu_s', nan):.2f} | {cold.get('kernel_cpu_s', nan):.2f} | {r['when']} | {r.get('load', '?')} |"
        )
    lines += [
        "",
        "Medians per size: the nftables cold sync (wall, and CPU) against the bare tools' time (wall, and CPU)",
        "for the same ruleset.",
        "",
        "| N | runs | nftables cold s | bare `nft -f` s | ÷ | bare legacy restore s | ÷ "
        "| nftables cold CPU s | bare `nft -f` CPU s | ÷ | bare legacy restore CPU s | ÷ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in sorted({r["services"] for r in rows}):

        def median(variant: str, key: str, size: int = n) -> float:
            values = [r["cold"].get(key) for r in rows if r["services"] == size and r["variant"] == variant]
            values = [v for v in values if v is not None]
            return statistics.median(values) if values else nan

        runs = sum(1 for r in rows if r["services"] == n and r["variant"] == "nftables")
        cells = [f"| {n} | {runs}"]
        for key, tool in (("total_s", "kernel_s"), ("cpu_s", "kernel_cpu_s")):
            ours, nft, legacy = (
                median("nftables", key),
                median("nftables-text", tool),
                median("iptables-legacy", tool),
            )
            cells.append(f"{ours:.2f} | {nft:.2f} | {ours / nft:.2f} | {legacy:.2f} | {ours / legacy:.2f}")
        lines.append(" | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_docs(results: dict[str, Any], json_path: Path, name: str, extra: str = "") -> None:
    """Regenerate docs/benchmarks.md from a run."""
    extra = extra or writer_section() + cold_section()
    m = results["machine"]
    rel = json_path.resolve().relative_to(ROOT)
    skipped = "".join(f"\n- N={s['services']} skipped: {s['reason']}." for s in results.get("skipped", []))
    text = f"""# Benchmarks

Generated by `make bench` (bench/run.py, rendered by bench/report.py) on {results["date"]}; raw samples,
medians and machine info in [{rel}](../{rel}). Re-render with
`.venv/bin/python bench/report.py {rel} --docs`. Numbers from one machine, one run: read the ratios and the
slopes, not the absolute values, and re-run before comparing.

## Machine

| | |
|---|---|
| CPUs (nproc) | {m["nproc"]} ({m["cpu"]}) |
| memory | {m["memory_gb"]} GB |
| kernel | {m["kernel"]} |
| iptables | {m["iptables"]} |
| nft | {m["nft"]} |
| HAProxy | {m["haproxy"]} |
| Python | {m["python"]} |
| load average at start | {", ".join(f"{x:.2f}" for x in m["loadavg_at_start"])} (the machine was shared with other work) |

## Targets

{_targets(results)}

## What the figures say

{_reading(results)}

## Headline

N Services installed, each with 3 endpoints (fake IPs, never contacted, except the target Service's 3 real
pods); the target Service is the last one created. Connections: new TCP connection, one HTTP/1.0 GET, close,
from a client pod on the same node, 4 client threads, {"1 × 1 s" if results["quick"] else "2 × 2 s"} per
figure (median). "× direct" divides by direct-to-pod-IP measured in the same lab just before kproxyd started (no rules: the
limit); HAProxy's by direct in its own lab (measured interleaved with it).
One change: an endpoint added to (or removed from) a probe Service; end-to-end is API write → first probe
connection that sees the new state (probed every ~1 ms); "sync" is the daemon's own sync duration from its
`synced … seconds=` log line. Burst: 1000 endpoint changes across Services then one probe change, until the
probe sees it (every earlier change is in that sync or an earlier one).

{summary(results)}

Data plane in detail ("direct, no rules" in the same lab before the daemon started; "rules loaded": the same
direct connections with kproxyd's rules in place, which every non-Service packet on the node also crosses):

{_dataplane_table(results)}

![data plane](../bench/results/{name}-dataplane.png)
![control plane](../bench/results/{name}-controlplane.png)
![kernel tool time and RSS](../bench/results/{name}-kernel-resources.png)

## How cost grows

Least-squares slope of log(figure) against log(N) over the measured sizes ({", ".join(map(str, sorted({x["services"] for x in results["modes"]})))}):
~0 means the figure does not depend on N (O(1)), ~1 means linear (O(N)). A complexity regression shows
here even when the machine's absolute speed drifts. Slopes over 100→1000 are dominated by fixed costs
(process start, Python imports): the growth that matters is between the two largest sizes.

{_slope_table(results)}

## Bare kernel tool time (same rulesets, scratch namespace)

The backends driven directly (no API, no daemon) as the former bench/iptables_sync.py and
bench/nftables_sync.py did: N Services × 3 endpoints, every third a NodePort. "tool" is the time inside
iptables-restore / nft -f on the renderer's text; "total" adds kproxyd's rendering and diffing.

{_kernel_table(results)}

## Resources and API decode

Daemon RSS from /proc/PID/status (VmRSS after the first sync, VmHWM at the end of the run); CPU from
/proc/PID/stat, the daemon's own plus its reaped children (iptables-restore, nft).

{_resources_table(results)}

API decode: Services and their EndpointSlices pushed through kproxyd.k8s.convert and ProxyStateTracker
(one relist), in-process, no HTTP.

{_decode_table(results)}

## Method and caveats

- The lab (kproxyd.lab.cluster.LabCluster): one node namespace, pods on its bridge, the in-process API
  server; kproxyd is the real daemon (`python -m kproxyd --proxy-mode=…`) in the node namespace with the
  lab's `--iptables-min-sync-period=100ms` and `--iptables-sync-period=1h` (no periodic resync during
  measurements). Services and slices are written straight into the store (`put_raw`) before the daemon
  starts; the lab's endpoints controller is stopped (its per-Service relists are O(N) each).
- The traffic servers are bench/loadgen.c (C, 2 accept threads per pod), not the lab's Python pod server,
  so that the proxy path, not the server, is what is measured. Client and servers share the machine's
  {m["nproc"]} CPUs with the daemon and with whatever else ran: absolute rates are low and noisy.
- HAProxy 2.6 (tcp mode, roundrobin, 2 threads) runs in the node namespace and listens on the pod bridge
  address; its connect latency is the accept by HAProxy, not the backend's: compare its request rate.
- iptables mode uses the node's default iptables (iptables-nft here); iptables-legacy is measured only as
  bare tool time (bench/syncbench.py), not in the data plane.
- One change: {"3 adds and 3 removes" if results["quick"] else "5 adds and 5 removes (medians; bench/run.py now does 2 + 2 for iptables mode at N ≥ 20k, where each takes about a minute)"}, 0.3 s apart.
  The probe Service goes from 0 to 1 endpoint and back (a probe can then tell deterministically when the
  change is in the kernel); the burst's 1000 changes each replace one endpoint of a filler Service.
- Cold start includes Python start-up, the informers' first lists over HTTP and the first full sync.
- One-change end-to-end can be shorter than the logged sync duration: the kernel has the new rules before
  the daemon finishes its post-sync work (health servers, conntrack cleanup) and logs.{skipped}
{extra}"""
    DOCS.write_text(text)


def main() -> int:
    """Re-render plots (and with --docs the document) from a saved JSON."""
    if len(sys.argv) < 2:
        sys.exit("usage: bench/report.py RESULTS.json [--docs]")
    path = Path(sys.argv[1])
    results = json.loads(path.read_text())
    results["slopes"] = slopes(results)
    path.write_text(json.dumps(results, indent=1) + "\n")
    name = path.stem
    for made in plots(results, path.parent, name):
        sys.stdout.write(f"wrote {made}\n")
    if "--docs" in sys.argv:
        write_docs(results, path, name)
        sys.stdout.write(f"wrote {DOCS}\n")
    sys.stdout.write(summary(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
