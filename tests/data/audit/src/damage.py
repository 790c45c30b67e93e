"""Write garbled/audit.log: the i386 capture with damaged and inserted lines.

Usage: damage.py [DIRECTORY]  (default: the directory above this script)

The SECCOMP lines are numbered from 1 in file order; the damages are:

1. line 5 is cut inside its syscall number ("syscall=257 ..." becomes "syscall=25");
2. line 10 is cut after its exe field;
3. line 15 loses "type=" at its start, so its header no longer parses
   (its "audit(TIME:SERIAL)" stamp is still there);
4. line 20 is cut before its arch field and the second half of line 21 is
   glued to it, so the two records become one unreadable line and line 21's
   serial is lost;
5. a line of binary junk is inserted after line 25;
6. an empty line is inserted after line 30;
7. the file ends with the first 60 bytes of line 35, without a newline.

A parser that reads the finished file must find 6 garbled lines (1, 2, 3, 4, 5
and 6), one serial number that never arrives (line 21's), and one partial
last line.
"""

import sys
from pathlib import Path

directory = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
lines = (directory / "i386" / "audit.log").read_bytes().split(b"\n")[:-1]
seccomp = [index for index, line in enumerate(lines) if line.startswith(b"type=SECCOMP ")]


def nth(number):
    return seccomp[number - 1]


out = list(lines)
first = out[nth(5)]
cut = first.index(b"syscall=") + len(b"syscall=") + 2
out[nth(5)] = first[:cut]
second = out[nth(10)]
out[nth(10)] = second[: second.index(b" sig=")]
out[nth(15)] = out[nth(15)][len(b"type=") :]
glued = out[nth(20)]
out[nth(20)] = glued[: glued.index(b" arch=")] + out[nth(21)][len(out[nth(21)]) // 2 :]
out[nth(21)] = None
out.insert(nth(30) + 1, b"")
out.insert(nth(25) + 1, bytes(range(1, 10)) + b"\xff\xfe junk without a header")
partial = lines[nth(35)][:60]
text = b"\n".join(line for line in out if line is not None) + b"\n" + partial
(directory / "garbled").mkdir(exist_ok=True)
(directory / "garbled" / "audit.log").write_bytes(text)
print(f"wrote {directory / 'garbled' / 'audit.log'}")
