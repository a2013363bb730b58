-- cloudtrail.json: JSON decoding, compact encoding and size measurement for the mapper.
--
-- Contract:
--   decode(s) -> value | nil, err
--     RFC 8259 text, one value, surrounding whitespace allowed. Objects become tables with the
--     metatable MAP_MT ({type = 2}), arrays tables with ARRAY_MT ({type = 1}): the markers
--     Fluent Bit's filter_lua uses, so empty arrays stay arrays when written back. `null`
--     becomes nil: the member is absent from its object, the element is skipped in its array.
--     Numbers become Lua numbers, \u escapes (with surrogate pairs) become UTF-8; a lone
--     surrogate escape becomes U+FFFD. Nesting deeper than MAX_DEPTH is an error.
--   encode(v) -> string
--     Compact JSON (separators "," and ":"), object keys sorted so the text is stable.
--     Non-finite numbers are written as the strings "NaN", "Infinity", "-Infinity".
--   size(v) -> integer
--     The byte length of Python's json.dumps(v, ensure_ascii=False, separators=(",", ":"))
--     for the value the sink will decode, i.e. what schema.py measures. Integral numbers count
--     as integers; other numbers as %.17g, which is never shorter than Python's repr, so the
--     size is exact or a slight overestimate: a size within a limit is within the limit.
--   is_array(t) -> boolean (metatable marker, else a non-empty sequence)

local byte, sub, find, format, char = string.byte, string.sub, string.find, string.format, string.char
local concat, sort = table.concat, table.sort
local floor, huge = math.floor, math.huge
local type, pairs, tonumber, tostring, getmetatable, setmetatable, next =
  type, pairs, tonumber, tostring, getmetatable, setmetatable, next

local ARRAY_MT = { type = 1 }
local MAP_MT = { type = 2 }
local MAX_DEPTH = 128

local function is_array(t)
  local mt = getmetatable(t)
  if mt then
    local ty = mt.type
    if ty == 1 then return true end
    if ty == 2 then return false end
  end
  return t[1] ~= nil
end

---------------------------------------------------------------------------------------------
-- decode

local ESCAPES = { [34] = '"', [92] = "\\", [47] = "/", [98] = "\b", [102] = "\f",
                  [110] = "\n", [114] = "\r", [116] = "\t" }

local function utf8_char(cp)
  if cp < 0x80 then return char(cp) end
  if cp < 0x800 then
    return char(0xC0 + floor(cp / 64), 0x80 + cp % 64)
  end
  if cp < 0x10000 then
    return char(0xE0 + floor(cp / 4096), 0x80 + floor(cp / 64) % 64, 0x80 + cp % 64)
  end
  return char(0xF0 + floor(cp / 262144), 0x80 + floor(cp / 4096) % 64,
              0x80 + floor(cp / 64) % 64, 0x80 + cp % 64)
end

local decode_value

-- Byte loops rather than string.find with character classes: LuaJIT compiles these.
local function skip_ws(s, i)
  local c = byte(s, i)
  if c ~= 32 and c ~= 10 and c ~= 13 and c ~= 9 then return i end
  for j = i + 1, #s do
    c = byte(s, j)
    if c ~= 32 and c ~= 10 and c ~= 13 and c ~= 9 then return j end
  end
  return #s + 1
end

local function decode_string(s, i)
  -- s[i] is the opening quote; fast path: no escape before the closing quote
  -- (a numeric for: LuaJIT traces these loops reliably, unlike while loops inside hot calls)
  local escaped = false
  for j = i + 1, #s do
    local c = byte(s, j)
    if c == 34 then return sub(s, i + 1, j - 1), j + 1 end
    if c == 92 then escaped = true; break end
    if c < 32 then return nil, "control character in string" end
  end
  if not escaped then return nil, "unterminated string" end
  local j = i + 1
  local parts, np = nil, 0
  local start = j
  while true do
    local k = find(s, '["\\%z\1-\31]', j)
    if not k then return nil, "unterminated string" end
    local c = byte(s, k)
    if c == 34 then
      if not parts then return sub(s, start, k - 1), k + 1 end
      np = np + 1; parts[np] = sub(s, start, k - 1)
      return concat(parts, "", 1, np), k + 1
    elseif c == 92 then
      parts = parts or {}
      np = np + 1; parts[np] = sub(s, start, k - 1)
      local e = byte(s, k + 1)
      if e == 117 then
        local hex = sub(s, k + 2, k + 5)
        if not find(hex, "^%x%x%x%x$") then return nil, "bad \\u escape" end
        local cp = tonumber(hex, 16)
        local nextpos = k + 6
        if cp >= 0xD800 and cp <= 0xDBFF then
          local hex2 = find(s, "^\\u[dD][c-fC-F]%x%x", nextpos) and sub(s, nextpos + 2, nextpos + 5)
          if hex2 then
            cp = 0x10000 + (cp - 0xD800) * 1024 + (tonumber(hex2, 16) - 0xDC00)
            nextpos = nextpos + 6
          else
            cp = 0xFFFD
          end
        elseif cp >= 0xDC00 and cp <= 0xDFFF then
          cp = 0xFFFD
        end
        np = np + 1; parts[np] = utf8_char(cp)
        j = nextpos
      else
        local r = e and ESCAPES[e]
        if not r then return nil, "bad escape" end
        np = np + 1; parts[np] = r
        j = k + 2
      end
      start = j
    else
      return nil, "control character in string"
    end
  end
