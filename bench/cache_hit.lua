-- wrk script for the cache-hit comparison: every connection POSTs the same prebuilt multipart body to
-- /caption-images over keep-alive, and the summary comes out as one JSON line (prefixed BENCH_JSON).
--   BENCH_BODY=/path/to/body BENCH_CONTENT_TYPE='multipart/form-data; boundary=...' \
--     wrk -t2 -c8 -d10s -s bench/cache_hit.lua http://127.0.0.1:PORT
-- Responses that are not a 200 with "cached":true are counted as misses, so a cold cache shows up.

local body_path = assert(os.getenv("BENCH_BODY"), "set BENCH_BODY to the multipart body file")
local file = assert(io.open(body_path, "rb"))
wrk.method = "POST"
wrk.path = "/caption-images"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = assert(os.getenv("BENCH_CONTENT_TYPE"), "set BENCH_CONTENT_TYPE")

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

-- per-thread counters (globals of each thread's Lua state, read back in done() with thread:get)
hits = 0
misses = 0

function response(status, headers, body)
  if status == 200 and string.find(body, '"cached":%s*true') then
    hits = hits + 1
  else
    misses = misses + 1
  end
end

function done(summary, latency, requests)
  local total_hits, total_misses = 0, 0
  for _, thread in ipairs(threads) do
    total_hits = total_hits + thread:get("hits")
    total_misses = total_misses + thread:get("misses")
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "hits": %d, "misses": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"mean": %.1f, "p50": %d, "p90": %d, "p99": %d, "max": %d}}\n',
    summary.requests, summary.duration, total_hits, total_misses,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
