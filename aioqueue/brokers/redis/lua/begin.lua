#!lua flags=allow-oom
-- begin.lua: turn delivered stream entries into running jobs, counting every delivery.
-- KEYS[1] stream, KEYS[2] dead zset, KEYS[3] delayed zset, KEYS[4] events stream,
--   KEYS[4 + i] hash of job i
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] max_deliveries,
--   ARGV[4] '1' to check that the consumer still owns each entry (entries taken over with
--   XAUTOCLAIM or found in its pending list), '0' for entries XREADGROUP handed over in the
--   same breath, ARGV[5] largest envelope in bytes the worker accepts, ARGV[6] result TTL
--   in ms (a workflow dependant that fails because this job died expires after it),
--   ARGV[7] events cap,
--   then per job i: job id, stream entry id
-- Returns per job one of:
--   {'run', envelope or false, attempt, deliveries[, input]}  the caller owns the job and
--              runs it; input (workflows) is the encoded result of the dependency it is fed
--   {'skip', why}  the entry was acked and deleted without running anything: why is
--              'missing' (no job record: deleted, or evicted by a misconfigured Redis),
--              'corrupt' (the job's key is not a hash),
--              'final' (aborted or already finished) or 'stale' (the job names another
--              entry as its current one: a stale or forged duplicate)
--   {'lost'}   another consumer owns the entry now: leave it alone
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
local group, consumer = ARGV[1], ARGV[2]
local max_deliveries = tonumber(ARGV[3])
local check = ARGV[4] == '1'
local max_payload = tonumber(ARGV[5])
local final = {complete = true, failed = true, dead = true, aborted = true}
local now = redis_now_text()
local out, acked, work, events = {}, {}, {}, {}

-- Dead-letter a job without running it; the error is an ErrorInfo (msgpack array).
local function bury(key, id, entry, reason, kind, message)
  redis.call('HSET', key, 'status', 'dead', 'finished', now, 'worker', consumer,
    'entry', entry, 'reason', reason, 'error', cmsgpack.pack({kind, message, ''}))
  redis.call('PERSIST', key)
  redis.call('ZADD', KEYS[2], now, id)
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

for i = 1, #KEYS - 4 do
  local key = KEYS[4 + i]
  local id, entry = ARGV[6 + i * 2], ARGV[7 + i * 2]
  if check and #redis.call('XPENDING', KEYS[1], group, entry, entry, 1, consumer) == 0 then
    out[i] = {'lost'}
  else
    -- One HMGET with the envelope is measurably cheaper than checking its size first; a
    -- hostile giant envelope is then copied once inside Redis, but never sent to a worker.
    local job = redis.pcall('HMGET', key, 'status', 'attempt', 'worker', 'entry', 'env', 'feed')
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
    elseif final[status] or status == 'waiting' or (job[4] and job[4] ~= entry) then
      acked[#acked + 1] = entry
      out[i] = {'skip', final[status] and 'final' or 'stale'}
    elseif job[5] and #job[5] > max_payload then
      local size = #job[5]
      bury(key, id, entry, 'payload too large', 'PayloadTooLarge',
        'the job is ' .. size .. ' bytes, more than max_payload_bytes (' .. max_payload .. ')')
      out[i] = {'big', size}
    elseif job[6] and redis.call('HSTRLEN', key, 'in:1') > max_payload + 1 then
      -- A fed input (a group's results) counts against the same limit as an envelope.
      local size = redis.call('HSTRLEN', key, 'in:1') - 1
      bury(key, id, entry, 'input too large', 'PayloadTooLarge',
        'its input is ' .. size .. ' bytes, more than max_payload_bytes (' .. max_payload .. ')')
      out[i] = {'big', size}
    else
      local deliveries = redis.pcall('HINCRBY', key, 'deliveries', 1)
      if type(deliveries) == 'table' then
        bury(key, id, entry, 'corrupt job record', 'CorruptRecord',
          "the job record's deliveries field is not a whole number")
        out[i] = {'corrupt'}
      elseif deliveries > max_deliveries then
        local reason = 'worker lost ' .. (deliveries - 1) .. ' times'
        bury(key, id, entry, reason, 'WorkerLost',
          'the job was handed out ' .. deliveries .. ' times; each time its worker died')
        out[i] = {'dead', deliveries}
      else
        redis.call('HSET', key, 'status', 'running', 'started', now, 'worker', consumer,
          'entry', entry)
        event(events, id, 'started', tonumber(job[2]) or 1, consumer)
        out[i] = {'run', job[5], tonumber(job[2]) or 1, deliveries, input(key, job[6])}
      end
    end
  end
end
ack(KEYS[1], ARGV[1], acked)
if #work > 0 then
  local first = KEYS[5]
  flow_drain({stream = KEYS[1], delayed = KEYS[3], ttl = ARGV[6], now = now,
    prefix = string.sub(first, 1, #first - #ARGV[8]), events = events}, work)
end
flush_events(KEYS[4], ARGV[7], events)
return out
