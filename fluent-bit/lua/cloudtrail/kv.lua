-- cloudtrail.kv: decode `key=value,key=value` lists (NeuVector's syslog payload).
--
-- Contract: decode(s, rest_keys) -> map | nil, err
--   * A key is [A-Za-z_][A-Za-z0-9_.-]* followed by '='. The text must start with a key.
--   * A value runs up to the next ',' that is directly followed by another key and '=';
--     any other comma belongs to the value (so `message=a, b` and `proc_cmd=x,y` survive).
--   * A key listed in rest_keys (a set: {message = true}) takes everything after its '=' to
--     the end of the text, commas and '=' included: NeuVector puts `message=` last.
--   * Values are strings, kept byte for byte (spaces included); an empty value is "".
--     Surrounding whitespace of the whole text is ignored.
--   * A repeated key keeps its last value.
--   The result carries the MAP_MT marker so it is written back as a map.

local find, sub = string.find, string.sub
local setmetatable = setmetatable
local MAP_MT = require("cloudtrail.json").MAP_MT

local KEY_AT = "^([%a_][%w_%.%-]*)="
local NEXT_KEY = ",[%a_][%w_%.%-]*="

local function decode(s, rest_keys)
  if type(s) ~= "string" then return nil, "not a string" end
  local _, lead = find(s, "^%s*")
  local last = #s
  while last > lead and find(s, "^%s", last) do last = last - 1 end
  local text = sub(s, lead + 1, last)
  if text == "" then return nil, "empty text" end
  local out = setmetatable({}, MAP_MT)
  local pos, n = 1, #text
  while pos <= n do
    local _, keyend, key = find(text, KEY_AT, pos)
    if not key then return nil, "not a key=value list (expected a key at byte " .. pos .. ")" end
    local vstart = keyend + 1
    if rest_keys and rest_keys[key] then
      out[key] = sub(text, vstart)
      return out
    end
    local comma = find(text, NEXT_KEY, vstart)
    if comma then
      out[key] = sub(text, vstart, comma - 1)
      pos = comma + 1
    else
      out[key] = sub(text, vstart)
      return out
    end
  end
  return out
end

return { decode = decode }
