#!lua flags=allow-oom
-- ensure_group.lua: create the stream and its consumer group if they are missing, and the
-- wake stream's (add_lane in _prelude.lua).
-- KEYS[1] stream
-- ARGV[1] group
-- Returns 1 if it created the group, 0 if it existed.
-- Why a script: XGROUP CREATE is refused when Redis is over maxmemory, and a worker that
-- cannot create its group cannot drain a full queue. The group is a few bytes; allow-oom
-- lets it be created so workers can free the memory. Repeat-safe: an existing group is
-- left alone.
local wake = redis.pcall('XGROUP', 'CREATE', KEYS[1] .. ':wake', ARGV[1], '0', 'MKSTREAM')
if type(wake) == 'table' and wake.err and not string.find(wake.err, 'BUSYGROUP', 1, true) then
  return redis.error_reply(wake.err)
end
local created = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
if type(created) == 'table' and created.err then
  if string.find(created.err, 'BUSYGROUP', 1, true) then
    return 0
  end
  return redis.error_reply(created.err)
end
return 1
