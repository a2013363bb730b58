-- cloudtrail.clock: the one place the filter reads time and process identity.
--
-- Contract:
--   clock.now() -> wall-clock seconds since the Unix epoch as a number with microsecond
--     resolution (gettimeofday through the ffi; os.time() when the ffi is unavailable).
--     Every module reads time as `clock.now()` through this table at call time, so a test
--     replaces the field (`require("cloudtrail.clock").now = function() return T end`) and
--     drives sealing ages deterministically.
--   clock.pid() -> this process's pid (getpid through the ffi; /proc/self/stat; else 0).
--   clock.random_chars(n) -> n characters of [a-z0-9] from /dev/urandom (math.random when
--     /dev/urandom cannot be read); used to make the spool writer's name unique.
local M = {}

local ok_ffi, ffi = pcall(require, "ffi")
local C
if ok_ffi then
  -- pcall: another module (or a reload in the same state) may have declared these already.
  pcall(ffi.cdef, [[
    typedef struct { long tv_sec; long tv_usec; } cloudtrail_timeval_t;
    int gettimeofday(cloudtrail_timeval_t *tv, void *tz);
    int getpid(void);
  ]])
  C = ffi.C
end

local tv -- one buffer for every call: now() runs once per record
local function ffi_now()
  if tv == nil then tv = ffi.new("cloudtrail_timeval_t") end
  if C.gettimeofday(tv, nil) ~= 0 then return os.time() end
  return tonumber(tv.tv_sec) + tonumber(tv.tv_usec) / 1e6
end

if ok_ffi and pcall(ffi_now) then
  M.now = ffi_now
else
  M.now = function() return os.time() end
end

function M.pid()
  if ok_ffi then
    local ok, pid = pcall(function() return tonumber(C.getpid()) end)
    if ok and pid then return pid end
  end
  local f = io.open("/proc/self/stat", "r")
  if f then
    local line = f:read("*l") or ""
    f:close()
    local pid = tonumber(line:match("^(%d+)"))
    if pid then return pid end
  end
  return 0
end

local ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"

function M.random_chars(n)
  local bytes
  local f = io.open("/dev/urandom", "rb")
  if f then
    bytes = f:read(n)
    f:close()
  end
  if bytes == nil or #bytes < n then
    math.randomseed(math.floor((M.now() * 1e6) % 2147483647) + M.pid())
    local t = {}
    for i = 1, n do t[i] = string.char(math.random(0, 255)) end
    bytes = table.concat(t)
  end
  local out = {}
  for i = 1, n do
    local b = bytes:byte(i) % #ALPHABET + 1
    out[i] = ALPHABET:sub(b, b)
  end
  return table.concat(out)
end

return M
