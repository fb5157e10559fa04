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


-- Job events (docs/workflows.md#job-events): a script that changes jobs appends ONE entry
-- to the queue's events stream holding all its events, field 'e': a msgpack array of
-- [job id, event, details...], where the job id may be an array of ids that share the
-- event (a bulk enqueue). One entry per call keeps the cost per job to a table insert;
-- XADD MAXLEN ~ cap bounds the stream (cap 0: no events are kept).
-- Consecutive events of one kind with the same details share one item (a settle batch of
-- completions is one item naming every job), which keeps the cost per job to a table
-- insert and the order of events as it was.
local function event(events, id, kind, a, b)
  local last = events[#events]
  if last and last[2] == kind and last[3] == a and last[4] == b then
    local ids = last[1]
    ids[#ids + 1] = id
  else
    events[#events + 1] = {{id}, kind, a, b}
  end
end

local function flush_events(key, cap, events)
  if #events > 0 and (tonumber(cap) or 0) > 0 then
    redis.call('XADD', key, 'MAXLEN', '~', cap, '*', 'e', cmsgpack.pack(events))
  end
end

-- Workflows (docs/workflows.md). A job that must wait for others is 'waiting', with
-- 'pending' dependencies left; every dependency lists its dependants in its 'next' field,
-- one line '<dependant id>\t<slot>\t<born>' each, where born is the dependant's
-- 'enqueued' time: an edge to a dependant that expired and whose id was used again for
-- another job is stale and ignored. Slot 0 of a group is its gate: the step before a
-- group inside a chain, which it waits for and fails with, but whose result it does not
-- keep. The script that makes a job final hands its id
-- to flow_drain, which settles every edge out of it in the same atomic step: the dependant
-- records the outcome in its field 'in:<slot>' and, when nothing is pending any more, is
-- released (a job goes to the stream or the delayed set; a group node completes with its
-- members' results as one msgpack array, or fails). The first outcome of an edge counts
-- and later ones (a dead member requeued and run again) only replace the stored value, so
-- a repeat, a takeover or a second run never counts an edge twice. Dependants are found
-- by id under the same key prefix, so every key stays in the queue's hash slot.
-- A flow context: {stream, delayed, ttl, prefix, now, events}.

-- An ErrorInfo (msgpack [type, message, traceback]) as three strings, whatever was stored.
local function error_parts(raw)
  local ok, parts = pcall(cmsgpack.unpack, raw or '')
  if ok and type(parts) == 'table' then
    return tostring(parts[1] or 'Error'), tostring(parts[2] or ''), tostring(parts[3] or '')
  end
  return 'UnreadableError', '', ''
end

local function be32(n)
  return string.char(math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
    math.floor(n / 256) % 256, n % 256)
end

local function array_header(n)
  if n < 16 then
    return string.char(0x90 + n)
  elseif n < 65536 then
    return string.char(0xdc, math.floor(n / 256), n % 256)
  end
  return string.char(0xdd) .. be32(n)
end

-- At most n bytes of a text, never ending inside a UTF-8 character.
local function clip(text, n)
  if #text <= n then
    return text
  end
  local cut = string.sub(text, 1, n)
  -- Find where the last character starts; drop it only if the cut left it incomplete.
  local start = #cut
  while start > 1 and cut:byte(start) >= 0x80 and cut:byte(start) < 0xC0 do
    start = start - 1
  end
  local lead = cut:byte(start)
  local size = (lead >= 0xF0 and 4) or (lead >= 0xE0 and 3) or (lead >= 0xC0 and 2) or 1
  if start + size - 1 > #cut then
    return string.sub(cut, 1, start - 1)
  end
  return cut
end

-- How a dependency that did not complete failed: its error, or what ended it.
local function outcome_error(status, raw)
  if status == 'aborted' then
    return 'JobAborted', 'the job was aborted', ''
  elseif status == 'missing' then
    return 'JobNotFound', 'no job with this id', ''
  end
  return error_parts(raw)
end

-- A failed member inside a group's result: msgpack extension 42 holding a MemberFailure.
local function member_error(payload)
  return string.char(0xc9) .. be32(#payload) .. string.char(42) .. payload
end

-- The error a dependant fails with: a dependency that itself failed for a dependency (a
-- chain, a group) passes its error on unchanged, so a long chain never nests messages.
local function dependency_error(did, status, raw)
  local kind, message, tb = error_parts(raw)
  if kind == 'DependencyFailed' or kind == 'GroupFailed' then
    return raw
  end
  local what
  if status == 'missing' then
    what = 'dependency ' .. did .. ' does not exist'
  elseif status == 'aborted' then
    what = 'dependency ' .. did .. ' was aborted'
  else
    what = 'dependency ' .. did .. ' ended ' .. status .. ': ' .. kind .. ': ' .. message
  end
  return cmsgpack.pack({'DependencyFailed', what, tb})
end

local function flow_final(ctx, work, wkey, wid, status, fields, reason)
  redis.call('HSET', wkey, 'status', status, 'finished', ctx.now, unpack(fields))
  redis.call('PEXPIRE', wkey, ctx.ttl)
  notify(wkey, wid, redis.call('HGET', wkey, 'watchers'))
  event(ctx.events, wid, status == 'complete' and 'completed' or status, reason)
  work[#work + 1] = wid
end

-- A group node whose members have all ended: one array of their results, in member order.
local function complete_group(ctx, work, wkey, wid, policy)
  local n = tonumber(redis.call('HGET', wkey, 'size')) or 0
  local parts, failures, named = {array_header(n)}, 0, {}
  for first = 1, n, 1000 do
    local fields = {}
    for i = first, math.min(first + 999, n) do
      fields[#fields + 1] = 'in:' .. i
    end
    local values = redis.call('HMGET', wkey, unpack(fields))
    for j = 1, #fields do
      local value = values[j] or 'c\192'
      if string.sub(value, 1, 1) == 'c' then
        parts[#parts + 1] = string.sub(value, 2)
      else
        local payload = string.sub(value, 2)
        failures = failures + 1
        parts[#parts + 1] = member_error(payload)
        if #named < 3 then
          local m = cmsgpack.unpack(payload)
          named[#named + 1] = m[2] .. ' ' .. m[1] .. ' (' .. m[3] .. ': ' .. clip(m[4], 200) .. ')'
        end
      end
    end
    redis.call('HDEL', wkey, unpack(fields))
  end
  if failures > 0 and policy ~= 'pass' then
    local message = failures .. ' of ' .. n .. ' members failed: ' .. table.concat(named, '; ')
    if failures > #named then
      message = message .. '; ...'
    end
    local reason = failures .. (failures == 1 and ' member failed' or ' members failed')
    flow_final(ctx, work, wkey, wid, 'failed', {'error',
      cmsgpack.pack({'GroupFailed', message, ''}), 'reason', reason}, reason)
  else
    flow_final(ctx, work, wkey, wid, 'complete', {'result', table.concat(parts)})
  end
end

local function release(ctx, work, wkey, wid, kind, policy)
  if kind == 'group' then
    complete_group(ctx, work, wkey, wid, policy)
    return
  end
  local run_at = tonumber(redis.call('HGET', wkey, 'run_at')) or 0
  if run_at > tonumber(ctx.now) then
    redis.call('HSET', wkey, 'status', 'scheduled')
    redis.call('ZADD', ctx.delayed, run_at, wid)
    event(ctx.events, wid, 'released', 'scheduled')
  else
    local entry = redis.call('XADD', ctx.stream, '*', 'j', wid)
    redis.call('HSET', wkey, 'status', 'queued', 'entry', entry)
    event(ctx.events, wid, 'released', 'queued')
  end
end

-- Record dependency did's outcome on dependant wid's edge 'slot' (born: see above; '' for
-- an edge that names no time).
local function resolve_edge(ctx, work, did, d, wid, slot, born)
  local wkey = ctx.prefix .. wid
  local w = redis.pcall('HMGET', wkey, 'status', 'policy', 'feed', 'kind', 'enqueued')
  if w.err or w[1] ~= 'waiting' or (born ~= '' and w[5] ~= born) then
    return
  end
  local status = d[1] or 'missing'
  local ok = status == 'complete'
  local value = status
  local gate = slot == '0'
  if w[4] == 'group' and not gate then
    if ok then
      value = 'c' .. (d[2] or '\192')
    else
      local kind, message, tb = outcome_error(status, d[3])
      value = 'x' .. cmsgpack.pack({status, did, kind, message, tb})
    end
  elseif w[3] and ok then
    value = 'c' .. (d[2] or '\192')
  end
  if redis.call('HSET', wkey, 'in:' .. slot, value) == 0 then
    return
  end
  local policy = w[2] or 'fast'
  if not ok and (policy == 'fast' or gate) then
    local reason = 'dependency ' .. did .. ' ' .. status
    flow_final(ctx, work, wkey, wid, 'failed', {'error', dependency_error(did, status, d[3]),
      'reason', reason}, reason)
  elseif redis.call('HINCRBY', wkey, 'pending', -1) <= 0 then
    release(ctx, work, wkey, wid, w[4], policy)
  end
end

-- Settle every edge out of the jobs in 'work' (ids of jobs that just became final, or
-- {id, {status, result, error, next}} from a caller that holds them already), and out of
-- the jobs that became final because of them.
local function flow_drain(ctx, work)
  while #work > 0 do
    local did, d = table.remove(work), nil
    if type(did) == 'table' then
      did, d = did[1], did[2]
    else
      d = redis.pcall('HMGET', ctx.prefix .. did, 'status', 'result', 'error', 'next')
    end
    if not d.err and d[4] then
      for line in string.gmatch(d[4], '[^\n]+') do
        local wid, slot, born = string.match(line, '^([^\t]*)\t(%d+)\t?(%d*)$')
        if wid then
          resolve_edge(ctx, work, did, d, wid, slot, born)
        end
      end
    end
  end
end