end

local function decode_array(s, i, depth)
  local t = setmetatable({}, ARRAY_MT)
  local n = 0
  i = skip_ws(s, i + 1)
  if byte(s, i) == 93 then return t, i + 1 end
  while true do
    local v
    v, i = decode_value(s, i, depth)
    if i == nil then return nil, v end
    if v ~= nil then n = n + 1; t[n] = v end
    i = skip_ws(s, i)
    local c = byte(s, i)
    if c == 93 then return t, i + 1 end
    if c ~= 44 then return nil, "expected ',' or ']'" end
    i = skip_ws(s, i + 1)
  end
end

local function decode_object(s, i, depth)
  local t = setmetatable({}, MAP_MT)
  i = skip_ws(s, i + 1)
  if byte(s, i) == 125 then return t, i + 1 end
  while true do
    if byte(s, i) ~= 34 then return nil, "expected a string key" end
    local k
    k, i = decode_string(s, i)
    if i == nil then return nil, k end
    i = skip_ws(s, i)
    if byte(s, i) ~= 58 then return nil, "expected ':'" end
    local v
    v, i = decode_value(s, skip_ws(s, i + 1), depth)
    if i == nil then return nil, v end
    if v ~= nil then t[k] = v end
    i = skip_ws(s, i)
    local c = byte(s, i)
    if c == 125 then return t, i + 1 end
    if c ~= 44 then return nil, "expected ',' or '}'" end
    i = skip_ws(s, i + 1)
  end
end

