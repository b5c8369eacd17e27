"""Turn the rows' results into table lines with targets and PASS/FAIL verdicts.

    python bench/report.py bench/results/<time>.json   # print the table of a recorded run again
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

# Row 7 counts as flat when the late RSS is within both limits of the early RSS.
FLAT_MAX_GROWTH_MIB = 5.0
FLAT_MAX_RATIO = 1.10


def _verdict(passed: bool | None) -> str:
    if passed is None:
        return "-"
    return "PASS" if passed else "FAIL"


def _rate(value: float) -> str:
    return f"{value:,.0f}/s"


def _cpu(guarded: float | None, baseline: float | None = None) -> str:
    if guarded is None:
        return ""
    if baseline is None:
        return f"{guarded:.0f}"
    return f"{guarded:.0f} / {baseline:.0f}"


def _line(row: str, measure: str, value: str, target: str, passed: bool | None, cpu: str = "",
          detail: str = "") -> dict:
    return {"row": row, "measure": measure, "value": value, "target": target,
            "verdict": _verdict(passed), "server_cpu_us_per_request": cpu, "detail": detail}


def _comparison_line(row: str, measure: str, comparison: dict, minimum: float | None) -> dict:
    """Return a line whose value is the req/s ratio; the detail adds the ratio of CPU per request.

    The CPU ratio (baseline CPU per request / guarded CPU per request) is the
    throughput ratio to expect when the servers alone are CPU-bound, and it
    moves much less than req/s when other work shares the machine.
    """
    guarded, baseline = comparison["guarded"], comparison["baseline"]
    ratio = comparison["ratio"]
    cpu_ratio = baseline["server_cpu_us_per_request"] / guarded["server_cpu_us_per_request"]
    return _line(
        row, measure, f"{ratio:.2f}x",
        f">= {minimum:.2f}x" if minimum is not None else "(compare)",
        ratio >= minimum if minimum is not None else None,
        _cpu(guarded["server_cpu_us_per_request"], baseline["server_cpu_us_per_request"]),
        f"{_rate(guarded['requests_per_second'])} vs {_rate(baseline['requests_per_second'])}; "
        f"CPU ratio {cpu_ratio:.2f}x; p50 {guarded['p50_ms']:.2f} vs {baseline['p50_ms']:.2f} ms",
    )


def _row_forward_auth(result: dict) -> list[dict]:
    lines = []
    for index, (label, comparison) in enumerate(result["variants"].items()):
        row = "1" if index == 0 else f"1{'abcdefg'[index]}"
        lines.append(_comparison_line(row, f"/oauth2/auth vs bare 202, {label}", comparison,
                                      0.85 if index == 0 else None))
    return lines


def _row_middleware(result: dict) -> list[dict]:
    saturated, single = result["saturated"], result["one_connection"]
    return [
        _comparison_line("2", "app + GuardMiddleware vs app alone (-c50)", saturated, 0.85),
        _line("2", "added p50 latency, -c50 / one connection",
              f"{saturated['added_p50_ms']:+.2f} / {single['added_p50_ms']:+.3f} ms", "(report)", None,
              detail=f"one connection: p50 {single['guarded']['p50_ms']:.3f} vs "
                     f"{single['baseline']['p50_ms']:.3f} ms"),
    ]


def _row_sign_in(result: dict) -> list[dict]:
    lines = [_line("5", "sign-in callbacks/s on SQLite, all", _rate(result["callbacks_per_second"]),
                   ">= 200/s", result["callbacks_per_second"] >= 200,
                   _cpu(result["guard_cpu_us_per_callback"]),
                   f"{result['count']} sign-ins, concurrency {result['concurrency']}, "
                   f"p50 {result['latency_ms']['p50']:.1f} ms, p99 {result['latency_ms']['p99']:.1f} ms")]
    for phase in ("provisioning", "returning"):
        data = result["phases"][phase]
        lines.append(_line("5", f"  {phase} users", _rate(data["callbacks_per_second"]), ">= 200/s",
                           data["callbacks_per_second"] >= 200, _cpu(data["guard_cpu_us_per_callback"]),
                           f"{data['count']} sign-ins, p99 {data['latency_ms']['p99']:.1f} ms"))
    return lines


def _row_store(result: dict) -> list[dict]:
    lines = []
    for backend, data in result["backends"].items():
        scale = f"{data['users']:,} users / {data['audit_rows']:,} audit rows"
        identity, audit = data["identity_lookup_ms"], data["audit_query_ms"]
        lines.append(_line("6", f"{backend}: identity lookup p99", f"{identity['p99']:.2f} ms", "<= 2 ms",
                           identity["p99"] <= 2.0,
                           detail=f"{scale}; p50 {identity['p50']:.2f} ms; driver alone p99 "
                                  f"{data['identity_lookup_driver_ms']['p99']:.2f} ms"))
        lines.append(_line("6", f"{backend}: audit by user + time range p99", f"{audit['p99']:.2f} ms",
                           "<= 20 ms", audit["p99"] <= 20.0, detail=f"p50 {audit['p50']:.2f} ms"))
        lines.append(_line("6", f"{backend}: size on disk", f"{float(data['size_mib']):,.0f} MiB", "(report)", None,
                           detail=f"load {data['load_seconds']:.0f} s"))
    return lines


def _row_memory(result: dict) -> list[dict]:
    growth, ratio = result["growth_mib"], result["ratio"]
    return [_line(
        "7", f"RSS after {result['requests_total']:,} vs {result['requests_early']:,} requests",
        f"{growth:+.1f} MiB ({ratio:.3f}x)",
        f"flat (<= {FLAT_MAX_GROWTH_MIB:.0f} MiB, <= {FLAT_MAX_RATIO:.2f}x)",
        growth <= FLAT_MAX_GROWTH_MIB and ratio <= FLAT_MAX_RATIO,
        _cpu(result["server_cpu_us_per_request"]),
        f"{result['rss_early_mib']:.1f} -> {result['rss_late_mib']:.1f} MiB over "
        f"{result['sessions']:,} sessions",
    )]


def _row_nginx(result: dict) -> list[dict]:
    lines = [_comparison_line("3", "nginx auth_request -> guard -> file vs nginx file", result, 0.5)]
    if "do_nothing" in result:
        # Target: at least 0.9 of the same path with a do-nothing auth endpoint.
        lines.append(_comparison_line("3b", "the same vs nginx -> do-nothing 202 endpoint -> file",
                                      result["do_nothing"], 0.9))
    return lines


_ROW_LINES: dict[str, Callable[[dict], list[dict]]] = {
    "1": _row_forward_auth,
    "2": _row_middleware,
    "3": _row_nginx,
    "4": lambda r: [_comparison_line("4", "reverse proxy -> upstream vs upstream direct", r, 0.6)],
    "5": _row_sign_in,
    "6": _row_store,
    "7": _row_memory,
}


def table_rows(rows: dict[str, dict]) -> list[dict]:
    lines: list[dict] = []
    for number in sorted(rows):
        lines.extend(_ROW_LINES[number](rows[number]))
    return lines


def render_table(lines: list[dict]) -> str:
    """Render the table as aligned text; CPU is the servers' µs per request (guarded / baseline)."""
    columns = [("row", "row"), ("measure", "measure"), ("value", "value"), ("target", "target"),
               ("verdict", "verdict"), ("server_cpu_us_per_request", "CPU µs/req"), ("detail", "detail")]
    widths = {key: max(len(title), *(len(line[key]) for line in lines)) for key, title in columns}
    header = "  ".join(title.ljust(widths[key]) for key, title in columns)
    body = ["  ".join(line[key].ljust(widths[key]) for key, _ in columns) for line in lines]
    return "\n".join([header, "-" * len(header), *body])


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python bench/report.py RESULTS_JSON", file=sys.stderr)
        return 2
    results = json.loads(Path(argv[0]).read_text())
    print(render_table(table_rows(results["rows"])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
