//! The Lua scripts: each decision that spans keys is one script, one round trip, on
//! Redis's own clock (`TIME`), so instances never read-then-write and never disagree on
//! time. Every key of one script shares the `{dg}` hash tag (valid on a Cluster too).

use std::sync::LazyLock;

use redis::Script;

/// The budget part, shared by [`LOOKUP`] and [`RESERVE`] (same positions in both): Diia's
/// brake first, then a GCRA reservation of `weight` calls' worth. `KEYS[1]` budget,
/// `KEYS[2]` brake; `ARGV[1]` emission interval (µs), `ARGV[2]` burst, `ARGV[3]` longest
/// wait (µs), `ARGV[4]` weight, `ARGV[5]` `limits.diia.max_backoff` (ms), `ARGV[6]` the
/// furthest ahead a reservation can put the budget's clock (µs: `burst / rate +
/// max_wait`). Sets `wait` (declared by the caller), or returns `{0, wait_us}` (over the
/// longest wait) or `{2, pause_us}` (Diia's brake).
///
/// What a Redis writer may have left is bounded, never trusted: a brake longer than
/// `max_backoff` is cut to it (instances only ever set it that long), and a budget clock
/// that is not a number or is further ahead than any reservation puts it is reset as a
/// missing one. A missing budget key starts empty (no burst): only a Redis that lost its
/// data has no key (it is never expired), and a restarted Redis must add nothing to what
/// the instances' local budgets just sent.
const BUDGET_LUA: &str = r"
local max_backoff = tonumber(ARGV[5])
local brake = redis.call('PTTL', KEYS[2])
if brake > max_backoff then
  redis.call('PEXPIRE', KEYS[2], max_backoff)
  brake = max_backoff
end
if brake > 0 then return {2, brake * 1000} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local weight = tonumber(ARGV[4])
local stored = redis.pcall('GET', KEYS[1])
local tat = nil
if type(stored) == 'string' then tat = tonumber(stored) end
if tat == nil or tat ~= tat or tat > now + tonumber(ARGV[6]) then
  tat = now + (burst - 1) * interval
end
if tat < now then tat = now end
wait = tat - now - (burst - weight) * interval
if wait < 0 then wait = 0 end
if wait > tonumber(ARGV[3]) then return {0, wait} end
redis.call('SET', KEYS[1], string.format('%.0f', tat + weight * interval))
";

/// A Diia call's budget alone. Returns `{1, wait_us}`, `{0, wait_us}` or `{2, pause_us}`.
pub static RESERVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "local wait = 0\n{BUDGET_LUA}\nreturn {{1, wait}}\n"
    ))
});

/// Cache lookup, lease and budget in one round trip. Keys: budget, brake (as in
/// [`BUDGET_LUA`]), result, lease. Args: the six budget args, lease holder, lease ms. A
/// weight of 0 takes the lease without the budget (the caller reserves it later, after its
/// client's share of the budget allows).
/// A lease without a TTL, of another type, or living longer than `ARGV[8]` is replaced.
/// Returns `{1, value, pttl_ms, now_ms}` (stored answer; an empty value when the key holds
/// no string), `{3, holder, pttl_ms, now_ms}` (another leader), `{4, wait_us, now_ms}` (this
/// caller leads, budget reserved), or a budget refusal; `now_ms` is Redis's clock.
///
/// A stored value starts with its kind and its absolute expiry (16 digits, ms on Redis's
/// clock), both sealed with it; the script never judges that clear head (a writer could
/// change its digits and make a value look expired, hence absent): the instance opens the
/// value, then compares the sealed expiry with `now_ms`, and drops a value past it
/// ([`DROP`]).
pub static LOOKUP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local v = redis.pcall('GET', KEYS[3])
if type(v) == 'table' then return {{1, '', redis.call('PTTL', KEYS[3]), now_ms}} end
if v then return {{1, v, redis.call('PTTL', KEYS[3]), now_ms}} end
-- A lease no instance could have written (another type, no TTL, or a TTL longer than this
-- key's lease) is a Redis writer's: replaced, so it holds the key for no longer than a
-- lease instances write would.
local holder = redis.pcall('GET', KEYS[4])
if type(holder) == 'table' then
  redis.call('DEL', KEYS[4])
  holder = false
elseif holder then
  local life = redis.call('PTTL', KEYS[4])
  if life < 0 or life > tonumber(ARGV[8]) then
    redis.call('DEL', KEYS[4])
    holder = false
  end
end
-- This request's own claim, taken by an earlier lookup of it whose reply was lost (a
-- stall outlived the command timeout): nothing was sent (a claim sends only after it
-- leads), so it leads now; the lost lookup already reserved the budget.
if holder == ARGV[7] then return {{4, 0, now_ms}} end
if holder then return {{3, holder, redis.call('PTTL', KEYS[4]), now_ms}} end
local wait = 0
if tonumber(ARGV[4]) > 0 then
{BUDGET_LUA}
end
redis.call('SET', KEYS[4], ARGV[7], 'PX', ARGV[8])
return {{4, wait, now_ms}}
"
    ))
});

