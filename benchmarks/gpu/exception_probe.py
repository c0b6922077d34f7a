"""Does a C++ exception crash this machine's Python, or only the extension's? (a crash seen once on a lent H200)

Each probe raises from C++ in a child process: torch's own shape error, and a wrong-shape call of the extension's
``line_stats``. Exit 0: the exception reached Python as it should; -11: a segfault. Also printed: the libstdc++
that the process holds once the extension is loaded.
"""
import subprocess
import sys

PROBES = (
    "torch.zeros(2) + torch.zeros(3)",
    "from pof_fast import _ext; _ext.available(); torch.ops.pof_fast.line_stats(torch.zeros(4, 6), torch.zeros(4, 5), "
    "torch.zeros(4, dtype=torch.long), torch.zeros(1), -100)",
)

LIBSTDCXX = ("from pof_fast import _ext; print(_ext.available(), sorted({line.split()[-1] for line in "
             "open('/proc/self/maps') if 'libstdc++' in line}))")

print("extension loaded, libstdc++ mapped:", subprocess.run([sys.executable, "-c", LIBSTDCXX], capture_output=True,
                                                             text=True).stdout.strip())
for probe in PROBES:
    code = f"import torch\ntry:\n    {probe}\nexcept Exception as e:\n    print(type(e).__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    print(f"C++ exception probe: exit {done.returncode} ({done.stdout.strip() or done.stderr.strip()[-200:]}): {probe}")
