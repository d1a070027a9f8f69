-- Wireshark / tshark dissector for pyvmbus captures (pcapng, LINKTYPE_USER12 = 159).
--
-- Each frame is one record written by pyvmbus.capture: a 16-byte pseudo-header of our own
-- (docs/capture.md has it byte by byte), then for a packet the VMBus packet as it sat in the
-- ring (struct vmpacket_descriptor, the transfer-page / GPA-direct header if any, the payload),
-- for an event a UTF-8 JSON object, for a signal or an interrupt a u64 count.
-- The payload is decoded as a Hyper-V integration-service message (vmbuspipe_hdr + icmsg_hdr
-- + negotiation / heartbeat / shutdown / timesync / fcopy / KVP) on channels whose "opened" event
-- names an IC class, and on others when it looks like one.
--
-- Use:  wireshark -X lua_script:contrib/wireshark/vmbus.lua session.pcapng
--       tshark -X lua_script:contrib/wireshark/vmbus.lua -r session.pcapng -V
-- or copy it into ~/.local/lib/wireshark/plugins/.  Filter fields start with "vmbus." and
-- "vmbus.ic." (e.g. vmbus.pkt.type == 11, vmbus.ic.msgtype == 1).

local vmbus = Proto("vmbus", "Hyper-V VMBus (pyvmbus capture)")
local ic = Proto("vmbus_ic", "Hyper-V integration service message")

local kinds = { [1] = "packet", [2] = "event", [3] = "signal", [4] = "interrupt" }
local directions = { [0] = "guest->host", [1] = "host->guest", [2] = "local" }
local pkt_types = {
    [0x0] = "INVALID", [0x1] = "SYNCH", [0x2] = "ADD_XFER_PAGESET", [0x3] = "RM_XFER_PAGESET",
    [0x4] = "ESTABLISH_GPADL", [0x5] = "TEARDOWN_GPADL", [0x6] = "DATA_INBAND",
    [0x7] = "DATA_USING_XFER_PAGES", [0x8] = "DATA_USING_GPADL", [0x9] = "DATA_USING_GPA_DIRECT",
    [0xa] = "CANCEL_REQUEST", [0xb] = "COMP", [0xc] = "DATA_USING_ADDITIONAL_PKT",
    [0xd] = "ADDITIONAL_DATA",
}
local ic_types = { [0] = "NEGOTIATE", [1] = "HEARTBEAT", [2] = "KVPEXCHANGE", [3] = "SHUTDOWN",
                   [4] = "TIMESYNC", [5] = "VSS", [7] = "FCOPY" }
local kvp_ops = { [0] = "GET", [1] = "SET", [2] = "DELETE", [3] = "ENUMERATE", [4] = "GET_IP_INFO",
                  [5] = "SET_IP_INFO" }
local kvp_pools = { [0] = "EXTERNAL", [1] = "GUEST", [2] = "AUTO", [3] = "AUTO_EXTERNAL",
                    [4] = "AUTO_INTERNAL" }
local reg_types = { [1] = "REG_SZ", [4] = "REG_U32", [8] = "REG_U64" }
local fcopy_ops = { [0] = "START_FILE_COPY", [1] = "WRITE_TO_FILE", [2] = "COMPLETE_FCOPY",
                    [3] = "CANCEL_FCOPY" }
local ic_classes = { heartbeat = true, shutdown = true, timesync = true, kvp = true, vss = true,
                     fcopy = true }

local f = vmbus.fields
f.magic = ProtoField.string("vmbus.magic", "Magic")
f.version = ProtoField.uint8("vmbus.version", "Pseudo-header version")
f.kind = ProtoField.uint8("vmbus.kind", "Record kind", base.DEC, kinds)
f.direction = ProtoField.uint8("vmbus.direction", "Direction", base.DEC, directions)
f.flags = ProtoField.uint8("vmbus.flags", "Record flags", base.HEX)
f.subchannel = ProtoField.uint16("vmbus.subchannel", "Subchannel index")
f.relid = ProtoField.uint32("vmbus.relid", "Relid")
f.seq = ProtoField.uint32("vmbus.seq", "Sequence number")
f.event = ProtoField.string("vmbus.event", "Event")
f.event_name = ProtoField.string("vmbus.event.name", "Event name")
f.count = ProtoField.uint64("vmbus.count", "Count")
f.ptype = ProtoField.uint16("vmbus.pkt.type", "Packet type", base.HEX, pkt_types)
f.offset8 = ProtoField.uint16("vmbus.pkt.offset8", "offset8 (header length / 8)")
f.len8 = ProtoField.uint16("vmbus.pkt.len8", "len8 (packet length / 8)")
f.pflags = ProtoField.uint16("vmbus.pkt.flags", "Packet flags", base.HEX)
f.comp_req = ProtoField.bool("vmbus.pkt.flags.completion_requested", "Completion requested", 16,
                             nil, 0x0001)