/// Stores `ARGV[2]` (unless empty) under `KEYS[1]` for `ARGV[3]` ms, except over a stored
/// positive answer when this one is negative (`ARGV[4]` '0'): shared by [`FINISH`] and
/// [`ABANDON`] (same argument positions in both).
const STORE_LUA: &str = r"
if ARGV[2] ~= '' then
  local cur = redis.pcall('GET', KEYS[1])
  if not (type(cur) == 'string' and string.sub(cur, 1, 1) == 'P' and ARGV[4] == '0') then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  end
end
";

/// The leader's write-back. Keys: result, lease. Args: holder, value ('' = do not store),
/// ttl ms, positive ('1'/'0'), channel, message. A stored positive answer is never
/// replaced by a negative one; the lease is released only if still ours.
pub static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{STORE_LUA}\n\
         if redis.pcall('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end\n\
         redis.call('PUBLISH', ARGV[5], ARGV[6])\n\
         return 1\n"
    ))
});

/// Drops a stored value that opened and is past its sealed expiry (`DUMP`ed and
/// `RESTORE`d with a new TTL), only if it is still that value. Keys: result. Args: value.
pub static DROP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        "if redis.pcall('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end\n",
        "return 1\n",
    ))
});

/// A claim given up without leading (its lookup's reply was lost, yet the lookup may have
/// run when Redis resumed and taken the lease): only while the lease is still that claim's,
/// store the answer the request got instead (if any), free the lease and tell the waiters.
/// Keys: result, lease. Args: holder, value ('' = do not store), ttl ms, positive
/// ('1'/'0'), channel, message ('' = none). Returns 1 when the claim held the lease.
pub static ABANDON: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "if redis.pcall('GET', KEYS[2]) ~= ARGV[1] then return 0 end\n\
         {STORE_LUA}\n\
         redis.call('DEL', KEYS[2])\n\
         if ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[6]) end\n\
         return 1\n"
    ))
});

/// Diia's brake as the fleet holds it, for calls that spend no fleet budget. Keys: brake.
/// Args: `limits.diia.max_backoff` (ms). Returns the pause left (ms; 0 or less: none),
/// cut to `max_backoff` as in [`BUDGET_LUA`], so a brake a Redis writer set for a day
/// stops these calls no longer than it stops the others.
pub static BRAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        "local max_backoff = tonumber(ARGV[1])\n",
        "local brake = redis.call('PTTL', KEYS[1])\n",
        "if brake > max_backoff then\n",
        "  redis.call('PEXPIRE', KEYS[1], max_backoff)\n",
        "  brake = max_backoff\n",
        "end\n",
        "return brake\n",
    ))
});

/// Diia's brake, shared: only ever extended. Keys: brake. Args: pause ms.
pub static PAUSE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        "if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then\n",
        "  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])\n",
        "end\n",
        "return 1\n",
    ))
});

