-- Fluent Bit Lua filter entry: `call: cb_cloudtrail` (docs/fluent-bit.md).
--
-- Thin and error-proof on purpose: all logic lives in lua/cloudtrail/*.lua. Fluent Bit does not
-- put this file's folder on package.path, so it is computed here from the chunk name. Nothing
-- in this file may raise into Fluent Bit: a Lua error in filter_lua sends the WHOLE batch
-- through unmapped (protected mode) or aborts Fluent Bit (unprotected). So:
--   * loading the modules and creating the filter happen under pcall; if that fails, every
--     record is returned unchanged (code 0, never dropped) with a log line, and creation is
--     retried on the next tick;
--   * every call runs under pcall; an unexpected error keeps the record (code 0).
-- A record kept with code 0 goes on to the configs' `unspooled` file output (<spool>/unspooled,
-- docs/fluent-bit.md), so it is kept somewhere replayable rather than dropped by Fluent Bit.
-- Configuration comes from the environment (see lua/cloudtrail/filter.lua).

local function script_dir()
  local info = debug.getinfo(1, "S")
  local source = info and info.source or ""
  if source:sub(1, 1) == "@" then
    local dir = source:sub(2):match("^(.*)[/\\][^/\\]*$")
    if dir then return dir end
    return "."
  end
  return "."
end

local DIR = script_dir()
package.path = DIR .. "/lua/?.lua;" .. package.path

local instance, init_error

local function log(msg)
  pcall(function() io.stderr:write("[cloudtrail.lua] ", msg, "\n") end)
end

local function init()
  local ok, filter = pcall(require, "cloudtrail.filter")
  if not ok then
    -- A failed require leaves a "loading" marker (not a table) that would fail every retry.
    for name, value in pairs(package.loaded) do
      if type(name) == "string" and name:find("^cloudtrail%.") and type(value) ~= "table" then
        package.loaded[name] = nil
      end
    end
    return nil, "cannot load cloudtrail.filter: " .. tostring(filter)
  end
  local cfg, problems = filter.config_from_env(os.getenv, DIR)
  for i = 1, #problems do log(problems[i]) end
  local created, f = pcall(filter.new, cfg)
  if not created then return nil, "cannot start the filter: " .. tostring(f) end
  return f
end

instance, init_error = init()
if not instance then log(init_error .. "; records pass through unchanged") end

-- On a clean shutdown Fluent Bit calls lua_close, which runs finalizers: seal what is open so
-- it is published now rather than at the next start.
local shutdown_hook = newproxy(true)
getmetatable(shutdown_hook).__gc = function()
  if instance then pcall(instance.seal_all, instance) end
end
CLOUDTRAIL_SHUTDOWN_HOOK = shutdown_hook

local TICK_TAG = os.getenv("CLOUDTRAIL_TICK_TAG") or "cloudtrail.tick"
if TICK_TAG == "" then TICK_TAG = "cloudtrail.tick" end

function cb_cloudtrail(tag, timestamp, record)
  if instance == nil then
    if tag == TICK_TAG then
      instance, init_error = init()
      if instance then log("filter started") end
      return -1, timestamp, record
    end
    return 0, timestamp, record
  end
  local ok, code, ts, out = pcall(instance.process, instance, tag, timestamp, record)
  if ok then return code, ts, out end
  log("unexpected error, record kept in the pipeline: " .. tostring(code))
  return 0, timestamp, record
end
