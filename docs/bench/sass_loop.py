"""Instruction histogram of the largest backward-branch loop (a kernel's main loop) in a `cuobjdump -sass` listing, such as
docs/bench/triton_asm.py writes: python docs/bench/sass_loop.py FILE.sass [how many opcodes]"""
import re, sys, collections
rx = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);")
ins = [(int(m.group(1), 16), m.group(2)) for m in map(rx.match, open(sys.argv[1])) if m]
best = None
for a, text in ins:
    m = re.search(r"BRA\s+(?:`?\(?)0x([0-9a-f]+)", text)
    if m and int(m.group(1), 16) < a:
        size = a - int(m.group(1), 16)
        if best is None or size > best[0]:
            best = (size, int(m.group(1), 16), a)
_, lo, hi = best
body = [t for a, t in ins if lo <= a <= hi]
ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
print("loop", hex(lo), hex(hi), "instructions", len(body))
print("  ".join(f"{op} {n}" for op, n in ops.most_common(int(sys.argv[2]) if len(sys.argv) > 2 else 25)))
