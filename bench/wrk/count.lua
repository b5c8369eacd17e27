-- Send requests until this thread has received LIMIT responses, then stop the
-- thread. Each request carries the next Cookie header from COOKIE_FILE (one
-- header value per line), so the requests carry many different sessions.
-- Arguments after "--": LIMIT COOKIE_FILE. The -d duration still bounds the run.

local threads_created = 0
local limit = 0
local received = 0
local cookies = {}
local next_cookie = 1
local headers = {}

setup = function(thread)
  threads_created = threads_created + 1
  thread:set("thread_number", threads_created)
end

init = function(args)
  limit = tonumber(args[1])
  for line in io.lines(args[2]) do
    if #line > 0 then
      cookies[#cookies + 1] = line
    end
  end
  for key, value in pairs(wrk.headers) do
    headers[key] = value
  end
  -- Start each thread at a different place in the list.
  next_cookie = ((thread_number or 1) * 7919) % #cookies + 1
end

request = function()
  headers["Cookie"] = cookies[next_cookie]
  next_cookie = next_cookie % #cookies + 1
  return wrk.format(nil, nil, headers)
end

response = function(status, headers, body)
  received = received + 1
  if received >= limit then
    wrk.thread:stop()
  end
end

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
