"""Rewrite README.md's method table from the registry (`taskmerge methods --markdown`)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

readme = Path(__file__).resolve().parents[1] / "README.md"
table = subprocess.run(["taskmerge", "methods", "--markdown"], capture_output=True, text=True, check=True).stdout
text = re.sub(r"<!-- methods:start -->.*<!-- methods:end -->",
              lambda _: f"<!-- methods:start -->\n{table.strip()}\n<!-- methods:end -->", readme.read_text(), flags=re.S)
readme.write_text(text)
