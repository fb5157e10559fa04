-- _prelude.lua: helpers every script shares; scripts.py puts this in front of each script
-- when it loads it, so every script stays one self-contained EVALSHA.

-- Redis's clock in ms: the one clock every worker agrees on. Anything compared across
-- machines (due times, cron ticks) is decided on it, never on a caller's clock.
local function redis_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The same as text, for scripts that write it many times: redis.call converts a Lua number
-- on every call, which measurably slows per-job loops. 13 digits print exactly.
local function redis_now_text()
  return tostring(redis_now())
end

-- Ack and delete stream entries. An entry leaves the stream only in the script that
-- records its job's outcome (at-least-once). Both commands are no-ops when repeated.
local function ack(stream, group, entries)
  if #entries > 0 then
    redis.call('XACK', stream, group, unpack(entries))
    redis.call('XDEL', stream, unpack(entries))
  end
end

-- Tell every process waiting for this job (see watch.lua) that it is final. Watchers are
-- hash fields 'w:<channel>' counted in 'watchers', so a job nobody waits for costs nothing.
-- pcall: a channel this ACL user may not publish to must not abort the script half-way
-- through recording an outcome (the waiter re-checks the job on its own).
local function notify(key, id, watchers)
  if (tonumber(watchers) or 0) > 0 then
    for _, field in ipairs(redis.call('HKEYS', key)) do
      if string.sub(field, 1, 2) == 'w:' then
        redis.pcall('PUBLISH', string.sub(field, 3), id)
      end
    end
  end
end

-- A script whose first run destroys what a repeat would need to give the same answer keeps
-- that answer for ten minutes under a key unique to the request (Keys.memo).
local function remembered(key)
  local answer = redis.call('GET', key)
  return answer and tonumber(answer)
end

local function remember(key, answer)
  redis.call('SET', key, answer, 'PX', 600000)
  return answer
end

