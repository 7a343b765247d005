#!/usr/bin/env python3
"""An independent reading of the qmig specification, run against the captured vectors.

This decoder was written from spec/*.md alone (not from QEMU, not from the Rust codec). For every
vector under conformance/vectors/ it decodes the main stream(s) with the grammar of stream.md,
commands.md and ram.md (device payloads delimited by the VM description, DEV-SCHEMA, or for the
footer-lookalike vectors and streams without a description by SEC-DELIMIT's footer scan), the
return paths with return-path.md, multifd connections with channels.md (fixed 128 offset slots,
deviations.md D-13), and for the recovery vectors it checks bitmap.md and recovery.md:
the destination's received bitmap computed over stream.bin equals the RECV_BITMAP bodies of
resume-rp.bin byte for byte, and the recovery channel carries exactly the pages whose bit is
clear (SM-REBUILD), each once. Usage: python3 spec/check/decode_vectors.py [vector-dir ...]
"""
import copy
import json
import os
import struct
import sys

TPS = 4096


# Whether a stream decodes to its end from a position (memo for SEC-DELIMIT's footer scan).
CONTINUES = {}


class Cut(Exception):
    """The input ends inside a record."""


class R:
    def __init__(self, b):
        self.b, self.p = b, 0

    def take(self, n):
        if self.p + n > len(self.b):
            raise Cut(self.p)
        v = self.b[self.p:self.p + n]
        self.p += n
        return v

    def u8(self): return self.take(1)[0]
    def be16(self): return struct.unpack('>H', self.take(2))[0]
    def be32(self): return struct.unpack('>I', self.take(4))[0]
    def be64(self): return struct.unpack('>Q', self.take(8))[0]

    def str8(self):
        n = self.u8()
        assert n > 0, f'STR8-EMPTY at {self.p - 1}'
        return self.take(n).decode()


