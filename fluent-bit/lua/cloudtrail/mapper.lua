-- cloudtrail.mapper: turn one Fluent Bit record into a CloudTrail Lake eventData table, following
-- compiled mapping rules (see docs/mappings.md for the YAML they come from).
--
-- Contract:
--   local m, err = mapper.new(compiled)
--     compiled is the table a compiled mapping file returns: { format = 1, schema = {...},
--     rules = {...}, defaults = {...}? }. `schema` holds the event fields and their limits
--     (written by the compiler from schema.py; this module keeps no copy). Every rule is turned
--     into closures once, here; bad data gives nil + err (never an error).
--   local event_data, reason, rule_name = m:map(tag, timestamp, record)
--     Rules are tried in order; the first whose tag glob and conditions hold (and whose decode
--     and capture steps succeed, unless a step says on_failure: reject) builds the event.
--     Returns the eventData table, or nil + a reason (no rule matched, a required field has no
--     value, a field is over its limit under oversize: reject, a step failed with
--     on_failure: reject). rule_name names the rule that applied, when one did. A rule with
--     `drop` returns nil, "dropped by rule ...: WHY", rule_name, true: the record is meant to
--     make no event (the 4th value tells it from a rejection). That reason is built once per
--     rule, when the rule is compiled: the same string every time.
--   m.drop_reasons: the reasons m:map can give for a dropped record, one per drop rule (so a
--     caller can prepare what it does with them once per set of rules, not per record).
--   local lines = m:explain(tag, timestamp, record)
--     For `mappings test --explain`: one line per rule tried, up to the one that applies, with
--     the first condition or step that failed and the value it saw.
--     Never raises for any record shape; the returned table:
--       * holds only valid UTF-8 strings (invalid bytes become U+FFFD, see cloudtrail.utf8),
--       * no NaN/inf (they become the strings "NaN", "Infinity", "-Infinity"),
--       * eventTime as YYYY-MM-DDTHH:MM:SSZ, sourceIPAddress only when it is an IP address (a
--         value that is not is moved to additionalEventData.invalidSourceIPAddress),
--       * sizes within the schema limits (truncated visibly or rejected, per the rule),
--       * always a UID: the rule's, or hash128(tag, timestamp, canonical record).
--     Tables in the result carry the filter_lua array/map metatables ({type=1} / {type=2}).
--     The record is never modified. Parts of it that need no cleaning are SHARED with the
--     result (e.g. additionalEventData: $ may be the record table itself): treat the result as
--     read-only below its top level (eventData and userIdentity are always fresh tables).

local json = require("cloudtrail.json")
local utf8 = require("cloudtrail.utf8")
local kv = require("cloudtrail.kv")
local timeconv = require("cloudtrail.timeconv")
local hash = require("cloudtrail.hash")
local ipaddr = require("cloudtrail.ipaddr")

local type, pairs, ipairs, tostring, tonumber, setmetatable, getmetatable, next, pcall =
  type, pairs, ipairs, tostring, tonumber, setmetatable, getmetatable, next, pcall
local find, format, gsub, sub, byte = string.find, string.format, string.gsub, string.sub, string.byte
local concat = table.concat
local floor, huge = math.floor, math.huge

local sanitize, cut_utf8 = utf8.sanitize, utf8.cut
local json_size, json_encode, json_decode, is_array = json.size, json.encode, json.decode, json.is_array
local string_size, number_size = json.string_size, json.number_size
local ARRAY_MT, MAP_MT = json.ARRAY_MT, json.MAP_MT
local to_utc, from_epoch = timeconv.to_utc, timeconv.from_epoch
local hex128, canonical = hash.hex128, hash.canonical
local valid_ip = ipaddr.valid

-- table.new(narray, nhash) pre-sizes a table: an event filled field by field would otherwise
-- be regrown (reallocated and rehashed) 4 times per record. Plain {} where it is missing.
local new_tab
do
  local ok, tn = pcall(require, "table.new")
  new_tab = ok and tn or function() return {} end
end
-- Rules without steps read no variables: they all share this table (never written to).
local NO_VARS = {}

local FORMAT = 1
local MAX_CLEAN_DEPTH = 200
local TRUNCATION_MARK = "...[truncated]"
local TAG_CACHE_MAX = 512

-- The CloudTrail integration-event fields, their byte limits and which have no default come
-- from the compiled data's `schema` section, which the compiler writes from schema.py (one
-- source of truth): see schema_from() below.

local M = {}
M.__index = M

---------------------------------------------------------------------------------------------
-- value conversions

local function number_text(n)
  if n ~= n then return "NaN" end
  if n == huge then return "Infinity" end
  if n == -huge then return "-Infinity" end
  if n == floor(n) and n > -1e15 and n < 1e15 then return format("%d", n) end
  local t = format("%.14g", n)
  if tonumber(t) ~= n then t = format("%.17g", n) end
  return t
end

-- Strings that need no work: no invalid UTF-8 possible (ASCII only) and nothing JSON escapes.
-- One find per string on the hot path decides both.

