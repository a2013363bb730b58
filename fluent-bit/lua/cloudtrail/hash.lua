-- cloudtrail.hash: stable 128-bit hashes for generated event UIDs.
--
-- Contract:
--   hex128(s) -> 32 lowercase hex characters: MurmurHash3_x86_128 of the bytes of s with
--     seed 0 (the published algorithm, so any implementation can recompute it). Not a
--     cryptographic hash: it makes UIDs unique and stable, it does not protect secrets.
--   canonical(v) -> string: a byte-exact serialization of a record that does not depend on
--     table iteration order (map keys sorted), so the same record always hashes the same:
--     strings "s<len>:<bytes>", numbers "n<%.17g>", booleans "T"/"F", maps "{" key value ... "}",
--     arrays "[" values "]".

local bit = require("bit")
local band, bor, bxor, lshift, rshift, tobit, tohex, bswap =
  bit.band, bit.bor, bit.bxor, bit.lshift, bit.rshift, bit.tobit, bit.tohex, bit.bswap
local byte, format, sub = string.byte, string.format, string.sub
local floor = math.floor
local concat, sort = table.concat, table.sort
local type, pairs, tostring, getmetatable = type, pairs, tostring, getmetatable

-- 32-bit multiplications are written out as a * lo + (a * hi) << 16 with the constant's
-- 16-bit halves: each product stays exact in a double (< 2^47), and no helper function or
-- generic split (%, /) is called, so LuaJIT compiles all of hex128 (a small helper and the
-- tail loop used to get its traces blacklisted).
local C1L, C1H = 0x961b, 0x239b
local C2L, C2H = 0x9789, 0xab0e
local C3L, C3H = 0x4ae5, 0x38b3
local C4L, C4H = 0x8b93, 0xa1e3

local function fmix(h)
  h = bxor(h, rshift(h, 16))
  h = tobit(tobit(h * 0xca6b) + lshift(tobit(h * 0x85eb), 16))  -- * 0x85ebca6b
  h = bxor(h, rshift(h, 13))
  h = tobit(tobit(h * 0xae35) + lshift(tobit(h * 0xc2b2), 16))  -- * 0xc2b2ae35
  return bxor(h, rshift(h, 16))
end

local ZEROS16 = string.rep("\0", 16)

local function word_le(t, i)
  local a, b, c, d = byte(t, i, i + 3)
  return bor(a, lshift(b, 8), lshift(c, 16), lshift(d, 24))
end

-- MurmurHash3's 16-byte output is the four words little-endian; hex of those bytes
local function le(h)
  return tohex(bswap(h), 8)
end