f.trans_id = ProtoField.uint64("vmbus.pkt.trans_id", "Transaction id")
f.payload = ProtoField.bytes("vmbus.pkt.payload", "Payload")
f.payload_len = ProtoField.uint32("vmbus.pkt.payload_length", "Payload length (padded to 8)")
f.xfer_pageset = ProtoField.uint16("vmbus.xfer.pageset_id", "Transfer page set id")
f.xfer_owns = ProtoField.uint8("vmbus.xfer.sender_owns_set", "Sender owns set")
f.xfer_reserved = ProtoField.uint8("vmbus.xfer.reserved", "Reserved")
f.xfer_count = ProtoField.uint32("vmbus.xfer.range_count", "Range count")
f.xfer_bytes = ProtoField.uint32("vmbus.xfer.range.byte_count", "Byte count")
f.xfer_off = ProtoField.uint32("vmbus.xfer.range.byte_offset", "Byte offset")
f.gpa_reserved = ProtoField.uint32("vmbus.gpa.reserved", "Reserved")
f.gpa_count = ProtoField.uint32("vmbus.gpa.range_count", "Range count")
f.gpa_len = ProtoField.uint32("vmbus.gpa.range.len", "Length")
f.gpa_off = ProtoField.uint32("vmbus.gpa.range.offset", "Offset")
f.gpa_pfn = ProtoField.uint64("vmbus.gpa.range.pfn", "PFN", base.HEX)

local g = ic.fields
g.pipe_flags = ProtoField.uint32("vmbus.ic.pipe.flags", "vmbuspipe_hdr.flags")
g.pipe_msgsize = ProtoField.uint32("vmbus.ic.pipe.msgsize", "vmbuspipe_hdr.msgsize")
g.framever = ProtoField.string("vmbus.ic.framework_version", "Framework version")
g.msgtype = ProtoField.uint16("vmbus.ic.msgtype", "Message type", base.DEC, ic_types)
g.msgver = ProtoField.string("vmbus.ic.message_version", "Message version")
g.msgsize = ProtoField.uint16("vmbus.ic.msgsize", "icmsgsize")
g.status = ProtoField.uint32("vmbus.ic.status", "Status", base.HEX)
g.trans_id = ProtoField.uint8("vmbus.ic.transaction_id", "IC transaction id")
g.icflags = ProtoField.uint8("vmbus.ic.flags", "icflags", base.HEX)
g.fl_trans = ProtoField.bool("vmbus.ic.flags.transaction", "Transaction", 8, nil, 0x01)
g.fl_req = ProtoField.bool("vmbus.ic.flags.request", "Request", 8, nil, 0x02)
g.fl_resp = ProtoField.bool("vmbus.ic.flags.response", "Response", 8, nil, 0x04)
g.fw_count = ProtoField.uint16("vmbus.ic.negotiate.framework_count", "icframe_vercnt")
g.msg_count = ProtoField.uint16("vmbus.ic.negotiate.message_count", "icmsg_vercnt")
g.neg_reserved = ProtoField.uint32("vmbus.ic.negotiate.reserved", "Reserved")
g.fw_version = ProtoField.string("vmbus.ic.negotiate.framework_version", "Framework version")
g.msg_version = ProtoField.string("vmbus.ic.negotiate.message_version", "Service version")
g.hb_seq = ProtoField.uint64("vmbus.ic.heartbeat.seq_num", "seq_num")
g.sd_reason = ProtoField.uint32("vmbus.ic.shutdown.reason_code", "reason_code", base.HEX)
g.sd_timeout = ProtoField.uint32("vmbus.ic.shutdown.timeout_seconds", "timeout_seconds")
g.sd_flags = ProtoField.uint32("vmbus.ic.shutdown.flags", "flags (0 shut down, 1 force, 2 reboot, 4 hibernate)",
                               base.HEX)
