"""crs_core: the library behind the CRS curation studio (no Streamlit in here)."""

__version__ = "0.1.0"

import os as _os

# torch/OpenMP threads spin-wait by default; on a shared 2-core machine that made training and
# generation steps 5-10x slower (measured). Passive waiting costs nothing when the CPU is free.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
