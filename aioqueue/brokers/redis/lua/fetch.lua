#!lua flags=allow-oom
-- fetch.lua: read up to count new entries from one or several queues, highest priority
-- first within each queue, and begin them, in one step (one round trip while there is work;
-- the worker blocks in XREADGROUP only when this finds nothing).
-- KEYS per queue i (5 each, in the worker's order): stream, dead zset, delayed zset,
--   events stream, paused flag
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] count, ARGV[4] max_deliveries, ARGV[5] largest
--   envelope in bytes the worker accepts, ARGV[6] result TTL in ms, ARGV[7] events cap,
--   ARGV[8] lease (ms), ARGV[9] order: 'strict' (a queue is read only while the ones before
--   it have nothing new) or 'weighted' (each queue first reads up to its share, then what
--   is left of count goes to the queues in order), then per queue i: job key prefix, the
--   worker's limits for it (see parse_limits in _prelude.lua), its share of count
-- Returns per queue i one of {'paused'} (nothing read), {'nogroup'} (the consumer group of
-- its stream is missing) or {'ok', lanes, taken, answers, foreign}: lanes the priorities in
-- use, highest first (to block on); taken {job id, token} per entry begun and answers what
-- begin_batch answered for each; foreign {token, fields} per entry that names no valid job
-- id (the caller dead-letters it).
-- Invariant: lanes are read strictly from the highest priority down, so no entry of a
-- lower priority is taken while a higher one has new entries; in strict order the same
-- holds between queues. A lane's group is created here at id 0 the first time it is read,
-- so it misses none of its entries.
-- Repeat-safe: a repeat reads other entries; those the lost reply had begun stay in this
-- consumer's pending list, where the worker adopts them (begin with check).
-- Several queues make the call touch several hash slots: one Redis, not a Cluster.
local group, consumer, count = ARGV[1], ARGV[2], tonumber(ARGV[3])
local weighted = ARGV[9] == 'weighted'
local n = #KEYS / 5

-- A job id a worker accepts: 1 to 200 characters, no control character (TASK_NAME).
local function valid(id)
  if not id or #id == 0 or #id > 800 or string.find(id, '[%z\1-\31\127]') then
    return false
  end
  local _, chars = string.gsub(id, '[^\128-\191]', '')
  return chars <= 200
end

local queues, taken = {}, 0
for i = 1, n do
  local stream = KEYS[i * 5 - 4]
  local q = {stream = stream, items = {}, foreign = {}, lanes = {}, levels = {0},
    share = tonumber(ARGV[9 + i * 3]) or 0}
  if redis.call('EXISTS', KEYS[i * 5]) == 1 then
    q.status = 'paused'
  else
    q.status = 'ok'
    for _, member in ipairs(redis.call('SMEMBERS', stream .. ':lanes')) do
      local level = tonumber(member)
      if level and level ~= 0 then
        q.levels[#q.levels + 1] = level
      end
    end
    table.sort(q.levels, function(a, b) return a > b end)
    for _, level in ipairs(q.levels) do
      q.lanes[#q.lanes + 1] = tostring(level)
    end
  end
  queues[i] = q
end

-- Read up to 'wanted' new entries of queue q, lane by lane, highest priority first.
local function read(q, wanted)
  for _, level in ipairs(q.lanes) do
    if wanted <= 0 or q.status ~= 'ok' then
      return
    end
    local s, tag = lane(q.stream, level)
    local got = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', wanted,
      'STREAMS', s, '>')
    if type(got) == 'table' and got.err then
      if not string.find(got.err, 'NOGROUP', 1, true) then
        error(got.err)
      elseif level == '0' then
        q.status = 'nogroup'
        return
      end
      redis.call('XGROUP', 'CREATE', s, group, '0', 'MKSTREAM')
      got = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', wanted,
        'STREAMS', s, '>')
    end
    if got then
      for _, e in ipairs(got[1][2]) do
        local token, fields, id = e[1] .. tag, e[2], nil
        for f = 1, #fields - 1, 2 do
          if fields[f] == 'j' then
            id = fields[f + 1]
          end
        end
        if valid(id) then
          q.items[#q.items + 1] = {id, token}
        else
          q.foreign[#q.foreign + 1] = {token, fields}
        end
        taken, wanted = taken + 1, wanted - 1
      end
    end
  end
end

if weighted then
  for _, q in ipairs(queues) do
    read(q, math.min(q.share, count - taken))
  end
end
for _, q in ipairs(queues) do
  read(q, count - taken)
end

local out = {}
for i, q in ipairs(queues) do
  if q.status ~= 'ok' then
    out[i] = {q.status}
  else
    local answers = begin_batch({stream = q.stream, dead = KEYS[i * 5 - 3],
      delayed = KEYS[i * 5 - 2], events = KEYS[i * 5 - 1], group = group, consumer = consumer,
      max_deliveries = tonumber(ARGV[4]), check = false, max_payload = tonumber(ARGV[5]),
      ttl = ARGV[6], cap = ARGV[7], limits = parse_limits(ARGV[9 + i * 3 - 1]),
      lease = tonumber(ARGV[8]), base = string.sub(q.stream, 1, #q.stream - #'stream'),
      prefix = ARGV[9 + i * 3 - 2], paused = false}, q.items)
    out[i] = {'ok', q.lanes, q.items, answers, q.foreign}
  end
end
return out
