-- cloudtrail.ipaddr: is a string an IPv4 or IPv6 address as CloudTrail's sourceIPAddress needs?
--
-- Contract: valid(s) -> boolean
--   IPv4: four decimal parts 0..255 without leading zeros (as Python's ipaddress accepts).
--   IPv6: RFC 4291 text: eight groups of 1-4 hex digits, at most one '::' standing for one or
--   more zero groups, optionally ending in a dotted IPv4 address (counting as two groups).
--   Zone ids ('%eth0') and brackets are refused (conservative: the mapper moves a refused
--   value to additionalEventData rather than lose it).

local find, sub, match, gmatch = string.find, string.sub, string.match, string.gmatch
local tonumber = tonumber

local function valid_v4(s)
  local a, b, c, d = match(s, "^(%d%d?%d?)%.(%d%d?%d?)%.(%d%d?%d?)%.(%d%d?%d?)$")
  if not a then return false end
  for _, p in ipairs({ a, b, c, d }) do
    if #p > 1 and sub(p, 1, 1) == "0" then return false end
    if tonumber(p) > 255 then return false end
  end
  return true
end

local function groups(part)
  -- number of hex groups in a ':'-separated run, or nil if malformed; "" has 0 groups
  if part == "" then return 0 end
  local n = 0
  for g in gmatch(part .. ":", "([^:]*):") do
    if not find(g, "^%x%x?%x?%x?$") then return nil end
    n = n + 1
  end
  return n
end

local function valid_v6(s)
  if #s < 2 or #s > 45 or find(s, "[^%x:%.]") then return false end
  local v4 = match(s, ":([%d%.]+)$")
  if v4 and find(v4, ".", 1, true) then
    if not valid_v4(v4) then return false end
    s = sub(s, 1, #s - #v4) .. "0:0"     -- the IPv4 tail counts as two groups
  elseif find(s, ".", 1, true) then
    return false
  end
  local dbl = find(s, "::", 1, true)
  if dbl then
    if find(s, "::", dbl + 1, true) then return false end
    local l, r = groups(sub(s, 1, dbl - 1)), groups(sub(s, dbl + 2))
    if not l or not r then return false end
    return l + r <= 7
  end
  local n = groups(s)
  return n ~= nil and n == 8
end

-- Source addresses repeat from record to record, and the checks above are Lua patterns the
-- JIT cannot compile: remember answers (true or false) for up to CACHE_MAX strings.
local CACHE_MAX = 1024
local cache, cached = {}, 0

local function valid(s)
  if type(s) ~= "string" then return false end
  local known = cache[s]
  if known ~= nil then return known end
  local ok
  if find(s, ":", 1, true) then ok = valid_v6(s) else ok = valid_v4(s) end
  ok = ok == true
  if cached >= CACHE_MAX then cache, cached = {}, 0 end
  cache[s] = ok
  cached = cached + 1
  return ok
end

return { valid = valid }
