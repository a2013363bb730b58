-- cloudtrail.reload: notice a changed compiled-mappings file, and tell users what is loaded.
--
-- Contract:
--   reload.read(path) -> text | nil, err
--     The whole file as bytes. A missing or unreadable file is an error, never a raise.
--   reload.new{ path=, interval=1.0, clock=<table with now()> } -> watcher
--   w:check() -> nil | text | nil, err
--     At most once per `interval` seconds (earlier calls return nil at once), reads the file
--     and returns its text when the bytes differ from the text last seen (the first check
--     after new() compares with what w:seen(text) recorded), or nil, err when it cannot be
--     read and that state is new. The same text or the same error is reported once only, so
--     a broken file costs one message, however many ticks pass.
--   w:seen(text, err)  records what the filter read at start (the text, or why it could not).
--   reload.due(last, now, interval) -> bool
--     Whether `interval` seconds passed since `last` (nil: never); a clock stepped back is due.
--   reload.write_status(path, fields, tmp_suffix=".tmp") -> true | nil, err
--     Writes `fields` as one JSON object to `path` atomically: path .. tmp_suffix in the same
--     folder, then rename(2), so a reader never sees half a status (give each writer its own
--     suffix when several may write the same path).
--
-- Why the bytes and not stat(2): the ffi's struct stat differs between x86-64 and aarch64 and
-- glibc before 2.33 exports no `stat` symbol at all, so a wrong layout would read garbage where
-- a mistake must not happen. Reading the file once a second costs about 10 us for the shipped
-- rules (about 110 kB), and comparing bytes catches every change a new inode, size or mtime
-- would, plus an in-place edit of the same size within the same second.
local io_open, os_rename, os_remove, tostring, setmetatable = io.open, os.rename, os.remove,
  tostring, setmetatable

local json = require("cloudtrail.json")

local M = {}

function M.read(path)
  local f, err = io_open(path, "rb")
  if not f then return nil, tostring(err) end -- io.open's message names the path
  local text, read_err = f:read("*a")
  f:close()
  if text == nil then return nil, "cannot read " .. tostring(path) .. ": " .. tostring(read_err) end
  return text
end

-- A clock stepped back must not stop what it paces: any step back counts as due.
function M.due(last, now, interval)
  return last == nil or now < last or now - last >= interval
end

local Watcher = {}
Watcher.__index = Watcher

function M.new(opts)
  return setmetatable({
    path = opts.path, interval = opts.interval or 1.0, clock = opts.clock,
    last_check = nil, last_text = nil, last_err = nil,
  }, Watcher)
end

function Watcher:seen(text, err)
  self.last_text, self.last_err = text, err
end

function Watcher:check()
  local now = self.clock.now()
  if not M.due(self.last_check, now, self.interval) then return nil end
  self.last_check = now
  local text, err = M.read(self.path)
  if text == nil then
    if err == self.last_err then return nil end
    -- Forget the text: the same file put back afterwards is a change worth reporting.
    self.last_err, self.last_text = err, nil
    return nil, err
  end
  self.last_err = nil
  if text == self.last_text then return nil end
  self.last_text = text
  return text
end

function M.write_status(path, fields, tmp_suffix)
  local tmp = path .. (tmp_suffix or ".tmp")
  local f, err = io_open(tmp, "wb")
  if not f then return nil, "cannot write " .. tmp .. ": " .. tostring(err) end
  local ok, werr = f:write(json.encode(fields), "\n")
  f:close()
  if not ok then
    os_remove(tmp)
    return nil, "cannot write " .. tmp .. ": " .. tostring(werr)
  end
  local renamed, rerr = os_rename(tmp, path)
  if not renamed then
    os_remove(tmp)
    return nil, "cannot rename " .. tmp .. ": " .. tostring(rerr)
  end
  return true
end

return M
