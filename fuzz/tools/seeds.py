#!/usr/bin/env python3
"""Builds the committed seed corpora fuzz/corpus/<target>/ from conformance/vectors.

Every seed is at most 64 KiB. Big streams are shrunk record by record with the manifests'
record lists: each RAM SECTION_PART keeps its first RAM records (a few pages) and is closed
with EOS and its footer, so the seeds stay valid streams that reach postcopy, PACKAGED,
RECV_BITMAP and EOF. Run from anywhere: python3 fuzz/tools/seeds.py
"""
import json, os, struct, hashlib, glob

HERE = os.path.dirname(os.path.abspath(__file__))
FUZZ = os.path.dirname(HERE)
VEC = os.path.join(FUZZ, '..', 'conformance', 'vectors')
MAX = 64 * 1024
TPS = 4096

# (machine, ram bytes) -> layout index of qmig_fuzz::layouts
LAYOUT = {('none', 16 << 20): 0, ('none', 4 << 20): 1, ('none', 64 << 20): 2,
          ('none', 32 << 20): 3, ('microvm', 64 << 20): 4, ('microvm', 16 << 20): 5}


def put(target, data, tag):
    data = data[:MAX]
    d = os.path.join(FUZZ, 'corpus', target)
    os.makedirs(d, exist_ok=True)
    name = '%s-%s' % (tag, hashlib.sha1(data).hexdigest()[:10])
    with open(os.path.join(d, name), 'wb') as f:
        f.write(data)


def ram_records(buf, pos, end, keep_bytes):
    """Offsets of RAM records in buf[pos:end] until keep_bytes are used (None on a parse problem)."""
    start = pos
    while pos < end and pos - start < keep_bytes:
        (w,) = struct.unpack('>Q', buf[pos:pos + 8])
        flags = w & (TPS - 1)
        kind = flags & ~0x20
        p = pos + 8
        if kind in (0x02, 0x08, 0x40, 0x100) and not flags & 0x20:
            p += 1 + buf[p]
        if kind == 0x02:
            p += 1
        elif kind == 0x08:
            p += TPS
        elif kind == 0x40:
            (l,) = struct.unpack('>H', buf[p + 1:p + 3])
            p += 3 + l
        elif kind == 0x100:
            (l,) = struct.unpack('>I', buf[p:p + 4])
            p += 4 + l
        elif kind == 0x10:
            return p
        elif kind == 0x200:
            pass
        else:
            return None
        pos = p
    return pos


def shrink(buf, records):
    """The stream with every RAM SECTION_PART cut to its first RAM records + EOS + footer:
    the first three parts keep about 6000 bytes of records, later ones their first record."""
    out = bytearray()
    parts = 0
    for r in records:
        keep = 6000 if parts < 3 else 16
        off, ty = r['offset'], r['type']
        if ty == 'TRUNCATED':
            break
        ln = r.get('length') or (8 if ty == 'HEADER' else 0)
        if ln == 0:
            ln = 1 if ty == 'EOF' else 0
        chunk = buf[off:off + ln]
        if ty == 'SECTION_PART' and r.get('idstr') == 'ram' and ln > keep + 64:
            sid = r['section_id']
            cut = ram_records(buf, off + 5, off + ln - 5, keep)
            if cut is None:
                continue
            chunk = buf[off:cut] + struct.pack('>Q', 0x10) + b'\x7e' + struct.pack('>I', sid)
            parts += 1
        out += chunk
    return bytes(out)


def cmd_bytes(buf, records):
    out = bytearray()
    for r in records:
        if r['type'] == 'COMMAND':
            out += buf[r['offset'] + 1:r['offset'] + r['length']][:4096]
    return bytes(out)


def ram_payload(buf, records):
    out = bytearray()
    for r in records:
        if r.get('idstr') == 'ram' and r['type'] in ('SECTION_START', 'SECTION_PART'):
            off = r['offset']
            hdr = 5 if r['type'] == 'SECTION_PART' else 5 + 1 + len(r['idstr']) + 8
            end = ram_records(buf, off + hdr, off + r['length'] - 5, 16000)
            if end:
                out += buf[off + hdr:end]
        if len(out) > 48000:
            break
    return bytes(out)


