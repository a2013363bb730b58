-- cloudtrail.timeconv: turn the time notations found in logs into CloudTrail's eventTime.
--
-- Contract: to_utc(value, format, ref) -> "YYYY-MM-DDTHH:MM:SSZ" | nil
--   value   a number or a string; anything else gives nil.
--   format  "epoch_s" | "epoch_ms" | "epoch_us" | "epoch_ns" | "rfc3339" | "syslog" | "auto"
--   ref     the Fluent Bit timestamp (epoch seconds), used only to choose the year of an
--           RFC 3164 syslog time, which has none: the year that puts the time closest to ref.
--   * epoch_*: a number, or a string of digits (optionally signed, with a fraction) in that
--     unit. Fractions of a second are dropped (rounded toward the past).
--   * rfc3339: YYYY-MM-DD, 'T' or ' ', HH:MM:SS, optional fraction, then 'Z', '+HH:MM',
--     '-HH:MM', '+HHMM' or nothing (no offset is read as UTC). The offset is applied.
--   * syslog: RFC 3164 'Mmm dd HH:MM:SS' (day space- or zero-padded), or an RFC 5424 time
--     (which is RFC 3339).
--   * auto: numbers and digit strings by magnitude (|n| < 1e11 seconds, < 1e14 milliseconds,
--     < 1e17 microseconds, else nanoseconds); other strings as rfc3339, then syslog.
--   Years outside 0001..9999, impossible dates (Feb 30) and hours/minutes out of range give
--   nil. A leap second :60 becomes the next minute's :00.
--   from_epoch(seconds) -> the same string for an epoch number in seconds.

local floor, tonumber, type = math.floor, tonumber, type
local find, format, sub, match = string.find, string.format, string.sub, string.match

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = floor(z / 146097)
  local doe = z - era * 146097
  local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
  local mp = floor((5 * doy + 2) / 153)
  local d = doy - floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return y, m, d
end

-- year 1 (not 0): the sink checks eventTime with Python's datetime, whose years start at 1
local MIN_EPOCH = days_from_civil(1, 1, 1) * 86400
local MAX_EPOCH = days_from_civil(10000, 1, 1) * 86400

-- one-entry cache: records arrive in time order, many in the same second
local cached_sec, cached_text = nil, nil

local function from_epoch(t)
  if type(t) ~= "number" or t ~= t then return nil end
  local sec = floor(t)
  if sec < MIN_EPOCH or sec >= MAX_EPOCH then return nil end
  if sec == cached_sec then return cached_text end
  local days = floor(sec / 86400)
  local rem = sec - days * 86400
  local y, m, d = civil_from_days(days)
  local text = format("%04d-%02d-%02dT%02d:%02d:%02dZ", y, m, d,
                      floor(rem / 3600), floor(rem / 60) % 60, rem % 60)
  cached_sec, cached_text = sec, text
  return text
end

local DAYS_IN = { 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 }

local function valid_date(y, m, d)
  if m < 1 or m > 12 or d < 1 then return false end
  local dim = DAYS_IN[m]
  if m == 2 and (y % 4 == 0 and (y % 100 ~= 0 or y % 400 == 0)) then dim = 29 end
  return d <= dim
end

local function civil_epoch(y, m, d, hh, mm, ss)
  if not valid_date(y, m, d) or hh > 23 or mm > 59 or ss > 60 then return nil end
  return days_from_civil(y, m, d) * 86400 + hh * 3600 + mm * 60 + ss
end

local SCALE = { epoch_s = 1, epoch_ms = 1e3, epoch_us = 1e6, epoch_ns = 1e9 }

local DIGITS = { [1] = 0, [1e3] = 3, [1e6] = 6, [1e9] = 9 }