local function hex128(s)
  local len = #s
  local h1, h2, h3, h4 = 0, 0, 0, 0
  local nblocks = len - len % 16
  for i = 1, nblocks, 16 do
    local a1, a2, a3, a4, b1, b2, b3, b4, c1, c2, c3, c4, d1, d2, d3, d4 = byte(s, i, i + 15)
    local k1 = bor(a1, lshift(a2, 8), lshift(a3, 16), lshift(a4, 24))
    local k2 = bor(b1, lshift(b2, 8), lshift(b3, 16), lshift(b4, 24))
    local k3 = bor(c1, lshift(c2, 8), lshift(c3, 16), lshift(c4, 24))
    local k4 = bor(d1, lshift(d2, 8), lshift(d3, 16), lshift(d4, 24))
    k1 = tobit(tobit(k1 * C1L) + lshift(tobit(k1 * C1H), 16))
    k1 = bor(lshift(k1, 15), rshift(k1, 17))
    k1 = tobit(tobit(k1 * C2L) + lshift(tobit(k1 * C2H), 16))
    h1 = bxor(h1, k1)
    h1 = bor(lshift(h1, 19), rshift(h1, 13))
    h1 = tobit(h1 + h2)
    h1 = tobit(h1 * 5 + 0x561ccd1b)
    k2 = tobit(tobit(k2 * C2L) + lshift(tobit(k2 * C2H), 16))
    k2 = bor(lshift(k2, 16), rshift(k2, 16))
    k2 = tobit(tobit(k2 * C3L) + lshift(tobit(k2 * C3H), 16))
    h2 = bxor(h2, k2)
    h2 = bor(lshift(h2, 17), rshift(h2, 15))
    h2 = tobit(h2 + h3)
    h2 = tobit(h2 * 5 + 0x0bcaa747)
    k3 = tobit(tobit(k3 * C3L) + lshift(tobit(k3 * C3H), 16))
    k3 = bor(lshift(k3, 17), rshift(k3, 15))
    k3 = tobit(tobit(k3 * C4L) + lshift(tobit(k3 * C4H), 16))
    h3 = bxor(h3, k3)
    h3 = bor(lshift(h3, 15), rshift(h3, 17))
    h3 = tobit(h3 + h4)
    h3 = tobit(h3 * 5 + 0x96cd1c35)
    k4 = tobit(tobit(k4 * C4L) + lshift(tobit(k4 * C4H), 16))
    k4 = bor(lshift(k4, 18), rshift(k4, 14))
    k4 = tobit(tobit(k4 * C1L) + lshift(tobit(k4 * C1H), 16))
    h4 = bxor(h4, k4)
    h4 = bor(lshift(h4, 13), rshift(h4, 19))
    h4 = tobit(h4 + h1)
    h4 = tobit(h4 * 5 + 0x32ac3b17)
  end
  -- tail: the last len % 16 bytes, little-endian into k1..k4, padded with zero bytes to a
  -- full block. A zero word mixes to zero and leaves its h unchanged, exactly like the words
  -- the reference skips, so the tail needs neither a loop nor branches: the byte loop it
  -- replaces hit LuaJIT's unroll limit and got the rest of this function blacklisted
  -- (interpreted on every call).
  -- (a word at a time: 16 live byte values are more than the JIT's register allocator takes)
  local tail = sub(s, nblocks + 1) .. ZEROS16
  local k1, k2, k3, k4 = word_le(tail, 1), word_le(tail, 5), word_le(tail, 9), word_le(tail, 13)
  k4 = tobit(tobit(k4 * C4L) + lshift(tobit(k4 * C4H), 16))
  k4 = bor(lshift(k4, 18), rshift(k4, 14))
  k4 = tobit(tobit(k4 * C1L) + lshift(tobit(k4 * C1H), 16))
  h4 = bxor(h4, k4)
  k3 = tobit(tobit(k3 * C3L) + lshift(tobit(k3 * C3H), 16))
  k3 = bor(lshift(k3, 17), rshift(k3, 15))
  k3 = tobit(tobit(k3 * C4L) + lshift(tobit(k3 * C4H), 16))
  h3 = bxor(h3, k3)
  k2 = tobit(tobit(k2 * C2L) + lshift(tobit(k2 * C2H), 16))
  k2 = bor(lshift(k2, 16), rshift(k2, 16))
  k2 = tobit(tobit(k2 * C3L) + lshift(tobit(k2 * C3H), 16))
  h2 = bxor(h2, k2)
  k1 = tobit(tobit(k1 * C1L) + lshift(tobit(k1 * C1H), 16))
  k1 = bor(lshift(k1, 15), rshift(k1, 17))
  k1 = tobit(tobit(k1 * C2L) + lshift(tobit(k1 * C2H), 16))
  h1 = bxor(h1, k1)
  h1 = bxor(h1, len); h2 = bxor(h2, len); h3 = bxor(h3, len); h4 = bxor(h4, len)
  h1 = tobit(h1 + h2); h1 = tobit(h1 + h3); h1 = tobit(h1 + h4)
  h2 = tobit(h2 + h1); h3 = tobit(h3 + h1); h4 = tobit(h4 + h1)
  h1, h2, h3, h4 = fmix(h1), fmix(h2), fmix(h3), fmix(h4)
  h1 = tobit(h1 + h2); h1 = tobit(h1 + h3); h1 = tobit(h1 + h4)
  h2 = tobit(h2 + h1); h3 = tobit(h3 + h1); h4 = tobit(h4 + h1)
  return le(h1) .. le(h2) .. le(h3) .. le(h4)
end

local function is_array(t)
  local mt = getmetatable(t)
  if mt and mt.type == 1 then return true end
  if mt and mt.type == 2 then return false end
  return t[1] ~= nil
end

-- Pieces go into buf unjoined (numbers too: table.concat formats them), so serializing a
-- record makes no intermediate strings. One buffer serves every call (canonical is not
-- re-entered): a fresh one per record would be regrown and collected each time.
local buf = {}

-- A map's keys and values wait on two shared stacks while they are sorted: no tables per map.
-- Small maps (almost all) are sorted in place by insertion, which LuaJIT compiles; table.sort
-- is a C function the JIT cannot enter, and it needs a table of its own.
local kstack, vstack = {}, {}
local INSERTION_MAX = 24

local serialize

local function serialize_map(v, n, top)
  local nk = top
  for k, val in pairs(v) do
    nk = nk + 1
    kstack[nk] = type(k) == "string" and k or tostring(k)
    vstack[nk] = val
  end
  local count = nk - top
  if count <= INSERTION_MAX then
    for i = top + 2, nk do
      local k, val = kstack[i], vstack[i]
      local j = i - 1
      while j > top and kstack[j] > k do
        kstack[j + 1], vstack[j + 1] = kstack[j], vstack[j]
        j = j - 1
      end
      kstack[j + 1], vstack[j + 1] = k, val
    end
    -- Keys equal as text (1 and "1"): every one of them serializes the value of the last in
    -- iteration order, as the by-name lookup this replaced did (insertion sort is stable).
    for i = nk - 1, top + 1, -1 do
      if kstack[i] == kstack[i + 1] then vstack[i] = vstack[i + 1] end
    end
  else
    -- Large maps: table.sort on the keys (n log n), values looked up by key afterwards. Keys
    -- that collide as text (1 and "1") serialize the same value either way, as before.
    local keys, byname = {}, {}
    for i = 1, count do
      local k = kstack[top + i]
      keys[i] = k
      byname[k] = vstack[top + i]
    end
    sort(keys)
    for i = 1, count do
      kstack[top + i] = keys[i]
      vstack[top + i] = byname[keys[i]]
    end
  end
  n = n + 1; buf[n] = "{"
  for i = top + 1, nk do
    local k = kstack[i]
    buf[n + 1] = "s"; buf[n + 2] = #k; buf[n + 3] = ":"; buf[n + 4] = k
    n = serialize(vstack[i], n + 4, nk)
  end
  n = n + 1; buf[n] = "}"
  -- do not keep the record's values alive until the slots are reused
  for i = top + 1, nk do kstack[i] = nil; vstack[i] = nil end
  return n
end

-- top: how much of the key/value stacks the enclosing maps use.
serialize = function(v, n, top)
  local tv = type(v)
  if tv == "string" then
    buf[n + 1] = "s"; buf[n + 2] = #v; buf[n + 3] = ":"; buf[n + 4] = v
    return n + 4
  elseif tv == "number" then
    n = n + 1
    if v == floor(v) and v > -1e14 and v < 1e14 then
      buf[n] = "n"; buf[n + 1] = v; buf[n + 2] = ";"
      return n + 2
    end
    buf[n] = format("n%.17g;", v)
  elseif tv == "boolean" then
    n = n + 1; buf[n] = v and "T" or "F"
  elseif tv == "table" then
    if is_array(v) then
      n = n + 1; buf[n] = "["
      for i = 1, #v do n = serialize(v[i], n, top) end
      n = n + 1; buf[n] = "]"
    else
      n = serialize_map(v, n, top)
    end
  else
    n = n + 1; buf[n] = "z"
  end
  return n
end

local function canonical(v)
  local n = serialize(v, 0, 0)
  local s = concat(buf, "", 1, n)
  -- the pieces may be large strings of the record: release them now rather than at reuse
  for i = 1, n do buf[i] = nil end
  return s
end

return { hex128 = hex128, canonical = canonical }
