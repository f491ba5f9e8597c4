"""tests/probe_lookup.py runs end to end: a share of 8 lookups for each of its five wordings."""
import re
import subprocess
import sys


def test_probe_lookup_prints_a_share_per_wording():
    out = subprocess.run([sys.executable, "tests/probe_lookup.py", "tiny-qwen2.5-vl-cxr",
                          "--n", "8"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    shares = [float(x) for x in re.findall(r"^  .+ (\d\.\d{3})$", out.stdout, re.M)]
    assert len(shares) == 5 and all(round(v * 8, 6) == round(v * 8) for v in shares)  # k of 8
    assert shares[0] >= 0.5    # the base reads its own format (0.91 on 300): the letters are read
