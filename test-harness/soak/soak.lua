-- wrk script of the soak (test-harness/src/bin/soak.rs writes its data). A fixed, interleaved
-- mix of request classes; every answer names its class (`x-soak-class`, echoed by Envoy), and
-- each status is checked against the class's expected ones as it arrives.
-- Arguments: data directory, chunk number, thread count, output file.

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

local classes, by_name, schedule = {}, {}, {}
local pos = 0
-- What a thread counted, as globals holding numbers and strings (the only values wrk hands
-- from a thread to `done`): `keylist` names every counter, one per line.
keylist = ""
samples = ""

local function count(c, key)
  local name = c.keys[key]
  if not name then
    name = key .. "\t" .. c.name
    c.keys[key] = name
    keylist = keylist .. name .. "\n"
  end
  _G[name] = (_G[name] or 0) + 1
end

function init(args)
  local dir, chunk, nthreads = args[1], args[2], tonumber(args[3])
  out_file = args[4]
  local spec = dofile(dir .. "/classes.lua")
  local pools = dofile(dir .. "/pool-" .. chunk .. ".lua")
  for _, c in ipairs(spec) do
    local requests = c.requests
    if pools[c.name] then
      -- Each thread takes its own share of a pool: every pooled request is sent once.
      requests = {}
      for i, r in ipairs(pools[c.name]) do
        if (i - 1) % nthreads == tid then table.insert(requests, r) end
      end
    end
    local expect = {}
    for _, s in ipairs(c.expect) do expect[s] = true end
    local class = { name = c.name, expect = expect, agent = c.agent, requests = requests, next = 0,
                    pooled = pools[c.name] ~= nil,
                    keys = {}, sampled = 0 }
    table.insert(classes, class)
    by_name[c.name] = class
  end
  -- Smooth weighted round-robin: the mix is the same in every second of the run.
  local credit, total = {}, 0
  for i, c in ipairs(spec) do credit[i] = 0; total = total + c.weight end
  for _ = 1, total do
    local best = 1
    for i, c in ipairs(spec) do
      credit[i] = credit[i] + c.weight
      if credit[i] > credit[best] then best = i end
    end
    credit[best] = credit[best] - total
    table.insert(schedule, classes[best])
  end
  pos = tid * 7 % #schedule
end

function request()
  pos = pos % #schedule + 1
  local c = schedule[pos]
  -- A pooled token is sent once: an exhausted pool gives its turns to the next class (a
  -- reused single-use token would be a replay, not the class it claims).
  while c.pooled and c.next == #c.requests do
    count(c, "wraps")
    pos = pos % #schedule + 1
    c = schedule[pos]
  end
  if c.next == #c.requests then c.next = 0 end
  c.next = c.next + 1
  return c.requests[c.next]
end

local untagged = { name = "(untagged)", keys = {}, sampled = 0 }

local function sample(c, status, headers, body)
  if c.sampled < 3 then
    c.sampled = c.sampled + 1
    local text = string.gsub(string.sub(body or "", 1, 160), "[\r\n\t]", " ")
    samples = samples .. c.name .. "\t" .. status .. " agent=" .. tostring(headers["x-soak-agent"]) .. " " .. text .. "\n"
  end
end

function response(status, headers, body)
  local c = by_name[headers["x-soak-class"]]
  if not c then
    count(untagged, "status:" .. status)
    sample(untagged, status, headers, body)
    return
  end
  count(c, status)
  -- An allowed request must reach the upstream as the token's agent, whatever the client wrote.
  if not c.expect[status] or (status < 300 and c.agent and headers["x-soak-agent"] ~= c.agent) then
    count(c, "wrong")
    sample(c, status, headers, body)
  end
end

function done(summary, latency, requests)
  -- `done` runs in the main state, which saw no arguments: the threads did.
  local out = io.open(threads[1]:get("out_file"), "w")
  local e = summary.errors
  out:write(string.format("summary\t%d\t%d\t%d\t%d\t%d\t%d\t%d\n", summary.duration, summary.requests,
    e.connect, e.read, e.write, e.status, e.timeout))
  out:write(string.format("latency\t%d\t%d\t%d\t%d\n", latency:percentile(50), latency:percentile(99),
    latency:percentile(99.9), latency.max))
  for _, t in ipairs(threads) do
    for name in string.gmatch(t:get("keylist"), "[^\n]+") do
      out:write("count\t", name, "\t", t:get(name), "\n")
    end
    for line in string.gmatch(t:get("samples"), "[^\n]+") do out:write("sample\t", line, "\n") end
  end
  out:close()
end
