-- enqueue.lua: write a batch of new jobs, all or nothing with respect to max_size.
-- KEYS[1] stream, KEYS[2] delayed zset, KEYS[3] events stream, KEYS[3 + i] hash of job i
-- ARGV[1] max_size (0 = unlimited),
--   ARGV[2] length of the job-key prefix (the job id is the rest of KEYS[3 + i]),
--   ARGV[3] the layout of each job's arguments: '0' all run now: envelope;
--     '1' timed: envelope, run_at (ms on Redis's clock, 0 = none), delay (ms from now on
--     Redis's clock, 0 = none); '2' a workflow (docs/workflows.md): envelope only, and
--     after every job's envelope, pairs (job index in this batch, spec) for the jobs that
--     are more than a plain job: a spec is fields separated by \31: run_at, delay, kind
--     ('job' or 'group'), policy, feed ('1' = the dependency's result is the first
--     argument, '' = none), pending (how many dependencies), next (its dependants in this
--     batch, lines '<id>\t<slot>'), after (its dependencies outside this batch, lines
--     '<id>\t<slot>'), members (a group's members in this batch, runs
--     '<first slot>:<first job index>:<count>' separated by commas), shape (a named
--     group's digest of its whole workflow), size (a group's member count; its pending
--     count may hold one more edge, the gate, slot 0), then optionally its own priority
--     and its limit keys ('<rate key>\31<concurrency key>' as two fields). Also used for a
--     batch of mixed priorities or with limit keys. Members listed by
--     their group need no spec of their own, so a large group costs what as many plain
--     jobs cost, plus one argument,
--   ARGV[4] result TTL in ms (used by workflows: a dependant that fails at once expires),
--   ARGV[5] events cap (entries kept in the events stream, 0 = none),
--   ARGV[6] the jobs' priority ('0': the default lane; see lane in _prelude.lua; a
--   workflow job's spec may name its own as a twelfth field),
--   then the jobs' arguments.
-- Returns -1 when the new jobs would take ready + delayed past max_size (nothing is
-- written), -2 when a named group of the workflow exists with another shape (a different
-- workflow under the same group id: nothing is written), else a table with 1 for each job written and 0 for each id that already existed.
-- Invariant: a job id exists at most once, and a live job is in exactly one of the ready
-- stream, the delayed zset and (workflows) 'waiting' for its dependencies. Counting and
-- writing in one script makes QueueFull exact, and a workflow is written all or nothing.
-- Repeat-safe: a job whose stored envelope is byte-for-byte the one given (the envelope
-- holds the enqueue time and the id) was written by this very call before its reply was
-- lost, and is reported as written again; its edges were written with it.
-- Due times are on Redis's clock, so a producer whose clock is off cannot make a delay
-- longer or shorter. The hash starts with only what every job needs; 'attempt' (1) and
-- 'deliveries' (0) are implied until first written, which keeps bulk enqueue cheap.
local max_size = tonumber(ARGV[1])
local skip = tonumber(ARGV[2])
local mode = ARGV[3]
local step = (mode == '1' and 3) or 1
local prio = ARGV[6]
-- Priorities written by this call besides 0, added to the set of lanes workers read.
local lanes = {}
if prio ~= '0' then
  lanes[prio] = true
end
local n = #KEYS - 3
local fresh, repeated, seen, fresh_ids, specs, member_of = {}, {}, {}, {}, {}, {}
local new, fresh_count = 0, 0

-- A spec's fields, separated by \31: run_at, delay, kind, policy, feed, pending, next,
-- after, members, shape, size, then optionally prio (its own priority), and its rate and
-- concurrency keys (stored as 'lk', see parse_limits in _prelude.lua).
local function spec_of(text)
  local f = {}
  for part in string.gmatch(text .. '\31', '([^\31]*)\31') do
    f[#f + 1] = part
  end
  local pending = tonumber(f[6]) or 0
  return {run_at = tonumber(f[1]) or 0, delay = tonumber(f[2]) or 0, kind = f[3] or 'job',
    policy = f[4] or 'fast', feed = f[5] or '', pending = pending, next = f[7] or '',
    after = f[8] or '', members = f[9] or '', shape = f[10] or '',
    size = tonumber(f[11]) or pending, prio = (f[12] or '') ~= '' and f[12] or nil,
    lk = ((f[13] or '') ~= '' or (f[14] or '') ~= '') and (f[13] .. '\31' .. (f[14] or ''))
      or nil}
end

if mode == '2' then
  for at = 7 + n, #ARGV - 1, 2 do
    local i = tonumber(ARGV[at])
    local spec = spec_of(ARGV[at + 1])
    specs[i] = spec
    -- Each member of a group names the group as its dependant: '<group id>\t<slot>'.
    local gid = string.sub(KEYS[3 + i], skip + 1)
    for run in string.gmatch(spec.members, '[^,]+') do
      local slot, first, count = string.match(run, '^(%d+):(%d+):(%d+)$')
      slot, first = tonumber(slot), tonumber(first)
      for k = 0, tonumber(count) - 1 do
        local line = gid .. '\t' .. (slot + k)
        local had = member_of[first + k]
        member_of[first + k] = had and (had .. '\n' .. line) or line
      end
    end
  end
end

-- A job's dependants in this batch, from its own spec and from the groups it is in.
local function dependants(i)
  local spec, member = specs[i], member_of[i]
  local own = spec and spec.next or ''
  if member and own ~= '' then
    return own .. '\n' .. member
  end
  return member or own
end

for i = 1, n do
  local key = KEYS[3 + i]
  local at = 6 + (i - 1) * step
  if not seen[key] then
    if redis.call('EXISTS', key) == 0 then
      fresh[i] = true
      fresh_count = fresh_count + 1
      fresh_ids[string.sub(key, skip + 1)] = true
      -- max_size counts what is ready or delayed; a waiting job counts from its release.
      if not specs[i] or (specs[i].kind ~= 'group' and specs[i].pending == 0) then
        new = new + 1
      end
    elseif redis.call('HGET', key, 'env') == ARGV[at + 1] then
      repeated[i] = true
    elseif specs[i] and specs[i].shape ~= ''
        and redis.call('HGET', key, 'shape') ~= specs[i].shape then
      return -2
    end
  end
  seen[key] = true
end
if max_size > 0 and new > 0 then
  local size = redis.call('XLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])
  for _, level in ipairs(redis.call('SMEMBERS', KEYS[1] .. ':lanes')) do
    size = size + redis.call('XLEN', KEYS[1] .. ':' .. level)
  end
  if size + new > max_size then
    return -1
  end
end
local now = redis_now()
local out = {}
local events = {}
local ctx = {stream = KEYS[1], delayed = KEYS[2], ttl = ARGV[4],
  prefix = string.sub(KEYS[4] or '', 1, skip), now = tostring(now), events = events}
local work, edges, groups = {}, {}, {}

-- Only dependants written by this call are wired: an id that already existed is returned
-- as it stands and must not start waiting for anything.
local all_fresh = fresh_count == n
local function fresh_lines(lines)
  if all_fresh then
    return lines
  end
  local kept = {}
  for line in string.gmatch(lines, '[^\n]+') do
    if fresh_ids[string.match(line, '^(.*)\t')] then
      kept[#kept + 1] = line
    end
  end
  return table.concat(kept, '\n')
end

-- Ids of the jobs written, per status they start in: one event names them all.
local written = {queued = {}, scheduled = {}, waiting = {}}

for i = 1, n do
  local key = KEYS[3 + i]
  local id = string.sub(key, skip + 1)
  local at = 6 + (i - 1) * step
  local env = ARGV[at + 1]
  if fresh[i] and not specs[i] and not member_of[i] and mode ~= '1' then
    -- A plain job to run now: the bulk enqueue path, kept lean.
    if prio == '0' then
      local entry = redis.call('XADD', KEYS[1], '*', 'j', id)
      redis.call('HSET', key, 'env', env, 'status', 'queued', 'enqueued', now, 'entry', entry)
    else
      local entry = push(KEYS[1], id, prio)
      redis.call('HSET', key, 'env', env, 'status', 'queued', 'enqueued', now, 'entry', entry,
        'prio', prio)
    end
    local ids = written.queued
    ids[#ids + 1] = id
    out[i] = 1
  elseif fresh[i] then
    local run_at, delay = 0, 0
    local spec = specs[i]
    if spec then
      run_at, delay = spec.run_at, spec.delay
    elseif mode == '1' then
      run_at, delay = tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
    end
    if delay > 0 then
      run_at = math.max(run_at, now + delay)
    end
    local kind, pending = 'job', 0
    local fields = {'env', env, 'enqueued', now}
    local own = spec and spec.prio or prio
    if own ~= '0' then
      fields[#fields + 1], fields[#fields + 2] = 'prio', own
      lanes[own] = true
    end
    if spec and spec.lk then
      fields[#fields + 1], fields[#fields + 2] = 'lk', spec.lk
    end
    local nxt = dependants(i)
    if nxt ~= '' then
      nxt = fresh_lines(nxt)
      if nxt ~= '' then
        -- Every dependant named here is written by this call: born now.
        nxt = string.gsub(nxt, '[^\n]+', '%0\t' .. now)
        fields[#fields + 1], fields[#fields + 2] = 'next', nxt
      end
    end
    if spec then
      kind, pending = spec.kind, spec.pending
      for line in string.gmatch(spec.after, '[^\n]+') do
        edges[#edges + 1] = {line, id}
      end
    end
    local status
    if kind == 'group' or pending > 0 then
      status = 'waiting'
      for _, f in ipairs({'pending', pending, 'policy', spec.policy}) do
        fields[#fields + 1] = f
      end
      if run_at > 0 then
        fields[#fields + 1], fields[#fields + 2] = 'run_at', run_at
      end
      if spec.feed ~= '' then
        fields[#fields + 1], fields[#fields + 2] = 'feed', spec.feed
      end
      if kind == 'group' then
        fields[#fields + 1], fields[#fields + 2] = 'kind', 'group'
        fields[#fields + 1], fields[#fields + 2] = 'size', spec.size
        if spec.shape ~= '' then
          fields[#fields + 1], fields[#fields + 2] = 'shape', spec.shape
        end
        groups[#groups + 1] = {key, id}
      end
    elseif run_at > now then
      status = 'scheduled'
      fields[#fields + 1], fields[#fields + 2] = 'run_at', run_at
      redis.call('ZADD', KEYS[2], run_at, id)
    else
      status = 'queued'
      fields[#fields + 1] = 'entry'
      fields[#fields + 1] = push(KEYS[1], id, own)
    end
    fields[#fields + 1], fields[#fields + 2] = 'status', status
    redis.call('HSET', key, unpack(fields))
    local ids = written[status]
    ids[#ids + 1] = id
    out[i] = 1
  elseif repeated[i] then
    out[i] = 1
  else
    -- An existing job named as a dependency in this batch: wire it like one outside it.
    for line in string.gmatch(fresh_lines(dependants(i)), '[^\n]+') do
      local wid, slot = string.match(line, '^(.*)\t(%d+)$')
      edges[#edges + 1] = {id .. '\t' .. slot, wid}
    end
    out[i] = 0
  end
end

-- Dependencies that existed before this call: wait for them, or take their outcome now.
-- The lines for one dependency are gathered and appended once, so a thousand dependants
-- of one job cost a thousand lines, not a thousand rewrites of a growing field.
local final = {complete = true, failed = true, dead = true, aborted = true}
local appends, order = {}, {}
for _, edge in ipairs(edges) do
  local did, slot = string.match(edge[1], '^(.*)\t(%d+)$')
  local dkey = ctx.prefix .. did
  local d = appends[did] and {} or redis.pcall('HMGET', dkey, 'status', 'result', 'error')
  if not appends[did] and (d.err or not d[1] or final[d[1]]) then
    resolve_edge(ctx, work, did, d.err and {} or d, edge[2], slot, '')
  else
    if not appends[did] then
      appends[did], order[#order + 1] = {}, did
    end
    local lines = appends[did]
    lines[#lines + 1] = edge[2] .. '\t' .. slot .. '\t' .. now
  end
end
for _, did in ipairs(order) do
  local dkey = ctx.prefix .. did
  local old = redis.call('HGET', dkey, 'next')
  local add = table.concat(appends[did], '\n')
  redis.call('HSET', dkey, 'next', old and (old .. '\n' .. add) or add)
end
-- A group with no members is complete at once.
for _, g in ipairs(groups) do
  if redis.call('HGET', g[1], 'status') == 'waiting'
      and tonumber(redis.call('HGET', g[1], 'pending')) <= 0 then
    release(ctx, work, g[1], g[2], 'group', redis.call('HGET', g[1], 'policy'))
  end
end
for _, status in ipairs({'waiting', 'scheduled', 'queued'}) do
  if #written[status] > 0 then
    -- Written before anything this call released or failed, so they come first.
    table.insert(events, 1, {written[status], 'enqueued', status})
  end
end
flow_drain(ctx, work)
for level in pairs(lanes) do
  add_lane(KEYS[1], level)
end
flush_events(KEYS[3], ARGV[5], events)
return out
