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

local find, sub, byte = string.find, string.sub, string.byte
local setmetatable = setmetatable
local MAP_MT = require("cloudtrail.json").MAP_MT

-- If a key ([A-Za-z_][A-Za-z0-9_.-]*) followed by '=' starts at byte i, the position of that
-- '='; else nil. A byte loop: LuaJIT compiles it, unlike pattern matching.
local function key_end(text, i, n)
  local c = byte(text, i)
  if not c or not (c == 95 or (c >= 65 and c <= 90) or (c >= 97 and c <= 122)) then return nil end
  for j = i + 1, n do
    c = byte(text, j)
    if c == 61 then return j end
    if not (c == 95 or c == 46 or c == 45 or (c >= 48 and c <= 57) or (c >= 65 and c <= 90)
            or (c >= 97 and c <= 122)) then
      return nil
    end
  end
  return nil
end

local function decode(s, rest_keys)
  if type(s) ~= "string" then return nil, "not a string" end
  local _, lead = find(s, "^%s*")
  local last = #s
  while last > lead and find(s, "^%s", last) do last = last - 1 end
  local text = sub(s, lead + 1, last)
  if text == "" then return nil, "empty text" end
  local out = setmetatable({}, MAP_MT)
  local pos, n = 1, #text
  local eq = key_end(text, 1, n)
  if not eq then return nil, "not a key=value list (it must start with key=)" end
  while true do
    local key = sub(text, pos, eq - 1)
    if rest_keys and rest_keys[key] then
      out[key] = sub(text, eq + 1)
      return out
    end
    -- the value ends at the first ',' that a key and '=' follow
    local comma, next_eq = eq, nil
    while true do
      comma = find(text, ",", comma + 1, true)
      if not comma then break end
      next_eq = key_end(text, comma + 1, n)
      if next_eq then break end
    end
    if not comma then
      out[key] = sub(text, eq + 1)
      return out
    end
    out[key] = sub(text, eq + 1, comma - 1)
    pos, eq = comma + 1, next_eq
  end
end

return { decode = decode }