-- Short strings (keys, enum-like values) repeat from record to record: remember the ones that
-- need no work, so most of them cost a table lookup instead of a pattern scan. Bounded.
local PLAIN_MAX_LEN, PLAIN_MAX_COUNT = 64, 4096
local plain, plain_count = {}, 0

-- true when s has no byte >= 0x80, < 0x20, '"' or '\\'. A string.byte loop is compiled by
-- LuaJIT and runs far faster than string.find with a character class.
local function is_plain(s, n)
  for i = 1, n do
    local c = byte(s, i)
    if c < 32 or c > 127 or c == 34 or c == 92 then return false end
  end
  return true
end

local function text_and_size(s)
  local n = #s
  if plain[s] then return s, n + 2 end
  if is_plain(s, n) then
    if n <= PLAIN_MAX_LEN then
      if plain_count >= PLAIN_MAX_COUNT then plain, plain_count = {}, 0 end
      plain[s] = true
      plain_count = plain_count + 1
    end
    return s, n + 2
  end
  local t = sanitize(s)
  return t, string_size(t)
end

-- A deep copy that is safe to write (valid UTF-8, no NaN/inf, string keys, marked tables),
-- and its JSON size as schema.py measures it (see cloudtrail.json size()), in one walk.
local copy_clean
copy_clean = function(v, depth)
  local tv = type(v)
  if tv == "string" then return text_and_size(v) end
  if tv == "number" then
    if v ~= v or v == huge or v == -huge then
      local t = number_text(v)
      return t, #t + 2
    end
    return v, number_size(v)
  end
  if tv == "boolean" then return v, v and 4 or 5 end
  if tv ~= "table" then return nil, 0 end        -- flb_null and other userdata: absent
  if depth > MAX_CLEAN_DEPTH then return "[nesting too deep]", 20 end
  depth = depth + 1
  local out
  local size, count = 2, 0
  if is_array(v) then
    out = setmetatable({}, ARRAY_MT)
    for i = 1, #v do
      local c, cs = copy_clean(v[i], depth)
      if c ~= nil then count = count + 1; out[count] = c; size = size + cs end
    end
  else
    out = setmetatable({}, MAP_MT)
    for k, val in pairs(v) do
      local c, cs = copy_clean(val, depth)
      if c ~= nil then
        local tk, ks = type(k), nil
        if tk == "string" then k, ks = text_and_size(k)
        else
          k = tk == "number" and number_text(k) or tostring(k)
          k, ks = text_and_size(k)
        end
        out[k] = c
        count = count + 1
        size = size + ks + 1 + cs
      end
    end
  end
  if count > 1 then size = size + count - 1 end
  return out, size
end


-- The JSON size of v if it can be written as it is (valid UTF-8 strings and keys, finite
-- numbers, only tables that carry filter_lua's array/map marker, no holes, string keys, no
-- userdata), else nil. Most records pass, and then need no copy at all.
local measure
measure = function(v, depth)
  local tv = type(v)
  if tv == "string" then
    local n = #v
    if plain[v] then return n + 2 end
    if is_plain(v, n) then
      if n <= PLAIN_MAX_LEN then
        if plain_count >= PLAIN_MAX_COUNT then plain, plain_count = {}, 0 end
        plain[v] = true
        plain_count = plain_count + 1
      end
      return n + 2
    end
    if sanitize(v) ~= v then return nil end
    return string_size(v)
  end
  if tv == "number" then
    if v ~= v or v == huge or v == -huge then return nil end
    return number_size(v)
  end
  if tv == "boolean" then return v and 4 or 5 end
  if tv ~= "table" or depth > MAX_CLEAN_DEPTH then return nil end
  local mt = getmetatable(v)
  local kind = mt and mt.type
  local size, count = 2, 0
  if kind == 1 then
    for i = 1, #v do
      local cs = measure(v[i], depth + 1)
      if not cs then return nil end
      size = size + cs
      count = count + 1
    end
  elseif kind == 2 then
    for k, val in pairs(v) do
      if type(k) ~= "string" then return nil end
      local ks = measure(k, depth)
      local cs = ks and measure(val, depth + 1)
      if not cs then return nil end
      size = size + ks + 1 + cs
      count = count + 1
    end
  else
    return nil
  end
  if count > 1 then size = size + count - 1 end
  return size
end

-- (value, JSON size): v itself when it can be written as it is, else a cleaned copy. The
-- result may be shared with the record: callers copy before they change it.
local function clean(v, depth)
  local size = measure(v, depth)
  if size then return v, size end
  return copy_clean(v, depth)
end

