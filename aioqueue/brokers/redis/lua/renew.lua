-- renew.lua: renew the leases of this consumer's in-flight jobs.
-- KEYS[1] stream, KEYS[1 + i] hash of job i
-- ARGV[1] group, ARGV[2] consumer, ARGV[2 + i] stream entry id of job i
-- Returns {lost, aborted}: entry ids this consumer no longer owns (taken over after an
-- expired lease), and entry ids of jobs aborted meanwhile (a backstop for an abort message
-- the worker missed while disconnected).
-- Invariant: XCLAIM with min-idle 0 would steal an entry from whoever owns it now, so only
-- entries still in this consumer's pending list are claimed; JUSTID resets their idle time
-- without counting a delivery.
local group, consumer = ARGV[1], ARGV[2]
local wanted = #KEYS - 1
if wanted == 0 then
  return {{}, {}}
end
local owned = {}
local pending = redis.call('XPENDING', KEYS[1], group, '-', '+', wanted * 2 + 100, consumer)
for _, row in ipairs(pending) do
  owned[row[1]] = true
end
local claim, lost, aborted = {}, {}, {}
for i = 1, wanted do
  local entry = ARGV[2 + i]
  if owned[entry] then
    claim[#claim + 1] = entry
    if redis.call('HGET', KEYS[1 + i], 'status') == 'aborted' then
      aborted[#aborted + 1] = entry
    end
  else
    lost[#lost + 1] = entry
  end
end
if #claim > 0 then
  redis.call('XCLAIM', KEYS[1], group, consumer, 0, unpack(claim), 'JUSTID')
end
return {lost, aborted}
