"""The rate limit scripts Redis runs: each algorithm once, as a Lua function
(`gcra`, `sliding`), called by a script for one key (`GCRA_LUA`,
`SLIDING_WINDOW_LUA`) and by one for a batch of keys (`GCRA_BATCH_LUA`,
`SLIDING_WINDOW_BATCH_LUA`).

They mirror `meshgate.ratelimit.gcra` / `sliding_window` exactly, on the
server's clock (`TIME`, so gateways need no synchronised clocks), and each
decision reads, decides and writes in one script: there is no
read-modify-write race between gateways. Keys expire (`PEXPIREAT`, the
instant their state stops mattering) and vanish once they are back to a full
quota.

A batch script decides the keys of one turn of a gateway's event loop in
one call, in order, on one `TIME`: Redis's cost per script call (the call,
the Lua context, the replies) is paid once per batch rather than once per
request, which measured here was most of the server's time per decision.
The decisions are the ones separate calls would make (the same key twice in
a batch is decided twice, the second after the first's write). A batch's
keys may be on different slots, so batches go to a single server only (not
a Redis Cluster).
"""

from __future__ import annotations

__all__ = ["GCRA_BATCH_LUA", "GCRA_LUA", "SLIDING_WINDOW_BATCH_LUA", "SLIDING_WINDOW_LUA"]

# Shared by the scripts. Lua 5.1 numbers are doubles: integers below 2**53
# are exact, and `LimitSpec` keeps every value under that. `idiv` is floor
# division made exact (a / b rounds before math.floor sees it);
# `string.format('%d')` writes an integer without the exponent `tostring`
# would use past 1e14.
_PRELUDE = """
pcall(redis.replicate_commands)
local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end
local function clock(arg)
  if arg then
    return tonumber(arg)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
-- A batch's reply: four integers per decision, appended in order.
local function push4(out, a, b, c, d)
  local n = #out
  out[n + 1] = a
  out[n + 2] = b
  out[n + 3] = c
  out[n + 4] = d
end
"""

_GCRA = """
-- Stored: the TAT in microseconds, expiring when it is reached.
-- Expiries are absolute (PEXPIREAT, on the same clock as TIME), so they also
-- hold when a test passes its own now_us.
local function gcra(key, interval, burst, now)
  local tolerance = burst * interval
  local tat = tonumber(redis.call('GET', key) or '0') or 0
  if tat < now then
    tat = now
  end
  local new_tat = tat + interval
  local allow_at = new_tat - tolerance
  if now < allow_at then
    return 0, 0, tat - now, allow_at - now
  end
  redis.call('SET', key, string.format('%d', new_tat))
  redis.call('PEXPIREAT', key, string.format('%d', idiv(new_tat + 999, 1000)))
  return 1, idiv(now + tolerance - new_tat, interval), new_tat - now, 0
end
"""

_SLIDING = """
-- Stored: "window_start_us prev cur", expiring at window_start + 2 * period.
local function sliding(key, tick, period, limit, now_us)
  local now = idiv(now_us, tick)
  local start = idiv(now, period) * period
  local stored, prev, cur = 0, 0, 0
  local value = redis.call('GET', key)
  if value then
    local s, p, c = string.match(value, '^(%d+) (%d+) (%d+)$')
    if s then
      stored = idiv(tonumber(s), tick)
      prev = tonumber(p)
      cur = tonumber(c)
    end
  end
  if stored ~= start then
    if stored + period == start then
      prev = cur
      cur = 0
    else
      prev = 0
      cur = 0
    end
  end
  local elapsed = now - start
  local estimate = idiv(prev * (period - elapsed), period) + cur
  local reset = (start + period) * tick - now_us
  if estimate < limit then
    redis.call('SET', key, string.format('%d %d %d', start * tick, prev, cur + 1))
    local expiry_us = (start + 2 * period) * tick
    redis.call('PEXPIREAT', key, string.format('%d', idiv(expiry_us + 999, 1000)))
    return 1, limit - estimate - 1, reset, 0
  end
  local room = limit - 1 - cur
  local allow_at
  if room >= 0 then
    allow_at = start + period - idiv((room + 1) * period - 1, prev)
  else
    allow_at = start + 2 * period - idiv(limit * period - 1, cur)
  end
  return 0, 0, reset, allow_at * tick - now_us
end
"""

GCRA_LUA = (
    _PRELUDE
    + _GCRA
    + """
-- KEYS[1]: the key. ARGV: interval_us, burst, [now_us (tests only)].
local a, b, c, d = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), clock(ARGV[3]))
return {a, b, c, d}
"""
)

SLIDING_WINDOW_LUA = (
    _PRELUDE
    + _SLIDING
    + """
-- KEYS[1]: the key. ARGV: tick_us, period_ticks, limit, [now_us (tests only)].
local a, b, c, d = sliding(
  KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), clock(ARGV[4]))
return {a, b, c, d}
"""
)

GCRA_BATCH_LUA = (
    _PRELUDE
    + _GCRA
    + """
-- KEYS: one per decision. ARGV: interval_us, burst of each, in order.
-- Returns four integers per decision, in order.
local now = clock(nil)
local out = {}
for i = 1, #KEYS do
  local a, b, c, d = gcra(KEYS[i], tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i]), now)
  push4(out, a, b, c, d)
end
return out
"""
)

SLIDING_WINDOW_BATCH_LUA = (
    _PRELUDE
    + _SLIDING
    + """
-- KEYS: one per decision. ARGV: tick_us, period_ticks, limit of each, in order.
-- Returns four integers per decision, in order.
local now = clock(nil)
local out = {}
for i = 1, #KEYS do
  local j = 3 * i - 2
  local a, b, c, d = sliding(
    KEYS[i], tonumber(ARGV[j]), tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2]), now)
  push4(out, a, b, c, d)
end
return out
"""
)