-- Whole seconds of an epoch value in 1/scale units, rounded toward the past. Digit strings are
-- split as text, so nanosecond values beyond 2^53 lose nothing; numbers are divided, with a
-- correction for the division landing just below an exact multiple.
local function epoch_seconds(v, scale)
  if type(v) == "number" then
    if v ~= v then return nil end
    local sec = floor(v / scale)
    if (sec + 1) * scale <= v then sec = sec + 1 end
    return sec
  end
  if type(v) ~= "string" then return nil end
  local sign, int, frac = match(v, "^%s*([-+]?)(%d+)%.?(%d*)%s*$")
  if not int then return nil end
  local k = DIGITS[scale]
  local head, tail = sub(int, 1, #int - k), sub(int, #int - k + 1)
  local sec = tonumber(head ~= "" and head or "0")
  if sign == "-" then
    sec = -sec
    if find(tail, "[1-9]") or find(frac, "[1-9]") then sec = sec - 1 end
  end
  return sec
end

local function numeric(v)
  if type(v) == "number" then return v end
  if type(v) == "string" and find(v, "^%s*[-+]?%d+%.?%d*%s*$") then return tonumber(v) end
  return nil
end

local function auto_scale(n)
  local a = n < 0 and -n or n
  if a < 1e11 then return 1 elseif a < 1e14 then return 1e3 elseif a < 1e17 then return 1e6 end
  return 1e9
end

local function parse_rfc3339(s)
  local _, e, y, mo, d, hh, mi, ss = find(s,
    "^%s*(%d%d%d%d)%-(%d%d)%-(%d%d)[Tt ](%d%d):(%d%d):(%d%d)")
  if not y then return nil end
  local rest = sub(s, e + 1)
  local _, fe = find(rest, "^[.,]%d+")
  if fe then rest = sub(rest, fe + 1) end
  local offset = 0
  if find(rest, "^[Zz]%s*$") or find(rest, "^%s*$") then
    offset = 0
  else
    local sign, oh, om = rest:match("^([-+])(%d%d):?(%d%d)%s*$")
    if not sign then return nil end
    oh, om = tonumber(oh), tonumber(om)
    if oh > 23 or om > 59 then return nil end
    offset = (oh * 3600 + om * 60) * (sign == "-" and -1 or 1)
  end
  local t = civil_epoch(tonumber(y), tonumber(mo), tonumber(d), tonumber(hh), tonumber(mi),
                        tonumber(ss))
  if not t then return nil end
  return t - offset
end

local MONTHS = { Jan = 1, Feb = 2, Mar = 3, Apr = 4, May = 5, Jun = 6, Jul = 7, Aug = 8,
                 Sep = 9, Oct = 10, Nov = 11, Dec = 12 }

local function parse_rfc3164(s, ref)
  local mon, d, hh, mi, ss = s:match("^%s*(%a%a%a) +(%d%d?) (%d%d):(%d%d):(%d%d)%s*$")
  if not mon then return nil end
  local m = MONTHS[mon]
  if not m then return nil end
  d, hh, mi, ss = tonumber(d), tonumber(hh), tonumber(mi), tonumber(ss)
  ref = type(ref) == "number" and ref == ref and ref or 0
  local ry = civil_from_days(floor(ref / 86400))
  local best, bestdist = nil, nil
  for y = ry - 1, ry + 1 do
    local t = civil_epoch(y, m, d, hh, mi, ss)
    if t then
      local dist = t - ref
      if dist < 0 then dist = -dist end
      if not bestdist or dist < bestdist then best, bestdist = t, dist end
    end
  end
  return best
end

local function to_utc(v, fmt, ref)
  local scale = SCALE[fmt]
  if scale then return from_epoch(epoch_seconds(v, scale)) end
  if fmt == "auto" then
    local n = numeric(v)
    if n then return from_epoch(epoch_seconds(v, auto_scale(n))) end
    if type(v) ~= "string" then return nil end
    return from_epoch(parse_rfc3339(v) or parse_rfc3164(v, ref))
  end
  if type(v) ~= "string" then return nil end
  if fmt == "rfc3339" then return from_epoch(parse_rfc3339(v)) end
  if fmt == "syslog" then return from_epoch(parse_rfc3164(v, ref) or parse_rfc3339(v)) end
  return nil
end

return { to_utc = to_utc, from_epoch = from_epoch, FORMATS = { epoch_s = true, epoch_ms = true,
  epoch_us = true, epoch_ns = true, rfc3339 = true, syslog = true, auto = true } }
