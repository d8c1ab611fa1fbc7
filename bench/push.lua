-- wrk script: POSTs a DataStream batch, made unique per request so retry dedup never skips work.
-- Usage: wrk ... -s bench/push.lua URL -- BODY_FILE plain|gzip TAIL_FILE
-- Appends TAIL_FILE's line (a record of the batch's stream and format) with {TAG} replaced by T-N:
-- plain: as a line; gzip: as a second gzip member.
local bit = require("bit")

local crc_table = {}
for i = 0, 255 do
  local c = i
  for _ = 1, 8 do
    if bit.band(c, 1) == 1 then c = bit.bxor(bit.rshift(c, 1), 0xEDB88320) else c = bit.rshift(c, 1) end
  end
  crc_table[i] = c
end

local function crc32(s)
  local c = 0xFFFFFFFF
  for i = 1, #s do
    c = bit.bxor(crc_table[bit.band(bit.bxor(c, s:byte(i)), 0xFF)], bit.rshift(c, 8))
  end
  return bit.bxor(c, 0xFFFFFFFF)
end

local function le16(n) return string.char(bit.band(n, 255), bit.band(bit.rshift(n, 8), 255)) end
local function le32(n) return le16(bit.band(n, 0xFFFF)) .. le16(bit.rshift(n, 16)) end

-- One gzip member with a single stored (uncompressed) deflate block: RFC 1952 + RFC 1951 3.2.4.
local function gzip_member(data)
  local n = #data
  return "\31\139\8\0\0\0\0\0\0\255" .. "\1" .. le16(n) .. le16(bit.bxor(n, 0xFFFF)) .. data ..
         le32(crc32(data)) .. le32(n)
end

local next_id = 1
function setup(thread)
  thread:set("thread_id", next_id)
  next_id = next_id + 1
end

local body, compressed, tail
local counter = 0
function init(args)
  local file = assert(io.open(args[1], "rb"))
  body = file:read("*a")
  file:close()
  compressed = args[2] == "gzip"
  file = assert(io.open(args[3], "rb"))
  tail = file:read("*a")
  file:close()
  wrk.headers["Content-Type"] = "application/json"
  if compressed then wrk.headers["Content-Encoding"] = "gzip" end
end

function request()
  counter = counter + 1
  local line = tail:gsub("{TAG}", thread_id .. "-" .. counter)
  return wrk.format("POST", nil, nil, body .. (compressed and gzip_member(line) or line))
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d}\n', summary.requests, summary.duration, e.connect,
    e.read, e.write, e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
