#!lua flags=allow-oom
-- begin.lua: turn entries the caller holds (read with a blocking XREADGROUP, taken over
-- with XAUTOCLAIM, or found in its pending list) into running jobs; see begin_batch in
-- _prelude.lua for the answers, the invariant and why a repeat is safe.
-- KEYS[1] stream, KEYS[2] dead zset, KEYS[3] delayed zset, KEYS[4] events stream,
--   KEYS[5] paused flag, KEYS[5 + i] hash of job i
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] max_deliveries,
--   ARGV[4] '1' to check that the consumer still owns each entry (entries taken over with
--   XAUTOCLAIM or found in its pending list), '0' for entries XREADGROUP handed over in the
--   same breath, ARGV[5] largest envelope in bytes the worker accepts, ARGV[6] result TTL
--   in ms (a workflow dependant that fails because this job died expires after it),
--   ARGV[7] events cap, ARGV[8] the worker's limits (see parse_limits), ARGV[9] lease (ms),
--   then per job i: job id, entry token (see lane in _prelude.lua)
-- While the queue is paused, entries are answered {'paused'} and left pending.
local items = {}
for i = 1, #KEYS - 5 do
  items[i] = {ARGV[8 + i * 2], ARGV[9 + i * 2]}
end
local base = string.sub(KEYS[1], 1, #KEYS[1] - #'stream')
return begin_batch({stream = KEYS[1], dead = KEYS[2], delayed = KEYS[3], events = KEYS[4],
  group = ARGV[1], consumer = ARGV[2], max_deliveries = tonumber(ARGV[3]),
  check = ARGV[4] == '1', max_payload = tonumber(ARGV[5]), ttl = ARGV[6], cap = ARGV[7],
  limits = parse_limits(ARGV[8]), lease = tonumber(ARGV[9]), base = base,
  prefix = base .. 'job:', paused = redis.call('EXISTS', KEYS[5]) == 1}, items)