g.sd_message = ProtoField.string("vmbus.ic.shutdown.message", "display_message")
g.ts_parent = ProtoField.uint64("vmbus.ic.timesync.parenttime", "parenttime (FILETIME)")
g.ts_child = ProtoField.uint64("vmbus.ic.timesync.childtime", "childtime")
g.ts_rtt = ProtoField.uint64("vmbus.ic.timesync.roundtriptime", "roundtriptime")
g.ts_vmref = ProtoField.uint64("vmbus.ic.timesync.vmreferencetime", "vmreferencetime")
g.ts_flags = ProtoField.uint8("vmbus.ic.timesync.flags", "flags (1 SYNC, 2 SAMPLE)", base.HEX)
g.ts_leap = ProtoField.uint8("vmbus.ic.timesync.leapflags", "leapflags")
g.ts_stratum = ProtoField.uint8("vmbus.ic.timesync.stratum", "stratum")
g.kvp_op = ProtoField.uint8("vmbus.ic.kvp.operation", "operation", base.DEC, kvp_ops)
g.kvp_pool = ProtoField.uint8("vmbus.ic.kvp.pool", "pool", base.DEC, kvp_pools)
g.kvp_index = ProtoField.uint32("vmbus.ic.kvp.index", "index (ENUMERATE)")
g.kvp_vtype = ProtoField.uint32("vmbus.ic.kvp.value_type", "value_type", base.DEC, reg_types)
g.kvp_ksize = ProtoField.uint32("vmbus.ic.kvp.key_size", "key_size (bytes, NUL included)")
g.kvp_vsize = ProtoField.uint32("vmbus.ic.kvp.value_size", "value_size")
g.kvp_key = ProtoField.string("vmbus.ic.kvp.key", "key")
g.kvp_value = ProtoField.string("vmbus.ic.kvp.value", "value")
g.fc_op = ProtoField.uint32("vmbus.ic.fcopy.operation", "operation", base.DEC, fcopy_ops)
g.fc_file = ProtoField.string("vmbus.ic.fcopy.file_name", "file_name")
g.fc_path = ProtoField.string("vmbus.ic.fcopy.path_name", "path_name")
g.fc_cflags = ProtoField.uint32("vmbus.ic.fcopy.copy_flags", "copy_flags (1 overwrite, 2 create path)",
                                base.HEX)
g.fc_fsize = ProtoField.uint64("vmbus.ic.fcopy.file_size", "file_size")
g.fc_pad = ProtoField.uint32("vmbus.ic.fcopy.pad", "pad")
g.fc_offset = ProtoField.uint64("vmbus.ic.fcopy.offset", "offset")
g.fc_size = ProtoField.uint32("vmbus.ic.fcopy.size", "size")
g.fc_data = ProtoField.bytes("vmbus.ic.fcopy.data", "data")

-- relid -> class short name, learnt from "opened" events (frames are dissected in order first)
local channel_class = {}

local function ver(tvb, off)
    return string.format("%d.%d", tvb(off, 2):le_uint(), tvb(off + 2, 2):le_uint())
end

local function utf16z(tvb, off, units)
    local n = units
    local avail = math.floor(tvb:len() - off) / 2
    if avail < n then n = math.floor(avail) end
    if n <= 0 then return "", 0 end
    local r = tvb(off, n * 2)
    local len = 0
    while len < n and r(len * 2, 2):le_uint() ~= 0 do len = len + 1 end
    if len == 0 then return "", n * 2 end
    return r(0, len * 2):le_ustring(), n * 2
end

local function looks_like_ic(tvb)
    if tvb:len() < 28 then return false end
    local pflags = tvb(0, 4):le_uint()
    local msgsize = tvb(4, 4):le_uint()
    local fmaj = tvb(8, 2):le_uint()
    local mtype = tvb(12, 2):le_uint()
    return pflags <= 1 and msgsize >= 20 and msgsize + 8 <= tvb:len() and fmaj <= 3
        and ic_types[mtype] ~= nil
end