-- Text for a CloudTrail string field or a template placeholder; nil when absent.
local function to_text(v)
  local tv = type(v)
  if tv == "string" then
    if plain[v] or is_plain(v, #v) or not find(v, "[\128-\255]") then return v end
    return (sanitize(v))
  end
  if tv == "number" then return number_text(v) end
  if tv == "boolean" then return v and "true" or "false" end
  if tv == "table" then return json_encode((clean(v, 0))) end
  return nil
end

-- An object field's value and its JSON size: maps as they are, anything else wrapped as
-- {"value": ...}.
local function to_object(v)
  local tv = type(v)
  if tv == "table" and not is_array(v) then return clean(v, 0) end
  if tv ~= "table" and tv ~= "string" and tv ~= "number" and tv ~= "boolean" then return nil end
  local c, cs = clean(v, 0)
  return setmetatable({ value = c }, MAP_MT), cs + 10      -- {"value":...}
end

local function scalar_equal(a, b)
  if a == b then return true end
  local ta, tb = type(a), type(b)
  if ta == "number" and tb == "string" then return number_text(a) == b end
  if ta == "string" and tb == "number" then return a == number_text(b) end
  return false
end

---------------------------------------------------------------------------------------------
-- compiling rule data into closures

local function glob_pattern(glob)
  local p = gsub(glob, "[%^%$%(%)%%%.%[%]%+%-%?]", "%%%0")
  p = gsub(p, "%*", ".*")
  return "^" .. p .. "$"
end

local function compile_ref(e)
  local src, path = e.src or "record", e.path or {}
  local n = #path
  for i = 1, n do
    local t = type(path[i])
    if t ~= "string" and t ~= "number" then return nil, "path element must be a key or index" end
  end
  -- the four cases cover the common depths without a loop
  if src == "record" then
    if n == 0 then return function(rec) return rec end end
    local p1, p2 = path[1], path[2]
    if n == 1 then
      return function(rec) return rec[p1] end
    end
    if n == 2 then
      return function(rec)
        local v = rec[p1]
        if type(v) ~= "table" then return nil end
        return v[p2]
      end
    end
    return function(rec)
      local v = rec
      for i = 1, n do
        if type(v) ~= "table" then return nil end
        v = v[path[i]]
      end
      return v
    end
  end
  return function(_, _, _, vars)
    local v = vars[src]
    for i = 1, n do
      if type(v) ~= "table" then return nil end
      v = v[path[i]]
    end
    return v
  end
end

local compile_expr

local function compile_list(list)
  if type(list) ~= "table" then return nil, "expected a list of expressions" end
  local fns = {}
  for i, e in ipairs(list) do
    local f, err = compile_expr(e)
    if not f then return nil, err end
    fns[i] = f
  end
  return fns
end

local function compile_kind(e)
  local k = e.k
  if k == "lit" then
    local v = e.v
    return function() return v end
  elseif k == "ref" then
    return compile_ref(e)
  elseif k == "tag" then
    return function(_, tag) return tag end
  elseif k == "time" then
    return function(_, _, ts) return ts end
  elseif k == "first" then
    local fns, err = compile_list(e.list)
    if not fns then return nil, err end
    local n = #fns
    return function(rec, tag, ts, vars)
      for i = 1, n do
        local v = fns[i](rec, tag, ts, vars)
        if v ~= nil and v ~= "" then return v end
      end
      return nil
    end
  elseif k == "tpl" then
    local parts = e.parts
    if type(parts) ~= "table" then return nil, "template without parts" end
    local fns, texts, n = {}, {}, #parts
    for i = 1, n do
      local p = parts[i]
      if type(p) == "string" then
        texts[i] = p
      else
        local f, err = compile_expr(p)
        if not f then return nil, err end
        fns[i] = f
      end
    end
    -- One buffer per template, its literal parts filled once: a call only sets the slots of
    -- placeholders. Safe to reuse: an expression tree never calls its own template again.
    local buf = {}
    for i = 1, n do buf[i] = texts[i] or "" end
    return function(rec, tag, ts, vars)
      for i = 1, n do
        if not texts[i] then
          local t = to_text(fns[i](rec, tag, ts, vars))
          if t == nil then return nil end
          buf[i] = t
        end
      end
      return concat(buf, "", 1, n)
    end
  elseif k == "tconv" then
    local fns, err = compile_list(e.list)
    if not fns then return nil, err end
    local fmt = e.fmt or "auto"
    if not timeconv.FORMATS[fmt] then return nil, "unknown time format '" .. tostring(fmt) .. "'" end
    local n = #fns
    local kinds = {}
    for i, sub_e in ipairs(e.list) do kinds[i] = sub_e.k end
    return function(rec, tag, ts, vars)
      for i = 1, n do
        local v = fns[i](rec, tag, ts, vars)
        if v ~= nil then
          -- the Fluent Bit timestamp is always epoch seconds, whatever the rule's format
          local t = kinds[i] == "time" and from_epoch(v) or to_utc(v, fmt, ts)
          if t then return t end
        end
      end
      return nil
    end
  elseif k == "obj" then
    local keys, vals = e.keys, e.vals
    if type(keys) ~= "table" or type(vals) ~= "table" or #keys ~= #vals then
      return nil, "object needs keys and vals of the same length"
    end
    local fns, err = compile_list(vals)
    if not fns then return nil, err end
    local n = #keys
    return function(rec, tag, ts, vars)
      local out, any = setmetatable(new_tab(0, n), MAP_MT), false
      for i = 1, n do
        local v = fns[i](rec, tag, ts, vars)
        if v ~= nil then out[keys[i]] = v; any = true end
      end
      if not any then return nil end   -- no member present: the object is absent too
      return out
    end
  elseif k == "rest" then
    -- {remaining: $x}: the map $x without the keys the rule stores elsewhere (e.skip, found by
    -- the compiler) and without empty strings, so each field is stored once.
    local get, err = compile_ref(e.ref or {})
    if not get then return nil, err end
    local skip = {}
    for _, key in ipairs(e.skip or {}) do skip[key] = true end
    return function(rec, tag, ts, vars)
      local v = get(rec, tag, ts, vars)
      if type(v) ~= "table" or is_array(v) then return v end
      local out, any = setmetatable({}, MAP_MT), false
      for key, val in pairs(v) do
        if val ~= "" and not skip[key] then out[key] = val; any = true end
      end
      if not any then return nil end
      return out
    end
  elseif k == "hash" then
    local fns, err = compile_list(e.list)
    if not fns then return nil, err end
    local n = #fns
    local buf = {}   -- reused, as for templates
    return function(rec, tag, ts, vars)
      for i = 1, n do buf[i] = canonical(fns[i](rec, tag, ts, vars)) end
      return hex128(concat(buf, "|", 1, n))
    end
  end
  return nil, "unknown expression kind '" .. tostring(k) .. "'"
end

compile_expr = function(e)
  if type(e) ~= "table" then return nil, "expression must be a table" end
  local f, err = compile_kind(e)
  if not f then return nil, err end
  local d = e.d
  if d ~= nil then
    return function(rec, tag, ts, vars)
      local v = f(rec, tag, ts, vars)
      if v == nil then return d end
      return v
    end
  end
  return f
end

local function compile_condition(c)
  if type(c) ~= "table" or type(c.ref) ~= "table" then return nil, "condition without ref" end
  local get, err = compile_ref(c.ref)
  if not get then return nil, err end
  local op = c.op
  if op == "exists" then
    return function(rec, tag, ts, vars) return get(rec, tag, ts, vars) ~= nil end
  elseif op == "absent" then
    return function(rec, tag, ts, vars) return get(rec, tag, ts, vars) == nil end
  elseif op == "equals" then
    local want = c.value
    return function(rec, tag, ts, vars) return scalar_equal(get(rec, tag, ts, vars), want) end
  elseif op == "one_of" then
    local values = c.values
    if type(values) ~= "table" then return nil, "one_of without values" end
    local set = {}
    for _, v in ipairs(values) do set[v] = true; if type(v) == "number" then set[number_text(v)] = true end end
    return function(rec, tag, ts, vars)
      local v = get(rec, tag, ts, vars)
      if v == nil then return false end
      if type(v) == "number" then return set[v] == true or set[number_text(v)] == true end
      return set[v] == true
    end
  elseif op == "pattern" then
    local pat = c.pattern
    if type(pat) ~= "string" then return nil, "pattern must be a string" end
    local ok = pcall(find, "", pat)
    if not ok then return nil, "invalid Lua pattern" end
    return function(rec, tag, ts, vars)
      local v = get(rec, tag, ts, vars)
      local tv = type(v)
      if tv == "number" then v = number_text(v) elseif tv ~= "string" then return false end
      return find(v, pat) ~= nil
    end
  end
  return nil, "unknown condition op '" .. tostring(op) .. "'"
end

local function compile_conditions(list)
  local fns = {}
  for i, c in ipairs(list or {}) do
    local f, err = compile_condition(c)
    if not f then return nil, "condition " .. i .. ": " .. err end
    fns[i] = f
  end
  return fns
end

local function compile_step(s)
  if type(s) ~= "table" or type(s.name) ~= "string" then return nil, "step without name" end
  local get, err = compile_expr(s.from)
  if not get then return nil, err end
  local name = s.name
  local reject = s.on_failure == "reject"
  if s.kind == "decode" then
    local fmt = s.format or "json_or_kv"
    local rest
    if s.rest_keys then
      rest = {}
      for _, k in ipairs(s.rest_keys) do rest[k] = true end
    end
    local function decode_text(text)
      if type(text) ~= "string" then return nil, "is not a string" end
      if fmt == "json" then return json_decode(text) end
      if fmt == "kv" then return kv.decode(text, rest) end
      if fmt == "json_or_kv" then
        if find(text, "^%s*[{%[]") then return json_decode(text) end
        return kv.decode(text, rest)
      end
      return nil, "unknown decode format"
    end
    if fmt ~= "json" and fmt ~= "kv" and fmt ~= "json_or_kv" then
      return nil, "unknown decode format '" .. tostring(fmt) .. "'"
    end
    return { name = name, reject = reject, get = get, run = function(rec, tag, ts, vars)
      local v, derr = decode_text(get(rec, tag, ts, vars))
      if v == nil then return false, "decode '" .. name .. "': " .. (derr or "failed") end
      vars[name] = v
      return true
    end }
  elseif s.kind == "capture" then
    local pat, fields = s.pattern, s.fields
    if type(pat) ~= "string" or type(fields) ~= "table" then return nil, "capture needs pattern and fields" end
    if not pcall(find, "", pat) then return nil, "invalid Lua pattern" end
    local nf = #fields
    return { name = name, reject = reject, get = get, run = function(rec, tag, ts, vars)
      local v = get(rec, tag, ts, vars)
      if type(v) ~= "string" then return false, "capture '" .. name .. "': source is not a string" end
      local caps = { find(v, pat) }
      if caps[1] == nil then return false, "capture '" .. name .. "': pattern did not match" end
      local out = setmetatable({}, MAP_MT)
      for i = 1, nf do
        local c = caps[i + 2]
        if c ~= nil then out[fields[i]] = c end
      end
      vars[name] = out
      return true
    end }
  end
  return nil, "unknown step kind '" .. tostring(s.kind) .. "'"
end

---------------------------------------------------------------------------------------------
-- making an event fit

local function preview_object(obj, limit, extra_list)
  local original = json_size(obj)
  local text = json_encode(obj)
  local p = setmetatable({ truncated = true, originalBytes = original, preview = "" }, MAP_MT)
  if extra_list then p.truncatedFields = extra_list end
  -- the longest prefix whose escaped form still fits: escaping can double a byte or more, so
  -- search instead of guessing
  local lo, hi = 0, #text < limit and #text or limit
  while lo < hi do
    local mid = floor((lo + hi + 1) / 2)
    p.preview = cut_utf8(text, mid)
    if json_size(p) <= limit then lo = mid else hi = mid - 1 end
  end
  p.preview = cut_utf8(text, lo)
  return p
end

local function text_over(name, size, limit)
  return format("%s is %d bytes; the limit is %d", name, size, limit)
end

---------------------------------------------------------------------------------------------
-- the schema section of the compiled data (written by the compiler from schema.py)

local function string_list(t)
  if type(t) ~= "table" or #t == 0 then return nil end
  for i = 1, #t do if type(t[i]) ~= "string" then return nil end end
  return t
end

local function limits_for(names, limits)
  if type(limits) ~= "table" then return nil end
  for i = 1, #names do
    local n = limits[names[i]]
    if type(n) ~= "number" or n < 1 then return nil end
  end
  return limits
end

-- The schema tables build() reads, checked once; nil + reason when a part is missing (a file
-- compiled by an older `mappings compile`, or not by it at all).
local function schema_from(s)
  if type(s) ~= "table" then
    return nil, "compiled mappings have no schema section: compile them again with "
      .. "`cloudtrail-sink mappings compile`"
  end
  local out = {
    string_fields = string_list(s.string_fields), object_fields = string_list(s.object_fields),
    identity_fields = string_list(s.identity_fields), required = {},
    details_limit = tonumber(s.details_limit),
  }
  for _, k in ipairs({ "string_fields", "object_fields", "identity_fields" }) do
    if not out[k] then return nil, "compiled mappings: schema." .. k .. " is not a list of names" end
  end
  out.string_limits = limits_for(out.string_fields, s.string_limits)
  out.object_limits = limits_for(out.object_fields, s.object_limits)
  out.identity_limits = limits_for(out.identity_fields, s.identity_limits)
  for _, k in ipairs({ "string_limits", "object_limits", "identity_limits" }) do
    if not out[k] then return nil, "compiled mappings: schema." .. k .. " lacks a field's limit" end
  end
  if not out.details_limit or out.details_limit < 1 then
    return nil, "compiled mappings: schema.details_limit is not a positive number"
  end
  local required = string_list(s.required)
  if not required then return nil, "compiled mappings: schema.required is not a list of names" end
  out.identity_keys, out.identity_paths, out.required_keys = {}, {}, {}
  for i, name in ipairs(out.identity_fields) do
    out.identity_keys[i] = name
    out.identity_paths[i] = "userIdentity." .. name
  end
  out.identity_keys[#out.identity_keys + 1] = "details"
  for _, name in ipairs(required) do
    out.required[name] = true
    out.required_keys[#out.required_keys + 1] = name
  end
  for _, p in ipairs(out.identity_paths) do out.required_keys[#out.required_keys + 1] = p end
  return out
end

---------------------------------------------------------------------------------------------
-- rules

local function compile_rule(r, i, defaults, schema)
  if type(r) ~= "table" then return nil, "rule " .. i .. " is not a table" end
  local label = format("rule '%s' (%s:%s)", tostring(r.name), tostring(r.file or "?"),
                       tostring(r.line or "?"))
  local rule = { name = r.name, label = label, truncate = r.oversize ~= "reject", tags = {},
                  schema = schema }
  for j, g in ipairs(r.tags or {}) do
    if type(g) ~= "string" then return nil, label .. ": tag glob must be a string" end
    rule.tags[j] = glob_pattern(g)
  end
  if #rule.tags == 0 then return nil, label .. ": no tag glob" end
  rule.globs, rule.pre_src, rule.post_src = r.tags, r.where or {}, r.after or {}
  local err
  rule.pre, err = compile_conditions(r.where)
  if not rule.pre then return nil, label .. ": " .. err end
  rule.post, err = compile_conditions(r.after)
  if not rule.post then return nil, label .. ": " .. err end
  rule.steps = {}
  for j, s in ipairs(r.steps or {}) do
    local st, serr = compile_step(s)
    if not st then return nil, label .. ": step " .. j .. ": " .. serr end
    rule.steps[j] = st
  end
  if r.drop ~= nil then          -- drop: the records this rule matches make no event
    rule.drop = tostring(r.drop)
    -- The same for every record the rule drops: built here, not per record.
    rule.drop_reason = "dropped by " .. label .. ": " .. rule.drop
    return rule
  end
  local ev = r.event
  if type(ev) ~= "table" then return nil, label .. ": no event" end
  local fields = {}
  for _, name in ipairs(schema.string_fields) do
    local e = ev[name]
    if e == nil and defaults and defaults[name] ~= nil then e = { k = "lit", v = defaults[name] } end
    if e ~= nil then
      local f, ferr = compile_expr(e)
      if not f then return nil, label .. ": " .. name .. ": " .. ferr end
      fields[name] = f
    end
  end
  for _, name in ipairs(schema.object_fields) do
    if ev[name] ~= nil then
      local f, ferr = compile_expr(ev[name])
      if not f then return nil, label .. ": " .. name .. ": " .. ferr end
      fields[name] = f
    end
  end
  local ui = ev.userIdentity
  if type(ui) ~= "table" then return nil, label .. ": userIdentity missing" end
  for _, name in ipairs(schema.identity_keys) do
    if ui[name] ~= nil then
      local f, ferr = compile_expr(ui[name])
      if not f then return nil, label .. ": userIdentity." .. name .. ": " .. ferr end
      fields["userIdentity." .. name] = f
    end
  end
  for _, name in ipairs(schema.required_keys) do
    if not fields[name] then return nil, label .. ": " .. name .. " has no expression" end
  end
  -- eventTime is always converted: a plain field reference goes through 'auto'
  local et = ev.eventTime
  if et ~= nil and et.k ~= "tconv" then
    fields.eventTime = compile_expr({ k = "tconv", list = { et }, fmt = "auto", d = et.d })
  end
  rule.fields = fields
  -- Upper bound of the event's top-level fields (eventTime, UID, userIdentity always), to
  -- create it at its final size.
  local nfields = 3
  for name in pairs(fields) do
    if name ~= "eventTime" and name ~= "UID" and not find(name, "^userIdentity%.") then
      nfields = nfields + 1
    end
  end
  rule.nfields = nfields
  rule.explicit_uid = ev.UID ~= nil
  return rule
end

function M.new(compiled)
  if type(compiled) ~= "table" then return nil, "compiled mappings must be a table" end
  if compiled.format ~= FORMAT then
    return nil, "compiled mappings format " .. tostring(compiled.format) .. " is not " .. FORMAT
  end
  if type(compiled.rules) ~= "table" then return nil, "compiled mappings have no rules" end
  local schema, serr = schema_from(compiled.schema)
  if not schema then return nil, serr end
  local rules, drop_reasons = {}, {}
  for i, r in ipairs(compiled.rules) do
    local ok, rule, err = pcall(compile_rule, r, i, compiled.defaults, schema)
    if not ok then return nil, "rule " .. i .. ": " .. tostring(rule) end
    if not rule then return nil, err end
    rules[i] = rule
    drop_reasons[#drop_reasons + 1] = rule.drop_reason
  end
  return setmetatable({ rules = rules, drop_reasons = drop_reasons, tag_cache = {},
                        tag_cache_n = 0 }, M)
end

-- Rules whose globs match tag, computed once per distinct tag.
local function rules_for(self, tag)
  local list = self.tag_cache[tag]
  if list then return list end
  list = {}
  for _, rule in ipairs(self.rules) do
    for _, p in ipairs(rule.tags) do
      if find(tag, p) then list[#list + 1] = rule; break end
    end
  end
  if self.tag_cache_n >= TAG_CACHE_MAX then self.tag_cache, self.tag_cache_n = {}, 0 end
  self.tag_cache[tag] = list
  self.tag_cache_n = self.tag_cache_n + 1
  return list
end

-- aed may be a table of the record itself (clean() shares what needs no change)
local function shallow_copy(t)
  local out = setmetatable({}, MAP_MT)
  for k, v in pairs(t) do out[k] = v end
  return out
end

local function add_truncated(list, name)
  list = list or setmetatable({}, ARRAY_MT)
  list[#list + 1] = name
  return list
end

local valid_account = nil

local function build(rule, tag, ts, rec, vars)
  local f = rule.fields
  local S = rule.schema
  local STRING_FIELDS, STRING_LIMITS, REQUIRED = S.string_fields, S.string_limits, S.required
  local IDENTITY_FIELDS, IDENTITY_KEYS, IDENTITY_LIMITS = S.identity_fields, S.identity_paths, S.identity_limits
  local OBJECT_FIELDS, OBJECT_LIMITS, DETAILS_LIMIT = S.object_fields, S.object_limits, S.details_limit
  local ev = setmetatable(new_tab(0, rule.nfields), MAP_MT)  -- final size: no regrowth
  local truncated, bad_ip
  local truncate = rule.truncate

  for i = 1, #STRING_FIELDS do
    local name = STRING_FIELDS[i]
    local fn = f[name]
    if fn then
      local text = to_text(fn(rec, tag, ts, vars))
      if text == nil then
        if REQUIRED[name] then return nil, name .. " has no value" end
      elseif name == "eventTime" then
        ev.eventTime = text
      elseif name == "sourceIPAddress" then
        if text ~= "" then
          if valid_ip(text) then ev.sourceIPAddress = text else bad_ip = text end
        end
      elseif name == "recipientAccountId" then
        -- Usually one constant id: remember the last valid one instead of running a pattern
        -- (which LuaJIT cannot compile) on every record.
        if text ~= valid_account and not find(text, "^%d%d%d%d%d%d%d%d%d%d%d%d$") then
          return nil, "recipientAccountId must be a 12-digit account id"
        end
        valid_account = text
        ev.recipientAccountId = text
      elseif name == "UID" then
        if #text > STRING_LIMITS.UID then
          if not truncate then return nil, text_over("UID", #text, STRING_LIMITS.UID) end
          truncated = add_truncated(truncated, "UID")
          text = hex128(text)       -- a cut UID could collide; its hash stays unique
        end
        ev.UID = text
      else
        local limit = STRING_LIMITS[name]
        if #text > limit then
          if not truncate then return nil, text_over(name, #text, limit) end
          truncated = add_truncated(truncated, name)
          text = cut_utf8(text, limit - #TRUNCATION_MARK) .. TRUNCATION_MARK
        end
        ev[name] = text
      end
    end
  end
  if ev.eventTime == nil then
    if f.eventTime then return nil, "eventTime has no value that converts to a time" end
    ev.eventTime = from_epoch(ts)
    if not ev.eventTime then return nil, "the record's timestamp is not a usable time" end
  end
  if ev.UID == nil then
    ev.UID = hex128(canonical(tag) .. canonical(ts) .. canonical(rec))
  end

  local ident = setmetatable(new_tab(0, 3), MAP_MT)
  for i = 1, #IDENTITY_FIELDS do
    local name = IDENTITY_FIELDS[i]
    local text = to_text(f[IDENTITY_KEYS[i]](rec, tag, ts, vars))
    if text == nil then return nil, IDENTITY_KEYS[i] .. " has no value" end
    local limit = IDENTITY_LIMITS[name]
    if #text > limit then
      if not truncate then return nil, text_over(IDENTITY_KEYS[i], #text, limit) end
      truncated = add_truncated(truncated, IDENTITY_KEYS[i])
      text = cut_utf8(text, limit - #TRUNCATION_MARK) .. TRUNCATION_MARK
    end
    ident[name] = text
  end
  local fd = f["userIdentity.details"]
  if fd then
    local d, size = to_object(fd(rec, tag, ts, vars))
    if d ~= nil then
      if size > DETAILS_LIMIT then
        if not truncate then return nil, text_over("userIdentity.details", size, DETAILS_LIMIT) end
        truncated = add_truncated(truncated, "userIdentity.details")
        d = preview_object(d, DETAILS_LIMIT)
      end
      ident.details = d
    end
  end
  ev.userIdentity = ident

  local aed, aed_size
  for i = 1, #OBJECT_FIELDS do
    local name = OBJECT_FIELDS[i]
    local fn = f[name]
    if fn then
      local obj, size = to_object(fn(rec, tag, ts, vars))
      if obj ~= nil then
        local limit = OBJECT_LIMITS[name]
        if name == "additionalEventData" then
          aed, aed_size = obj, size
        elseif size > limit then
          if not truncate then return nil, text_over(name, size, limit) end
          truncated = add_truncated(truncated, name)
          ev[name] = preview_object(obj, limit)
        else
          ev[name] = obj
        end
      end
    end
  end
  if bad_ip then
    aed = aed and shallow_copy(aed) or setmetatable({}, MAP_MT)
    aed.invalidSourceIPAddress = bad_ip
    aed_size = nil
  end
  if aed == nil and truncated == nil then return ev end
  local limit = OBJECT_LIMITS.additionalEventData
  aed_size = aed_size or json_size(aed)
  if aed_size > limit then
    if not truncate then return nil, text_over("additionalEventData", aed_size, limit) end
    truncated = add_truncated(truncated, "additionalEventData")
    ev.additionalEventData = preview_object(aed, limit, truncated)
    return ev
  end
  if truncated then
    aed = aed and shallow_copy(aed) or setmetatable({}, MAP_MT)
    aed.truncatedFields = truncated
    if json_size(aed) > limit then
      aed.truncatedFields = nil
      truncated[#truncated + 1] = "additionalEventData"
      aed = preview_object(aed, limit, truncated)
    end
  end
  ev.additionalEventData = aed
  return ev
end

local function try_rule(rule, tag, ts, rec)
  local pre = rule.pre
  for i = 1, #pre do
    if not pre[i](rec, tag, ts, nil) then return false end
  end
  local vars
  local steps = rule.steps
  if #steps > 0 then
    vars = new_tab(0, #steps)
    for i = 1, #steps do
      local ok, why = steps[i].run(rec, tag, ts, vars)
      if not ok then
        if steps[i].reject then return true, nil, why end
        return false
      end
    end
  end
  local post = rule.post
  for i = 1, #post do
    if not post[i](rec, tag, ts, vars) then return false end
  end
  if rule.drop then return true, nil, rule.drop_reason, true end
  local ev, why = build(rule, tag, ts, rec, vars or NO_VARS)
  return true, ev, why
end

-- The rule being tried, for the reason when a rule raises (one pcall per record, not per rule)
local trying = nil

local function map_rules(list, tag, ts, record)
  for i = 1, #list do
    local rule = list[i]
    trying = rule
    local applied, ev, why, dropped = try_rule(rule, tag, ts, record)
    if applied then
      if ev then return ev, nil, rule.name end
      if dropped then return nil, why, rule.name, true end
      return nil, rule.label .. ": " .. tostring(why), rule.name
    end
  end
  trying = nil
  return nil, "no mapping rule matched tag '" .. sanitize(tag) .. "'"
end

local function seconds(ts)
  if type(ts) == "table" then          -- filter_lua's time_as_table form {sec=, nsec=}
    return (tonumber(ts.sec) or 0) + (tonumber(ts.nsec) or 0) / 1e9
  end
  return type(ts) == "number" and ts or 0
end

function M:map(tag, ts, record)
  if type(tag) ~= "string" then tag = tostring(tag) end
  if type(record) ~= "table" then return nil, "record is not a map" end
  ts = seconds(ts)
  local ok, ev, reason, name, dropped = pcall(map_rules, rules_for(self, tag), tag, ts, record)
  if ok then return ev, reason, name, dropped end
  local rule = trying
  trying = nil
  if rule then return nil, rule.label .. ": internal error: " .. tostring(ev), rule.name end
  return nil, "internal error: " .. tostring(ev)
end

---------------------------------------------------------------------------------------------
-- explain (`cloudtrail-sink mappings test --explain`; never on the record path)

local function shown(v)
  if v == nil then return "absent" end
  local t = to_text(v) or tostring(v)
  if #t > 80 then t = cut_utf8(t, 77) .. "..." end
  return json_encode(t)
end

local function shown_list(list)
  local out = {}
  for i = 1, #list do out[i] = shown(list[i]) end
  return concat(out, ", ")
end

local function why_not(c, v)
  local op = c.op
  if op == "exists" then return "must exist, is absent" end
  if op == "absent" then return "must be absent, is " .. shown(v) end
  if op == "equals" then return "must equal " .. shown(c.value) .. ", is " .. shown(v) end
  if op == "one_of" then return "must be one of " .. shown_list(c.values) .. ", is " .. shown(v) end
  return "must match the pattern " .. shown(c.pattern) .. ", is " .. shown(v)
end

local function failed_condition(conds, fns, rec, tag, ts, vars)
  for i = 1, #fns do
    if not fns[i](rec, tag, ts, vars) then
      local c = conds[i]
      local get = compile_ref(c.ref)
      return "match.fields." .. tostring(c.name or "?") .. ": " .. why_not(c, get(rec, tag, ts, vars or NO_VARS))
    end
  end
end

-- (text, applied): what this rule makes of the record, and why when it does not apply.
local function explain_rule(rule, tag, ts, rec)
  local tag_ok = false
  for _, p in ipairs(rule.tags) do
    if find(tag, p) then tag_ok = true; break end
  end
  if not tag_ok then
    return "not applied: match.tag: " .. shown(tag) .. " matches none of " .. shown_list(rule.globs), false
  end
  local why = failed_condition(rule.pre_src, rule.pre, rec, tag, ts, nil)
  if why then return "not applied: " .. why, false end
  local vars = {}
  for _, st in ipairs(rule.steps) do
    local ok, step_why = st.run(rec, tag, ts, vars)
    if not ok then
      local text = step_why .. " (its input: " .. shown(st.get(rec, tag, ts, vars)) .. ")"
      if st.reject then return "applied: rejected: " .. text, true end
      return "not applied: " .. text, false
    end
  end
  why = failed_condition(rule.post_src, rule.post, rec, tag, ts, vars)
  if why then return "not applied: " .. why, false end
  if rule.drop then return "applied: dropped: " .. rule.drop, true end
  local ev, reason = build(rule, tag, ts, rec, vars)
  if ev then return "applied", true end
  return "applied: rejected: " .. tostring(reason), true
end

-- One line per rule tried, in order, up to the one that applies: which rule took the record
-- and, for each earlier rule, the first thing that did not hold (with the value it saw).
function M:explain(tag, ts, record)
  if type(tag) ~= "string" then tag = tostring(tag) end
  local lines = setmetatable({}, ARRAY_MT)
  if type(record) ~= "table" then lines[1] = "record is not a map"; return lines end
  ts = seconds(ts)
  for _, rule in ipairs(self.rules) do
    local ok, text, applied = pcall(explain_rule, rule, tag, ts, record)
    if not ok then text, applied = "applied: internal error: " .. tostring(text), true end
    lines[#lines + 1] = rule.label .. ": " .. text
    if applied then return lines end
  end
  lines[#lines + 1] = "no mapping rule matched tag " .. shown(tag)
  return lines
end

M.FORMAT = FORMAT
M.TRUNCATION_MARK = TRUNCATION_MARK
M.glob_pattern = glob_pattern

return M
