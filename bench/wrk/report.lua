-- Print one line "MOKO_WRK_JSON {...}" after the run: totals, error counts and
-- latency percentiles in microseconds. No per-request hooks, so wrk stays on
-- its plain C path.

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'MOKO_WRK_JSON {"duration_us":%d,"requests":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p99_9":%d}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