local function dissect_ic(tvb, pinfo, tree)
    local t = tree:add(ic, tvb())
    t:add_le(g.pipe_flags, tvb(0, 4))
    t:add_le(g.pipe_msgsize, tvb(4, 4))
    t:add(g.framever, tvb(8, 4), ver(tvb, 8))
    local mtype = tvb(12, 2):le_uint()
    t:add_le(g.msgtype, tvb(12, 2))
    local mver_major = tvb(14, 2):le_uint()
    t:add(g.msgver, tvb(14, 4), ver(tvb, 14))
    local size = tvb(18, 2):le_uint()
    t:add_le(g.msgsize, tvb(18, 2))
    t:add_le(g.status, tvb(20, 4))
    t:add_le(g.trans_id, tvb(24, 1))
    local fl = t:add_le(g.icflags, tvb(25, 1))
    fl:add_le(g.fl_trans, tvb(25, 1))
    fl:add_le(g.fl_req, tvb(25, 1))
    fl:add_le(g.fl_resp, tvb(25, 1))
    local name = ic_types[mtype] or tostring(mtype)
    local resp = bit.band(tvb(25, 1):uint(), 4) ~= 0
    local info = "IC " .. name .. (resp and " response" or " request")
    local len = tvb:len()
    local b = 28
    if mtype == 0 and len >= b + 8 then
        local nf = tvb(b, 2):le_uint()
        local nm = tvb(b + 2, 2):le_uint()
        t:add_le(g.fw_count, tvb(b, 2))
        t:add_le(g.msg_count, tvb(b + 2, 2))
        t:add_le(g.neg_reserved, tvb(b + 4, 4))
        local off = b + 8
        local fws, msgs = {}, {}
        for i = 1, nf + nm do
            if off + 4 > len then break end
            local v = ver(tvb, off)
            if i <= nf then
                t:add(g.fw_version, tvb(off, 4), v); fws[#fws + 1] = v
            else
                t:add(g.msg_version, tvb(off, 4), v); msgs[#msgs + 1] = v
            end
            off = off + 4
        end
        info = info .. " framework " .. table.concat(fws, ",") .. " service " .. table.concat(msgs, ",")
    elseif mtype == 1 and len >= b + 8 then
        t:add_le(g.hb_seq, tvb(b, 8))
        info = info .. " seq " .. tostring(tvb(b, 8):le_uint64())
    elseif mtype == 3 and len >= b + 12 then
        t:add_le(g.sd_reason, tvb(b, 4))
        t:add_le(g.sd_timeout, tvb(b + 4, 4))
        t:add_le(g.sd_flags, tvb(b + 8, 4))
        if len > b + 12 then
            local msg = utf16z(tvb, b + 12, 1024)
            t:add(g.sd_message, tvb(b + 12, math.min(2048, len - b - 12)), msg)
        end
        info = info .. string.format(" flags %d", tvb(b + 8, 4):le_uint())
    elseif mtype == 4 and len >= b + 17 then
        t:add_le(g.ts_parent, tvb(b, 8))
        if mver_major >= 4 and len >= b + 19 then
            t:add_le(g.ts_vmref, tvb(b + 8, 8))
            t:add_le(g.ts_flags, tvb(b + 16, 1))
            t:add_le(g.ts_leap, tvb(b + 17, 1))
            t:add_le(g.ts_stratum, tvb(b + 18, 1))
            info = info .. string.format(" flags %d", tvb(b + 16, 1):uint())
        elseif len >= b + 25 then
            t:add_le(g.ts_child, tvb(b + 8, 8))
            t:add_le(g.ts_rtt, tvb(b + 16, 8))
            t:add_le(g.ts_flags, tvb(b + 24, 1))
            info = info .. string.format(" flags %d", tvb(b + 24, 1):uint())
        end
    elseif mtype == 2 and len >= b + 4 then
        local op = tvb(b, 1):uint()
        t:add(g.kvp_op, tvb(b, 1))
        t:add(g.kvp_pool, tvb(b + 1, 1))
        info = info .. " " .. (kvp_ops[op] or tostring(op)) .. " pool " .. tostring(tvb(b + 1, 1):uint())
        local v = nil
        if (op == 0 or op == 1) then v = b + 4 end
        if op == 3 and len >= b + 8 then
            t:add_le(g.kvp_index, tvb(b + 4, 4))
            info = info .. " index " .. tostring(tvb(b + 4, 4):le_uint())
            v = b + 8
        end
        if op == 2 and len >= b + 8 then
            t:add_le(g.kvp_ksize, tvb(b + 4, 4))
            local key = utf16z(tvb, b + 8, math.min(256, math.floor(tvb(b + 4, 4):le_uint() / 2)))
            t:add(g.kvp_key, tvb(b + 8, math.min(512, len - b - 8)), key)
            info = info .. " " .. key
        end
        if v ~= nil and len >= v + 12 then
            local vtype = tvb(v, 4):le_uint()
            t:add_le(g.kvp_vtype, tvb(v, 4))
            t:add_le(g.kvp_ksize, tvb(v + 4, 4))
            t:add_le(g.kvp_vsize, tvb(v + 8, 4))
            local ksize = tvb(v + 4, 4):le_uint()
            if len >= v + 12 + 512 then
                local key = utf16z(tvb, v + 12, math.min(256, math.floor(ksize / 2)))
                t:add(g.kvp_key, tvb(v + 12, 512), key)
                if key ~= "" then info = info .. " " .. key end
            end
            if len >= v + 524 + 2048 then
                local value
                if vtype == 4 then
                    value = tostring(tvb(v + 524, 4):le_uint())
                elseif vtype == 8 then
                    value = tostring(tvb(v + 524, 8):le_uint64())
                else
                    value = utf16z(tvb, v + 524, math.min(1024, math.floor(tvb(v + 8, 4):le_uint() / 2)))
                end
                t:add(g.kvp_value, tvb(v + 524, 2048), value)
                if value ~= "" then info = info .. "=" .. value end
            end
        end
    elseif mtype == 7 and len >= b + 36 and size >= 36 then
        local op = tvb(b, 4):le_uint()
        t:add_le(g.fc_op, tvb(b, 4))
        info = info .. " " .. (fcopy_ops[op] or tostring(op))
        if op == 0 and len >= b + 1088 then
            local fname = utf16z(tvb, b + 36, 260)
            local pname = utf16z(tvb, b + 556, 260)
            t:add(g.fc_file, tvb(b + 36, 520), fname)
            t:add(g.fc_path, tvb(b + 556, 520), pname)
            t:add_le(g.fc_cflags, tvb(b + 1076, 4))
            t:add_le(g.fc_fsize, tvb(b + 1080, 8))
            info = info .. " " .. pname .. "/" .. fname
        elseif op == 1 and len >= b + 52 then
            t:add_le(g.fc_pad, tvb(b + 36, 4))
            t:add_le(g.fc_offset, tvb(b + 40, 8))
            local n = tvb(b + 48, 4):le_uint()
            t:add_le(g.fc_size, tvb(b + 48, 4))
            if n > 0 and b + 52 + n <= len then t:add(g.fc_data, tvb(b + 52, n)) end
            info = info .. string.format(" %d bytes at %s", n, tostring(tvb(b + 40, 8):le_uint64()))
        end
    end
    if not resp or tvb(20, 4):le_uint() ~= 0 then
        if resp then info = info .. string.format(" status 0x%08x", tvb(20, 4):le_uint()) end
    end
    return info
end

local function dissect_packet(tvb, pinfo, tree, relid)
    local t = tree:add(vmbus, tvb(), "VMBus packet")
    local ptype = tvb(0, 2):le_uint()
    local off8 = tvb(2, 2):le_uint()
    local len8 = tvb(4, 2):le_uint()
    t:add_le(f.ptype, tvb(0, 2))
    t:add_le(f.offset8, tvb(2, 2))
    t:add_le(f.len8, tvb(4, 2))
    local fl = t:add_le(f.pflags, tvb(6, 2))
    fl:add_le(f.comp_req, tvb(6, 2))
    t:add_le(f.trans_id, tvb(8, 8))
    local info = string.format("%s txid %s", pkt_types[ptype] or string.format("0x%x", ptype),
                               tostring(tvb(8, 8):le_uint64()))
    local hdr_end = off8 * 8
    local pkt_end = len8 * 8
    if hdr_end < 16 or hdr_end > pkt_end or pkt_end > tvb:len() then
        t:add_expert_info(PI_MALFORMED, PI_ERROR, "offset8/len8 do not fit the record")
        return info .. " [malformed]"
    end
    if ptype == 0x7 and hdr_end >= 24 then
        local h = t:add(vmbus, tvb(16, hdr_end - 16), "Transfer-page header")
        h:add_le(f.xfer_pageset, tvb(16, 2))
        h:add_le(f.xfer_owns, tvb(18, 1))
        h:add_le(f.xfer_reserved, tvb(19, 1))
        h:add_le(f.xfer_count, tvb(20, 4))
        local n = tvb(20, 4):le_uint()
        local off = 24
        for i = 1, n do
            if off + 8 > hdr_end then break end
            local r = h:add(vmbus, tvb(off, 8), string.format("Range %d", i - 1))
            r:add_le(f.xfer_bytes, tvb(off, 4))
            r:add_le(f.xfer_off, tvb(off + 4, 4))
            off = off + 8
        end
        info = info .. string.format(" %d ranges", n)
    elseif ptype == 0x9 and hdr_end >= 24 then
        local h = t:add(vmbus, tvb(16, hdr_end - 16), "GPA-direct header")
        h:add_le(f.gpa_reserved, tvb(16, 4))
        h:add_le(f.gpa_count, tvb(20, 4))
        local n = tvb(20, 4):le_uint()
        local off = 24
        for i = 1, n do
            if off + 8 > hdr_end then break end
            local rlen = tvb(off, 4):le_uint()
            local roff = tvb(off + 4, 4):le_uint()
            local npfn = math.floor((roff + rlen + 4095) / 4096)
            local r = h:add(vmbus, tvb(off, math.min(8 + npfn * 8, hdr_end - off)),
                            string.format("Range %d", i - 1))
            r:add_le(f.gpa_len, tvb(off, 4))
            r:add_le(f.gpa_off, tvb(off + 4, 4))
            off = off + 8
            for _ = 1, npfn do
                if off + 8 > hdr_end then break end
                r:add_le(f.gpa_pfn, tvb(off, 8))
                off = off + 8
            end
        end
        info = info .. string.format(" %d ranges", n)
    end
    local plen = pkt_end - hdr_end
    t:add(f.payload_len, plen)
    if plen > 0 then
        local payload = tvb(hdr_end, plen):tvb()
        t:add(f.payload, tvb(hdr_end, plen))
        local cls = channel_class[relid]
        if (cls ~= nil and ic_classes[cls]) or (cls == nil and looks_like_ic(payload)) then
            if payload:len() >= 28 and (ptype == 0x6 or ptype == 0xb) then
                info = info .. "  " .. dissect_ic(payload, pinfo, tree)
            end
        end
    end
    return info .. string.format(" len %d", plen)
end

function vmbus.dissector(tvb, pinfo, tree)
    if tvb:len() < 16 or tvb(0, 2):string() ~= "VB" then return 0 end
    pinfo.cols.protocol = "VMBus"
    local kind = tvb(3, 1):uint()
    local dir = tvb(4, 1):uint()
    local relid = tvb(8, 4):le_uint()
    local sub = tvb(6, 2):le_uint()
    local root = tree:add(vmbus, tvb(), "pyvmbus capture record")
    local ph = root:add(vmbus, tvb(0, 16), "Pseudo-header")
    ph:add(f.magic, tvb(0, 2))
    ph:add(f.version, tvb(2, 1))
    ph:add(f.kind, tvb(3, 1))
    ph:add(f.direction, tvb(4, 1))
    ph:add(f.flags, tvb(5, 1))
    ph:add_le(f.subchannel, tvb(6, 2))
    ph:add_le(f.relid, tvb(8, 4))
    ph:add_le(f.seq, tvb(12, 4))
    pinfo.cols.src = dir == 1 and "host" or "guest"
    pinfo.cols.dst = dir == 0 and "host" or (dir == 1 and "guest" or "-")
    local where = string.format("relid %d", relid) .. (sub > 0 and string.format(" sub %d", sub) or "")
    local info
    local body = tvb(16):tvb()
    if kind == 1 and body:len() >= 16 then
        info = dissect_packet(body, pinfo, root, relid)
    elseif kind == 2 then
        local text = body:raw()
        root:add(f.event, tvb(16), text)
        local name = string.match(text, '"event"%s*:%s*"([^"]*)"') or "?"
        root:add(f.event_name, tvb(16), name)
        local cls = string.match(text, '"class"%s*:%s*"([^"]*)"')
        if name == "opened" and cls ~= nil then channel_class[relid] = cls end
        info = "event " .. name
        local reason = string.match(text, '"reason"%s*:%s*"([^"]*)"')
        if reason ~= nil then info = info .. ": " .. reason end
    elseif (kind == 3 or kind == 4) and body:len() >= 8 then
        root:add_le(f.count, tvb(16, 8))
        info = (kind == 3 and "signal to host #" or "interrupt, event count ")
               .. tostring(tvb(16, 8):le_uint64())
    else
        info = "record kind " .. tostring(kind)
    end
    pinfo.cols.info = where .. ": " .. info
    return tvb:len()
end

local encaps = wtap_encaps or wtap
DissectorTable.get("wtap_encap"):add(encaps.USER12, vmbus)
