-- cloudtrail.filter: what happens to one record inside Fluent Bit (docs/fluent-bit.md).
--
-- Contract:
--   filter.config_from_env(getenv, script_dir) -> cfg, problems
--     Reads (defaults in brackets):
--       CLOUDTRAIL_SPOOL_DIR            spool root                         [/var/spool/cloudtrail]
--       CLOUDTRAIL_MAPPINGS             compiled mappings (data-only Lua)  [<script dir>/mappings.lua]
--       CLOUDTRAIL_SEGMENT_MAX_EVENTS   seal a segment at this many events [500]
--       CLOUDTRAIL_SEGMENT_MAX_BYTES    ... or at this many bytes          [1048576]
--       CLOUDTRAIL_SEGMENT_MAX_AGE_MS   ... or when older than this        [1000]
--       CLOUDTRAIL_TICK_TAG             tag of the once-a-second tick      [cloudtrail.tick]
--     A bad number is reported in `problems` and its default used.
--   filter.new(cfg, deps) -> f   (deps: clock, log, mapper = module with new(), all optional)
--     Prepares the spool (creates missing folders, publishes what a crash left in tmp/) and
--     loads the mappings: load (text only, no bytecode) in an EMPTY environment (the file is data only and cannot
--     call anything), then mapper.new(table). A missing or broken mappings file or mapper is
--     not fatal: every record is then rejected with that reason (and one log line).
--   Live reload (docs/fluent-bit.md, "Changing the rules while running"): on a tick, at most
--     once per MAPPINGS_CHECK_INTERVAL, the mappings file is read again (cloudtrail.reload); if
--     its bytes changed, the new rules are built and replace the old ones between two records,
--     so every record is mapped by exactly one complete set of rules and none is lost. A file
--     that cannot be read, loaded or accepted by the mapper leaves the last good rules in
--     place (records keep being mapped by them, none is rejected for it) and is logged once.
--     Each change of state is written atomically to <spool>/mappings-status.json:
--     {"state": "ok"|"error", "mappings": path, "rules": n, "loaded_at": epoch seconds of the
--     rules in use, "error": why the newest file was refused, "error_at": when,
--     "started_at": when this filter started, "dropped": {rule name: records its drop: rule
--     took since started_at}}; new drop counts are written at the next tick, then at most
--     every STATUS_COUNTS_INTERVAL seconds.
--   f:process(tag, timestamp, record) -> code, timestamp, record   (filter_lua's contract)
--     * tick tag: seal what is older than the age limit, reload changed mappings; return -1.
--     * otherwise: map with the first matching rule; the event (eventData must be a table
--       with a string UID; every string valid UTF-8) is appended to the open segment as
--       {"eventData", "tag", "time"}; a record no rule maps, or whose mapping or encoding fails,
--       is appended to the rejected file as {"tag", "time", "reason", "record"}. Return -1:
--       the record has left the pipeline and is in the spool.
--     * a record a `drop:` rule matches (the rule means it to make no event, e.g. a Kubernetes
--       audit stage before the final one) is counted in stats.dropped and per rule in the
--       status file, and logged (each rule's line at most once a minute, with the count of
--       repeats); return -1.
--     * if the spool cannot be written at all (disk full, read-only, folder gone and not
--       re-creatable), return 0: the record stays in the pipeline unchanged rather than being
--       dropped, and a log line says why. That is the only case in which a record passes.
--   f:seal_all()  seal every open file (clean shutdown).
--   f.stats: counters { events, rejected, dropped, kept, ticks }.
local msgpack = require("cloudtrail.msgpack")
local spool = require("cloudtrail.spool")
local clock_mod = require("cloudtrail.clock")
local reload = require("cloudtrail.reload")
local MAP_MT = require("cloudtrail.json").MAP_MT

local type, tostring, tonumber, pcall, setmetatable, load, setfenv, ipairs =
      type, tostring, tonumber, pcall, setmetatable, load, setfenv, ipairs
local table_concat = table.concat
local str, float64, map_header, encode_parts, utf8_valid =
      msgpack.str, msgpack.float64, msgpack.map_header, msgpack.encode_parts, msgpack.utf8_valid

local function safe_text(s)
  s = tostring(s)
  if utf8_valid(s) then return s end
  return (s:gsub("[\128-\255]", "?"))
end

-- What a dropped record shows, cleaned once per set of rules instead of once per dropped record:
-- rule names (the drop counters) and drop reasons (the log). The compiler only writes names of
-- [A-Za-z0-9_.-]; a mappings file written by hand can hold any bytes, in names, files and drop
-- texts. Keyed by the exact string the mapper returns (safe_text of the WHOLE string: a piece
-- cleaned alone could differ), from `list` itself or, with `field`, from its items' field.
local function safe_texts(list, field)
  local out = {}
  if type(list) ~= "table" then return out end
  for _, item in ipairs(list) do
    local s = item
    if field then s = type(item) == "table" and item[field] end
    if type(s) == "string" then out[s] = safe_text(s) end
  end
  return out
end

local M = {}

M.DEFAULTS = {
  spool_dir = "/var/spool/cloudtrail",
  max_events = 500,
  max_bytes = 1048576,
  max_age_ms = 1000,
  tick_tag = "cloudtrail.tick",
}

-- Deeper records are kept as opaque msgpack bytes in rejected/ (strict decoders such as
-- Python's msgpack refuse nesting beyond ~1000 levels).
local REJECTED_MAX_DEPTH = 500
local OPAQUE_MAX_DEPTH = 5000
local EVENT_MAX_DEPTH = 250 -- the sink serializes eventData with orjson (255 levels)
local LOG_INTERVAL = 60
-- Below the tick's 1 s period, so every tick checks; a faster tick reads at most twice a second.
local MAPPINGS_CHECK_INTERVAL = 0.5
M.STATUS_FILE = "mappings-status.json"
-- Drop counts change with every dropped record: rewrite the status for them at most this often.
local STATUS_COUNTS_INTERVAL = 10

local function positive_int(getenv, name, default, problems)
  local raw = getenv(name)
  if raw == nil or raw == "" then return default end
  local n = tonumber(raw)
  if n == nil or n < 1 or n ~= math.floor(n) then
    problems[#problems + 1] = name .. "=" .. tostring(raw) .. " is not a positive integer; using "
      .. default
    return default
  end
  return n
end

function M.config_from_env(getenv, script_dir)
  local problems = {}
  local d = M.DEFAULTS
  local spool_dir = getenv("CLOUDTRAIL_SPOOL_DIR")
  if spool_dir == nil or spool_dir == "" then spool_dir = d.spool_dir end
  local mappings = getenv("CLOUDTRAIL_MAPPINGS")
  if mappings == nil or mappings == "" then mappings = (script_dir or ".") .. "/mappings.lua" end
  local tick_tag = getenv("CLOUDTRAIL_TICK_TAG")
  if tick_tag == nil or tick_tag == "" then tick_tag = d.tick_tag end
  local cfg = {
    spool_dir = spool_dir:gsub("/+$", ""),
    mappings = mappings,
    max_events = positive_int(getenv, "CLOUDTRAIL_SEGMENT_MAX_EVENTS", d.max_events, problems),
    max_bytes = positive_int(getenv, "CLOUDTRAIL_SEGMENT_MAX_BYTES", d.max_bytes, problems),
    max_age_ms = positive_int(getenv, "CLOUDTRAIL_SEGMENT_MAX_AGE_MS", d.max_age_ms, problems),
    tick_tag = tick_tag,
  }
  if cfg.spool_dir == "" then cfg.spool_dir = "/" end
  return cfg, problems
end

-- Log lines go to stderr (Fluent Bit's log), never with record content, and each distinct
-- message at most once a minute so a broken spool cannot flood the log.
local function stderr_logger(clock)
  local last = {}
  local suppressed = {}
  return function(msg)
    local now = clock.now()
    local prev = last[msg]
    if prev and now - prev < LOG_INTERVAL then
      suppressed[msg] = (suppressed[msg] or 0) + 1
      return
    end
    last[msg] = now
    local extra = ""
    if suppressed[msg] then
      extra = " (" .. suppressed[msg] .. " more times)"
      suppressed[msg] = nil
    end
    io.stderr:write("[cloudtrail.lua] ", msg, extra, "\n")
  end
end
M.stderr_logger = stderr_logger

-- Interpreted instructions a mappings file may take to evaluate: the shipped rules take about
-- 3,000; a file that loops (written by hand: the compiler writes only a table constructor)
-- would otherwise hang Fluent Bit's one engine thread, at start or at a reload.
local EVAL_MAX_INSTRUCTIONS = 20000000

-- load as text only (bytecode could crash the VM) in an empty environment: the compiled
-- mappings are data only.
function M.parse_mappings(text, path)
  local chunk, err = load(text, "@" .. tostring(path), "t")
  if not chunk then return nil, "cannot load mappings " .. tostring(path) .. ": " .. tostring(err) end
  setfenv(chunk, {})
  -- Count hooks run only in LuaJIT's interpreter, so the chunk is kept out of the JIT. `debug`
  -- and `jit` are there: Fluent Bit opens every library (luaL_openlibs in src/flb_luajit.c).
  local jit_lib = rawget(_G, "jit")
  if jit_lib then jit_lib.off(chunk, true) end
  debug.sethook(function()
    error("does not finish (more than " .. EVAL_MAX_INSTRUCTIONS .. " instructions)", 2)
  end, "", EVAL_MAX_INSTRUCTIONS)
  local ok, value = pcall(chunk)
  debug.sethook()
  if not ok then return nil, "mappings " .. path .. " failed to evaluate: " .. tostring(value) end
  if type(value) ~= "table" then return nil, "mappings " .. path .. " does not return a table" end
  if value.format ~= 1 then
    return nil, "mappings " .. path .. " has format " .. tostring(value.format) .. ", expected 1"
  end
  return value
end

function M.load_mappings(path)
  local text, err = reload.read(path)
  if text == nil then return nil, "cannot load mappings: " .. err end
  return M.parse_mappings(text, path)
end

local Filter = {}
Filter.__index = Filter

function M.new(cfg, deps)
  deps = deps or {}
  local clock = deps.clock or clock_mod
  local log = deps.log or stderr_logger(clock)
  local f = setmetatable({
    cfg = cfg,
    clock = clock,
    log = log,
    tick_tag = cfg.tick_tag or M.DEFAULTS.tick_tag,
    stats = { events = 0, rejected = 0, dropped = 0, kept = 0, ticks = 0 },
    mapper = nil,
    mapper_error = nil,
    started_at = clock.now(),
    -- Records each drop: rule took, by rule name (bounded by the rule names ever loaded).
    dropped_by_rule = setmetatable({}, MAP_MT),
    dropped_in_status = 0,
  }, Filter)
  f.spool = spool.new{
    root = cfg.spool_dir, max_events = cfg.max_events, max_bytes = cfg.max_bytes,
    max_age = cfg.max_age_ms / 1000, clock = clock, log = log, writer = deps.writer,
  }
  f.spool:ensure_layout()
  local recovered, rec_err = f.spool:recover()
  if recovered == nil then
    log("cannot recover tmp/ of " .. cfg.spool_dir .. ": " .. tostring(rec_err)
        .. " (the sink publishes stale files after stale_tmp_seconds)")
  elseif recovered > 0 then
    log("published " .. recovered .. " file(s) a previous run left in " .. cfg.spool_dir .. "/tmp")
  end
  f.mapper_module = deps.mapper
  f.watch = reload.new{ path = cfg.mappings, interval = MAPPINGS_CHECK_INTERVAL, clock = clock }
  f.status_path = cfg.spool_dir .. "/" .. M.STATUS_FILE
  f.status_tmp_suffix = "." .. f.spool.writer .. ".tmp"
  local text, read_err = reload.read(cfg.mappings)
  f.watch:seen(text, read_err)
  f:load_mapper(text, read_err)
  return f
end

-- A mapper built from text (the compiled file's bytes), or nil, err; never raises. With the
-- mapper: nil, the number of rules, their names as the drop counts show them and the mapper's
-- drop reasons as the log shows them (both by the string the mapper returns).
function Filter:build_mapper(text)
  local mappings, err = M.parse_mappings(text, self.cfg.mappings)
  if not mappings then return nil, err end
  local mod = self.mapper_module
  if mod == nil then
    local ok, loaded = pcall(require, "cloudtrail.mapper")
    if not ok then return nil, "mapping engine unavailable: " .. tostring(loaded) end
    mod = loaded
    self.mapper_module = mod
  end
  local ok, m, new_err = pcall(mod.new, mappings)
  if not ok or m == nil then
    return nil, "mappings " .. self.cfg.mappings .. " rejected by the mapping engine: "
      .. tostring(ok and new_err or m)
  end
  local rules = type(mappings.rules) == "table" and #mappings.rules or 0
  -- A mapper without drop_reasons (a stand-in) gets its reasons cleaned per record.
  local reasons = type(m) == "table" and rawget(m, "drop_reasons") or nil
  return m, nil, rules, safe_texts(mappings.rules, "name"), safe_texts(reasons)
end

-- Installs the rules of `text` (the file as read), or records why it cannot. With rules already
-- running, a bad file changes nothing but the status: the last good rules stay.
function Filter:load_mapper(text, read_err)
  local m, err, rules, drop_names, drop_reasons
  if text == nil then
    err = "cannot load mappings: " .. tostring(read_err)
  else
    m, err, rules, drop_names, drop_reasons = self:build_mapper(text)
  end
  local now = self.clock.now()
  if m then
    local reloaded = self.mapper ~= nil or self.mapper_error ~= nil
    self.mapper, self.mapper_error = m, nil
    self.drop_names, self.drop_reasons = drop_names, drop_reasons
    self.loaded_at, self.rules, self.status_error = now, rules, nil
    if reloaded then
      self.log("mappings reloaded from " .. self.cfg.mappings .. " (" .. rules .. " rules)")
    end
  elseif self.mapper then
    self.status_error, self.status_error_at = err, now
    self.log(err .. "; keeping the rules loaded at "
      .. os.date("!%Y-%m-%dT%H:%M:%SZ", math.floor(self.loaded_at)))
  else
    self.mapper_error = err
    self.status_error, self.status_error_at = err, now
    self.log(err .. "; every record goes to rejected/")
  end
  self:write_status()
end

function Filter:write_status()
  local fields = {
    state = self.status_error and "error" or "ok",
    mappings = safe_text(self.cfg.mappings),
    rules = self.mapper and self.rules or 0,
    started_at = self.started_at,
    dropped = self.dropped_by_rule,
  }
  self.dropped_in_status = self.stats.dropped
  if self.mapper then fields.loaded_at = self.loaded_at end
  if self.status_error then
    fields.error = safe_text(self.status_error)
    fields.error_at = self.status_error_at
  end
  local ok, err = reload.write_status(self.status_path, fields, self.status_tmp_suffix)
  if not ok then self.log("cannot write the mappings status: " .. tostring(err)) end
end

function Filter:check_mappings()
  local text, err = self.watch:check()
  if text ~= nil or err ~= nil then return self:load_mapper(text, err) end
  if self.stats.dropped ~= self.dropped_in_status then
    local now = self.clock.now()
    -- The first drops show at once (counts_at is nil until then).
    if reload.due(self.counts_at, now, STATUS_COUNTS_INTERVAL) then
      self.counts_at = now
      self:write_status()
    end
  end
end

local EVENT_OPTS = { strict_utf8 = true, max_depth = EVENT_MAX_DEPTH }
local K_EVENT_DATA, K_TAG, K_TIME = str("eventData"), str("tag"), str("time")
local K_REASON, K_RECORD = str("reason"), str("record")
local HEADER3, HEADER4 = map_header(3), map_header(4)

-- One buffer for every event: a fresh table would be regrown (and rehashed) per record.
-- Slots past the last event's length only keep old strings alive until overwritten.
local event_buf = {}

local function encode_event(tag_str, time_bytes, event)
  local buf = event_buf
  buf[1], buf[2] = HEADER3, K_EVENT_DATA
  local n = encode_parts(buf, 2, event, EVENT_OPTS)
  buf[n + 1] = K_TAG
  buf[n + 2] = tag_str
  buf[n + 3] = K_TIME
  buf[n + 4] = time_bytes
  return table_concat(buf, "", 1, n + 4)
end

-- Tags repeat: keep their msgpack form (false when not UTF-8), at most TAG_CACHE_MAX of them.
local TAG_CACHE_MAX = 1024
local tag_cache, tag_cache_size = {}, 0

local function encoded_tag(tag)
  local bytes = tag_cache[tag]
  if bytes == nil then
    bytes = utf8_valid(tag) and str(tag)
    if tag_cache_size >= TAG_CACHE_MAX then tag_cache, tag_cache_size = {}, 0 end
    tag_cache[tag] = bytes
    tag_cache_size = tag_cache_size + 1
  end
  return bytes
end

-- The record as it goes into rejected/: exact when possible, else opaque msgpack bytes, and
-- as a last resort a note in the reason (only for records no decoder could read anyway).
local function encode_record(record)
  local bytes = msgpack.encode(record, { bin_for_invalid_utf8 = true, max_depth = REJECTED_MAX_DEPTH })
  if bytes then return bytes, nil end
  local opaque, err = msgpack.encode(record, { max_depth = OPAQUE_MAX_DEPTH })
  if opaque then
    return msgpack.bin(opaque), "record nested deeper than " .. REJECTED_MAX_DEPTH
      .. " levels: kept as a bin holding its msgpack bytes"
  end
  return "\192", "record could not be kept: " .. tostring(err)
end

function Filter:reject(tag, time_bytes, record, reason)
  local record_bytes, note = encode_record(record)
  if note then reason = reason .. "; " .. note end
  local tag_bytes = msgpack.encode(tag, { bin_for_invalid_utf8 = true }) or str("")
  local data = table_concat({ HEADER4, K_TAG, tag_bytes, K_TIME, time_bytes,
                              K_REASON, str(safe_text(reason)), K_RECORD, record_bytes })
  local ok, err = self.spool:append_rejected(data)
  if not ok then return nil, err end
  self.stats.rejected = self.stats.rejected + 1
  return true
end

function Filter:map(tag, timestamp, record)
  local m = self.mapper
  if m == nil then return nil, self.mapper_error or "no mappings loaded" end
  local ok, event, reason, rule, dropped = pcall(m.map, m, tag, timestamp, record)
  if not ok then return nil, "mapping failed: " .. safe_text(event) end
  if event == nil then
    dropped = dropped == true
    -- A drop reason was cleaned when the rules were built (the same string every time).
    return nil, dropped and self.drop_reasons[reason] or safe_text(reason or "no rule matched"),
      dropped, rule
  end
  if type(event) ~= "table" then return nil, "mapping returned a " .. type(event) .. ", not a table" end
  if type(event.UID) ~= "string" or event.UID == "" then
    return nil, "mapping produced no UID"
  end
  return event
end

function Filter:process(tag, timestamp, record)
  if tag == self.tick_tag then
    self.stats.ticks = self.stats.ticks + 1
    self.spool:tick()
    self:check_mappings()
    return -1, timestamp, record
  end
  if type(timestamp) ~= "number" then timestamp = self.clock.now() end
  local time_bytes = float64(timestamp)
  local event, reason, dropped, rule = self:map(tag, timestamp, record)
  if dropped then
    self.stats.dropped = self.stats.dropped + 1
    -- Only a mapper returning a name its rules do not hold (or no string) cleans it here.
    local name = self.drop_names[rule] or safe_text(rule or "?")
    self.dropped_by_rule[name] = (self.dropped_by_rule[name] or 0) + 1
    self.log(reason)   -- rule text only, never record content; repeats are counted
    return -1, timestamp, record
  end
  local err
  if event ~= nil then
    local tag_bytes = type(tag) == "string" and encoded_tag(tag)
    if tag_bytes then
      local ok, data = pcall(encode_event, tag_bytes, time_bytes, event)
      if ok then
        local written, write_err = self.spool:append_event(data)
        if written then
          self.stats.events = self.stats.events + 1
          return -1, timestamp, record
        end
        err = write_err
      else
        reason = "event cannot be written: " .. safe_text(data)
      end
    else
      reason = "tag is not valid UTF-8"
    end
  end
  if err == nil then
    local ok, rej_err = self:reject(tostring(tag), time_bytes, record, reason)
    if ok then return -1, timestamp, record end
    err = rej_err
  end
  self.stats.kept = self.stats.kept + 1
  self.log("record kept in the pipeline, spool not writable: " .. tostring(err))
  return 0, timestamp, record
end

function Filter:seal_all()
  self.spool:seal_all()
end

M.safe_text = safe_text    -- the cleaning every text the filter writes gets (tests compare with it)

return M
