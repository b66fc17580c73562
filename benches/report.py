"""Turns the bench's result lines into the summary table and target/bench/summary.json.

usage: report.py RESULTS_JSONL SUMMARY_JSON [--quick] [--no-pip-clients]

Throughput measurements run in rounds; each figure is the median of its rounds (the
spread is kept as `*_min` / `*_max`). Verdicts compare with the targets of the
performance issue; a ratio target compares with the baseline measured in the same run.
"""

import json
import os
import platform
import statistics
import sys
import time


def load(path):
    by_measure = {}
    errors = {}
    with open(path) as lines:
        for line in lines:
            line = line.strip()
            if not line:
                continue
            try:
                result = json.loads(line)
            except ValueError:
                continue
            name = result.get("measure", "?")
            if "error" in result:
                errors[name] = result["error"]
            else:
                by_measure.setdefault(name, []).append(result)
    return by_measure, errors


def machine():
    model = None
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory_gb = None
    try:
        with open("/proc/meminfo") as meminfo:
            memory_gb = round(int(meminfo.readline().split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    # A VM guest's halt polling (the haltpoll cpuidle driver): how long an idle vCPU
    # polls before it halts. 0 means each message at a paced rate wakes a halted vCPU
    # through the hypervisor, which is most of the latency's p50 (README, "Latency").
    halt_poll_ns = None
    try:
        with open("/sys/module/haltpoll/parameters/guest_halt_poll_ns") as param:
            halt_poll_ns = int(param.read().strip())
    except (OSError, ValueError):
        pass
    return {
        "cpu_model": model,
        "cpu_cores": os.cpu_count(),
        "memory_gb": memory_gb,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_end": os.getloadavg()[0],
        "guest_halt_poll_ns": halt_poll_ns,
    }


def main():
    args = [arg for arg in sys.argv[1:] if not arg.startswith("--")]
    flags = {arg for arg in sys.argv[1:] if arg.startswith("--")}
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    by_measure, errors = load(args[0])
    summary = {}

    def rounds(name, field="msgs_per_s"):
        values = [result[field] for result in by_measure.get(name, []) if result.get(field) is not None]
        return values

    def median(name, field="msgs_per_s"):
        values = rounds(name, field)
        return statistics.median(values) if values else None

    def first(name, field):
        results = by_measure.get(name, [])
        return results[0].get(field) if results else None

    throughput = {
        "raw_tungstenite_msgs_per_s": "raw_tungstenite",
        "single_raw_codec_msgs_per_s": "pool_raw_1",
        "single_raw_codec_decode_msgs_per_s": "pool_raw_decode_1",
        "single_json_codec_msgs_per_s": "pool_json_1",
        "c_abi_batch_msgs_per_s": "c_abi_batch",
        "python_wirepool_msgs_per_s": "python_wirepool",
        "python_wirepool_json_msgs_per_s": "python_wirepool_json",
        "python_websockets_msgs_per_s": "python_websockets",
        "python_websocket_client_msgs_per_s": "python_websocket_client",
        "python_picows_msgs_per_s": "python_picows",
    }
    for key, name in throughput.items():
        summary[key] = median(name)
        values = rounds(name)
        if len(values) > 1:
            summary[key.replace("_msgs_per_s", "_min")] = min(values)
            summary[key.replace("_msgs_per_s", "_max")] = max(values)
    for connections in (4, 16):
        for codec in ("raw", "json"):
            summary[f"aggregate_{codec}_{connections}_msgs_per_s"] = median(f"pool_{codec}_{connections}")
    # The headline aggregate: the json codec (the default protocol), at the better
    # of 4 and 16 connections; the raw codec's figures are kept beside it.
    candidates = [
        (summary.get(f"aggregate_json_{connections}_msgs_per_s"), connections) for connections in (4, 16)
    ]
    candidates = [candidate for candidate in candidates if candidate[0] is not None]
    if candidates:
        best = max(candidates)
        summary["aggregate_msgs_per_s"] = best[0]
        summary["aggregate_connections"] = best[1]
        summary["aggregate_codec"] = "json"
    else:
        summary["aggregate_msgs_per_s"] = None
        summary["aggregate_connections"] = None

    for name in ("pool_raw_1", "pool_raw_decode_1", "pool_json_1", "raw_tungstenite", "pool_json_4", "pool_json_16"):
        cores = median(name, "client_cpu_cores")
        if cores is not None:
            summary[f"{name}_client_cpu_cores"] = round(cores, 2)
        server = median(name, "server_cpu_cores")
        if server is not None:
            summary[f"{name}_server_cpu_cores"] = round(server, 2)
    gaps = sum(
        result.get("gaps", 0) or 0 for results in by_measure.values() for result in results
    )
    summary["gaps_seen"] = gaps

    # Latency runs in rounds too: each percentile is the median of the rounds' values.
    latency_fields = {
        "latency_p50_us": ("latency_pool_json", "p50_us"),
        "latency_p99_us": ("latency_pool_json", "p99_us"),
        "latency_p999_us": ("latency_pool_json", "p999_us"),
        "latency_rate_msgs_per_s": ("latency_pool_json", "rate_msgs_per_s"),
        "latency_wire_p50_us": ("latency_pool_json", "wire_p50_us"),
        "latency_wire_p99_us": ("latency_pool_json", "wire_p99_us"),
        "latency_raw_codec_p50_us": ("latency_pool_raw", "p50_us"),
        "latency_raw_codec_p99_us": ("latency_pool_raw", "p99_us"),
        "latency_raw_codec_p999_us": ("latency_pool_raw", "p999_us"),
        "latency_tungstenite_p50_us": ("latency_raw_tungstenite", "p50_us"),
        "latency_tungstenite_p99_us": ("latency_raw_tungstenite", "p99_us"),
        "latency_tungstenite_p999_us": ("latency_raw_tungstenite", "p999_us"),
        "latency_busy_poll_p50_us": ("latency_pool_json_busy_poll", "p50_us"),
        "latency_busy_poll_p99_us": ("latency_pool_json_busy_poll", "p99_us"),
        "latency_busy_poll_p999_us": ("latency_pool_json_busy_poll", "p999_us"),
        "latency_consumer_spin_p50_us": ("latency_pool_json_consumer_spin", "p50_us"),
        "latency_consumer_spin_p99_us": ("latency_pool_json_consumer_spin", "p99_us"),
        "latency_consumer_spin_p999_us": ("latency_pool_json_consumer_spin", "p999_us"),
        "latency_spin_loop_p50_us": ("latency_raw_tungstenite_spin", "p50_us"),
        "latency_spin_loop_p99_us": ("latency_raw_tungstenite_spin", "p99_us"),
        "latency_spin_loop_p999_us": ("latency_raw_tungstenite_spin", "p999_us"),
        "latency_pinned_worker_spin_p50_us": ("latency_pool_json_worker_spin_pinned", "p50_us"),
        "latency_pinned_worker_spin_p99_us": ("latency_pool_json_worker_spin_pinned", "p99_us"),
        "latency_pinned_worker_spin_p999_us": ("latency_pool_json_worker_spin_pinned", "p999_us"),
        "latency_pinned_busy_poll_p50_us": ("latency_pool_json_busy_poll_pinned", "p50_us"),
        "latency_pinned_busy_poll_p99_us": ("latency_pool_json_busy_poll_pinned", "p99_us"),
        "latency_pinned_busy_poll_p999_us": ("latency_pool_json_busy_poll_pinned", "p999_us"),
        "latency_pinned_spin_loop_p50_us": ("latency_raw_tungstenite_spin_pinned", "p50_us"),
        "latency_pinned_spin_loop_p99_us": ("latency_raw_tungstenite_spin_pinned", "p99_us"),
        "latency_pinned_spin_loop_p999_us": ("latency_raw_tungstenite_spin_pinned", "p999_us"),
    }
    for key, (name, field) in latency_fields.items():
        summary[key] = median(name, field)
    summary["latency_p99_us_rounds"] = rounds("latency_pool_json", "p99_us")
    summary["latency_tungstenite_p99_us_rounds"] = rounds("latency_raw_tungstenite", "p99_us")
    summary["latency_busy_poll_p99_us_rounds"] = rounds("latency_pool_json_busy_poll", "p99_us")
    summary["latency_consumer_spin_p99_us_rounds"] = rounds("latency_pool_json_consumer_spin", "p99_us")
    summary["latency_spin_loop_p99_us_rounds"] = rounds("latency_raw_tungstenite_spin", "p99_us")
    summary["latency_pinned_worker_spin_p99_us_rounds"] = rounds("latency_pool_json_worker_spin_pinned", "p99_us")
    summary["latency_pinned_busy_poll_p99_us_rounds"] = rounds("latency_pool_json_busy_poll_pinned", "p99_us")
    summary["latency_pinned_spin_loop_p99_us_rounds"] = rounds("latency_raw_tungstenite_spin_pinned", "p99_us")

    for scheme in ("ws", "wss"):
        name = f"connect_{scheme}"
        summary[f"connect_{scheme}_median_ms"] = first(name, "connection_median_ms")
        summary[f"connect_{scheme}_p99_ms"] = first(name, "connection_p99_ms")
        summary[f"connect_{scheme}_cold_pool_median_ms"] = first(name, "cold_median_ms")
        summary[f"connect_{scheme}_cold_pool_p99_ms"] = first(name, "cold_p99_ms")
        summary[f"connect_{scheme}_first_pool_new_ms"] = first(name, "first_pool_new_ms")
        summary[f"connect_{scheme}_pool_new_median_ms"] = first(name, "pool_new_median_ms")
        summary[f"connect_{scheme}_samples"] = first(name, "samples")

    summary["rss_mb_per_1000_idle"] = first("memory_idle", "rss_mb_per_1000_idle")
    summary["rss_mb_per_1000_idle_marginal"] = first("memory_idle", "rss_mb_per_1000_idle_marginal")
    summary["rss_mb_pool_and_1000_idle"] = first("memory_idle", "rss_mb_pool_and_1000_idle")
    summary["rss_mb_pool"] = first("memory_idle", "pool_mb")
    summary["rss_mb_first_connection"] = first("memory_idle", "first_connection_mb")
    summary["pss_mb_per_1000_idle"] = first("memory_idle", "pss_mb_per_1000_idle")
    summary["subscribe_burst_channels"] = first("subscribe_burst", "channels")
    summary["subscribe_burst_all_confirmed_ms"] = first("subscribe_burst", "all_confirmed_ms")
    summary["memory_connections_measured"] = first("memory_idle", "connections")
    summary["memory_threads_added"] = first("memory_idle", "threads_added")

    summary["message_bytes"] = 100
    info = machine()
    summary["cpu_cores"] = info["cpu_cores"]
    summary["machine"] = info
    summary["quick"] = "--quick" in flags
    summary["python_clients_installed"] = "--no-pip-clients" not in flags
    summary["errors"] = errors
    summary["generated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    rows = verdicts(summary)
    summary["verdicts"] = {row[0]: row[3] for row in rows if row[2]}
    with open(args[1], "w") as out:
        json.dump(summary, out, indent=2, sort_keys=True)
        out.write("\n")
    print_table(rows, summary)
    return 0


def fmt_rate(value):
    if value is None:
        return "n/a"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M msg/s"
    return f"{value / 1e3:.0f}k msg/s"


def fmt(value, unit):
    return "n/a" if value is None else f"{value:.{2 if value < 10 else 1}f} {unit}"


def ratio_verdict(value, base, minimum):
    if value is None or not base:
        return "n/a"
    ratio = value / base
    if minimum is None:
        return f"{ratio:.2f}x baseline"
    return f"{ratio:.2f}x {'MET' if ratio >= minimum else 'MISSED'}"


def limit_verdict(value, maximum):
    if value is None:
        return "n/a"
    return "MET" if value <= maximum else f"MISSED ({value / maximum:.1f}x the limit)"


def max_present(*values):
    present = [value for value in values if value is not None]
    return max(present) if present else None


def aggregate_verdict(value):
    if value is None:
        return "n/a"
    return "MET" if value >= 1.5e6 else f"MISSED ({value / 1.5e6:.2f}x)"


def verdicts(s):
    """(measurement, value, target, verdict) rows."""
    base = s.get("raw_tungstenite_msgs_per_s")
    single_raw = s.get("single_raw_codec_msgs_per_s")
    python_others = [
        s.get(key)
        for key in (
            "python_websockets_msgs_per_s",
            "python_websocket_client_msgs_per_s",
            "python_picows_msgs_per_s",
        )
    ]
    python_others = [value for value in python_others if value is not None]
    python_wp = s.get("python_wirepool_msgs_per_s")
    if python_wp is not None and python_others:
        best = max(python_others)
        python_verdict = f"{python_wp / best:.2f}x best {'MET' if python_wp > best else 'MISSED'}"
    else:
        python_verdict = "n/a"
    aggregate = s.get("aggregate_msgs_per_s")
    return [
        ("raw tungstenite loop (baseline)", fmt_rate(base), "", ""),
        ("1 conn, raw codec (passthrough)", fmt_rate(single_raw), ">= 0.8x baseline", ratio_verdict(single_raw, base, 0.8)),
        (
            "1 conn, raw codec, passthrough off",
            fmt_rate(s.get("single_raw_codec_decode_msgs_per_s")),
            "",
            ratio_verdict(s.get("single_raw_codec_decode_msgs_per_s"), base, None),
        ),
        (
            "1 conn, json codec",
            fmt_rate(s.get("single_json_codec_msgs_per_s")),
            ">= 0.5x baseline",
            ratio_verdict(s.get("single_json_codec_msgs_per_s"), base, 0.5),
        ),
        (
            f"aggregate, json, {s.get('aggregate_connections')} conns",
            fmt_rate(aggregate),
            ">= 1.5M msg/s",
            aggregate_verdict(aggregate),
        ),
        ("  json, 4 / 16 conns", f"{fmt_rate(s.get('aggregate_json_4_msgs_per_s'))} / {fmt_rate(s.get('aggregate_json_16_msgs_per_s'))}", "", ""),
        ("  raw, 4 / 16 conns", f"{fmt_rate(s.get('aggregate_raw_4_msgs_per_s'))} / {fmt_rate(s.get('aggregate_raw_16_msgs_per_s'))}", "(same, raw codec)", aggregate_verdict(max_present(s.get("aggregate_raw_4_msgs_per_s"), s.get("aggregate_raw_16_msgs_per_s")))),
        ("latency p50 @50k/s (json)", fmt(s.get("latency_p50_us"), "us"), "", ""),
        ("latency p99 @50k/s (json)", fmt(s.get("latency_p99_us"), "us"), "<= 50 us", limit_verdict(s.get("latency_p99_us"), 50)),
        ("latency p99.9 @50k/s (json)", fmt(s.get("latency_p999_us"), "us"), "", ""),
        ("  achieved rate", fmt_rate(s.get("latency_rate_msgs_per_s")), "", ""),
        ("  raw codec p50 / p99", f"{fmt(s.get('latency_raw_codec_p50_us'), 'us')} / {fmt(s.get('latency_raw_codec_p99_us'), 'us')}", "", ""),
        ("  tungstenite loop p50", fmt(s.get("latency_tungstenite_p50_us"), "us"), "", ""),
        ("  tungstenite loop p99 / p99.9", f"{fmt(s.get('latency_tungstenite_p99_us'), 'us')} / {fmt(s.get('latency_tungstenite_p999_us'), 'us')}", "", ""),
        ("latency p50 / p99 / p99.9, busy_poll 1 ms", " / ".join(fmt(s.get(f"latency_busy_poll_{q}_us"), "us") for q in ("p50", "p99", "p999")), "<= 50 us", limit_verdict(s.get("latency_busy_poll_p99_us"), 50)),
        ("  consumer alone spinning (consumer_us 1 ms)", " / ".join(fmt(s.get(f"latency_consumer_spin_{q}_us"), "us") for q in ("p50", "p99", "p999")), "<= 50 us", limit_verdict(s.get("latency_consumer_spin_p99_us"), 50)),
        ("  spinning tungstenite loop", " / ".join(fmt(s.get(f"latency_spin_loop_{q}_us"), "us") for q in ("p50", "p99", "p999")), "", ""),
        ("latency pinned (worker spin; worker+consumer on 1 CPU)", " / ".join(fmt(s.get(f"latency_pinned_worker_spin_{q}_us"), "us") for q in ("p50", "p99", "p999")), "<= 50 us", limit_verdict(s.get("latency_pinned_worker_spin_p99_us"), 50)),
        ("  pinned, the consumer spinning too", " / ".join(fmt(s.get(f"latency_pinned_busy_poll_{q}_us"), "us") for q in ("p50", "p99", "p999")), "<= 50 us", limit_verdict(s.get("latency_pinned_busy_poll_p99_us"), 50)),
        ("  pinned spinning tungstenite loop (floor)", " / ".join(fmt(s.get(f"latency_pinned_spin_loop_{q}_us"), "us") for q in ("p50", "p99", "p999")), "", ""),
        ("connect-to-ready ws, median", fmt(s.get("connect_ws_median_ms"), "ms"), "<= 2 ms", limit_verdict(s.get("connect_ws_median_ms"), 2)),
        ("  ws p99", fmt(s.get("connect_ws_p99_ms"), "ms"), "", ""),
        ("  ws new pool (Pool::new + ready), median", fmt(s.get("connect_ws_cold_pool_median_ms"), "ms"), "<= 2 ms", limit_verdict(s.get("connect_ws_cold_pool_median_ms"), 2)),
        ("connect-to-ready wss, median", fmt(s.get("connect_wss_median_ms"), "ms"), "<= 5 ms", limit_verdict(s.get("connect_wss_median_ms"), 5)),
        ("  wss p99", fmt(s.get("connect_wss_p99_ms"), "ms"), "", ""),
        ("  wss new pool (Pool::new + ready), median", fmt(s.get("connect_wss_cold_pool_median_ms"), "ms"), "<= 5 ms", limit_verdict(s.get("connect_wss_cold_pool_median_ms"), 5)),
        (
            "  first Pool::new of a process (loads the codec), ws",
            fmt(s.get("connect_ws_first_pool_new_ms"), "ms"),
            "",
            "",
        ),
        (
            f"RSS added by 1000 idle conns to a pool ({s.get('memory_connections_measured')} measured)",
            fmt(s.get("rss_mb_per_1000_idle"), "MB"),
            "<= 30 MB",
            limit_verdict(s.get("rss_mb_per_1000_idle"), 30),
        ),
        ("  the pool itself, once (codec module, code pages)", fmt(s.get("rss_mb_pool"), "MB"), "", ""),
        (
            "  the pool and 1000 idle conns, all included",
            fmt(s.get("rss_mb_pool_and_1000_idle"), "MB"),
            "(<= 30 MB)",
            limit_verdict(s.get("rss_mb_pool_and_1000_idle"), 30),
        ),
        ("  per 1000 beyond the first connection", fmt(s.get("rss_mb_per_1000_idle_marginal"), "MB"), "", ""),
        ("  PSS per 1000 (shared pages counted once)", fmt(s.get("pss_mb_per_1000_idle"), "MB"), "", ""),
        (
            f"{s.get('subscribe_burst_channels')} subscriptions, all confirmed",
            fmt(s.get("subscribe_burst_all_confirmed_ms"), "ms"),
            "",
            "",
        ),
        ("C ABI batch polling (raw)", fmt_rate(s.get("c_abi_batch_msgs_per_s")), ">= 0.9x Rust API", ratio_verdict(s.get("c_abi_batch_msgs_per_s"), single_raw, 0.9)),
        ("Python wirepool recv_many (raw)", fmt_rate(python_wp), "> every client below", python_verdict),
        ("Python wirepool recv_many (json)", fmt_rate(s.get("python_wirepool_json_msgs_per_s")), "", ""),
        ("Python websockets", fmt_rate(s.get("python_websockets_msgs_per_s")), "", ""),
        ("Python websocket-client", fmt_rate(s.get("python_websocket_client_msgs_per_s")), "", ""),
        ("Python picows", fmt_rate(s.get("python_picows_msgs_per_s")), "", ""),
    ]


def print_table(rows, summary):
    widths = [max(len(str(row[index])) for row in rows + [("measurement", "value", "target", "verdict")]) for index in range(4)]
    header = ("measurement", "value", "target", "verdict")
    print("  ".join(text.ljust(width) for text, width in zip(header, widths)))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print("  ".join(str(text).ljust(width) for text, width in zip(row, widths)))
    info = summary["machine"]
    print(
        f"\n{info['cpu_model']}, {info['cpu_cores']} cores, {info['memory_gb']} GB, "
        f"Linux {info['kernel']}, Python {info['python']}; 100-byte messages on loopback; "
        + (
            f"guest halt polling {info['guest_halt_poll_ns'] // 1000} µs; "
            if info.get("guest_halt_poll_ns") is not None
            else ""
        )
        + 
        f"gaps seen: {summary['gaps_seen']}"
        + (" (quick mode: short windows, not for the README)" if summary["quick"] else "")
    )
    if summary["errors"]:
        print("failed: " + ", ".join(sorted(summary["errors"])))


if __name__ == "__main__":
    sys.exit(main())
