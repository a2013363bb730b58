-- cloudtrail.spool: the Lua writer side of docs/spool.md (segments, rejected files, recovery).
--
-- Contract:
--   spool.new{ root=, max_events=500, max_bytes=1048576, max_age=1.0 (seconds),
--              clock=<table with now()>, log=function(msg), writer=<name, default fb_<pid>_<rand>> }
--     -> writer. Creating it never touches the disk.
--   w:ensure_layout()  creates root and tmp/ ready/ failed/ rejected/ quarantine/ (0750) when
--     missing (mkdir(2) through the ffi; plain Lua has no mkdir). Returns true | nil, err.
--   w:recover()  publishes what a previous Fluent Bit on this spool left in tmp/: every
--     tmp/fb_*-<seq>.open into ready/ as .seg, every tmp/fb_*-<seq>.rejecting into rejected/
--     as .rej, under a fresh sealed_us name; empty leftovers are removed. Returns the count
--     published | nil, err (no ffi: the sink's stale-tmp backstop publishes them instead).
--   w:append_event(bytes) / w:append_rejected(bytes) -> true | nil, err
--     Appends one already-encoded msgpack map to the open events segment (tmp/<w>-<seq>.open)
--     or rejected file (tmp/<w>-<seq>.rejecting), opening one lazily. Every append reaches the
--     kernel before returning (unbuffered file), so a crash of Fluent Bit loses nothing that
--     was appended; recover() publishes it after restart. Before appending, a file older than
--     max_age is sealed; after, a file holding max_events entries or >= max_bytes is sealed.
--     On a write error the file is sealed as is (a torn last entry is quarantined by the sink)
--     and the entry is retried once in a fresh file; a second failure returns nil, err.
--   w:tick()  seals files older than max_age and retries renames that failed earlier.
--   w:seal_all()  seals every open file (clean shutdown).
--   While a tmp/ file is written, the writer holds flock(LOCK_EX) on it (a second descriptor,
--   through the ffi) until it is renamed, so the sink's stale-tmp backstop never takes it
--   (docs/spool.md); without ffi there is no lock and the backstop relies on its age alone.
--   Sealing = close, then rename(2) into ready/<sealed_us>-<writer>-<seq>.seg (or rejected/
--   ...rej); sealed_us is the clock in microseconds, 16 digits, strictly increasing per writer.
--   A file whose rename fails stays in a retry list (tick retries; recover() of the next start
--   is the backstop). The .open and .rejecting names share one seq counter, so names never
--   collide; the sink only ever publishes stale *.open files, so a rejected file can never be
--   shipped as events.
local clock_mod = require("cloudtrail.clock")

local io_open, os_rename, os_remove = io.open, os.rename, os.remove
local string_format, math_floor, tostring = string.format, math.floor, tostring
local setmetatable, pcall = setmetatable, pcall

local M = {}

local FOLDERS = { "tmp", "ready", "failed", "rejected", "quarantine" }
local DIR_MODE = 488 -- 0750

local ffi_ok, ffi = pcall(require, "ffi")
local C
if ffi_ok then
  -- struct dirent of glibc on LP64 Linux (x86_64, aarch64): what the Fluent Bit image runs.
  pcall(ffi.cdef, [[
    typedef struct {
      uint64_t d_ino; int64_t d_off; unsigned short d_reclen; unsigned char d_type;
      char d_name[256];
    } cloudtrail_dirent_t;
    void *opendir(const char *name);
    cloudtrail_dirent_t *readdir(void *dir);
    int closedir(void *dir);
    int mkdir(const char *path, unsigned int mode);
  ]])
  C = ffi.C
  -- Separate cdef: a clash with another module's declaration must not cost the ones above.
  pcall(ffi.cdef, [[
    int open(const char *path, int flags, ...);
    int flock(int fd, int operation);
    int close(int fd);
  ]])
end

local O_RDONLY_CLOEXEC = 524288 -- O_RDONLY | O_CLOEXEC (02000000) on Linux x86_64/aarch64
local LOCK_EX_NB = 6           -- LOCK_EX | LOCK_NB

-- Resolved once: a libc without one of these symbols must cost only the lock, never raise on
-- every append (which would send records past the spool).
local lock_ok = ffi_ok and pcall(function() return C.open, C.flock, C.close end)

local function try_lock(path)
  local fd = C.open(path, O_RDONLY_CLOEXEC)
  if fd < 0 then return nil end
  if C.flock(fd, LOCK_EX_NB) ~= 0 then
    C.close(fd)
    return nil
  end
  return fd
end

-- A descriptor of path holding flock(LOCK_EX), or nil (no ffi, or the lock is unavailable).
local function lock_file(path)
  if not lock_ok then return nil end
  local ok, fd = pcall(try_lock, path)
  if not ok then return nil end
  return fd
end

local function unlock_file(fd)
  if fd and lock_ok then pcall(C.close, fd) end
end

local function list_dir(path)
  if not ffi_ok then return nil, "no ffi: cannot list " .. path end
  local dir = C.opendir(path)
  if dir == nil then return nil, "cannot open folder " .. path end
  local names = {}
  while true do
    local entry = C.readdir(dir)
    if entry == nil then break end
    names[#names + 1] = ffi.string(entry.d_name)
  end
  C.closedir(dir)
  table.sort(names)
  return names
end
M.list_dir = list_dir

local function mkdir(path)
  if not ffi_ok then return nil, "no ffi: cannot create " .. path end
  C.mkdir(path, DIR_MODE) -- EEXIST is fine; the open/rename that follows reports real trouble
  return true
end

local function file_size(path)
  local f = io_open(path, "rb")
  if not f then return nil end
  local size = f:seek("end")
  f:close()
  return size
end

local Writer = {}
Writer.__index = Writer

local Stream = {}
Stream.__index = Stream

local function new_stream(writer, tmp_suffix, out_dir, out_suffix)
  return setmetatable({
    w = writer, tmp_suffix = tmp_suffix, out_dir = out_dir, out_suffix = out_suffix,
    file = nil, path = nil, seq = nil, count = 0, bytes = 0, opened_at = 0, lock_fd = nil,
  }, Stream)
end

function M.new(opts)
  local clock = opts.clock or clock_mod
  local w = setmetatable({
    root = opts.root,
    max_events = opts.max_events or 500,
    max_bytes = opts.max_bytes or 1048576,
    max_age = opts.max_age or 1.0,
    clock = clock,
    log = opts.log or function() end,
    writer = opts.writer or ("fb_" .. clock_mod.pid() .. "_" .. clock_mod.random_chars(6)),
    seq = 0,
    last_sealed_us = 0,
    unpublished = {}, -- { {from=, to=}, ... } renames to retry
  }, Writer)
  w.events = new_stream(w, ".open", "ready", ".seg")
  w.rejected = new_stream(w, ".rejecting", "rejected", ".rej")
  return w
end

function Writer:path(folder, name)
  return self.root .. "/" .. folder .. "/" .. name
end

function Writer:ensure_layout()
  local ok, err = mkdir(self.root)
  if not ok then return nil, err end
  for i = 1, #FOLDERS do mkdir(self:path(FOLDERS[i], "")) end
  return true
end

-- sealed_us for a seal happening now: strictly increasing for this writer, so ready/ names sort
-- in sealing order even if the wall clock steps back.
function Writer:sealed_us()
  local us = math_floor(self.clock.now() * 1e6)
  if us <= self.last_sealed_us then us = self.last_sealed_us + 1 end
  self.last_sealed_us = us
  return us
end

function Writer:published_name(writer, seq, suffix)
  return string_format("%016d-%s-%010d%s", self:sealed_us(), writer, seq, suffix)
end

function Writer:publish(from, out_dir, name)
  local to = self:path(out_dir, name)
  local ok, err = os_rename(from, to)
  if not ok then
    self.unpublished[#self.unpublished + 1] = { from = from, to = to }
    self.log("cannot publish " .. from .. ": " .. tostring(err) .. " (will retry)")
    return nil, err
  end
  return true
end

function Writer:retry_unpublished()
  if #self.unpublished == 0 then return end
  local still = {}
  for i = 1, #self.unpublished do
    local item = self.unpublished[i]
    if not os_rename(item.from, item.to) then still[#still + 1] = item end
  end
  self.unpublished = still
end

function Writer:recover()
  local names, err = list_dir(self.root .. "/tmp")
  if not names then return nil, err end
  local published = 0
  for i = 1, #names do
    local name = names[i]
    local writer, seq, suffix = name:match("^(fb_[A-Za-z0-9_]+)%-(%d+)(%.[a-z]+)$")
    if writer and writer ~= self.writer and (suffix == ".open" or suffix == ".rejecting") then
      local from = self:path("tmp", name)
      if file_size(from) == 0 then
        os_remove(from)
      else
        local out_dir, out_suffix = "ready", ".seg"
        if suffix == ".rejecting" then out_dir, out_suffix = "rejected", ".rej" end
        if self:publish(from, out_dir, self:published_name(writer, tonumber(seq), out_suffix)) then
          published = published + 1
        end
      end
    end
  end
  return published
end

function Stream:open(now)
  local w = self.w
  w.seq = w.seq + 1
  local path = w:path("tmp", string_format("%s-%010d%s", w.writer, w.seq, self.tmp_suffix))
  local f, err = io_open(path, "wb")
  if not f then
    -- The folders may be missing (first start, or removed by hand): create them once, retry.
    w:ensure_layout()
    f, err = io_open(path, "wb")
    if not f then return nil, "cannot create " .. path .. ": " .. tostring(err) end
  end
  f:setvbuf("no")
  self.lock_fd = lock_file(path)
  self.file, self.path, self.seq = f, path, w.seq
  self.count, self.bytes, self.opened_at = 0, 0, now
  return true
end

function Stream:seal()
  local f = self.file
  if not f then return true end
  self.file = nil
  -- pcall: at lua_close the io library may have finalized (closed) the file before us.
  pcall(f.close, f)
  local lock_fd = self.lock_fd
  self.lock_fd = nil
  if self.bytes == 0 then
    os_remove(self.path)
    unlock_file(lock_fd)
    return true
  end
  local w = self.w
  -- The lock is released only after the rename: the sink never sees the file unlocked in tmp/.
  local ok, err = w:publish(self.path, self.out_dir,
                            w:published_name(w.writer, self.seq, self.out_suffix))
  unlock_file(lock_fd)
  return ok, err
end

function Stream:seal_if_old(now)
  if self.file then
    local age = now - self.opened_at
    -- A clock stepped back (negative age) must not hold a segment back until it catches up.
    if age >= self.w.max_age or age < 0 then
      return self:seal()
    end
  end
  return true
end

function Stream:write(data)
  local ok, err = self.file:write(data)
  if not ok then return nil, err end
  self.count = self.count + 1
  self.bytes = self.bytes + #data
  return true
end

function Stream:append(data)
  local now = self.w.clock.now()
  self:seal_if_old(now)
  local err
  for _ = 1, 2 do
    if not self.file then
      local ok, open_err = self:open(now)
      if not ok then return nil, open_err end
    end
    local ok, write_err = self:write(data)
    if ok then
      if self.count >= self.w.max_events or self.bytes >= self.w.max_bytes then
        self:seal()
      end
      return true
    end
    err = write_err
    -- Entries written before stay valid and get published (a torn tail of this one is
    -- quarantined by the sink); a file holding no complete entry is removed.
    self:seal()
  end
  return nil, "cannot write to the spool: " .. tostring(err)
end

function Writer:append_event(data)
  return self.events:append(data)
end

function Writer:append_rejected(data)
  return self.rejected:append(data)
end

function Writer:tick()
  local now = self.clock.now()
  self.events:seal_if_old(now)
  self.rejected:seal_if_old(now)
  self:retry_unpublished()
end

function Writer:seal_all()
  self.events:seal()
  self.rejected:seal()
  self:retry_unpublished()
end

return M