class Dest:
    """Destination-side decoding state for one migration (survives a recovery)."""

    def __init__(self, vmdesc):
        self.devs = {(d['name'], d['instance_id']): d for d in vmdesc['devices']} if vmdesc else {}
        self.blocks, self.bitmap, self.sections = {}, {}, {}
        self.last = None            # RAM channel 0 CONTINUE state (RAM-CONTINUE)
        self.ignore_shared = False  # from configuration/capabilities
        self.pages = []             # page records seen (block, index), when collecting
        self.counts = {}
        self.trial = False          # inside a footer-scan trial: first valid candidate wins

    def count(self, what):
        self.counts[what] = self.counts.get(what, 0) + 1

    def vmsd(self, r, d, depth=0):
        assert depth <= 32, 'DEV-NESTING'
        for f in d['fields']:
            for _ in range(f.get('array_len', 1)):
                if f['type'] == 'struct':
                    self.vmsd(r, f['struct'], depth + 1)
                else:
                    r.take(f['size'])
        subs = {x['vmsd_name']: x for x in d.get('subsections', [])}
        while r.p < len(r.b) and r.b[r.p] == 0x05:
            save = r.p
            r.u8()
            name = r.str8()
            if name not in subs:
                assert not name.startswith(d['vmsd_name'] + '/'), f'DEV-SUBSECTION {name}'
                r.p = save
                break
            assert r.be32() <= subs[name]['version'], 'DEV-SUBSECTION version'
            self.vmsd(r, subs[name], depth + 1)

    def delimit_by_footer(self, r, sid):
        """SEC-DELIMIT without a layout: a candidate footer counts only if the rest of the stream
        decodes from it; exactly one candidate must."""
        pat = b'\x7e' + struct.pack('>I', sid)
        good = []
        at = r.b.find(pat, r.p)
        while at >= 0:
            key = (id(r.b), at + 5)
            if key not in CONTINUES:
                trial, tr = copy.deepcopy(self), R(r.b)
                trial.trial = True
                tr.p = at + 5
                try:
                    CONTINUES[key] = tr_end(trial, tr)
                except Cut:
                    CONTINUES[key] = True  # valid up to the end of the available input (cut stream)
                except (AssertionError, KeyError, ValueError, UnicodeDecodeError):
                    CONTINUES[key] = False
            if CONTINUES[key]:
                good.append(at)
            if good and self.trial:
                break  # uniqueness is decided at the top level only
            at = r.b.find(pat, at + 1)
        assert len(good) == 1, f'SEC-DELIMIT section {sid}: {len(good)} candidates'
        r.p = good[0]
        self.count('footer-scan')

    def configuration(self, r):
        assert r.u8() == 0x07, 'CFG-PRESENT'
        n = r.be32()
        assert 1 <= n <= 256, 'CFG-NAME-LEN'
        r.take(n)
        while r.p < len(r.b) and r.b[r.p] == 0x05:
            r.u8()
            name = r.str8()
            assert r.be32() == 1, 'CFG-SUBSECTION version'
            if name == 'configuration/capabilities':
                count = r.be32()
                assert count <= 64, 'CFG-CAPS-COUNT'
                caps = [r.str8() for _ in range(count)]
                self.ignore_shared = 'x-ignore-shared' in caps
            elif name == 'configuration/uuid':
                r.take(16)
            elif name == 'configuration/target-page-bits':
                r.be32()
            else:
                raise AssertionError(f'CFG-SUBSECTION {name}')
            self.count('config-subsection')

    def ram(self, r, collect):
        while True:
            at = r.p
            word = r.be64()
            flags, off = word & (TPS - 1), word & ~(TPS - 1)
            kind = flags & ~0x20
            if kind == 0x04:
                total, s = off, 0
                while s < total:
                    name, ln = r.str8(), r.be64()
                    if self.ignore_shared:
                        r.be64()  # region address
                    self.blocks[name] = ln
                    self.bitmap.setdefault(name, bytearray(ln // TPS))
                    s += ln
                assert s == total, 'RAM-MEMSIZE-SUM'
            elif kind == 0x10:
                return
            elif kind == 0x200:
                self.count('MULTIFD_FLUSH')
            elif kind in (0x02, 0x08, 0x40, 0x100):
                if flags & 0x20:
                    assert self.last is not None, f'RAM-CONTINUE at {at}'
                    blk = self.last
                else:
                    blk = self.last = r.str8()
                assert blk in self.blocks, 'RAM-BLOCK-UNKNOWN'
                assert off < self.blocks[blk], 'RAM-OFFSET'
                if kind == 0x02:
                    r.u8()
                elif kind == 0x08:
                    r.take(TPS)
                elif kind == 0x40:
                    assert r.u8() == 0x01, 'RAM-XBZRLE-ENC'
                    n = r.be16()
                    assert n <= TPS, 'RAM-XBZRLE-LEN'
                    r.take(n)
                else:
                    n = r.be32()
                    assert n <= 4110, 'RAM-COMPRESS-LEN'
                    r.take(n)
                self.count({0x02: 'ZERO', 0x08: 'PAGE', 0x40: 'XBZRLE', 0x100: 'COMPRESS_PAGE'}[kind])
                self.bitmap[blk][off // TPS] = 1  # marked only once the record is complete
                if collect:
                    self.pages.append((blk, off // TPS))
            else:
                raise AssertionError(f'RAM-FLAGS {flags:#x} at {at}')

    def records(self, r, end, collect=False, in_package=False):
        while r.p < end:
            at = r.p
            t = r.u8()
            if t == 0x00:
                assert not in_package, 'CMD-PACKAGED-CONTENT'
                return 'EOF'
            if t == 0x08:
                code, ln = r.be16(), r.be16()
                body = R(r.take(ln))
                self.count(f'CMD {code}')
                if code == 3:
                    assert ln in (0, 16), 'CMD-ADVISE-LEN'
                    for b in self.bitmap:
                        self.bitmap[b] = bytearray(len(self.bitmap[b]))
                elif code == 6:
                    assert body.u8() == 0, 'CMD-DISCARD-VERSION'
                    name = body.str8()
                    assert body.u8() == 0, 'CMD-DISCARD-TERM'
                    assert (ln - 3 - len(name)) % 16 == 0, 'CMD-DISCARD-LEN'
                    while body.p < ln:
                        st, l = body.be64(), body.be64()
                        assert st % TPS == 0 and l % TPS == 0 and st + l <= self.blocks[name], 'CMD-DISCARD-RANGE'
                        self.bitmap[name][st // TPS:(st + l) // TPS] = bytes(l // TPS)
                elif code == 7:
                    assert ln == 4, 'CMD-LEN'
                    size = body.be32()
                    self.records(r, r.p + size, collect, True)
                elif code == 10:
                    assert ln == 1 + len(body.str8()), 'CMD-RECV-BITMAP-LEN'
                else:
                    assert ln == {1: 0, 2: 4, 4: 0, 5: 0, 9: 0, 11: 0}[code], 'CMD-LEN'
                continue
            if t in (0x01, 0x04):
                sid, idstr, inst, ver = r.be32(), r.str8(), r.be32(), r.be32()
                assert self.sections.get(sid, (idstr, inst)) == (idstr, inst), 'SEC-DUPLICATE-ID'
                self.sections[sid] = (idstr, inst)
            elif t in (0x02, 0x03):
                sid = r.be32()
                assert sid in self.sections, 'SEC-UNKNOWN-ID'
                idstr, inst = self.sections[sid]
            else:
                raise AssertionError(f'SEC-TYPE {t:#x} at {at}')
            self.count(f'section {t}')
            if idstr == 'ram':
                self.ram(r, collect)
            elif self.devs:
                self.vmsd(r, self.devs[(idstr, inst)])
            else:
                self.delimit_by_footer(r, sid)
            assert r.u8() == 0x7E, f'SEC-FOOTER at {r.p - 1}'
            assert r.be32() == sid, 'SEC-FOOTER-ID'
        return 'end of package' if in_package else None


def tr_end(d, r):
    """Whether the rest of a complete stream decodes: records, EOF, optional VM description."""
    if d.records(r, len(r.b)) != 'EOF':
        return False
    if r.p == len(r.b):
        return True
    if r.u8() != 0x06:
        return False
    n = r.be32()
    json.loads(r.take(n))
    return r.p == len(r.b)


def rp_messages(b):
    r, out = R(b), []
    while r.p < len(b):
        ty, ln = r.be16(), r.be16()
        assert ln <= 512, 'RP-LEN-MAX'
        body = R(r.take(ln))
        if ty == 5:
            name = body.str8()
            assert ln == 1 + len(name), 'RP-BITMAP-LEN'
            size = r.be64()
            bm = r.take(size)
            assert r.be64() == 0x0123456789ABCDEF, 'RP-BITMAP-ENDMARK'
            out.append((ty, name, bm))
        else:
            out.append((ty, None, body.b))
    return out


def multifd(b, v10):
    """Decodes a multifd connection per channels.md: init packet, then packets of a fixed
    1344-byte header (128 offset slots) followed by normal_pages x TPS bytes."""
    r = R(b)
    assert r.be32() == 0x11223344 and r.be32() == 1, 'MFD-MAGIC/MFD-VERSION (init)'
    r.take(56)
    packets = pages = syncs = 0
    while r.p < len(b):
        assert r.be32() == 0x11223344, 'MFD-MAGIC'
        assert r.be32() == 1, 'MFD-VERSION'
        flags, alloc, normal, _next, _num = r.be32(), r.be32(), r.be32(), r.be32(), r.be64()
        zero = r.be32() if v10 else 0
        r.take(28 if v10 else 32)
        r.take(256)
        assert alloc <= 128 and normal + zero <= alloc, 'MFD-PAGES'
        r.take(128 * 8)
        r.take(normal * TPS)
        packets += 1
        pages += normal + zero
        syncs += flags & 1
    return packets, pages, syncs


def wire_bitmap(bits):
    out = bytearray(((len(bits) + 7) // 8 + 7) // 8 * 8)
    for i, x in enumerate(bits):
        if x:
            out[i // 8] |= 1 << (i % 8)  # BITMAP-LE
    return bytes(out)


def check(v):
    CONTINUES.clear()
    files = set(os.listdir(v))
    vmdesc = json.load(open(os.path.join(v, 'vmdesc.json'))) if 'vmdesc.json' in files else None
    b = open(os.path.join(v, 'stream.bin'), 'rb').read()
    if vmdesc is None:  # precopy: the VM description follows EOF; find it by decoding to EOF
        # (a first pass without devices is impossible, so read it from the stream's tail)
        i = b.rfind(b'\x06', 0, len(b) - 2)
        while i > 0:
            n = struct.unpack_from('>I', b, i + 1)[0]
            if i + 5 + n == len(b):
                vmdesc = json.loads(b[i + 5:])
                break
            i = b.rfind(b'\x06', 0, i)
    if v.rstrip('/').endswith('footer-lookalike'):
        vmdesc = None  # exercise SEC-DELIMIT's footer scan on the vector made for it
    d = Dest(vmdesc)
    r = R(b)
    assert r.be32() == 0x5145564D, 'HDR-MAGIC'
    assert r.be32() == 3, 'HDR-VERSION'
    d.configuration(r)
    result = []
    try:
        end = d.records(r, len(b))
        if end == 'EOF' and r.p < len(b):
            assert r.u8() == 0x06, 'EOF-TRAILING'
            n = r.be32()
            json.loads(r.take(n))
            assert r.p == len(b), 'EOF-TRAILING'
            end = 'EOF + VM description'
        result.append(f'stream.bin: {end}')
    except Cut as c:
        result.append(f'stream.bin: cut inside the record at {c.args[0]}')
    if 'resume-stream.bin' in files:
        clear = {(k, i) for k, bits in d.bitmap.items() for i, x in enumerate(bits) if not x}
        answers = [m for m in rp_messages(open(os.path.join(v, 'resume-rp.bin'), 'rb').read()) if m[0] == 5]
        ok = all(wire_bitmap(d.bitmap[name]) == bm for _, name, bm in answers)
        ok = ok and [m[1] for m in answers] == list(d.blocks)
        result.append(f'RECV_BITMAP bodies equal the bitmap computed from stream.bin: {ok}')
        rr = R(open(os.path.join(v, 'resume-stream.bin'), 'rb').read())
        first = rr.b[:3]
        end = d.records(rr, len(rr.b), collect=True)
        resent = d.pages
        once = len(resent) == len(set(resent)) and set(resent) == clear
        result.append(f'resume-stream.bin starts {first.hex()} (RECV_BITMAP), ends {end}; '
                      f'{len(resent)} pages sent = exactly the {len(clear)} clear pages, once each: {once}')
        if not ok or not once:
            raise AssertionError('recovery check failed')
    for name in ('rp.bin', 'resume-rp.bin'):
        if name in files:
            msgs = rp_messages(open(os.path.join(v, name), 'rb').read())
            result.append(f'{name}: {len(msgs)} messages, types {[m[0] for m in msgs][:12]}')
    for name in sorted(f for f in files if f.startswith('multifd-conn')):
        packets, pages, syncs = multifd(open(os.path.join(v, name), 'rb').read(), '10.0' in v)
        result.append(f'{name}: {packets} packets ({syncs} SYNC), {pages} pages, ends exactly')
    counts = ', '.join(f'{k} {n}' for k, n in sorted(d.counts.items()))
    return result + [counts]


def main():
    root = os.path.join(os.path.dirname(__file__), '..', '..', 'conformance', 'vectors')
    dirs = sys.argv[1:] or sorted(
        os.path.join(root, ver, name) for ver in os.listdir(root) if ver.startswith('qemu-')
        for name in os.listdir(os.path.join(root, ver))
        if os.path.isfile(os.path.join(root, ver, name, 'stream.bin')))
    failed = 0
    for v in dirs:
        try:
            lines = check(v)
            print(f'ok   {os.path.relpath(v, root)}')
            for line in lines:
                print(f'       {line}')
        except Exception as e:  # report and go on
            failed += 1
            print(f'FAIL {os.path.relpath(v, root)}: {type(e).__name__}: {e}')
    print(f'{len(dirs) - failed}/{len(dirs)} vectors decoded from the specification alone')
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