/// Heartbeat: this instance is alive. Keys: fleet (or `{dg}:relay-config`, whose members
/// are config entries, signed alike). Args: this instance's signed member,
/// its previous one ('' when none), instance ttl ms. Returns `{now_ms, members}`: Redis's
/// clock and the members heard from within the ttl (at most 1024; the instance counts only
/// those signed under the fleet secret). A fleet key of another type is replaced.
pub static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        "local t = redis.call('TIME')\n",
        "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n",
        "local ttl = tonumber(ARGV[3])\n",
        "if type(redis.pcall('ZADD', KEYS[1], now, ARGV[1])) == 'table' then\n",
        "  redis.call('DEL', KEYS[1])\n",
        "  redis.call('ZADD', KEYS[1], now, ARGV[1])\n",
        "end\n",
        "if ARGV[2] ~= '' and ARGV[2] ~= ARGV[1] then redis.call('ZREM', KEYS[1], ARGV[2]) end\n",
        "redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)\n",
        "redis.call('PEXPIRE', KEYS[1], ttl * 2)\n",
        "return {now, redis.call('ZRANGEBYSCORE', KEYS[1], now - ttl, now + ttl, 'LIMIT', 0, 1024)}\n",
    ))
});

/// A relay route's claim (`relay_routes`): the value already stored under `KEYS[1]`, or,
/// when there is none, `ARGV[1]` stored for `ARGV[2]` ms and `1` returned. One round trip,
/// so two instances that record the same requestId at once agree on the first owner.
pub static ROUTE_CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local held = redis.pcall('GET', KEYS[1])
if type(held) == 'string' then return held end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
",
    )
});

/// A relay route's refresh (a retried push): `ARGV[2]` replaces `KEYS[1]` for `ARGV[3]` ms
/// only while it still holds `ARGV[1]`, so a route another instance claimed after this
/// one's expired is never overwritten.
pub static ROUTE_SWAP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.pcall('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
",
    )
});

/// Gives a relay route's claim back (the local store refused it): `KEYS[1]` is deleted
/// only while it still holds this instance's value `ARGV[1]`.
pub static ROUTE_RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.pcall('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
",
    )
});

/// The relay routes stored under `KEYS` (nil where none), in order: one round trip for the
/// orphan sweep's batch, within the documented ACL (`GET` only, no `MGET`).
pub static ROUTE_FIND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local found = {}
for i, key in ipairs(KEYS) do found[i] = redis.call('GET', key) end
return found
",
    )
});

/// A relay pull copy stored (`relay_pulls`): `ARGV[2]` as field `ARGV[1]` of the hash
/// `KEYS[1]`, whose life is raised to `ARGV[3]` ms if shorter (the hash lives as long as
/// its longest-lived record; each record's own life is sealed in it). A key of another
/// type (a Redis writer's) is replaced. Unless `ARGV[4]` is `1`, nothing is stored while
/// the request's erase marker `KEYS[2]` is set: its value is returned instead (the caller
/// opens it and decides), so a copy and an erase never pass each other.
pub static PULL_PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if ARGV[4] ~= '1' then
  local erased = redis.pcall('GET', KEYS[2])
  if type(erased) == 'string' then return erased end
end
if type(redis.pcall('HSET', KEYS[1], ARGV[1], ARGV[2])) == 'table' then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
",
    )
});

/// A request's relay pull copies: the hash `KEYS[1]` as field, value, field, value … (at
/// most `ARGV[1]` records; an empty list for a missing key or one of another type).
pub static PULL_LIST: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local all = redis.pcall('HGETALL', KEYS[1])
if type(all) ~= 'table' or all.err then return {} end
local most = tonumber(ARGV[1]) * 2
if #all <= most then return all end
local cut = {}
for i = 1, most do cut[i] = all[i] end
return cut
",
    )
});

/// A relay pull copy taken: field `ARGV[1]` removed from the hash `KEYS[1]` and the
/// acknowledgement marker `KEYS[2]` set to `ARGV[2]` for `ARGV[3]` ms, in one step, so the
/// instance holding the record never misses an acknowledgement whose copy is gone.
pub static PULL_ACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.pcall('HDEL', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
",
    )
});
