-- _prelude.lua: helpers every script shares; scripts.py puts this in front of each script
-- when it loads it, so every script stays one self-contained EVALSHA.

-- Redis Cluster: while the queue's slot moves to another node (a reshard), its keys lie
-- partly on each, and a script reaching a key already moved would stop half-way with its
-- first writes kept. Two keys that never exist make every script stop before it writes
-- instead: on the node the slot leaves (the keys would be asked for elsewhere) and on the
-- one it goes to (TRYAGAIN); the client sends the script again once the move is over.
-- Otherwise, and without Cluster, this is one cheap EXISTS.
redis.call('EXISTS', KEYS[1] .. ':moving:1', KEYS[1] .. ':moving:2')

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

-- Priority lanes (docs/flow-control.md#priorities): a stream cannot reorder, so the jobs
-- of priority p wait in a stream of their own, '<stream>:<p>' (the queue's stream itself
-- for 0), read through the same consumer group; the priorities in use besides 0 are
-- members of the set '<stream>:lanes'. An entry is named everywhere (job records, settle,
-- renew and release calls) by a token that says its lane: '<entry id>' in lane 0,
-- '<entry id>@<p>' in lane p. Every lane shares the queue's hash tag.
local function lane(stream, prio)
  if not prio or prio == '' or prio == '0' then
    return stream, ''
  end
  return stream .. ':' .. prio, '@' .. prio
end

-- The stream and the entry id a token names.
local function untoken(stream, token)
  local at = string.find(token, '@', 1, true)
  if not at then
    return stream, token
  end
  return stream .. ':' .. string.sub(token, at + 1), string.sub(token, 1, at - 1)
end

-- Record that a job of priority prio was written: a priority new to the queue is added to
-- its lanes, and a worker blocked in XREADGROUP (which names only the lanes it knew) is
-- woken through '<stream>:wake' so that it reads the new lane at once.
local function add_lane(stream, prio)
  if redis.call('SADD', stream .. ':lanes', prio) == 1 then
    redis.call('XADD', stream .. ':wake', 'MAXLEN', '~', 100, '*', 'lane', prio)
  end
end

-- Append job id to the stream of its priority; returns the new entry's token.
local function push(stream, id, prio)
  local s, tag = lane(stream, prio)
  return redis.call('XADD', s, '*', 'j', id) .. tag
end

-- Whether consumer holds the entry a token names in its pending list.
local function holds(stream, group, token, consumer)
  local s, entry = untoken(stream, token)
  return #redis.call('XPENDING', s, group, entry, entry, 1, consumer) > 0
end

-- Ack and delete stream entries (tokens, of any lanes). An entry leaves the stream only in
-- the script that records its job's outcome (at-least-once). Both commands are no-ops when
-- repeated.
local function ack(stream, group, tokens)
  if #tokens == 0 then
    return
  end
  local by, order = {}, {}
  for _, token in ipairs(tokens) do
    local s, entry = untoken(stream, token)
    local entries = by[s]
    if not entries then
      entries = {}
      by[s], order[#order + 1] = entries, s
    end
    entries[#entries + 1] = entry
  end
  for _, s in ipairs(order) do
    redis.call('XACK', s, group, unpack(by[s]))
    redis.call('XDEL', s, unpack(by[s]))
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
        redis.pcall('SPUBLISH', string.sub(field, 3), id)
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
    local entry = push(ctx.stream, wid, redis.call('HGET', wkey, 'prio'))
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

-- Rate and concurrency limits (docs/flow-control.md#rate-and-concurrency-limits), decided
-- in the step that begins a job, on Redis's clock, across every worker. A worker hands its
-- tasks' limits to begin as text: per task '<task>\31<interval us>\31<burst us>\31<slots>'
-- (empty fields: no such limit), tasks separated by \30. A job's limit key is its task
-- name, or the keys its producer computed (field 'lk': '<rate key>\31<concurrency key>').
-- Rate: GCRA in microseconds of Redis's clock, one hash '<queue>rate:<key>' with 'tat' (the
-- theoretical arrival time) and 'tail' (the last time a deferred job was given, so
-- deferred jobs queue up an interval apart instead of all coming back at once), and the
-- deferred jobs in their order in '<queue>rwait:<key>'. Concurrency: a zset
-- '<queue>conc:<key>' of the
-- jobs holding a slot, scored by when their lease ends (renew extends it, so a dead
-- worker's slot frees with its lease); jobs waiting for a slot are in '<queue>cwait:<key>'
-- and the settle that frees a slot sends the oldest waiter back to the stream at once.
-- A job over a limit goes to the delayed set until it may run: its entry is acked, its
-- attempt and deliveries stay as they were ('limited' says which limit held it).
local function parse_limits(text)
  if not text or text == '' then
    return nil
  end
  local limits = {}
  for spec in string.gmatch(text, '[^\30]+') do
    local task, t, tau, n = string.match(spec, '^([^\31]*)\31(%d*)\31(%d*)\31(%d*)$')
    if task then
      limits[task] = {t = tonumber(t), tau = tonumber(tau) or 0, n = tonumber(n)}
    end
  end
  return limits
end

-- The task name at the head of an envelope (a msgpack array, maybe behind a signature:
-- \193 and a 32-byte tag), read from its first bytes without unpacking the rest.
local function envelope_task(env)
  if not env then
    return nil
  end
  local at = 1
  if string.byte(env, 1) == 0xc1 then
    at = 34
  end
  local head = string.byte(env, at)
  if not head then
    return nil
  elseif head >= 0x90 and head <= 0x9f then
    at = at + 1
  elseif head == 0xdc then
    at = at + 3
  elseif head == 0xdd then
    at = at + 5
  else
    return nil
  end
  local s = string.byte(env, at)
  if not s then
    return nil
  elseif s >= 0xa0 and s <= 0xbf then
    return string.sub(env, at + 1, at + s - 0xa0)
  elseif s == 0xd9 then
    local n = string.byte(env, at + 1) or 0
    return string.sub(env, at + 2, at + 1 + n)
  elseif s == 0xda then
    local n = (string.byte(env, at + 1) or 0) * 256 + (string.byte(env, at + 2) or 0)
    return string.sub(env, at + 3, at + 2 + n)
  end
  return nil
end

-- Send the oldest job waiting for a slot of concurrency key ckey back to its stream. A
-- waiter keeps its place in the waiters set until it starts (admit removes it), so one
-- woken but beaten to the slot by a newer job is still the oldest next time. Waiters that
-- ended or run are dropped; one already woken (queued) is left to take the slot.
local function wake_waiter(base, stream, delayed, ckey)
  local waiters = base .. 'cwait:' .. ckey
  for _, wid in ipairs(redis.call('ZRANGE', waiters, 0, 19)) do
    local wkey = base .. 'job:' .. wid
    local w = redis.pcall('HMGET', wkey, 'status', 'limited', 'prio')
    if w.err or (w[1] ~= 'queued' and w[1] ~= 'scheduled') then
      redis.call('ZREM', waiters, wid)
    elseif w[1] == 'scheduled' and w[2] == 'concurrency'
        and redis.call('ZREM', delayed, wid) == 1 then
      local entry = push(stream, wid, w[3])
      redis.call('HSET', wkey, 'status', 'queued', 'entry', entry)
      redis.call('HDEL', wkey, 'limited', 'run_at')
      return
    end
  end
end

-- Free the concurrency slot a job holds (field 'slot': its concurrency key), if any.
local function free_slot(base, stream, delayed, key, id, ckey)
  if ckey then
    redis.call('ZREM', base .. 'conc:' .. ckey, id)
    redis.call('HDEL', key, 'slot')
    wake_waiter(base, stream, delayed, ckey)
  end
end

-- Whether a job may start now under its task's limits ('limited': the limit that held it
-- back before, if any). Admitted: takes its slot and its place in the rate and returns
-- nil. Over a limit: returns the time (ms) it may try again and which limit held it,
-- changing nothing but the rate's tail and the waiters.
-- The state of one rate or concurrency key is read once per call, kept in q while the call
-- runs (it is atomic, so that copy is the truth meanwhile) and written back once at its end
-- (flush_limits): a batch of jobs of one limited task costs a few commands, not a few per
-- job.
local function rate_state(q, rkey, spec)
  q.rates = q.rates or {}
  local r = q.rates[rkey]
  if not r then
    if not q.now_us then
      local t = redis.call('TIME')
      q.now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
    end
    local key = q.base .. 'rate:' .. rkey
    local state = redis.call('HMGET', key, 'tat', 'tail')
    r = {key = key, waiting = q.base .. 'rwait:' .. rkey, tat = tonumber(state[1]) or 0,
      tail = tonumber(state[2]) or 0, span = spec.t + spec.tau, dirty = false}
    q.rates[rkey] = r
  end
  return r
end

local function slot_state(q, ckey, now)
  q.slots = q.slots or {}
  local s = q.slots[ckey]
  if not s then
    local key = q.base .. 'conc:' .. ckey
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    s = {key = key, count = redis.call('ZCARD', key), dirty = false}
    q.slots[ckey] = s
  end
  return s
end

local function admit(q, key, id, env, lk, now, limited)
  local task = envelope_task(env)
  local spec = task and q.limits[task]
  if not spec then
    return nil
  end
  local rkey, ckey = task, task
  if lk then
    local r, c = string.match(lk, '^([^\31]*)\31([^\31]*)$')
    rkey = (r and r ~= '') and r or task
    ckey = (c and c ~= '') and c or task
  end
  local s, r, tat
  if spec.n then
    s = slot_state(q, ckey, now)
    if s.count >= spec.n and not redis.call('ZSCORE', s.key, id) then
      local waiters = q.base .. 'cwait:' .. ckey
      redis.call('ZADD', waiters, 'NX', now, id)
      redis.call('PEXPIRE', waiters, q.lease * 2 + 60000)
      local head = redis.call('ZRANGE', s.key, 0, 0, 'WITHSCORES')
      return tonumber(head[2]) or (now + q.lease), 'concurrency'
    end
  end
  if spec.t then
    r = rate_state(q, rkey, spec)
    tat = math.max(r.tat, q.now_us)
    if tat - spec.tau > q.now_us then
      -- Jobs held back queue up one interval apart, in '<queue>rwait:<key>' (score: their
      -- place). One that comes back before its turn (the ones ahead started a few ms
      -- late) keeps its place: it is due when the jobs still ahead of it have had theirs.
      local due = tat - spec.tau
      if limited ~= 'rate' then
        due = math.max(due, r.tail + spec.t)
        r.tail, r.dirty = due, true
        redis.call('ZADD', r.waiting, string.format('%d', due), id)
      else
        local ahead = redis.call('ZRANK', r.waiting, id)
        if not ahead then
          redis.call('ZADD', r.waiting, string.format('%d', due), id)
          ahead = redis.call('ZRANK', r.waiting, id)
        end
        due = due + ahead * spec.t
      end
      return math.ceil(due / 1000), 'rate'
    end
  end
  if s then
    s.count = s.count + redis.call('ZADD', s.key, now + q.lease, id)
    s.dirty = true
    redis.call('ZREM', q.base .. 'cwait:' .. ckey, id)
    redis.call('HSET', key, 'slot', ckey)
  end
  if r then
    r.tat, r.dirty = tat + spec.t, true
    if limited == 'rate' then
      redis.call('ZREM', r.waiting, id)
    end
  end
  return nil
end

-- Write back the limit state a call changed (see rate_state).
local function flush_limits(q)
  for _, r in pairs(q.rates or {}) do
    if r.dirty then
      redis.call('HSET', r.key, 'tat', string.format('%d', r.tat),
        'tail', string.format('%d', r.tail))
      local ttl = math.ceil((math.max(r.tat, r.tail) - q.now_us + r.span) / 1000) + 60000
      redis.call('PEXPIRE', r.key, ttl)
      redis.call('PEXPIRE', r.waiting, ttl)
    end
  end
  for _, s in pairs(q.slots or {}) do
    if s.dirty then
      redis.call('PEXPIRE', s.key, q.lease * 2 + 60000)
    end
  end
end

-- Begin (docs/architecture.md#begin): turn delivered entries into running jobs, counting
-- every delivery; shared by begin.lua (entries read or taken over by the caller) and
-- fetch.lua (entries it reads itself). q: {stream, dead, delayed, events (stream key),
-- group, consumer, max_deliveries, check, max_payload, ttl, cap, prefix, paused}; items:
-- {job id, entry token} each; q.limits (parse_limits), q.lease (ms) and q.base (the
-- queue's key prefix) for limits. Returns per item one of:
--   {'run', envelope or false, attempt, deliveries[, input]}  the caller owns the job and
--              runs it; input (workflows) is the encoded result of the dependency it is fed
--   {'skip', why}  the entry was acked and deleted without running anything: why is
--              'missing' (no job record: deleted, or evicted by a misconfigured Redis),
--              'corrupt' (the job's key is not a hash),
--              'final' (aborted or already finished) or 'stale' (the job names another
--              entry as its current one: a stale or forged duplicate)
--   {'lost'}   another consumer owns the entry now: leave it alone
--   {'paused'} the queue is paused: the entry stays in this consumer's pending list,
--              unbegun, until the caller begins it again after the queue is resumed
--   {'deferred', due}  over its task's rate or concurrency limit: the entry was acked and
--              the job waits in the delayed set until due (ms), attempt not used up
--   {'dead', deliveries}  delivered more than max_deliveries times: dead-lettered
--   {'corrupt'}  the record's counters are not numbers (written by something else):
--              dead-lettered as 'corrupt job record'
--   {'big', size}  the envelope is larger than the worker accepts: dead-lettered without
--              sending it (anyone who can write to Redis can write a job)
-- Invariant: deliveries counts every hand-over of the current attempt, crash redeliveries
-- included, so a job that kills its worker cannot loop forever. The hash records the
-- consumer and entry that began the job; settle scripts accept outcomes only from them.
-- Repeat-safe: a delivery is identified by (consumer, entry). A job already running under
-- the same pair was begun by this very call before its reply was lost (or this consumer
-- re-adopts an entry it holds): it is returned as it stands, without counting again.
-- Workflows: a job dead-lettered here hands its outcome to its dependants (flow_drain).
local BEGIN_FINAL = {complete = true, failed = true, dead = true, aborted = true}

local function begin_batch(q, items)
  local consumer = q.consumer
  local now = redis_now_text()
  local out, acked, work, events = {}, {}, {}, {}

  -- Dead-letter a job without running it; the error is an ErrorInfo (msgpack array).
  local function bury(key, id, entry, reason, kind, message)
    redis.call('HSET', key, 'status', 'dead', 'finished', now, 'worker', consumer,
      'entry', entry, 'reason', reason, 'error', cmsgpack.pack({kind, message, ''}))
    redis.call('PERSIST', key)
    redis.call('ZADD', q.dead, now, id)
    acked[#acked + 1] = entry
    notify(key, id, redis.call('HGET', key, 'watchers'))
    event(events, id, 'dead', reason)
    work[#work + 1] = id
  end

  -- The input of a job fed by its dependency (a chain step, a group's callback), or nil.
  local function input(key, feed)
    if feed then
      local value = redis.call('HGET', key, 'in:1')
      return value and string.sub(value, 2) or nil
    end
  end

  for i, item in ipairs(items) do
    local id, entry = item[1], item[2]
    local key = q.prefix .. id
    if q.check and not holds(q.stream, q.group, entry, consumer) then
      out[i] = {'lost'}
    else
      -- One HMGET with the envelope is measurably cheaper than checking its size first; a
      -- hostile giant envelope is then copied once inside Redis, but never sent to a worker.
      local job = redis.pcall('HMGET', key, 'status', 'attempt', 'worker', 'entry', 'env', 'feed',
        'lk', 'limited')
      local status = job[1]
      local mine = job[3] == consumer and job[4] == entry
      if job.err then
        -- The key is not a hash (written by something else): nothing aioqueue can run or
        -- record there; the entry must not block the queue.
        acked[#acked + 1] = entry
        out[i] = {'skip', 'corrupt'}
      elseif mine and status == 'running' then
        local deliveries = redis.call('HGET', key, 'deliveries')
        out[i] = {'run', job[5], tonumber(job[2]) or 1, tonumber(deliveries) or 0,
          input(key, job[6])}
      elseif mine and status == 'dead' then
        acked[#acked + 1] = entry
        out[i] = {'dead', tonumber(redis.call('HGET', key, 'deliveries')) or 0}
      elseif not status then
        acked[#acked + 1] = entry
        out[i] = {'skip', 'missing'}
      elseif BEGIN_FINAL[status] or status == 'waiting' or (job[4] and job[4] ~= entry) then
        acked[#acked + 1] = entry
        out[i] = {'skip', BEGIN_FINAL[status] and 'final' or 'stale'}
      elseif q.paused then
        out[i] = {'paused'}
      elseif job[5] and #job[5] > q.max_payload then
        local size = #job[5]
        bury(key, id, entry, 'payload too large', 'PayloadTooLarge', 'the job is ' .. size
          .. ' bytes, more than max_payload_bytes (' .. q.max_payload .. ')')
        out[i] = {'big', size}
      elseif job[6] and redis.call('HSTRLEN', key, 'in:1') > q.max_payload + 1 then
        -- A fed input (a group's results) counts against the same limit as an envelope.
        local size = redis.call('HSTRLEN', key, 'in:1') - 1
        bury(key, id, entry, 'input too large', 'PayloadTooLarge', 'its input is ' .. size
          .. ' bytes, more than max_payload_bytes (' .. q.max_payload .. ')')
        out[i] = {'big', size}
      else
        local deliveries = redis.pcall('HINCRBY', key, 'deliveries', 1)
        if type(deliveries) == 'table' then
          bury(key, id, entry, 'corrupt job record', 'CorruptRecord',
            "the job record's deliveries field is not a whole number")
          out[i] = {'corrupt'}
        elseif deliveries > q.max_deliveries then
          local reason = 'worker lost ' .. (deliveries - 1) .. ' times'
          bury(key, id, entry, reason, 'WorkerLost',
            'the job was handed out ' .. deliveries .. ' times; each time its worker died')
          out[i] = {'dead', deliveries}
        else
          local due, why
          if q.limits then
            due, why = admit(q, key, id, job[5], job[7], tonumber(now), job[8])
          end
          if due then
            -- Not started: the hand-over is not counted, the attempt is not used up.
            redis.call('HINCRBY', key, 'deliveries', -1)
            redis.call('HSET', key, 'status', 'scheduled', 'run_at', due, 'limited', why)
            redis.call('ZADD', q.delayed, due, id)
            acked[#acked + 1] = entry
            event(events, id, 'deferred', why, due)
            out[i] = {'deferred', due}
          else
            if job[8] then
              redis.call('HDEL', key, 'limited', 'run_at')
            end
            redis.call('HSET', key, 'status', 'running', 'started', now, 'worker', consumer,
              'entry', entry)
            event(events, id, 'started', tonumber(job[2]) or 1, consumer)
            out[i] = {'run', job[5], tonumber(job[2]) or 1, deliveries, input(key, job[6])}
          end
        end
      end
    end
  end
  ack(q.stream, q.group, acked)
  flush_limits(q)
  if #work > 0 then
    flow_drain({stream = q.stream, delayed = q.delayed, ttl = q.ttl, now = now,
      prefix = q.prefix, events = events}, work)
  end
  flush_events(q.events, q.cap, events)
  return out
end
