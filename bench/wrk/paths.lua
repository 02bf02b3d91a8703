-- Cycles through BENCH_PATHS (default 1000) distinct paths /p/0 .. /p/N-1, each
-- wrk connection starting at a different offset, so every worker sees every
-- path (one label set per path). Used by the scrape-cost measurement.
local n = tonumber(os.getenv("BENCH_PATHS") or "1000")
local counter = 0
local headers = {}
local close = os.getenv("BENCH_CLOSE") == "1"

init = function(args)
  counter = math.random(0, n - 1)
  if close then headers["Connection"] = "close" end
end

request = function()
  counter = (counter + 1) % n
  return wrk.format("GET", "/p/" .. counter, headers)
end
