-- TEST-ONLY stand-in for cloudtrail.mapper (the real engine is built from mappings/*.yaml by
-- `cloudtrail-sink mappings compile`). It honours the same interface -- new(compiled) ->
-- m | nil, err; m:map(tag, ts, record) -> eventData | nil, reason -- with a trivial rule
-- format, so filter/spool tests do not depend on the mapping language:
--   { format = 1, rules = { { tag_prefix = "app." , account = "123456789012" }, ... } }
-- Records with `reject` are refused, records with `boom` make map() raise, `msg` (a string of
-- at most 1024 bytes, not checked for UTF-8 on purpose) becomes eventName, `uid` the UID.
local msgpack = require("cloudtrail.msgpack")

local M = {}
local Mapper = {}
Mapper.__index = Mapper

function M.new(compiled)
  if type(compiled.rules) ~= "table" then return nil, "rules must be a table" end
  return setmetatable({ rules = compiled.rules, n = 0 }, Mapper)
end

function Mapper:map(tag, ts, record)
  if type(record) ~= "table" then return nil, "record is not a map" end
  if record.boom ~= nil then error("stand-in mapper exploded") end
  if record.reject ~= nil then return nil, "stand-in: record asks to be rejected" end
  for _, rule in ipairs(self.rules) do
    if tag:sub(1, #rule.tag_prefix) == rule.tag_prefix then
      self.n = self.n + 1
      local name = "Unknown"
      if type(record.msg) == "string" and #record.msg <= 1024 then name = record.msg end
      if name == "" then name = "Empty" end
      local uid = record.uid
      if type(uid) ~= "string" or #uid > 128 or not msgpack.utf8_valid(uid) or uid == "" then
        uid = string.format("standin-%d", self.n)
      end
      local keys = 0
      for _ in pairs(record) do keys = keys + 1 end
      return {
        version = "1.0",
        userIdentity = { type = "StandIn", principalId = "tester" },
        eventSource = "standin.test",
        eventName = name,
        eventTime = os.date("!%Y-%m-%dT%H:%M:%SZ", math.floor(ts)),
        UID = uid,
        recipientAccountId = rule.account or "123456789012",
        requestParameters = { keys = keys, empty = {} },
      }
    end
  end
  return nil, "no rule matched tag " .. tag
end

return M