for mpath in sorted(glob.glob(os.path.join(VEC, '*', '*', 'manifest.json'))):
    vdir = os.path.dirname(mpath)
    tag = os.path.basename(os.path.dirname(vdir)).replace('qemu-', '') + '-' + os.path.basename(vdir)
    m = json.load(open(mpath))
    v10 = not tag.startswith('7.2')
    prof = 1 if v10 else 0
    mach = m['machine']['type']
    layout = LAYOUT.get((mach, m['machine']['ram_bytes']))
    chans = m.get('channels', [])
    streams = {}
    for c in chans:
        f = os.path.join(vdir, c['file'])
        if not os.path.exists(f) or 'records' not in c:
            continue
        buf = open(f, 'rb').read()
        streams[c.get('label', c['file'])] = (c, buf, shrink(buf, c['records']))
    postcopy = 'postcopy' in tag
    for label, (c, buf, small) in streams.items():
        resume = c['file'].startswith('resume')
        knob = prof | (0b010 if resume else 0) | (0x10 if resume else 0)
        put('stream', bytes([knob | 0x08, 0x40, 0x07]) + small, tag + '-' + label)
        if tag in ('10.0-precopy-xbzrle', '7.2-precopy-compress', '10.0-precopy-footer-lookalike'):
            put('stream', bytes([knob, 0x00, 0xff]) + buf[:MAX - 3], tag + '-' + label + '-raw')
        put('roundtrip', bytes([knob]) + small, tag + '-' + label)
        put('command', bytes([prof]) + cmd_bytes(buf, c['records']), tag + '-' + label)
        rp = ram_payload(buf, c['records'])
        if rp:
            put('ram', bytes([prof | (0x02 if resume else 0)]) + rp, tag + '-' + label)
        if not resume:
            cfg = [r for r in c['records'] if r['type'] == 'CONFIGURATION']
            if cfg:
                end = cfg[0]['offset'] + cfg[0]['length']
                put('configuration', bytes([prof | 0x06]) + buf[:end + 1], tag)
        if layout is not None and not resume:
            knob_d = prof | (0x02 if postcopy else 0)
            put('destination', bytes([knob_d, layout, 0]) + small, tag)
            if 'initial' in streams and 'recovery' in streams:
                # initial stream, cut, recover, recovery stream: ops feed/close/recover/open
                rec = streams['recovery'][2]
                first = small[:MAX // 2]
                n = len(first)
                ops = bytes([0, n >> 8, n & 0xff, 1, 0, 0, 3, 0, 0, 2, 0, 0])
                put('destination', bytes([knob_d, layout, 4]) + ops + first + rec, tag + '-recover')
    for f in ('rp.bin', 'resume-rp.bin'):
        p = os.path.join(vdir, f)
        if os.path.exists(p):
            b = open(p, 'rb').read()
            sel = 2 if mach == 'microvm' else 1
            put('return_path', bytes([prof | sel << 1]) + b, tag + '-' + f[:-4])
            # Source: open, transmit, start postcopy, transmit, then the return path.
            ops = bytes([0, 255, 255, 4, 3, 0, 0, 255, 255, 0, 255, 255])
            put('source', bytes([prof | 0x02, 0, 4]) + ops + b, tag + '-' + f[:-4])
    for f in sorted(glob.glob(os.path.join(vdir, 'multifd-conn*.bin'))):
        put('multifd', bytes([prof]) + open(f, 'rb').read()[:MAX - 1], tag + '-' + os.path.basename(f)[:-4])
    vj = os.path.join(vdir, 'vmdesc.json')
    first = streams.get('initial') or streams.get('main')
    if os.path.exists(vj) and first:
        j = open(vj, 'rb').read()
        c, buf, _ = first
        full = [r for r in c['records'] if r['type'] == 'SECTION_FULL']
        put('vmdesc', bytes([0]) + struct.pack('>H', len(j)) + j, tag)
        for r in full[:3]:
            hdr = 1 + 4 + 1 + len(r['idstr']) + 8
            payload = buf[r['offset'] + hdr:r['offset'] + r['length']]
            put('vmdesc', bytes([0]) + struct.pack('>H', len(j)) + j + payload, tag + '-' + r['idstr'])
