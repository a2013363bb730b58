-- cloudtrail.msgpack: the msgpack encoder of the spool writer (no decoder is needed in Lua).
--
-- Contract (docs/spool.md, "Segment content"):
--   encode(value, opts) -> string | nil, err
--     Tables follow Fluent Bit's own Lua -> msgpack rule, so a record Fluent Bit handed us is
--     written back exactly as Fluent Bit would write it:
--       * a table whose metatable has a numeric `type` (set by Fluent Bit on every table it
--         creates): 1 -> array of #t items, any other value >= 0 -> map;
--       * otherwise table.maxn(t) > 0 (integral) -> array of that many items (holes -> nil,
--         other keys dropped, as Fluent Bit does); else a map. An empty {} is an empty MAP.
--     Numbers: integral and within int64 -> the smallest msgpack int; else float64.
--     Strings -> str (always); with opts.bin_for_invalid_utf8 a string that is not valid
--     UTF-8 is written as bin instead (rejected records keep their bytes and stay decodable by
--     strict decoders); with opts.strict_utf8 such a string is an error (events must be UTF-8).
--     nil / booleans as such. Functions, userdata, threads: error (never written).
--     opts.max_depth (default 200) bounds nesting: deeper is an error, never a crash.
--   float64(x) -> the 9-byte msgpack float64 of x (for "time", always a float).
--   str(s), bin(s), map_header(n): building blocks for callers assembling a top-level map themselves.
--   utf8_valid(s) -> boolean.
local string_char, string_byte, string_find = string.char, string.byte, string.find
local table_concat, table_maxn = table.concat, table.maxn
local math_floor, math_huge, math_frexp = math.floor, math.huge, math.frexp
local type, next, pairs, rawget, getmetatable, error, pcall, tostring =
      type, next, pairs, rawget, debug.getmetatable, error, pcall, tostring

local M = {}

local TWO32 = 4294967296
local INT64_LIMIT = 9223372036854775808 -- 2^63
local DEFAULT_MAX_DEPTH = 200

-- float64, big-endian. The ffi path is exact and fast; the pure-Lua path covers a LuaJIT
-- without ffi (never the case in Fluent Bit, kept so the module runs anywhere).
local float64
do
  local ok, ffi = pcall(require, "ffi")
  if ok then
    local buf = ffi.new("double[1]")
    local bytes = ffi.cast("const uint8_t *", buf)
    local little = ffi.abi("le")
    if little then
      float64 = function(x)
        buf[0] = x
        return string_char(0xcb, bytes[7], bytes[6], bytes[5], bytes[4],
                           bytes[3], bytes[2], bytes[1], bytes[0])
      end
    else
      float64 = function(x)
        buf[0] = x
        return "\203" .. ffi.string(bytes, 8)
      end
    end
  else
    float64 = function(x)
      local sign = 0
      if x < 0 or (x == 0 and 1 / x < 0) then sign = 0x80; x = -x end
      local mant, expo
      if x ~= x then
        return string_char(0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0)
      elseif x == math_huge then
        return string_char(0xcb, sign + 0x7f, 0xf0, 0, 0, 0, 0, 0, 0)
      elseif x == 0 then
        return string_char(0xcb, sign, 0, 0, 0, 0, 0, 0, 0)
      end
      mant, expo = math_frexp(x)
      expo = expo + 1022
      if expo <= 0 then -- subnormal
        mant = x / 2 ^ -1074
        expo = 0
      else
        mant = (mant * 2 - 1) * 2 ^ 52
      end
      local hi = math_floor(mant / TWO32)
      local lo = mant - hi * TWO32
      local b1 = sign + math_floor(expo / 16)
      local b2 = (expo % 16) * 16 + math_floor(hi / 65536)
      return string_char(0xcb, b1, b2, math_floor(hi / 256) % 256, hi % 256,
                         math_floor(lo / 16777216), math_floor(lo / 65536) % 256,
                         math_floor(lo / 256) % 256, lo % 256)
    end
  end
end
M.float64 = float64

local function be16(n)
  return string_char(math_floor(n / 256), n % 256)
end

local function be32(n)
  return string_char(math_floor(n / 16777216), math_floor(n / 65536) % 256,
                     math_floor(n / 256) % 256, n % 256)
end

local function integer(n)
  if n >= 0 then
    if n < 128 then return string_char(n) end
    if n < 256 then return string_char(0xcc, n) end
    if n < 65536 then return "\205" .. be16(n) end
    if n < TWO32 then return "\206" .. be32(n) end
    local hi = math_floor(n / TWO32)
    return "\207" .. be32(hi) .. be32(n - hi * TWO32)
  end
  if n >= -32 then return string_char(n + 256) end
  if n >= -128 then return string_char(0xd0, n + 256) end
  if n >= -32768 then return "\209" .. be16(n + 65536) end
  if n >= -2147483648 then return "\210" .. be32(n + TWO32) end
  local hi = math_floor(n / TWO32)          -- negative
  return "\211" .. be32(hi + TWO32) .. be32(n - hi * TWO32)
