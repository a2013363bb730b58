-- cloudtrail.utf8: make any byte string valid UTF-8, visibly.
--
-- Contract:
--   sanitize(s) -> s2, n
--     s2 is s itself when s is already valid UTF-8 (the common case costs one string.find),
--     otherwise a new string in which every byte that does not start a well-formed UTF-8
--     sequence (RFC 3629: no overlong forms, no surrogates U+D800..U+DFFF, nothing above
--     U+10FFFF, no truncated sequences) is replaced by U+FFFD (EF BF BD), one U+FFFD per
--     invalid byte. n is the number of replaced bytes (0 when s2 == s).
--   valid(s) -> boolean
-- This matches what Python's strict UTF-8 decoder (the sink's msgpack reader) accepts.

local byte, find, sub, concat = string.byte, string.find, string.sub, table.concat

local REPLACEMENT = "\239\191\189"

-- Returns the length of the well-formed sequence starting at i, or nil.
local function seq_len(s, i)
  local c = byte(s, i)
  if c < 0x80 then return 1 end
  if c < 0xC2 or c > 0xF4 then return nil end
  local c1 = byte(s, i + 1)
  if not c1 then return nil end
  if c < 0xE0 then
    if c1 >= 0x80 and c1 <= 0xBF then return 2 end
    return nil
  end
  local lo, hi = 0x80, 0xBF
  if c == 0xE0 then lo = 0xA0 elseif c == 0xED then hi = 0x9F
  elseif c == 0xF0 then lo = 0x90 elseif c == 0xF4 then hi = 0x8F end
  if c1 < lo or c1 > hi then return nil end
  local c2 = byte(s, i + 2)
  if not c2 or c2 < 0x80 or c2 > 0xBF then return nil end
  if c < 0xF0 then return 3 end
  local c3 = byte(s, i + 3)
  if not c3 or c3 < 0x80 or c3 > 0xBF then return nil end
  return 4
end

local function sanitize(s)
  local first = find(s, "[\128-\255]")
  if not first then return s, 0 end
  local n = #s
  local out, o = {}, 0
  local i, start, bad = first, 1, 0
  while i <= n do
    local c = byte(s, i)
    if c < 0x80 then
      i = i + 1
    else
      local l = seq_len(s, i)
      if l then
        i = i + l
      else
        if start < i then o = o + 1; out[o] = sub(s, start, i - 1) end
        o = o + 1; out[o] = REPLACEMENT
        bad = bad + 1
        i = i + 1
        start = i
      end
    end
  end
  if bad == 0 then return s, 0 end
  if start <= n then o = o + 1; out[o] = sub(s, start, n) end
  return concat(out, "", 1, o), bad
end

local function valid(s)
  local _, bad = sanitize(s)
  return bad == 0
end

-- Largest prefix of s (valid UTF-8) that is at most max bytes and does not cut a character.
local function cut(s, max)
  if #s <= max then return s end
  if max <= 0 then return "" end
  local i = max + 1
  -- step back over continuation bytes so the cut lands on a character boundary
  while i > 1 do
    local c = byte(s, i)
    if c < 0x80 or c >= 0xC0 then break end
    i = i - 1
  end
  return sub(s, 1, i - 1)
end

return { sanitize = sanitize, valid = valid, cut = cut, REPLACEMENT = REPLACEMENT }