decode_value = function(s, i, depth)
  local c = byte(s, i)
  if c == 34 then
    local v, e = decode_string(s, i)
    if v == nil then return e, nil end
    return v, e
  elseif c == 123 or c == 91 then
    if depth >= MAX_DEPTH then return "nesting too deep", nil end
    local v, e
    if c == 123 then v, e = decode_object(s, i, depth + 1) else v, e = decode_array(s, i, depth + 1) end
    if v == nil then return e, nil end
    return v, e
  elseif c == 116 then
    if sub(s, i, i + 3) == "true" then return true, i + 4 end
  elseif c == 102 then
    if sub(s, i, i + 4) == "false" then return false, i + 5 end
  elseif c == 110 then
    if sub(s, i, i + 3) == "null" then return nil, i + 4 end
  elseif c == 45 or (c and c >= 48 and c <= 57) then
    -- a number: scan its characters, let tonumber judge; then refuse what JSON does not allow
    local e = i + 1
    local d = byte(s, e)
    while d and ((d >= 48 and d <= 57) or d == 46 or d == 101 or d == 69 or d == 43 or d == 45) do
      e = e + 1
      d = byte(s, e)
    end
    local txt = sub(s, i, e - 1)
    local n = tonumber(txt)
    local first = byte(txt, c == 45 and 2 or 1)
    local last = byte(txt, #txt)
    if n == nil or not first or first < 48 or first > 57 or last < 48 or last > 57
       or (first == 48 and #txt > (c == 45 and 2 or 1) and byte(txt, c == 45 and 3 or 2) ~= 46
           and byte(txt, c == 45 and 3 or 2) ~= 101 and byte(txt, c == 45 and 3 or 2) ~= 69)
       or find(txt, ".", 1, true) and not find(txt, "%.%d") then
      return "bad number", nil
    end
    return n, e
  end
  return "unexpected character", nil
end

local function decode(s)
  if type(s) ~= "string" then return nil, "not a string" end
  local i = skip_ws(s, 1)
  if i > #s then return nil, "empty text" end
  local v, e = decode_value(s, i, 0)
  if e == nil then return nil, "invalid JSON: " .. v end
  if skip_ws(s, e) <= #s then return nil, "invalid JSON: trailing characters" end
  if v == nil then return nil, "JSON text is null" end
  return v
end

---------------------------------------------------------------------------------------------
-- encode and size

local ESC_OUT = { ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f",
                  ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" }
for c = 0, 31 do
  local ch = char(c)
  if not ESC_OUT[ch] then ESC_OUT[ch] = format("\\u%04x", c) end
end

local function number_text(n)
  if n ~= n then return nil, '"NaN"' end
  if n == huge then return nil, '"Infinity"' end
  if n == -huge then return nil, '"-Infinity"' end
  if n == floor(n) and n > -1e18 and n < 1e18 then return format("%d", n) end
  local t = format("%.17g", n)
  return t
end

local function encode_string(s)
  if not find(s, '[%z\1-\31"\\]') then return '"' .. s .. '"' end
  return '"' .. s:gsub('[%z\1-\31"\\]', ESC_OUT) .. '"'
end

local function sorted_keys(t)
  local keys, n = {}, 0
  for k in pairs(t) do n = n + 1; keys[n] = tostring(k) end
  sort(keys)
  return keys, n
end

local function encode_into(v, buf, n)
  local tv = type(v)
  if tv == "string" then
    n = n + 1; buf[n] = encode_string(v)
  elseif tv == "number" then
    local t, special = number_text(v)
    n = n + 1; buf[n] = t or special
  elseif tv == "boolean" then
    n = n + 1; buf[n] = v and "true" or "false"
  elseif tv == "table" then
    if is_array(v) then
      n = n + 1; buf[n] = "["
      for i = 1, #v do
        if i > 1 then n = n + 1; buf[n] = "," end
        n = encode_into(v[i], buf, n)
      end
      n = n + 1; buf[n] = "]"
    else
      n = n + 1; buf[n] = "{"
      local keys, nk = sorted_keys(v)
      local byname = {}
      for k, val in pairs(v) do byname[tostring(k)] = val end
      for i = 1, nk do
        if i > 1 then n = n + 1; buf[n] = "," end
        n = n + 1; buf[n] = encode_string(keys[i])
        n = n + 1; buf[n] = ":"
        n = encode_into(byname[keys[i]], buf, n)
      end
      n = n + 1; buf[n] = "}"
    end
  else
    n = n + 1; buf[n] = "null"
  end
  return n
end

local function encode(v)
  local buf = {}
  local n = encode_into(v, buf, 0)
  return concat(buf, "", 1, n)
end

local function string_size(s)
  local len = #s + 2
  local i = find(s, '[%z\1-\31"\\]')
  while i do
    local c = byte(s, i)
    if c == 34 or c == 92 or c == 8 or c == 9 or c == 10 or c == 12 or c == 13 then
      len = len + 1
    else
      len = len + 5
    end
    i = find(s, '[%z\1-\31"\\]', i + 1)
  end
  return len
end

local size
size = function(v)
  local tv = type(v)
  if tv == "string" then return string_size(v) end
  if tv == "number" then
    local t, special = number_text(v)
    return #(t or special)
  end
  if tv == "boolean" then return v and 4 or 5 end
  if tv == "table" then
    local total, count = 2, 0
    if is_array(v) then
      for i = 1, #v do total = total + size(v[i]); count = count + 1 end
    else
      for k, val in pairs(v) do
        total = total + string_size(type(k) == "string" and k or tostring(k)) + 1 + size(val)
        count = count + 1
      end
    end
    if count > 1 then total = total + count - 1 end
    return total
  end
  return 4
end

-- JSON size of a number as the sink writes it (see size()); integers without making a string
local function number_size(n)
  if n == floor(n) and n > -1e15 and n < 1e15 then
    local d, a = 1, n
    if a < 0 then d = 2; a = -a end
    local p = 10
    while a >= p do d = d + 1; p = p * 10 end
    return d
  end
  local t, special = number_text(n)
  return #(t or special)
end

return {
  decode = decode, encode = encode, size = size, is_array = is_array,
  string_size = string_size, number_size = number_size,
  ARRAY_MT = ARRAY_MT, MAP_MT = MAP_MT, MAX_DEPTH = MAX_DEPTH,
}