end

local function number(n)
  -- lua_isinteger of flb_lua.c: (int64)n == n, i.e. integral and inside int64.
  if n == math_floor(n) and n >= -INT64_LIMIT and n < INT64_LIMIT then
    return integer(n)
  end
  return float64(n)
end
M.number = number

-- Headers of short strings and small containers, precomputed: the encoder's hot path.
local FIXSTR, STR8, BIN8, FIXMAP, FIXARRAY = {}, {}, {}, {}, {}
for len = 0, 255 do
  if len < 32 then FIXSTR[len] = string_char(0xa0 + len) end
  if len < 16 then
    FIXMAP[len] = string_char(0x80 + len)
    FIXARRAY[len] = string_char(0x90 + len)
  end
  STR8[len] = string_char(0xd9, len)
  BIN8[len] = string_char(0xc4, len)
end

local function str_header(len, code_fix, code8, code16, code32)
  if code_fix and len < 32 then return FIXSTR[len] end
  if len < 256 then
    if code8 == 0xd9 then return STR8[len] end
    return BIN8[len]
  end
  if len < 65536 then return string_char(code16) .. be16(len) end
  return string_char(code32) .. be32(len)
end

local function str(s)
  return str_header(#s, 0xa0, 0xd9, 0xda, 0xdb) .. s
end
M.str = str

local function bin(s)
  return str_header(#s, nil, 0xc4, 0xc5, 0xc6) .. s
end
M.bin = bin

function M.map_header(n)
  if n < 16 then return FIXMAP[n] end
  if n < 65536 then return "\222" .. be16(n) end
  return "\223" .. be32(n)
end
local map_header = M.map_header

local function array_header(n)
  if n < 16 then return FIXARRAY[n] end
  if n < 65536 then return "\220" .. be16(n) end
  return "\221" .. be32(n)
end

-- RFC 3629 UTF-8 (no surrogates, no overlongs, <= U+10FFFF). Through the ffi the byte loop is
-- JIT-compiled (~5x faster than Lua patterns on this hot path); plain string.byte otherwise.
local utf8_valid
do
  local ok, ffi = pcall(require, "ffi")
  local byte_at
  if ok then
    local cast, u8p, u64p = ffi.cast, ffi.typeof("const uint8_t *"), ffi.typeof("const uint64_t *")
    local bitops = require("bit")
    local band, rshift = bitops.band, bitops.rshift
    local HIGH_BITS = 0x8080808080808080ULL
    utf8_valid = function(s)
      local n = #s
      -- ASCII prefix 8 bytes at a time (unaligned loads are fine on x86-64 and arm64).
      local q = cast(u64p, s)
      local words = rshift(n, 3)
      local i = words * 8
      for w = 0, words - 1 do
        if band(q[w], HIGH_BITS) ~= 0ULL then i = w * 8; break end
      end
      if i == n then return true end
      local p = cast(u8p, s)
      while i < n do
        local c = p[i]
        if c < 0x80 then
          i = i + 1
        else
          local len, lo, hi = 0, 0x80, 0xbf
          if c >= 0xc2 and c <= 0xdf then len = 1
          elseif c == 0xe0 then len = 2; lo = 0xa0
          elseif c >= 0xe1 and c <= 0xec then len = 2
          elseif c == 0xed then len = 2; hi = 0x9f
          elseif c >= 0xee and c <= 0xef then len = 2
          elseif c == 0xf0 then len = 3; lo = 0x90
          elseif c >= 0xf1 and c <= 0xf3 then len = 3
          elseif c == 0xf4 then len = 3; hi = 0x8f
          else return false end
          if i + len >= n then return false end
          local c2 = p[i + 1]
          if c2 < lo or c2 > hi then return false end
          for j = i + 2, i + len do
            local cj = p[j]
            if cj < 0x80 or cj > 0xbf then return false end
          end
          i = i + len + 1
        end
      end
      return true
    end
  else
    byte_at = string_byte
    utf8_valid = function(s)
      if not string_find(s, "[\128-\255]") then return true end
      local i, n = 1, #s
      while i <= n do
        local c = byte_at(s, i)
        if c < 0x80 then
          i = i + 1
        else
          local len, lo, hi = 0, 0x80, 0xbf
          if c >= 0xc2 and c <= 0xdf then len = 1
          elseif c == 0xe0 then len = 2; lo = 0xa0
          elseif c >= 0xe1 and c <= 0xec then len = 2
          elseif c == 0xed then len = 2; hi = 0x9f
          elseif c >= 0xee and c <= 0xef then len = 2
          elseif c == 0xf0 then len = 3; lo = 0x90
          elseif c >= 0xf1 and c <= 0xf3 then len = 3
          elseif c == 0xf4 then len = 3; hi = 0x8f
          else return false end
          if i + len > n then return false end
          local c2 = byte_at(s, i + 1)
          if c2 < lo or c2 > hi then return false end
          for j = i + 2, i + len do
            local cj = byte_at(s, j)
            if cj < 0x80 or cj > 0xbf then return false end
          end
          i = i + len + 1
        end
      end
      return true
    end
  end
end
M.utf8_valid = utf8_valid

-- Fluent Bit's decision for one table: array length n >= 0, or -1 for a map. Only a table
-- marked as an array by its metatable can be an EMPTY array.
local function array_length(t)
  local mt = getmetatable(t)
  if type(mt) == "table" then
    local data_type = rawget(mt, "type")
    if type(data_type) == "number" and data_type >= 0 then
      if math_floor(data_type) == 1 then return #t end
      return -1
    end
  end
  local n = table_maxn(t)
  if n > 0 and n == math_floor(n) and n < 2147483648 then return n end
  return -1
end
M.array_length = array_length

local encode_into

-- Header and bytes go into buf separately: no intermediate string is built and interned.
-- Strings of a strict_utf8 encoding, collected to be checked in one scan (see encode_parts).
local pending, npending = {}, 0
-- Short strings already found valid (keys, enum-like values repeat in every event): they skip
-- the scan. Bounded; emptied when full.
local KNOWN_MAX_LEN, KNOWN_MAX_COUNT = 64, 4096
local known_utf8, known_count = {}, 0

local function encode_string(buf, n, s, opts)
  local len = #s
  if opts.strict_utf8 and not known_utf8[s] then
    npending = npending + 1
    pending[npending] = s
  end
  if opts.bin_for_invalid_utf8 and not utf8_valid(s) then
    buf[n + 1] = str_header(len, nil, 0xc4, 0xc5, 0xc6)
  elseif len < 32 then
    buf[n + 1] = FIXSTR[len]
  else
    buf[n + 1] = str_header(len, 0xa0, 0xd9, 0xda, 0xdb)
  end
  buf[n + 2] = s
  return n + 2
end

encode_into = function(buf, n, v, opts, depth)
  local tv = type(v)
  if tv == "string" then
    return encode_string(buf, n, v, opts)
  elseif tv == "number" then
    buf[n + 1] = number(v)
    return n + 1
  elseif tv == "table" then
    if depth >= opts.max_depth then
      error("nesting deeper than " .. opts.max_depth .. " levels", 0)
    end
    local len = array_length(v)
    if len >= 0 then
      buf[n + 1] = array_header(len)
      n = n + 1
      for i = 1, len do
        n = encode_into(buf, n, rawget(v, i), opts, depth + 1)
      end
      return n
    end
    -- One pass: reserve the header slot, count while encoding, fill the slot after.
    local header_at = n + 1
    n = n + 1
    local count = 0
    for key, value in next, v do
      count = count + 1
      n = encode_into(buf, n, key, opts, depth + 1)
      n = encode_into(buf, n, value, opts, depth + 1)
    end
    buf[header_at] = map_header(count)
    return n
  elseif tv == "boolean" then
    buf[n + 1] = v and "\195" or "\194"
    return n + 1
  elseif tv == "nil" then
    buf[n + 1] = "\192"
    return n + 1
  end
  error("cannot encode a " .. tv, 0)
end

local DEFAULT_OPTS = { max_depth = DEFAULT_MAX_DEPTH }

-- encode_parts(buf, n, value, opts) -> new n; appends the encoding to buf (raises on error).
-- With strict_utf8 the strings are checked all at once after encoding: the string payloads
-- of buf joined with a NUL byte form valid UTF-8 exactly when each of them does (no sequence
-- can span an ASCII separator), and one long scan is much cheaper than one per string.
function M.encode_parts(buf, n, value, opts)
  if opts == nil then opts = DEFAULT_OPTS
  elseif opts.max_depth == nil then
    opts.max_depth = DEFAULT_MAX_DEPTH
  end
  if not opts.strict_utf8 then
    return encode_into(buf, n, value, opts, 0)
  end
  npending = 0
  n = encode_into(buf, n, value, opts, 0)
  local joined = table_concat(pending, "\0", 1, npending)
  local valid = utf8_valid(joined)
  for i = 1, npending do
    local s = pending[i]
    pending[i] = nil -- do not keep event strings alive
    if valid and #s <= KNOWN_MAX_LEN and not known_utf8[s] then
      if known_count >= KNOWN_MAX_COUNT then known_utf8, known_count = {}, 0 end
      known_utf8[s] = true
      known_count = known_count + 1
    end
  end
  npending = 0
  if not valid then
    error("string is not valid UTF-8", 0)
  end
  return n
end

function M.encode(value, opts)
  local buf = {}
  local ok, n = pcall(M.encode_parts, buf, 0, value, opts)
  if not ok then return nil, tostring(n) end
  return table_concat(buf, "", 1, n)
end

return M
