-- renew.lua: renew the leases of this consumer's in-flight jobs.
-- KEYS[1] stream
-- ARGV[1] group, ARGV[2] consumer, then the stream entry ids of the jobs still running
-- Returns the entry ids this consumer no longer owns (taken over after an expired lease).
-- Invariant: XCLAIM with min-idle 0 would steal an entry from whoever owns it now, so only
-- entries still in this consumer's pending list are claimed; JUSTID resets their idle time
-- without counting a delivery.
local group, consumer = ARGV[1], ARGV[2]
local wanted = #ARGV - 2
if wanted == 0 then
  return {}
end
local owned = {}
local pending = redis.call('XPENDING', KEYS[1], group, '-', '+', wanted * 2 + 100, consumer)
for _, row in ipairs(pending) do
  owned[row[1]] = true
end
local claim, lost = {}, {}
for i = 3, #ARGV do
  if owned[ARGV[i]] then
    claim[#claim + 1] = ARGV[i]
  else
    lost[#lost + 1] = ARGV[i]
  end
end
if #claim > 0 then
  redis.call('XCLAIM', KEYS[1], group, consumer, 0, unpack(claim), 'JUSTID')
end
return lost
